"""Steps: the host calls of a task attempt, numbered, recorded as they are
answered, and replayed when a journaled run is resumed.

The supervisor knows what a step is; where steps are kept is the journal's
business (``capsule.journal``), which implements :class:`StepLog` and builds the
:class:`History` of an earlier run. A run without a journal uses
:class:`NoStepLog` and no history.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from capsule.supervisor.option_specs import WordedError

if TYPE_CHECKING:
    from capsule.supervisor.tree import TaskResult


#: A string as JSON, exactly as ``json.dumps`` writes it.
json_string = json.encoder.encode_basestring_ascii


def json_strings(*texts: str) -> str:
    """``json.dumps(list(texts))``, byte for byte (a replay compares requests as
    text, with those of journals written before), at a tenth of its cost: one
    is built on every journaled message."""
    return f"[{', '.join(map(json_string, texts))}]"


#: What the guest asked: canonical JSON text, or the strings of a JSON array of
#: strings (what most requests are), whose text is ``json_strings(*request)``:
#: built only if a replay compares it. A journal keeps such a request as the
#: array itself (encoding it as text inside its batch, then again as a string,
#: cost the journal's thread a third of its time on a stream of messages).
Request = str | tuple[str, ...]


def request_text(request: str | Sequence[str]) -> str:
    """A request (or one read back from a journal: a list) as the canonical
    JSON text a replay compares."""
    return request if isinstance(request, str) else json_strings(*request)


#: A received message as a receive step's answer holds it: id, sender, body
#: (JSON text), expects_reply.
Received = tuple[str, str, str, bool]


def received_answer(messages: Sequence[Received]) -> str:
    """A receive step's answer, as journaled: ``{"messages": [[id, sender,
    body, expects_reply], ...]}``, each body a JSON string holding the body's
    JSON text (never spliced in as a value)."""
    return json.dumps({"messages": [list(message) for message in messages]})


def received_messages(answer: str) -> list[Received]:
    """The messages of a receive step's answer, from any journal: the form
    above, or the older ones (version 5 to 8: an array [id, sender, body,
    expects_reply], or an array of them, the body as a JSON value; before
    version 5: an object). ValueError if it is none of these."""
    data = json.loads(answer)
    if isinstance(data, dict) and "messages" in data:
        rows = data["messages"]
        if not isinstance(rows, list):
            raise ValueError("malformed receive answer")
        return [_received(row, body_is_text=True) for row in rows]
    if isinstance(data, dict):  # (before version 5)
        return [
            _received(
                [data.get("id"), data.get("sender"), data.get("body"), data.get("expects_reply")],
                body_is_text=False,
            )
        ]
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [_received(row, body_is_text=False) for row in data]
    return [_received(data, body_is_text=False)]


def _received(row: object, body_is_text: bool) -> Received:
    if not isinstance(row, list) or len(row) != 4:
        raise ValueError("malformed message in a receive answer")
    message_id, sender, body, expects_reply = row
    if not body_is_text:
        body = json.dumps(body)
    if not (
        isinstance(message_id, str)
        and isinstance(sender, str)
        and isinstance(body, str)
        and isinstance(expects_reply, bool)
    ):
        raise ValueError("malformed message in a receive answer")
    return message_id, sender, body, expects_reply


class Step(NamedTuple):
    """One answered host call of an attempt, as a resume replays it. (A named
    tuple: a resume reads thousands, and a frozen dataclass costs four times
    more.)"""

    kind: str
    #: What the guest asked, as canonical JSON: a replay must ask the same.
    request: str
    ok: bool
    answer: str


@dataclass
class AttemptHistory:
    steps: list[Step]
    #: The task's child and message counters when the attempt started, so that a
    #: replay hands out the same child and message ids.
    children_before: int
    messages_before: int


@dataclass
class TaskHistory:
    name: str
    #: How the task ended, if it did: a resumed run returns this, unexecuted.
    final: TaskResult | None = None
    attempts: dict[int, AttemptHistory] = field(default_factory=dict)
    #: Attempts that failed and were retried since it was last (re)started
    #: (they count against max_retries).
    failures: int = 0
    #: Times its supervisor restarted it.
    restarts: int = 0
    #: Attempts that ended (failed and retried, or returned and restarted): a
    #: resume starts the next one afresh instead of replaying them.
    ended_attempts: set[int] = field(default_factory=set)
    #: The highest child and message numbers the task used (for a fresh attempt).
    children_used: int = 0
    messages_used: int = 0


@dataclass(frozen=True)
class PendingMessage:
    id: str
    sender: str
    target_id: str
    body_json: str
    expects_reply: bool


@dataclass
class History:
    """What an earlier run (the one being resumed) journaled."""

    tasks: dict[str, TaskHistory] = field(default_factory=dict)
    #: Messages sent but never received, by target task id, in send order: they
    #: are put back in the target's mailbox when it opens.
    undelivered: dict[str, list[PendingMessage]] = field(default_factory=dict)
    #: Ids of every message that was sent (a live ``ask`` does not send it again).
    sent: set[str] = field(default_factory=set)
    #: The asks among them: message id -> the task asked (the only one whose
    #: reply may arrive before the asker, replaying, asks again).
    asked: dict[str, str] = field(default_factory=dict)
    #: Ids of every message that was received (never delivered again, even if
    #: the crash lost the step that sent it).
    received: set[str] = field(default_factory=set)
    #: Replies given to asks whose asker had not seen them, by message id.
    replies: dict[str, str] = field(default_factory=dict)
    #: The largest monotonic clock reading a guest saw.
    monotonic_ns: int = 0
    #: What its steps recorded, in characters (the run's journal limit counts it).
    recorded: int = 0


class JournalFailure(WordedError):
    """The journal cannot be written; the run stops (its journal stays consistent)."""


class StepLog(Protocol):
    """Where a run's steps, attempts, messages and task outcomes are recorded.

    Records are written in the order they are made (one write order for the
    whole run), so a crash loses a suffix of them at most. A ``durable`` step
    returns only once it, and so everything recorded before it, is committed.
    All may raise JournalFailure."""

    def attempt_started(
        self, task_id: str, name: str, attempt: int, children_before: int, messages_before: int
    ) -> None: ...

    def step(
        self,
        task_id: str,
        attempt: int,
        number: int,
        kind: str,
        request: Request,
        ok: bool,
        answer: str,
        durable: bool = False,
        unredacted: str | None = None,
    ) -> None:
        """One answered host call (what a :class:`Step` holds). ``unredacted``:
        the answer before secrets were redacted from it, kept apart so that a
        replay sees what the guest saw."""
        ...

    def ask_sent(self, message: PendingMessage) -> None:
        """The message of an ``ask`` was delivered (a send's is in its step)."""
        ...

    def task_ended(self, result: TaskResult, parent_id: str | None) -> None: ...

    def program_file(self, path: str, digest: str) -> None:
        """A source file of the program (or a package it imports) was read,
        with this SHA-256: a resume checks that it did not change."""
        ...

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything recorded so far is committed (on the
        writer's thread, in the order they were given)."""
        ...

    def when_committed(self, then: Callable[[JournalFailure | None], None]) -> None:
        """Call ``then(None)`` once everything recorded so far is committed, or
        ``then(failure)`` if the journal fails first (on the writer's thread: it
        must not raise, nor wait for a commit). Waits as a durable record
        does, holding no thread meanwhile."""
        ...

    def sync(self) -> None:
        """Return once everything recorded so far is committed and the actions
        waiting for that have run."""
        ...


class NoStepLog:
    """A run without a journal."""

    def attempt_started(
        self, task_id: str, name: str, attempt: int, children_before: int, messages_before: int
    ) -> None:
        return None

    def step(
        self,
        task_id: str,
        attempt: int,
        number: int,
        kind: str,
        request: Request,
        ok: bool,
        answer: str,
        durable: bool = False,
        unredacted: str | None = None,
    ) -> None:
        return None

    def ask_sent(self, message: PendingMessage) -> None:
        return None

    def task_ended(self, result: TaskResult, parent_id: str | None) -> None:
        return None

    def program_file(self, path: str, digest: str) -> None:
        return None

    def after_commit(self, action: Callable[[], None]) -> None:
        action()  # nothing to wait for

    def when_committed(self, then: Callable[[JournalFailure | None], None]) -> None:
        then(None)

    def sync(self) -> None:
        return None
