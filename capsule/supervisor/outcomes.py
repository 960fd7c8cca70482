"""Who a spawned child's outcome belongs to: its parent's handle on it.

A child's outcome (its value, or its failure) is kept by the host until its
parent collects it with a wait (``result``, ``gather``, ``map``,
``capsule.wait``, ``as_completed``), whenever that comes, as futures keep
theirs. Only two things make a child's failure fail its parent instead:

- the child was spawned with ``link=True`` (OTP's link): its failure fails the
  parent at once, unless the parent is waiting on it then;
- the parent returned without ever collecting it: a failure nobody looked at
  is not lost silently.

A ``temporary`` child's failure never fails its parent, and neither does a
child its parent cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from capsule.sandbox.config import TaskConfig
from capsule.sandbox.engine import ErrorInfo
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.tree import Child

#: How to collect a child's outcome, in the errors that say one was not.
COLLECT_FIX = (
    'call handle.result(), gather() or capsule.wait() on it, or spawn it with restart="temporary"'
)


def _answerable_failure(child: Child, configs: dict[str, TaskConfig]) -> ErrorDetail | None:
    """The failure ``child`` ended with, if its parent must answer for it (not
    temporary, not cancelled by the parent), else None."""
    result = child.result
    if result is None or result.error is None or child.scope.cancelled:
        return None
    if configs[child.name].restart == "temporary":
        return None
    return result.error


def linked_failure(child: Child, configs: dict[str, TaskConfig]) -> ErrorInfo | None:
    """The failure a linked child hands its parent as it ends (None: none)."""
    error = _answerable_failure(child, configs)
    if error is None or not child.link:
        return None
    return ErrorInfo(
        "child_failed",
        f"child {child.name!r} ({child.task_id}) failed ({error.kind}); it was spawned with "
        f"link=True, so its failure fails its parent at once: {error.message}",
        traceback=error.traceback,
    )


def uncollected_failure(
    task: str, task_id: str, children: Iterable[Child], configs: dict[str, TaskConfig]
) -> ErrorInfo | None:
    """The failure of a parent that returned while the failure of one of its
    children (the first such, in spawn order) was never collected."""
    for child in children:
        if not child.done.is_set() or child.collected:
            continue  # (one still running is cancelled as its parent ends)
        error = _answerable_failure(child, configs)
        if error is not None:
            return ErrorInfo(
                "child_failed",
                f"task {task!r} ({task_id}) returned, but its child {child.name!r} "
                f"({child.task_id}) failed ({error.kind}) and that failure was never "
                f"collected: {error.message}. To handle it, {COLLECT_FIX}",
                traceback=error.traceback,
            )
    return None


def outcome(child: Child) -> dict[str, Any]:
    """An ended child's outcome as a wait's answer holds it."""
    result = child.result
    assert result is not None
    if result.error is None:
        return {"ok": True, "value": result.value()}
    return {"ok": False, "error": {**result.error.model_dump(), "attempts": result.attempts}}


def outcomes_answer(children: list[Child], delivered: set[str]) -> str:
    """A wait's answer: per child, its outcome if delivered, else null."""
    return json.dumps(
        [outcome(child) if child.task_id in delivered else None for child in children]
    )


def delivered_positions(answer: str) -> list[int]:
    """The positions a journaled ``wait_any`` answer delivered outcomes for."""
    try:
        items = json.loads(answer)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [index for index, item in enumerate(items) if item is not None]
