"""CPU slots: at most N threads execute wasm at once, handed round fairly.

A thread takes a slot before it runs wasm and gives it back when it stops (or
blocks in a host call). At every epoch tick a running instance offers its slot
to the longest-waiting thread, if any, and queues behind the others: round-robin
time slices of one tick, so many CPU-bound tasks share the cores evenly and none
starves. The slot belongs to the thread, so a parent and the children it runs
inline on the same thread share one.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class CpuSlots:
    def __init__(self, slots: int | None = None) -> None:
        self.size = slots or os.cpu_count() or 1
        self._free = self.size
        self._queue: deque[threading.Event] = deque()
        self._lock = threading.Lock()
        self._held = threading.local()
        #: The turn each queued thread waits for, by thread id (see ``hurry``).
        self._turns: dict[int, threading.Event] = {}

    def _depth(self) -> int:
        return getattr(self._held, "depth", 0)

    def _acquire(self, first: bool = False) -> None:
        with self._lock:
            if self._free > 0 and not self._queue:
                self._free -= 1
                return
            turn = threading.Event()
            if first:
                self._queue.appendleft(turn)
            else:
                self._queue.append(turn)
            self._turns[threading.get_ident()] = turn
        self._wait(turn)

    def _wait(self, turn: threading.Event) -> None:
        """Wait for a turn queued (the releasing thread hands its slot over
        directly); it was put in ``_turns`` with it, under the lock."""
        turn.wait()
        del self._turns[threading.get_ident()]

    def _release(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().set()
            else:
                self._free += 1

    @contextmanager
    def running(self) -> Iterator[None]:
        """Hold a slot while the body runs wasm (re-entrant on one thread)."""
        depth = self._depth()
        if depth == 0:
            self._acquire()
        self._held.depth = depth + 1
        try:
            yield
        finally:
            self._held.depth = depth
            if depth == 0:
                self._release()

    @contextmanager
    def released(self, urgent: Callable[[], bool] | None = None) -> Iterator[None]:
        """Give the slot up while the body blocks (a host call waiting). If
        ``urgent()`` says so afterwards (it must stop), take it back first."""
        depth = self._depth()
        if depth == 0:
            yield
            return
        self._held.depth = 0
        self._release()
        try:
            yield
        finally:
            try:
                first = urgent is not None and urgent()
            except Exception:
                first = False
            self._acquire(first=first)
            self._held.depth = depth

    def hurry(self, thread: int) -> None:
        """If ``thread`` waits for its turn, give it the next one (a task that
        must stop: its instance, and memory, go sooner)."""
        with self._lock:
            turn = self._turns.get(thread)
            if turn is None or turn.is_set() or turn not in self._queue:
                return
            self._queue.remove(turn)
            self._queue.appendleft(turn)

    def yield_turn(self) -> None:
        """At an epoch tick: if others wait, pass the slot on and queue behind them."""
        if self._depth() == 0:
            return
        with self._lock:
            if not self._queue:
                return
            self._queue.popleft().set()
            turn = threading.Event()
            self._queue.append(turn)
            self._turns[threading.get_ident()] = turn
        self._wait(turn)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)
