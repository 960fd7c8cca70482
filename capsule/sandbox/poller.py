"""A run queue of call futures (capsule.sandbox.wasm_async), polled by a few
threads: a future is polled while it can run, left alone while it waits in an
async import, and queued again when its answer is given.

A future woken by a host function of another (a send, a reply) is polled next
by the thread that polls its waker, once that poll returns: the waker mostly
waits soon after (an ask, a receive), and a ping-pong of two tasks then stays
on one thread instead of waking another one for every message. Not ahead of
the queue: if other futures are queued, it goes behind them. Nor for long: a
waker's poll that does not return within an epoch tick or two (slow host
work, a blocking WASI call) lets it go to the queue (:meth:`Poller.flush_handed`)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from capsule.logs import logger
from capsule.sandbox.wasm_async import CallFuture

_log = logger("sandbox")

_IDLE, _QUEUED, _RUNNING, _HELD = "idle", "queued", "running", "held"

OnDone = Callable[[CallFuture[Any]], None]


#: How much more fuel (~10 µs of guest work) a future that woke another runs
#: before its thread polls the woken one instead (it mostly waits before).
HANDOFF_FUEL = 50_000


class _Slot:
    """A poll thread's own: the future it polls (None: none now), and the one
    that future woke, which it polls next."""

    __slots__ = ("next", "next_seen", "polled")

    def __init__(self) -> None:
        self.polled: CallFuture[Any] | None = None
        self.next: CallFuture[Any] | None = None
        #: Whether a flush_handed found ``next`` there already.
        self.next_seen = False


@dataclass(eq=False)
class _Entry:
    on_done: OnDone | None
    state: str = _QUEUED
    #: Woken while being polled: polled again after.
    notified: bool = False


class Poller:
    """A run queue of call futures, polled by up to ``threads`` threads it
    owns, each started once a future is queued with every other one busy.

    A future is polled until it waits in an async import (then it is left
    alone until its Pending is resolved) or ends (then ``on_done`` is called,
    on a poll thread); one that yielded (its fuel yield interval) goes to the
    back of the queue. No future is polled by two threads at once: a future
    submitted is the poller's to poll. Closing stops the threads and cancels
    the futures left (without their ``on_done``)."""

    def __init__(self, threads: int = 1, name: str = "capsule-poll") -> None:
        if threads < 1:
            raise ValueError(f"a poller needs at least one thread, not {threads!r}")
        self._lock = threading.Lock()
        #: The poll threads asleep for want of a future to poll, each as the
        #: lock it sleeps on (held; released to wake it). Not a Condition:
        #: its wait and notify are a dozen Python calls, for every message.
        self._parked: list[threading.Lock] = []
        self._ready: deque[CallFuture[Any]] = deque()
        self._entries: dict[CallFuture[Any], _Entry] = {}
        self._closing = False
        #: This poller's poll threads' slots (a thread-local: found by the
        #: host functions that wake a future, on the thread they run on).
        self._slots = threading.local()
        self._all_slots: list[_Slot] = []
        self._name = name
        #: At most this many poll threads; each starts when a future is
        #: queued and every thread started is busy (a run that never has two
        #: tasks runnable at once never starts a second one).
        self._most_threads = threads
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """How many futures it holds (queued, polled or waiting)."""
        return len(self._entries)

    def submit(self, future: CallFuture[Any], on_done: OnDone | None = None) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the poller is closed")
            if future in self._entries:
                raise ValueError("the future was submitted already")
            self._entries[future] = _Entry(on_done)
            future.on_wake = self._wake
            self._ready.append(future)
            self._wake_one()

    def cancel(self, future: CallFuture[Any]) -> None:
        """Cancel ``future``; its ``on_done`` follows on a poll thread."""
        future.cancel()
        self._wake(future)

    def waiting(self, future: CallFuture[Any]) -> bool:
        """Whether ``future`` waits in an async import, left alone by the poll
        threads (False while a poll that will leave it so has not returned)."""
        with self._lock:
            entry = self._entries.get(future)
            return entry is not None and entry.state == _IDLE

    @contextmanager
    def held(self, future: CallFuture[Any]) -> Iterator[bool]:
        """Keep ``future`` from being polled in the block, if it waits in an
        async import: True then (its guest cannot run until the block ends,
        even if its answer is given meanwhile); False if it is queued, being
        polled, or not this poller's (nothing is held)."""
        with self._lock:
            entry = self._entries.get(future)
            held = entry is not None and entry.state == _IDLE
            if entry is not None and held:
                entry.state, entry.notified = _HELD, False
        try:
            yield held
        finally:
            if entry is not None and held:
                with self._lock:
                    if self._entries.get(future) is entry:
                        if entry.notified:  # woken meanwhile
                            entry.state = _QUEUED
                            self._ready.append(future)
                            self._wake_one()
                        else:
                            entry.state = _IDLE

    @property
    def threads(self) -> int:
        """How many poll threads it has started."""
        return len(self._threads)

    def flush_handed(self) -> None:
        """Queue each future handed to a poll thread that a previous call
        found there already: its waker's poll has not returned since (call
        it at each epoch tick)."""
        with self._lock:
            for slot in self._all_slots:
                if slot.next is None:
                    continue
                if slot.next_seen:
                    handed, slot.next = slot.next, None
                    self._ready.append(handed)
                    self._wake_one()
                else:
                    slot.next_seen = True

    def close(self) -> None:
        with self._lock:
            self._closing = True
            parked, self._parked = self._parked, []
            threads = list(self._threads)
        for park in parked:
            park.release()
        for thread in threads:
            thread.join()
        with self._lock:
            left = list(self._entries)
            self._entries.clear()
            self._ready.clear()
        for future in left:
            future.on_wake = None
            future.cancel()

    def _wake(self, future: CallFuture[Any]) -> None:
        with self._lock:
            entry = self._entries.get(future)
            if entry is None:
                return
            state = entry.state
            if state is _IDLE:
                entry.state = _QUEUED
                slot: _Slot | None = getattr(self._slots, "slot", None)
                polled = None if slot is None else slot.polled
                if slot is not None and polled is not None:  # woken by the future it polls
                    handed, slot.next = slot.next, future
                    slot.next_seen = False
                    if handed is None:
                        polled.store.yield_soon(HANDOFF_FUEL)
                        return
                    future = handed  # (the one woken before goes to the queue)
                self._ready.append(future)
                self._wake_one()
            elif state is _RUNNING or state is _HELD:
                entry.notified = True

    def _wake_one(self) -> None:
        """Holding the lock: wake a sleeping poll thread, if any; else start
        one, if it has started fewer than it may."""
        if self._parked:
            self._parked.pop().release()
        elif len(self._threads) < self._most_threads and not self._closing:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            try:
                thread.start()  # (it takes the lock once this caller lets go of it)
            except RuntimeError:  # the system's thread limit
                if not self._threads:
                    raise
                _log.warning("a poll thread could not start: %d poll the calls", len(self._threads))
                self._most_threads = len(self._threads)
                return
            self._threads.append(thread)

    def _work(self) -> None:
        park = threading.Lock()
        park.acquire()
        slot = self._slots.slot = _Slot()
        with self._lock:
            self._all_slots.append(slot)
        handed: CallFuture[Any] | None = None
        while True:
            with self._lock:
                if handed is not None and self._ready:
                    self._ready.append(handed)  # (behind the futures queued before)
                    handed = None
                if handed is None:
                    while not self._ready and not self._closing:
                        # (Whoever takes it off _parked releases it: a wake-up
                        # before the acquire below is not lost.)
                        self._parked.append(park)
                        self._lock.release()
                        try:
                            park.acquire()
                        finally:
                            self._lock.acquire()
                if self._closing:
                    return
                future = self._ready.popleft() if handed is None else handed
                entry = self._entries[future]
                entry.state, entry.notified = _RUNNING, False
                slot.polled = future
            try:
                done = future.poll()
            except Exception:  # (polled elsewhere too: the poll thread must go on)
                _log.exception("a poll thread failed polling a call; the call is cancelled")
                future.cancel()
                done = True
            with self._lock:
                slot.polled = None
                handed, slot.next = slot.next, None
                if not done:  # (if it woke one: the interval, even if flush_handed took it)
                    future.store.yield_as_set()
                if done:
                    del self._entries[future]
                    future.on_wake = None
                    if handed is not None and entry.on_done is not None:
                        # (This thread hands the end on first: the woken
                        # future should not wait for that.)
                        self._ready.append(handed)
                        self._wake_one()
                        handed = None
                elif future.blocked and not entry.notified:
                    entry.state = _IDLE
                else:  # it yielded, or was woken while polled (another thread polls on)
                    entry.state = _QUEUED
                    if handed is not None:  # (ahead of its waker, which had its turn)
                        self._ready.append(handed)
                        handed = None
                    self._ready.append(future)
                    self._wake_one()
            if done and entry.on_done is not None:
                try:
                    entry.on_done(future)
                except Exception:  # (the poll thread must go on)
                    _log.exception("a poll thread failed handing on the end of a call")
