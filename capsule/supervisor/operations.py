"""Operations a task starts without waiting for them, and waits for together:
the host's side of the ``operations`` interface (wit/capsule.wit), which the
guest's asyncio event loop awaits: an HTTP request of ``get_async`` (work done
elsewhere, ending with its future), or a condition (children that end, a
message that arrives, a reply): the wait of the same host call's blocking
form (waits.py), checked whenever the attempt is woken.

One :class:`Operations` per attempt numbers its operations (1, 2, ...: the
same in a replay), holds those in flight and those that ended and were not
yet reported, and is closed with the attempt, stopping what is still in
flight. An operation's work runs elsewhere (the HTTP client's loop); its
future's end wakes the attempt, whose next ``poll`` reports it.

A replayed start is not performed again: its operation waits, unstarted, for
a replayed poll that reports it (the journal has its answer). One the journal
never reported (the run stopped while it was in flight) is started when the
attempt first polls live, as a blocking call cut off by a crash is made again.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from capsule.net.http import HttpResponse, Transfer
from capsule.net.redact import Secrets
from capsule.sandbox.engine import Invocation
from capsule.supervisor.events import WaitReason
from capsule.supervisor.waits import Wait

#: Operations one attempt may have in flight (started and not yet reported).
MAX_IN_FLIGHT = 64

#: An operation's end as the guest gets it, and as the journal keeps it: ok,
#: payload (JSON), journaled payload (secrets redacted).
Ended = tuple[bool, str, str]


def too_many_in_flight(caller: Invocation) -> str:
    """The error (JSON) of a start refused for MAX_IN_FLIGHT."""
    return json.dumps(
        {
            "kind": "limit",
            "message": f"task {caller.task!r} has {MAX_IN_FLIGHT} operations in flight, "
            f"its limit: await some before starting more",
        }
    )


@dataclass(eq=False)
class Operation:
    handle: int
    #: Starts the work; returns the future whose end is the operation's end.
    #: None for an operation that is a condition (see ``ready``).
    start: Callable[[], Future[Any]] | None
    #: Makes the guest's answer once it ended (on the attempt's thread, in its
    #: poll), from its future (None for a condition).
    finish: Callable[[Future[Any] | None], Ended]
    #: Bytes the host holds for it meanwhile (the run's memory budget counts them).
    held: Callable[[], int] = lambda: 0
    #: For a condition (waiting for children, for a message): whether it holds
    #: now. Checked whenever the attempt is woken, and polls.
    ready: Callable[[], bool] | None = None
    #: What a replayed poll that reports it must still do in this process.
    replayed: Callable[[], None] | None = None
    #: What a task waiting for it is reported waiting on.
    reason: WaitReason = "http"
    #: What stopping it (abandoned, or its attempt ended) must undo.
    on_stop: Callable[[], None] | None = None
    future: Future[Any] | None = None


@dataclass(eq=False)
class Operations:
    """The operations of one attempt."""

    #: Wakes the attempt's blocking call (an operation ended).
    wake: Callable[[], None]
    _started: int = 0
    _in_flight: dict[int, Operation] = field(default_factory=dict)
    #: Handles of operations that ended, in the order they did, not yet reported.
    _ended: deque[int] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def in_flight(self) -> int:
        return len(self._in_flight)

    def add(self, operation_for: Callable[[int], Operation], live: bool) -> int:
        """Number a new operation (made by ``operation_for(handle)``) and start
        it, if ``live`` (a replayed one is not performed: see the module)."""
        self._started += 1
        handle = self._started
        operation = operation_for(handle)
        with self._lock:
            self._in_flight[handle] = operation
        if live:
            self._begin(operation)
        return handle

    def _begin(self, operation: Operation) -> None:
        if operation.start is None:  # a condition: nothing to start
            return
        future = operation.start()
        operation.future = future
        future.add_done_callback(lambda _: self._on_end(operation.handle))

    def _on_end(self, handle: int) -> None:  # (on the thread the work ran on)
        with self._lock:
            if handle in self._in_flight and not self._closed:
                self._ended.append(handle)
        self.wake()

    def start_unstarted(self) -> None:
        """Start the operations a replay left unstarted (see the module): the
        attempt now runs live."""
        for operation in list(self._in_flight.values()):
            if operation.future is None:
                self._begin(operation)

    def wait_reason(self) -> WaitReason:
        """What the attempt waits on while it polls: its oldest operation's."""
        with self._lock:
            oldest = next(iter(self._in_flight.values()), None)
        return "http" if oldest is None else oldest.reason

    def any_ended(self) -> bool:
        self._check_conditions()
        return bool(self._ended)

    def _check_conditions(self) -> None:
        with self._lock:
            conditions = [
                operation
                for operation in self._in_flight.values()
                if operation.ready is not None and operation.handle not in self._ended
            ]
        for operation in conditions:
            assert operation.ready is not None
            if operation.ready():
                with self._lock:
                    if operation.handle in self._in_flight:
                        self._ended.append(operation.handle)

    def take_ended(self) -> list[tuple[int, Ended]]:
        """The operations that ended since the last call, in order, with their
        answers; they are forgotten."""
        self._check_conditions()
        with self._lock:
            handles = list(self._ended)
            self._ended.clear()
            ended = [self._in_flight.pop(handle) for handle in handles]
        return [(operation.handle, operation.finish(operation.future)) for operation in ended]

    def forget(self, handles: list[int]) -> None:
        """A replayed poll reported these: they are over (never started again)."""
        with self._lock:
            reported = [self._in_flight.pop(handle, None) for handle in handles]
            self._ended = deque(h for h in self._ended if h in self._in_flight)
        for operation in reported:
            if operation is None:
                continue
            if operation.future is not None:
                operation.future.cancel()
            if operation.replayed is not None:
                operation.replayed()

    def abandon(self, handle: int) -> None:
        """The guest no longer waits for it: stopped, and never reported."""
        with self._lock:
            operation = self._in_flight.pop(handle, None)
            if handle in self._ended:
                self._ended.remove(handle)
        if operation is not None:
            _stop(operation)

    def held_bytes(self) -> int:
        with self._lock:
            operations = list(self._in_flight.values())
        return sum(operation.held() for operation in operations)

    def close(self) -> None:
        """The attempt ended: everything still in flight is stopped."""
        with self._lock:
            self._closed = True
            operations = list(self._in_flight.values())
            self._in_flight.clear()
            self._ended.clear()
        for operation in operations:
            _stop(operation)


