"""What the TUI shows, as plain data: the run and its task tree, built from
lifecycle events (live ones, or rows of the journal) and live fuel readings.

Events arrive as dicts (``type``, ``task_id``, ``task``, ``at`` and the event's
own fields), whichever source they come from; applying one marks its task
dirty, so the screen redraws only what changed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Task states, in the order the header counts them.
STATES = (
    "pending",
    "running",
    "waiting",
    "retrying",
    "restarting",
    "completed",
    "failed",
    "cancelled",
)
#: A symbol per state, readable without colour.
SYMBOLS = {
    "pending": "·",
    "running": "▶",
    "waiting": "…",
    "retrying": "↻",
    "restarting": "⟳",
    "completed": "✓",
    "failed": "✗",
    "cancelled": "⊘",
}
COLOURS = {
    "pending": "grey62",
    "running": "bold cyan",
    "waiting": "yellow",
    "retrying": "bold magenta",
    "restarting": "magenta",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "grey50",
}
ENDED = frozenset({"completed", "failed", "cancelled"})
#: Lines of output and timeline entries kept per task.
KEEP_LINES = 500


@dataclass
class TaskView:
    task_id: str
    name: str
    parent_id: str | None = None
    state: str = "pending"
    attempt: int = 0
    max_attempts: int = 1
    started_at: float | None = None
    ended_at: float | None = None
    #: Fuel of attempts that ended, plus the running attempt's live reading.
    fuel_done: int = 0
    fuel_live: int = 0
    fuel_budget: int | None = None
    peak_memory: int | None = None
    mailbox_depth: int | None = None
    waiting_on: str | None = None
    #: Bytes its instance gave back while it waited (hibernated), if it did.
    hibernated_bytes: int | None = None
    #: The name it was registered under at spawn (``spawn(name=...)``), if any.
    actor_name: str | None = None
    call: str | None = None
    result: str | None = None
    #: Whether ``result`` is the whole result read from the journal (an event
    #: carries a preview: its first PREVIEW_CHARS characters).
    whole_result: bool = False
    error: dict[str, Any] | None = None
    #: What it printed: (attempt, line) pairs, so that each attempt's output
    #: shows apart from the one before (a guest cannot print a separator).
    output: list[tuple[int, str]] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    replayed: bool = False
    children: list[str] = field(default_factory=list)

    @property
    def fuel(self) -> int:
        return self.fuel_done + self.fuel_live

    def elapsed(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or now) - self.started_at


class RunModel:
    """A run as the TUI knows it."""

    def __init__(self, run_id: str = "", program: str = "") -> None:
        self.run_id = run_id
        self.program = program
        self.started_at: float | None = None
        self.ended_at: float | None = None
        #: The run's outcome once it ended: completed, failed, interrupted, ...
        self.status = "running"
        self.exit_code: int | None = None
        self.tasks: dict[str, TaskView] = {}
        self.roots: list[str] = []
        self.dirty: set[str] = set()
        #: The task whose state changed last (for "follow").
        self.latest: str | None = None
        #: State changes so far (follow moves the cursor only on a new one).
        self.state_changes = 0

    # -- events ----------------------------------------------------------------

    def task(self, task_id: str, name: str) -> TaskView:
        view = self.tasks.get(task_id)
        if view is None:
            view = self.tasks[task_id] = TaskView(task_id, name)
        return view

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        task_id = str(event.get("task_id", ""))
        name = str(event.get("task", task_id))
        at = float(event.get("at") or time.time())
        if self.started_at is None or at < self.started_at:
            self.started_at = at
        if task_id.startswith("<"):  # output while the program was loading
            return
        view = self.task(task_id, name)
        self.dirty.add(task_id)
        if kind == "output":
            text = str(event.get("text", ""))
            view.output.extend((view.attempt, line) for line in text.splitlines() or [""])
            del view.output[:-KEEP_LINES]
            return
        if kind == "pending":
            parent = event.get("parent_id")
            if view.parent_id is None and parent is not None:
                view.parent_id = str(parent)
                siblings = self.task(view.parent_id, view.parent_id).children
                if task_id not in siblings:
                    siblings.append(task_id)
                self.dirty.add(view.parent_id)
            elif parent is None and task_id not in self.roots:
                self.roots.append(task_id)
            view.max_attempts = int(event.get("max_attempts", 1))
            view.call = event.get("call") or view.call
            actor_name = event.get("actor_name")
            view.actor_name = view.actor_name if actor_name is None else str(actor_name)
            self._state(view, "pending", at, "pending")
        elif kind == "started":
            view.attempt = int(event.get("attempt", view.attempt + 1))
            view.max_attempts = int(event.get("max_attempts", view.max_attempts))
            view.fuel_budget = event.get("fuel_budget", view.fuel_budget)
            view.fuel_live = 0
            view.hibernated_bytes = None
            if view.started_at is None:
                view.started_at = at
            view.ended_at = None
            self._state(view, "running", at, f"started attempt {view.attempt}")
        elif kind == "waiting":
            view.waiting_on = str(event.get("on", ""))
            self._state(view, "waiting", at, f"waiting on {view.waiting_on}")
        elif kind == "hibernated":
            view.hibernated_bytes = int(event.get("released_bytes", 0))
            view.timeline.append(
                (at, f"hibernated: gave back {view.hibernated_bytes / 2**20:.1f} MB only read")
            )
        elif kind == "resumed":
            view.waiting_on = view.hibernated_bytes = None
            self._state(view, "running", at, "resumed")
        elif kind == "retrying":
            self._ended_attempt(view, event)
            error = event.get("error") or {}
            view.error = error
            self._state(
                view,
                "retrying",
                at,
                f"attempt {event.get('attempt')} failed ({error.get('kind')}): "
                f"{error.get('message')}; retrying in {float(event.get('backoff_s', 0)):.2f}s",
            )
        elif kind == "restarting":
            self._state(view, "restarting", at, f"restarting: {event.get('reason')}")
        elif kind == "completed":
            self._ended_attempt(view, event)
            view.result = event.get("result")
            view.whole_result = False
            view.error = None
            view.ended_at = at
            self._state(view, "completed", at, f"completed attempt {event.get('attempt')}")
        elif kind in ("failed", "cancelled"):
            self._ended_attempt(view, event)
            error = event.get("error") or {}
            view.error = error
            view.ended_at = at
            self._state(view, kind, at, f"{kind} ({error.get('kind')}): {error.get('message')}")
        elif kind == "replayed":
            view.replayed = True
            outcome = event.get("outcome")
            if outcome is not None:
                view.attempt = int(event.get("attempt", view.attempt))
                view.ended_at = view.started_at = at
                self._state(view, str(outcome), at, f"{outcome}, from the journal")
            else:
                view.timeline.append((at, f"replaying {event.get('steps')} journaled host calls"))
        elif kind == "http":
            status = event.get("status") or event.get("error_kind")
            view.timeline.append((at, f"http {event.get('method')} {event.get('url')} -> {status}"))
        elif kind == "messages_returned":
            count = len(event.get("message_ids") or [])
            view.timeline.append(
                (at, f"{count} message(s) it had not received back in its mailbox")
            )
        elif kind in ("message_sent", "message_received"):
            other = event.get("target_id") or event.get("sender_id")
            word = "sent to" if kind == "message_sent" else "received from"
            view.timeline.append((at, f"message {event.get('message_id')} {word} {other}"))
        del view.timeline[:-KEEP_LINES]

    def _state(self, view: TaskView, state: str, at: float, note: str) -> None:
        view.state = state
        view.timeline.append((at, note))
        self.latest = view.task_id
        self.state_changes += 1

    @staticmethod
    def _ended_attempt(view: TaskView, event: dict[str, Any]) -> None:
        view.fuel_done += int(event.get("fuel_consumed", 0))
        view.fuel_live = 0
        peak = event.get("peak_memory_bytes")
        if isinstance(peak, int):  # the task's largest, over its attempts
            view.peak_memory = max(peak, view.peak_memory or 0)

    def apply_live(self, live: list[Any]) -> None:
        """Live readings of running attempts (``Run.snapshot()``)."""
        for reading in live:
            view = self.tasks.get(reading.task_id)
            if view is None or view.state in ENDED:
                continue
            if view.fuel_live != reading.fuel_used or view.mailbox_depth != reading.mailbox_depth:
                view.fuel_live = reading.fuel_used
                view.mailbox_depth = reading.mailbox_depth
                view.fuel_budget = view.fuel_budget or reading.fuel_budget
                self.dirty.add(reading.task_id)

    def finish(self, status: str, exit_code: int | None = None, at: float | None = None) -> None:
        self.status = status
        self.exit_code = exit_code
        self.ended_at = at or time.time()

    # -- what the header shows ---------------------------------------------------

    def children_of(self, task_id: str | None) -> list[str]:
        """A task's children (None: the roots), in task order."""
        ids = self.roots if task_id is None else self.task(task_id, task_id).children
        return sorted(ids, key=task_order)

    def counts(self) -> Counter[str]:
        return Counter(view.state for view in self.tasks.values())

    def total_fuel(self) -> int:
        return sum(view.fuel for view in self.tasks.values())

    def elapsed(self, now: float | None = None) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or now or time.time()) - self.started_at


def task_order(task_id: str) -> tuple[tuple[int, int, str], ...]:
    """Where a task stands among its siblings: by its number ("main/2" before
    "main/10"), the order they were spawned in; live and replayed alike."""
    return tuple(
        (0, int(part), "") if part.isascii() and part.isdigit() else (1, 0, part)
        for part in task_id.split("/")
    )


def pretty_json(text: str | None) -> str:
    if text is None:
        return "-"
    try:
        return json.dumps(json.loads(text), indent=2)
    except (ValueError, RecursionError):  # a preview cut short; nested too deep
        return text
