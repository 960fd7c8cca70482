"""Typed lifecycle events and the in-process stream that carries them.

Every change in a task's life is one pydantic model, emitted on an
:class:`EventStream`. The CLI renders them (``--verbose``); later the journal
and the TUI subscribe to the same stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str
    message: str
    task: str
    traceback: str | None = None
    #: For a failure caused by an unhandled TaskError from a child: the original
    #: failure, {"task", "kind", "message", "via"}.
    cause: dict[str, Any] | None = None
    #: Whether another attempt could have ended otherwise (see supervisor.retry):
    #: False for a failure no retry can fix, which is therefore not retried.
    retryable: bool = True


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    task_id: str
    task: str
    at: float = Field(default_factory=time.time)


#: Longest preview of a task's arguments or result carried by an event.
PREVIEW_CHARS = 400


def preview(text: str | None) -> str | None:
    """``text`` cut to PREVIEW_CHARS (events carry previews, the journal the rest)."""
    if text is None or len(text) <= PREVIEW_CHARS:
        return text
    return text[: PREVIEW_CHARS - 3] + "..."


class TaskPending(_Event):
    type: Literal["pending"] = "pending"
    parent_id: str | None
    max_attempts: int
    #: The arguments, as JSON ``{"args": [...], "kwargs": {...}}`` (a preview;
    #: ``[args, kwargs]`` in older journals).
    call: str | None = None
    #: The name it was registered under at spawn (``spawn(name=...)``), if any.
    actor_name: str | None = None


class TaskStarted(_Event):
    type: Literal["started"] = "started"
    attempt: int
    max_attempts: int
    #: Fuel the attempt may burn.
    fuel_budget: int | None = None
    #: Times its supervisor restarted it before this attempt (a permanent
    #: child that returned, or one_for_all / rest_for_one): restarts are
    #: numbered apart from attempts, which go on counting across them, while
    #: max_attempts bounds the attempts after each (re)start.
    restart: int = 0


class TaskRetrying(_Event):
    type: Literal["retrying"] = "retrying"
    attempt: int
    error: ErrorDetail
    backoff_s: float
    #: What the attempt that failed burned.
    fuel_consumed: int = 0
    #: The failed attempt's memory at its end (see TaskCompleted).
    peak_memory_bytes: int | None = None


class TaskCompleted(_Event):
    type: Literal["completed"] = "completed"
    attempt: int
    duration_ms: float
    fuel_consumed: int
    #: Size of its linear memory at the end of the attempt, its largest (None
    #: where it cannot be measured cheaply: before Linux 6.11).
    peak_memory_bytes: int | None = None
    #: The returned value, as JSON (a preview).
    result: str | None = None


class TaskFailed(_Event):
    type: Literal["failed"] = "failed"
    attempt: int
    error: ErrorDetail
    duration_ms: float
    fuel_consumed: int
    #: Size of its linear memory at the end of the attempt, its largest (None
    #: where it cannot be measured cheaply: before Linux 6.11).
    peak_memory_bytes: int | None = None


class TaskCancelled(_Event):
    """The task was stopped from outside: its parent ended or cancelled it, its
    caller's deadline passed, or the run was interrupted."""

    type: Literal["cancelled"] = "cancelled"
    attempt: int
    error: ErrorDetail
    duration_ms: float
    fuel_consumed: int
    #: Size of its linear memory at the end of the attempt, its largest (None
    #: where it cannot be measured cheaply: before Linux 6.11).
    peak_memory_bytes: int | None = None


class TaskRestarting(_Event):
    """A supervised child starts again (a permanent child returned, or a sibling's
    failure restarts it under one_for_all / rest_for_one)."""

    type: Literal["restarting"] = "restarting"
    reason: str
    #: What the attempt that failed burned (0 after one that returned: its
    #: ``completed`` event has it).
    fuel_consumed: int = 0
    #: The attempt that ended, and the number of this restart (1 for the first).
    attempt: int = 0
    restart: int = 0


WaitReason = Literal["result", "receive", "sleep", "send", "http"]


class TaskWaiting(_Event):
    """The task is blocked in a host call (its CPU slot is free meanwhile)."""

    type: Literal["waiting"] = "waiting"
    on: WaitReason