def _stop(operation: Operation) -> None:
    if operation.future is not None:
        operation.future.cancel()
    if operation.on_stop is not None:
        operation.on_stop()


def http_operation(
    handle: int,
    start: Callable[[Transfer], Future[HttpResponse]],
    ended: Callable[[Future[HttpResponse], float, list[HttpResponse]], tuple[bool, str]],
    secrets: Secrets,
) -> Operation:
    """An HTTP request as an operation: ``start(transfer)`` sends it,
    ``ended(future, started, received)`` answers it once it ended (adding its
    response to ``received``), journaled with ``secrets`` redacted."""
    transfer = Transfer()
    started = [0.0]

    def begin() -> Future[HttpResponse]:
        started[0] = time.monotonic()
        return start(transfer)

    def finish(future: Future[HttpResponse] | None) -> Ended:
        assert future is not None
        received: list[HttpResponse] = []
        ok, payload = ended(future, started[0], received)
        return ok, payload, received[0].journal_json(secrets) if received else payload

    return Operation(handle, begin, finish, held=lambda: transfer.bytes)


def condition(
    handle: int,
    wait: Wait,
    replayed: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> Operation:
    """An operation that ends once ``wait`` (what the blocking form of the same
    host call waits for: see waits.py) is ready, answering what its finish
    makes then (journaled as it is); ``replayed``: what a replayed poll that
    reports it must still do; ``on_stop``: what stopping it must undo."""

    def finish(_: Future[Any] | None) -> Ended:
        answer = wait.finish(True)
        if isinstance(answer, Wait):  # (an operation's wait answers once ready)
            raise TypeError(f"the wait of an operation ({wait.reason}) made another")
        ok, payload = answer
        return ok, payload, payload

    return Operation(
        handle,
        None,
        finish,
        ready=wait.ready,
        replayed=replayed,
        reason=wait.reason,
        on_stop=on_stop,
    )
