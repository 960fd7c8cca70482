"""What `capsule run` adds to a failure so that its cause is plain: the
traceback of the task where it began, and hints for common mistakes."""

from __future__ import annotations

from typing import Any

#: Where a str met a number in arithmetic or a comparison (TypeError texts).
_STR_MIXED = ("'str'", "str (not", "to str", "not str")


class FailureCauses:
    """The guest tracebacks of the tasks that failed in a run, by task name
    (the latest of each name): a TaskError that went unhandled up the tree
    names where it began, not its traceback. Bounded by the program's tasks
    (each traceback by the guest's traceback limit)."""

    def __init__(self) -> None:
        self._tracebacks: dict[str, str] = {}

    def on_failed(self, event: Any) -> None:
        traceback = event.error.traceback
        if traceback:
            self._tracebacks[event.task] = traceback

    def origin(self, error: Any) -> tuple[str, str] | None:
        """(task, traceback) of the task ``error`` began in, if another task's
        failure reached it unhandled and that task's traceback is known."""
        cause = error.cause if isinstance(error.cause, dict) else None
        if cause is None:
            return None
        task = cause.get("task")
        if not isinstance(task, str) or task == error.task:
            return None
        traceback = self._tracebacks.get(task)
        return None if traceback is None else (task, traceback)


def args_hint(error: Any) -> str | None:
    """A hint for a TypeError between a str and something else, in a run whose
    arguments came from the command line (ARGS arrive as strings)."""
    texts = [error.message]
    if isinstance(error.cause, dict):
        texts.append(str(error.cause.get("message", "")))
    for text in texts:
        if "TypeError" in text and any(mark in text for mark in _STR_MIXED):
            return (
                "ARGS on the command line reach the task as strings; pass typed values "
                "with --args-json (e.g. --args-json '[3, 2.5]'), or convert them in "
                "the task (int(x))"
            )
    return None