class TaskHibernated(_Event):
    """The task, waiting, gave back the memory pages it had only read (see
    RunSettings.hibernate_after); it reads them back as it needs them."""

    type: Literal["hibernated"] = "hibernated"
    released_bytes: int


class TaskResumed(_Event):
    """The task's blocking host call returned; it runs again."""

    type: Literal["resumed"] = "resumed"


class MessageSent(_Event):
    """A message was put in ``target_id``'s mailbox (``task_id`` sent it)."""

    type: Literal["message_sent"] = "message_sent"
    message_id: str
    target_id: str
    size: int
    expects_reply: bool


class MessageReceived(_Event):
    """``task_id`` took a message out of its mailbox."""

    type: Literal["message_received"] = "message_received"
    message_id: str
    sender_id: str


class MessagesReturned(_Event):
    """Messages the attempt had taken from its mailbox in one batch and its code
    never received went back to the front of its mailbox as it ended."""

    type: Literal["messages_returned"] = "messages_returned"
    attempt: int
    message_ids: list[str]


class TaskReplayed(_Event):
    """Part of the task came from the journal of the run being resumed: its
    outcome (``outcome`` set; the task did not execute again), or the first
    ``steps`` host calls of the attempt now re-executing (``outcome`` None)."""

    type: Literal["replayed"] = "replayed"
    attempt: int
    steps: int
    outcome: Literal["completed", "failed", "cancelled"] | None = None


class HttpExchange(_Event):
    """The host performed an HTTP request for the task (``url`` with key-like
    parameters redacted; headers are never in events)."""

    type: Literal["http"] = "http"
    method: str
    url: str
    status: int | None
    error_kind: str | None = None
    duration_ms: float
    request_bytes: int
    response_bytes: int


class RunWarning(_Event):
    """Something the user should know as the program loads, that does not stop
    the run (a declared environment variable that is not set)."""

    type: Literal["warning"] = "warning"
    text: str


class TaskOutput(_Event):
    type: Literal["output"] = "output"
    stream: Literal["stdout", "stderr"]
    text: str


TaskEvent = Annotated[
    TaskPending
    | TaskStarted
    | TaskRetrying
    | TaskCompleted
    | TaskFailed
    | TaskCancelled
    | TaskRestarting
    | TaskWaiting
    | TaskHibernated
    | TaskResumed
    | MessageSent
    | MessageReceived
    | MessagesReturned
    | TaskReplayed
    | HttpExchange
    | RunWarning
    | TaskOutput,
    Field(discriminator="type"),
]

Subscriber = Callable[[Any], None]

#: Every event type (the ``type`` of each model in TaskEvent).
EVENT_TYPES: frozenset[str] = frozenset(
    model.model_fields["type"].default for model in get_args(get_args(TaskEvent)[0])
)
#: One event per message sent or received: a run that nobody watches that
#: closely (no TUI) does not build them.
MESSAGE_EVENT_TYPES = frozenset({"message_sent", "message_received"})


class EventStream:
    """Fan-out of events to subscribers, in emission order, from any thread.

    Subscribers are called synchronously under a lock (events from worker threads
    and the event loop are serialised), so they must be quick and must not emit.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, frozenset[str] | None]] = []
        self._lock = threading.Lock()
        #: The types some subscriber takes (None: all).
        self._wanted: frozenset[str] | None = frozenset()

    def subscribe(
        self, subscriber: Subscriber, types: Collection[str] | None = None
    ) -> Callable[[], None]:
        """Add a subscriber for ``types`` (None: every event); returns a function
        that removes it."""
        entry = (subscriber, None if types is None else frozenset(types))
        with self._lock:
            self._subscribers.append(entry)
            self._update_wanted()

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._subscribers:
                    self._subscribers.remove(entry)
                    self._update_wanted()

        return unsubscribe

    def _update_wanted(self) -> None:
        wanted: frozenset[str] | None = frozenset()
        for _, types in self._subscribers:
            wanted = None if wanted is None or types is None else wanted | types
        self._wanted = wanted

    def wants(self, event_type: str) -> bool:
        """Whether any subscriber takes events of ``event_type``: an emitter
        may skip building one nobody takes."""
        wanted = self._wanted
        return wanted is None or event_type in wanted

    def emit(self, event: Any) -> None:
        with self._lock:
            for subscriber, types in list(self._subscribers):
                if types is None or event.type in types:
                    subscriber(event)
