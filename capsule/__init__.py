"""Capsule: a runtime for multi-agent workflows where every task runs in its own
WebAssembly sandbox.

This top-level package is what user programs import (``from capsule import task``).
It re-exports the SDK, and must stay light: the same package is loaded inside
the sandbox, where wasmtime, pydantic and the rest of the host do not exist. The
host API's names (``capsule.Runtime``, ...) are reached lazily, from
:mod:`capsule.host`, on first use; so are the SDK's, on the host.
"""

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or sys.platform == "wasi":
    # (In the sandbox at once: the guest's snapshot holds them. A host that
    # only runs programs, the CLI, never needs them.)
    from capsule.sdk.errors import (
        MessageError,
        NonRetryable,
        ReceiveTimeout,
        SendTimeout,
        TaskError,
    )
    from capsule.sdk.messaging import Message, ask, ask_async, receive, receive_async, send
    from capsule.sdk.task import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        DoneAndPending,
        TaskFunction,
        TaskHandle,
        TaskInfo,
        as_completed,
        current,
        gather,
        sleep,
        task,
        task_ref,
        wait,
    )

#: The SDK's names, by the module that defines them: on the host, imported
#: when first asked for.
_SDK_MODULES = {
    **dict.fromkeys(
        ("MessageError", "NonRetryable", "ReceiveTimeout", "SendTimeout", "TaskError"),
        "capsule.sdk.errors",
    ),
    **dict.fromkeys(
        ("Message", "ask", "ask_async", "receive", "receive_async", "send"),
        "capsule.sdk.messaging",
    ),
    **dict.fromkeys(
        (
            "ALL_COMPLETED",
            "FIRST_COMPLETED",
            "FIRST_EXCEPTION",
            "DoneAndPending",
            "TaskFunction",
            "TaskHandle",
            "TaskInfo",
            "as_completed",
            "current",
            "gather",
            "sleep",
            "task",
            "task_ref",
            "wait",
        ),
        "capsule.sdk.task",
    ),
}

if TYPE_CHECKING:
    from capsule.host import (
        CodeGrants,
        CodeLimits,
        DeliveryError,
        InvalidRequest,
        JournalUnavailable,
        LiveTask,
        NotResumable,
        ProgramFailed,
        RunError,
        RunFailure,
        RunHandle,
        RunNotFound,
        RunOptions,
        RunResult,
        Runtime,
        RuntimeFailure,
        SyncRunHandle,
        SyncRuntime,
    )

#: The host API's names, imported from capsule.host when first asked for.
_HOST_NAMES = frozenset(
    {
        "CodeGrants",
        "CodeLimits",
        "DeliveryError",
        "InvalidRequest",
        "JournalUnavailable",
        "LiveTask",
        "NotResumable",
        "ProgramFailed",
        "RunError",
        "RunFailure",
        "RunHandle",
        "RunNotFound",
        "RunOptions",
        "RunResult",
        "Runtime",
        "RuntimeFailure",
        "SyncRunHandle",
        "SyncRuntime",
    }
)


def __getattr__(name: str) -> Any:
    if name in _HOST_NAMES:
        from capsule import host

        return getattr(host, name)
    module = _SDK_MODULES.get(name)
    if module is not None:
        from importlib import import_module

        return getattr(import_module(module), name)
    raise AttributeError(f"module 'capsule' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "DoneAndPending",
    "Message",
    "MessageError",
    "NonRetryable",
    "ReceiveTimeout",
    "SendTimeout",
    "TaskError",
    "TaskFunction",
    "TaskHandle",
    "TaskInfo",
    "as_completed",
    "ask",
    "ask_async",
    "current",
    "gather",
    "receive",
    "receive_async",
    "send",
    "sleep",
    "task",
    "task_ref",
    "wait",
]
if sys.platform != "wasi":  # (inside the sandbox the host API does not exist)
    __all__ += [
        "CodeGrants",
        "CodeLimits",
        "DeliveryError",
        "InvalidRequest",
        "JournalUnavailable",
        "LiveTask",
        "NotResumable",
        "ProgramFailed",
        "RunError",
        "RunFailure",
        "RunHandle",
        "RunNotFound",
        "RunOptions",
        "RunResult",
        "Runtime",
        "RuntimeFailure",
        "SyncRunHandle",
        "SyncRuntime",
    ]
__version__ = "0.1.0"
