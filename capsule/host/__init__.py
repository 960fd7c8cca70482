"""The host API: run Capsule programs, and untrusted code, from inside a
Python application (an asyncio or trio service, or a plain script) with a
:class:`Runtime` that owns everything it starts."""

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
from capsule.host.result import RunFailure, RunResult, RunStatus
from capsule.host.runtime import RunDetails, Runtime
from capsule.host.sync import SyncRunHandle, SyncRuntime
from capsule.supervisor.options import OptionError, RunOptions

__all__ = [
    "CodeGrants",
    "CodeLimits",
    "DeliveryError",
    "InvalidRequest",
    "JournalUnavailable",
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
