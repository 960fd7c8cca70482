"""Capsule: a runtime for multi-agent workflows where every task runs in its own
WebAssembly sandbox.

This top-level package is what user programs import (``from capsule import task``).
It re-exports the SDK only and must stay light: the same package is loaded inside
the sandbox, where wasmtime, pydantic and the rest of the host do not exist.
"""

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
    wait,
)

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
    "wait",
]
__version__ = "0.1.0"
