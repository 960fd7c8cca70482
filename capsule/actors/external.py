"""Messages from outside a run (`capsule send`, `capsule ask`) into its actors'
mailboxes: delivered by the run's Router like any message, with a sender id
that no task has, journaled so that a resume delivers one not yet received."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from capsule.actors.router import Message, Router, RoutingError, Waker

#: The sender of a message from outside the run (what ``Message.sender`` says in
#: the receiving task). No task id has this form (ids are "main", "main/2/1"),
#: and no task may register it as a name (see TaskCalls._spawn).
EXTERNAL_SENDER = "cli"


@dataclass(frozen=True)
class Delivered:
    """A message put in a mailbox: its id, and the task id it went to."""

    message_id: str
    target_id: str


class ExternalError(Exception):
    """Why a message from outside was not delivered or answered; ``kind`` is
    ``no_such_actor``, ``mailbox_full``, ``queue_full``, ``too_large``,
    ``timeout``, ``actor_ended``, ``run_ended`` or ``cancelled``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Waiter:
    """The router's Waker for a message from outside: an event to wait on."""

    def __init__(self) -> None:
        self.woken = threading.Event()

    def wake(self) -> None:
        self.woken.set()


class Asking:
    """An ask from outside that its caller may stop (from any thread) while it
    waits for its reply; ``on_end`` is called once a wait that began is over."""

    def __init__(self, on_end: Callable[[], None] = lambda: None) -> None:
        self.waiter = _Waiter()
        self._on_end = on_end
        self._lock = threading.Lock()
        self._stopped = False
        self._waiting = False

    def stop(self) -> bool:
        """Stop it: its wait ends at once (or never begins). True if a wait
        was under way: ``on_end`` follows once it let go of the ask."""
        with self._lock:
            self._stopped = True
            waiting = self._waiting
        self.waiter.wake()
        return waiting

    @property
    def stopped(self) -> bool:
        return self._stopped

    def begin(self) -> None:
        """The wait begins (ExternalError if it was stopped first)."""
        with self._lock:
            if self._stopped:
                raise ExternalError("cancelled", "the ask was cancelled")
            self._waiting = True

    def end(self) -> None:
        with self._lock:
            waited, self._waiting = self._waiting, False
        if waited:
            self._on_end()


class ExternalMessages:
    """Delivers messages from outside into a run's mailboxes (thread-safe).
    ``record`` journals a delivered message (as an ask is: the messages
    table), and returns once it is durable."""

    def __init__(
        self, router: Router, max_message_bytes: int, record: Callable[[Message, str], None]
    ) -> None:
        self.router = router
        self.max_message_bytes = max_message_bytes
        self.record = record
        # Ids unique across resumes too (a resume keeps the run's journal):
        # numbered from the clock, in order of sending.
        self._numbers = itertools.count(time.time_ns())
        self._lock = threading.Lock()
        self._waiters: set[Waker] = set()
        self._closed = False

    def send(self, target: str, body_json: str) -> Delivered:
        """Deliver at once, or ExternalError (nothing waits for room)."""
        delivered, waiter = self._deliver(target, body_json, asks=False)
        with self._lock:
            self._waiters.discard(waiter)
        return delivered

    def ask(self, target: str, body_json: str, timeout: float, asking: Asking | None = None) -> str:
        """Deliver a message that expects a reply; the reply's JSON text once
        it came, or ExternalError (timeout, the target ended, the run ended,
        or ``asking`` was stopped)."""
        asking = asking or Asking()
        asking.begin()
        try:
            return self._ask(target, body_json, timeout, asking)
        finally:
            asking.end()

    def _ask(self, target: str, body_json: str, timeout: float, asking: Asking) -> str:
        waiter = asking.waiter
        delivered = self.begin_ask(target, body_json, waiter)
        deadline = time.monotonic() + timeout
        answered = False
        try:
            while (reply := self.reply_to(delivered, target)) is None:
                if asking.stopped:
                    raise ExternalError("cancelled", "the ask was cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExternalError("timeout", f"no reply from {target!r} within {timeout:g}s")
                waiter.woken.wait(left)
                waiter.woken.clear()
            answered = True
            return reply
        finally:
            self.end_ask(delivered, waiter, answered)

    # An ask in steps, for a caller that waits for its reply without a thread
    # (on an event loop): begin_ask, reply_to each time ``waker`` is woken,
    # end_ask.

    def begin_ask(self, target: str, body_json: str, waker: Waker) -> Delivered:
        """Deliver a message that expects a reply (journaled, durably: this
        may wait for the disk); ``waker`` is woken when its reply comes, its
        target ends or the run ends. ExternalError if it cannot be delivered."""
        return self._deliver(target, body_json, asks=True, waiter=waker)[0]

    def reply_to(self, delivered: Delivered, target: str) -> str | None:
        """The reply's JSON text if it came, None while it may still come;
        ExternalError if it never will (the target or the run ended)."""
        reply, failure = self.router.take_reply(delivered.message_id)
        if failure is not None:
            raise ExternalError("actor_ended", f"the actor {target!r} ended without replying")
        if reply is not None:
            return reply
        if self._closed:
            raise ExternalError("run_ended", "the run ended before a reply came")
        return None

    def end_ask(self, delivered: Delivered, waker: Waker, answered: bool) -> None:
        """The ask is over: a reply that comes after all (if it was not
        ``answered``) is dropped, and ``waker`` let go."""
        if not answered:
            self.router.abandon_replies([delivered.message_id])
        with self._lock:
            self._waiters.discard(waker)

    def close(self) -> None:
        """The run ends: asks still waiting end with kind run_ended."""
        with self._lock:
            self._closed = True
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.wake()

    def _deliver(
        self, target: str, body_json: str, asks: bool, waiter: Waker | None = None
    ) -> tuple[Delivered, Waker]:
        if len(body_json) > self.max_message_bytes:
            raise ExternalError(
                "too_large",
                f"a message of {len(body_json):,} bytes (as JSON) exceeds the run's limit "
                f"of {self.max_message_bytes:,} bytes (the run option max_message_size)",
            )
        waiter = waiter or _Waiter()
        with self._lock:
            if self._closed:
                raise ExternalError("run_ended", "the run is ending")
            self._waiters.add(waiter)
        number = next(self._numbers)
        message = Message(f"{EXTERNAL_SENDER}#{number}", EXTERNAL_SENDER, body_json, asks)
        try:
            target_id = self.router.resolve(target)
            if asks:
                self.router.expect_reply(message.id, waiter, target_id)
            if not self.router.try_send(target_id, message, waiter):
                self.router.forget_sender(target_id, waiter)
                raise ExternalError(
                    "mailbox_full",
                    f"the mailbox of {target!r} is full ({self.router.mailbox_capacity} "
                    f"messages); try again once it has taken some",
                )
        except RoutingError as exc:
            self._forget(message, waiter)
            raise ExternalError(exc.kind, str(exc)) from None
        except ExternalError:
            self._forget(message, waiter)
            raise
        self.record(message, target_id)
        return Delivered(message.id, target_id), waiter

    def _forget(self, message: Message, waiter: Waker) -> None:
        self.router.abandon_replies([message.id])
        with self._lock:
            self._waiters.discard(waiter)
