"""The host API: run Capsule programs, and untrusted code, from inside a
Python application (an asyncio or trio service, or a plain script) with a
:class:`Runtime` that owns everything it starts.

Its names are imported from their modules when first asked for: a caller of
one part (the ``capsule`` command runs programs, never untrusted code) loads
no other."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsule.host.code import CodeGrants, CodeLimits
    from capsule.host.errors import (
        DeliveryError,
        InvalidRequest,
        JournalUnavailable,
        NotResumable,
        ProgramFailed,
        RunError,
        RunNotFound,
        RuntimeFailure,
    )
    from capsule.host.handle import RunHandle
    from capsule.host.live import LiveTask
    from capsule.host.result import RunFailure, RunResult, RunStatus
    from capsule.host.runtime import RunDetails, Runtime
    from capsule.host.sync import SyncRunHandle, SyncRuntime
    from capsule.supervisor.options import OptionError, RunOptions

#: Each public name, and the module it comes from.
_MODULES = {
    "CodeGrants": "capsule.host.code",
    "CodeLimits": "capsule.host.code",
    "DeliveryError": "capsule.host.errors",
    "InvalidRequest": "capsule.host.errors",
    "JournalUnavailable": "capsule.host.errors",
    "NotResumable": "capsule.host.errors",
    "ProgramFailed": "capsule.host.errors",
    "RunError": "capsule.host.errors",
    "RunNotFound": "capsule.host.errors",
    "RuntimeFailure": "capsule.host.errors",
    "RunHandle": "capsule.host.handle",
    "LiveTask": "capsule.host.live",
    "RunFailure": "capsule.host.result",
    "RunResult": "capsule.host.result",
    "RunStatus": "capsule.host.result",
    "RunDetails": "capsule.host.runtime",
    "Runtime": "capsule.host.runtime",
    "SyncRunHandle": "capsule.host.sync",
    "SyncRuntime": "capsule.host.sync",
    "OptionError": "capsule.supervisor.options",
    "RunOptions": "capsule.supervisor.options",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'capsule.host' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])


__all__ = [
    "CodeGrants",
    "CodeLimits",
    "DeliveryError",
    "InvalidRequest",
    "JournalUnavailable",
    "LiveTask",
    "NotResumable",
    "OptionError",
    "ProgramFailed",
    "RunDetails",
    "RunError",
    "RunFailure",
    "RunHandle",
    "RunNotFound",
    "RunOptions",
    "RunResult",
    "RunStatus",
    "Runtime",
    "RuntimeFailure",
    "SyncRunHandle",
    "SyncRuntime",
]
