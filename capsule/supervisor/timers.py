"""One run's timer service on task threads: callbacks due at given times (the
timeouts and deadlines of waits run by continuation) and callbacks due now (the
re-check of a wait whose attempt was woken), run one at a time, in order, on
one thread the run owns: started at first use, stopped by :meth:`Timers.close`.
(The async core's are its event loop's: run_loop.py.)"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable


class Timer:
    """A callback due at a time; cancelled, it never runs."""

    __slots__ = ("callback", "cancelled", "owner", "when")

    def __init__(self, owner: Timers, when: float, callback: Callable[[], None]) -> None:
        self.owner = owner
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.owner.cancel(self)


def _nothing() -> None:
    pass


class Timers:
    """Runs callbacks at their time, one at a time, on one thread.

    A callback must not raise (the continuation driver's do not): one that
    does is kept in ``failures`` and the others run on."""

    def __init__(self, name: str = "capsule-timers") -> None:
        self.name = name
        self._changed = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, Timer]] = []
        self._now: deque[Callable[[], None]] = deque()
        self._order = itertools.count()
        #: Cancelled timers still in the heap (dropped once due, or all at
        #: once when they are most of it).
        self._cancelled = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        #: What callbacks raised (a bug in one of them).
        self.failures: list[BaseException] = []

    def at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` at ``when`` (time.monotonic()), unless cancelled first."""
        timer = Timer(self, when, callback)
        with self._changed:
            self._running()
            heapq.heappush(self._due, (when, next(self._order), timer))
            if self._due[0][2] is timer:  # sooner than what the thread waits for
                self._changed.notify()
        return timer

    def soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` as soon as the thread gets to it (before timers due
        now), in the order given. Safe from any thread, also holding locks the
        callback takes."""
        with self._changed:
            self._running()
            self._now.append(callback)
            if len(self._now) == 1:
                self._changed.notify()

    def cancel(self, timer: Timer) -> None:
        """``timer`` never runs. What its callback holds is let go now: a wait
        with a long timeout that ended early must not keep it until then."""
        with self._changed:
            if timer.cancelled:
                return
            timer.cancelled = True
            timer.callback = _nothing
            self._cancelled += 1
            due = self._due
            if self._cancelled > 64 and 2 * self._cancelled > len(due):
                self._due = [entry for entry in due if not entry[2].cancelled]
                heapq.heapify(self._due)
                self._cancelled = 0

    def pending(self) -> int:
        """Timers not yet run or dropped (cancelled ones included until due)."""
        with self._changed:
            return len(self._due) + len(self._now)

    def close(self) -> None:
        """Stop: what is not yet due never runs. Returns once the thread ended
        (at once if called from a callback)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _running(self) -> None:
        """Holding the lock: the thread runs (started at first use)."""
        if self._closed:
            raise RuntimeError(f"{self.name} is stopped: its run has ended")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _next(self) -> Callable[[], None] | None:
        """The next callback to run once it is due (None: closed)."""
        with self._changed:
            while not self._closed:
                if self._now:
                    return self._now.popleft()
                due = self._due
                while due and due[0][2].cancelled:
                    heapq.heappop(due)
                    self._cancelled -= 1
                if not due:
                    self._changed.wait()
                    continue
                wait = due[0][0] - time.monotonic()
                if wait <= 0:
                    timer = heapq.heappop(due)[2]
                    timer.cancelled = True  # (it runs now: cancelling it is too late)
                    return timer.callback
                self._changed.wait(wait)
            return None

    def _run(self) -> None:
        while (callback := self._next()) is not None:
            try:
                callback()
            except BaseException as exc:  # a bug: kept, and the others run on
                self.failures.append(exc)
