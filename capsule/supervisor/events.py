"""The run's events: the public, versioned schema, its JSON-lines form, and
the in-process stream that carries them.

Every change in a task's life is one pydantic model with a ``type`` literal,
emitted on an :class:`EventStream`; the journal, the CLI (``--verbose``,
``--events jsonl``) and the TUI subscribe to it. A run also has a start and an
end (:class:`RunStarted`, :class:`RunEnded`). :data:`Event` is the union of
them all, the schema that ``docs/events.md`` documents; :func:`event_json`
writes one as a JSON line and :func:`parse_event` reads it back.

The schema is versioned by :data:`EVENTS_SCHEMA_VERSION`. Adding an event type
or a field leaves it as it is: readers ignore fields they do not know, and
:func:`parse_event` returns an :class:`UnknownEvent` for a type it does not
know (a new field has a default, so that lines of older runtimes still parse).
Removing or renaming an event type or a field, changing a field's type or
meaning, giving a field a value it could not take before, or dropping an order
between events bumps it.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

#: The version of the event schema (see the module docstring for what bumps it).
EVENTS_SCHEMA_VERSION = 2


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

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
    model_config = ConfigDict(frozen=True, defer_build=True)

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


_TaskEvents = (
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
    | TaskOutput
)
TaskEvent = Annotated[_TaskEvents, Field(discriminator="type")]


class _RunEvent(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    at: float = Field(default_factory=time.time)


class RunStarted(_RunEvent):
    """The run began (or a resume of it): the first event of its stream, before
    anything the program prints as it loads."""

    type: Literal["run_started"] = "run_started"
    run_id: str
    #: The program file, as an absolute path.
    program: str
    #: The task run as the root of the tree (``main`` unless another was named).
    entry: str
    #: Whether this is a resume of a run that stopped before it ended.
    resumed: bool = False
    #: The EVENTS_SCHEMA_VERSION of the runtime writing the stream.
    schema_version: int = EVENTS_SCHEMA_VERSION


#: How a run ended: its entry task returned or failed; it was stopped (Ctrl-C,
#: SIGTERM: resumable); a resume's replay diverged from its journal (resumable
#: once its program agrees with the journal again); or nothing ran.
RunStatus = Literal["completed", "failed", "interrupted", "diverged", "error"]


class RunEnded(_RunEvent):
    """The run ended: the last event of its stream. It is made from the run's
    final outcome, once its journal recorded it, so it is not emitted on the
    run's EventStream (whose subscribers are gone by then)."""

    type: Literal["run_ended"] = "run_ended"
    #: None if the run never got an id (its program could not be loaded).
    run_id: str | None
    #: completed, failed, interrupted, diverged, or error (nothing ran).
    status: RunStatus
    #: The outcome as ``capsule run --json`` prints it: ``success``, ``result``,
    #: ``error``, ``execution``, ``totals``.
    envelope: dict[str, Any]


#: Every event of a run: the schema non-Python callers read (docs/events.md).
Event = Annotated[RunStarted | RunEnded | _TaskEvents, Field(discriminator="type")]


def _types_of(union: Any) -> frozenset[str]:
    return frozenset(model.model_fields["type"].default for model in get_args(get_args(union)[0]))


#: Every event type of the schema.
EVENT_TYPES: frozenset[str] = _types_of(Event)
#: The types of the events about tasks (TaskEvent: each has a task_id).
TASK_EVENT_TYPES: frozenset[str] = _types_of(TaskEvent)
#: The run's start and end.
RUN_EVENT_TYPES: frozenset[str] = EVENT_TYPES - TASK_EVENT_TYPES
#: One event per message sent or received: a run that nobody watches that
#: closely (no TUI) does not build them.
MESSAGE_EVENT_TYPES = frozenset({"message_sent", "message_received"})


class UnknownEvent(BaseModel):
    """An event of a type this version of Capsule does not know (written by a
    newer one): its ``type`` and, as extra fields, the rest of what it holds."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str


@functools.cache
def _event_adapter() -> TypeAdapter[Event]:
    """The union's validator, built when first asked for: building it builds
    every event's schema, which a run that only makes events never needs."""
    return TypeAdapter(Event)


Subscriber = Callable[[Any], None]


def event_json(event: BaseModel) -> str:
    """``event`` as one line of JSON (without the newline), ``type`` included.

    Pure ASCII: every character of guest text that could end the line, confuse
    a terminal or a JavaScript reader (newlines, U+2028, NULs, escape sequences)
    is a JSON escape; a lone surrogate becomes U+FFFD and a non-finite number
    null, which strict JSON readers require."""
    data = event.model_dump(mode="json")
    return json.dumps(
        _portable({"type": data.pop("type"), **data}),  # (type first: easier to read)
        ensure_ascii=True,
        allow_nan=False,
        separators=(",", ":"),
    )


def _portable(value: Any) -> Any:
    """``value`` (as model_dump gives it) with what JSON cannot carry replaced."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A pair of surrogates is one character; a lone one, U+FFFD.
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, float):
        return value if value - value == 0 else None  # NaN and infinities: null
    if isinstance(value, dict):
        return {_portable(key): _portable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(item) for item in value]
    return value


def parse_event(line: str | bytes) -> Event | UnknownEvent:
    """The typed event of one JSON line (as :func:`event_json` writes it). An
    event of a type this version does not know is an :class:`UnknownEvent`;
    fields it does not know are ignored. Raises ValueError for a line that is
    not an event (not JSON, not an object with a string ``type``, or a known
    type whose fields do not validate)."""
    try:
        return _event_adapter().validate_json(line)
    except ValidationError as exc:
        if not any(error["type"] == "union_tag_invalid" for error in exc.errors()):
            raise ValueError(f"not an event: {_first_error(exc)}") from None
    try:
        return UnknownEvent.model_validate(json.loads(line))
    except ValidationError as exc:
        raise ValueError(f"not an event: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"][1:])  # (loc[0]: the model)
    return f"{where}: {error['msg']}" if where else str(error["msg"])


class EventStream:
    """Fan-out of events to subscribers, in emission order, from any thread.

    Subscribers are called synchronously under a lock (events from worker threads
    and the event loop are serialised), so they must be quick and must not emit.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, frozenset[str]]] = []
        self._lock = threading.Lock()
        #: The types some subscriber takes.
        self._wanted: frozenset[str] = frozenset()

    def subscribe(
        self, subscriber: Subscriber, types: Collection[str] | None = None
    ) -> Callable[[], None]:
        """Add a subscriber for ``types`` (None: every task event; the run's own
        events, which have no task, go only to subscribers that name them);
        returns a function that removes it."""
        entry = (subscriber, TASK_EVENT_TYPES if types is None else frozenset(types))
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
        self._wanted = frozenset().union(*(types for _, types in self._subscribers))

    def wants(self, event_type: str) -> bool:
        """Whether any subscriber takes events of ``event_type``: an emitter
        may skip building one nobody takes."""
        return event_type in self._wanted

    def emit(self, event: Any) -> None:
        with self._lock:
            for subscriber, types in list(self._subscribers):
                if event.type in types:
                    subscriber(event)
