"""The exceptions of the host API: what went wrong with a call, as opposed to
a program that ran and failed (that is a value, on :class:`RunResult`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capsule.host.result import RunResult
    from capsule.supervisor.option_specs import Naming, Worded
    from capsule.supervisor.options import OptionError


class RunError(Exception):
    """Base of every error of a host API call; ``kind`` names the sort of
    error; ``traceback``, if not None, where it came from (the guest's, for a
    program whose import raised; the host's, for a host bug)."""

    kind = "error"
    traceback: str | None = None
    #: The error this one reports, if its message names settings of a run
    #: (a run option, the journal): ``worded`` names them as a caller spells them.
    named: Worded | None = None

    def worded(self, naming: Naming) -> str:
        """The message, with each setting it names named by ``naming`` (the
        CLI's flags: ``flag_of``)."""
        return str(self) if self.named is None else self.named.worded(naming)

    def naming(self, named: Worded | None) -> RunError:
        """This error, reporting ``named`` (see :meth:`worded`)."""
        self.named = named
        return self


class InvalidRequest(RunError):
    """The call cannot be served as asked: a bad option, run id, argument or
    grant, a missing program, or a program that does not load. The message
    names the option, the value and the fix; ``option_error``, if the run
    option (or the capsule.toml setting) that could not be used is why, says
    which (its ``worded(naming)`` names it as the caller spells options)."""

    kind = "config"

    def __init__(
        self,
        message: str,
        traceback: str | None = None,
        option_error: OptionError | None = None,
    ) -> None:
        super().__init__(message)
        self.traceback = traceback
        self.option_error = option_error
        self.named = option_error


class JournalUnavailable(RunError):
    """The journal cannot be opened, read or written (the message says why)."""

    kind = "journal"


class RunNotFound(RunError):
    """No run of that id in the journal (or the Runtime has no journal)."""

    kind = "not_found"


class NotResumable(RunError):
    """The run cannot be resumed: it ended, it is running, or its program changed."""

    kind = "not_resumable"


class RuntimeFailure(RunError):
    """Capsule itself failed (the guest runtime could not be built, or a host
    bug; ``traceback`` has the host's traceback then)."""

    kind = "runtime"

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


class DeliveryError(RunError):
    """A message from the host application was not delivered or answered.
    ``kind`` is ``no_such_actor``, ``mailbox_full``, ``queue_full``,
    ``too_large``, ``timeout``, ``actor_ended`` or ``run_ended``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ProgramFailed(RunError):
    """Raised by :meth:`RunResult.raise_for_error` for a run that did not
    complete; ``result`` is the run's result, ``kind`` its error's kind."""

    def __init__(self, result: RunResult) -> None:
        error = result.error
        message = (
            f"run {result.run_id} {result.status}"
            if error is None
            else f"run {result.run_id} {result.status}: task {error.task!r} "
            f"({error.kind}): {error.message}"
        )
        super().__init__(message)
        self.result = result
        self.kind = error.kind if error is not None else result.status
