"""How a run ended, as the host API returns it: built from the supervisor's
report of a run it just ran, or from the journal's record of one that ended."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict

from capsule.host.errors import (
    InvalidRequest,
    JournalUnavailable,
    ProgramFailed,
    RuntimeFailure,
)

if TYPE_CHECKING:
    from capsule.journal.reader import RunRecord
    from capsule.supervisor.program import RunReport

#: How a run ended: its entry task returned, failed, or the run was stopped
#: before it ended (cancelled, or its process died: resumable; or a resume's
#: replay diverged from its journal: resumable once the program agrees with
#: the journal again).
RunStatus = Literal["completed", "failed", "interrupted", "diverged", "crashed"]
#: Each RunStatus.
_STATUSES = frozenset(get_args(RunStatus))


class RunFailure(BaseModel):
    """Why a run's entry task did not return a value."""

    model_config = ConfigDict(frozen=True)

    #: The failure's kind: ``exception``, ``timeout``, ``fuel_exhausted``,
    #: ``memory_limit``, ``cancelled``, ``divergence``, ...
    kind: str
    message: str
    #: The task that failed (the entry task's name, or the child that failed it).
    task: str | None = None
    traceback: str | None = None
    #: Whether another attempt could have ended otherwise.
    retryable: bool = True
    #: For a failure an unhandled TaskError from a child caused: that child's
    #: error (``task``, ``kind``, ``message``), where the failure began.
    cause: dict[str, Any] | None = None


class RunResult(BaseModel):
    """The outcome of a run. A program that fails is a result (``ok`` False,
    ``error`` set), not an exception; :meth:`raise_for_error` makes it one."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    status: RunStatus
    #: What the entry task returned (None unless completed).
    value: Any = None
    error: RunFailure | None = None
    #: Attempts the entry task made (None for a result read from the journal).
    attempts: int | None = None
    duration_s: float | None = None
    #: Fuel the entry task burned (its children's is in ``totals``).
    fuel_consumed: int | None = None
    peak_memory_bytes: int | None = None
    #: The whole run's counts: tasks, failed, retried, fuel_consumed, duration_ms.
    totals: dict[str, Any] | None = None
    #: What the program printed (``run_code`` only; cut to its output limit).
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def raise_for_error(self) -> Any:
        """The value if the run completed; else ProgramFailed."""
        if not self.ok:
            raise ProgramFailed(self)
        return self.value


def report_result(report: RunReport, stdout: str = "", stderr: str = "") -> RunResult:
    """The result of a run the supervisor reports; the call's error (nothing
    ran, or the journal failed) as a RunError."""
    if report.result is None or report.run_id is None:
        if report.usage_error is not None:
            raise InvalidRequest(report.usage_error, report.traceback, report.option_error)
        if report.journal_error is not None:
            raise JournalUnavailable(report.journal_error).naming(report.journal_failure)
        raise RuntimeFailure(report.runtime_error or "the run did not start", report.traceback)
    if report.journal_error is not None:
        raise JournalUnavailable(report.journal_error).naming(report.journal_failure)
    outcome = report.result
    error = outcome.error
    status = report.status
    return RunResult(
        run_id=report.run_id,
        status=status
        if status in ("interrupted", "diverged")
        else "completed"
        if outcome.ok
        else "failed",
        value=outcome.value() if status == "completed" else None,
        error=None
        if error is None
        else RunFailure(
            kind=error.kind,
            message=error.message,
            task=error.task,
            traceback=error.traceback,
            retryable=error.retryable,
            cause=error.cause if isinstance(error.cause, dict) else None,
        ),
        attempts=outcome.attempts,
        duration_s=outcome.duration_s,
        fuel_consumed=outcome.fuel_consumed,
        peak_memory_bytes=outcome.peak_memory_bytes,
        totals=report.totals,
        stdout=stdout,
        stderr=stderr,
    )


def record_result(record: RunRecord) -> RunResult:
    """The result of a run the journal holds, as far as it says (a run that
    could not start raises its error again: InvalidRequest, or RuntimeFailure
    if the host failed, as when it ran)."""
    from capsule.journal.schema import INTERNAL_ERROR

    status = record.shown_status
    error = record.error if isinstance(record.error, dict) else None
    if status == "error":
        message = str((error or {}).get("message") or f"run {record.run_id} did not start")
        if error is not None and error.get("kind") == INTERNAL_ERROR:
            traceback = error.get("traceback")
            raise RuntimeFailure(message, traceback if isinstance(traceback, str) else None)
        raise InvalidRequest(message)
    failure = None
    if error is not None and isinstance(error.get("kind"), str):
        failure = RunFailure(
            kind=error["kind"],
            message=str(error.get("message", "")),
            task=error.get("task") if isinstance(error.get("task"), str) else None,
            traceback=error.get("traceback") if isinstance(error.get("traceback"), str) else None,
            retryable=bool(error.get("retryable", True)),
        )
    shown = cast(RunStatus, status if status in _STATUSES else "interrupted")
    return RunResult(
        run_id=record.run_id,
        status=shown,
        value=json.loads(record.result_json)
        if record.result_json is not None and shown == "completed"
        else None,
        error=failure,
        duration_s=record.duration_s,
    )
