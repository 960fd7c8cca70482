"""The event loop runs are driven on: an anyio event loop (the asyncio
backend) on a thread of its own (:class:`LoopThread`, loop_thread.py), and
each run's part of it (:class:`RunLoop`), a task group on it. A Runtime's
runs share one loop thread, started by its first run that needs one and
stopped as the Runtime closes (or the ``capsule`` command's, given it); a
run made without one (``run_program`` alone) starts a loop thread of its own
and stops it as it ends. A run's task group holds the root invocation, under
which every other one is a task (async_core.py), the waits run by
continuation (continuations.py), and its inbox's listener and requests
(inbox.py); callbacks (:meth:`RunLoop.soon`) and timers
(:meth:`RunLoop.at`) come to it from any thread. Once the run ends its group
is cancelled, its timers and callbacks not yet run never run, and nothing of
it is left on the loop.

Callbacks go through the loop's own thread-safe ``call_soon_threadsafe`` and
``call_at``, not an anyio portal: a wake-up of a waiting task is one of them,
and a portal adds a future and a coroutine to each."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from capsule.supervisor.loop_thread import LoopThread

if TYPE_CHECKING:  # (a run that makes no HTTP request needs no portal)
    from anyio.from_thread import BlockingPortal


def _nothing() -> None:
    pass


class LoopTimer:
    """A callback due at a time on a RunLoop; cancelled, it never runs."""

    __slots__ = ("callback", "cancelled", "handle", "owner", "when")

    def __init__(self, owner: RunLoop, when: float, callback: Callable[[], None]) -> None:
        self.owner = owner
        self.when = when
        self.callback = callback
        self.cancelled = False
        #: The loop's timer, once set (on the loop's thread).
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        """It never runs; what its callback holds is let go now (a wait with
        a long timeout that ended early must not keep it until then)."""
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = _nothing
        if self.handle is not None:
            try:
                # (A loop's timer is cancelled on its own thread: it counts them.)
                self.owner.call(self._disarm)
            except RuntimeError:  # its run's loop has stopped: the timer went with it
                pass

    def _arm(self) -> None:
        """On the loop's thread: set the loop's timer, unless cancelled."""
        if not self.cancelled:
            owner = self.owner
            self.handle = owner._running().call_at(self.when, self._fire, context=owner._context)
            owner._timers.add(self)

    def _disarm(self) -> None:
        """On the loop's thread: its loop's timer is cancelled and let go."""
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()
        self.owner._timers.discard(self)

    def _fire(self) -> None:
        if self.cancelled:
            return
        if time.monotonic() < self.when:
            # (asyncio runs a timer up to its clock's resolution early: a
            # check at a deadline must find it passed.)
            self._arm()
            return
        self.cancelled = True  # (it runs now: cancelling it is too late)
        self.handle = None
        self.owner._timers.discard(self)
        self.owner._guarded(self.callback)


class RunLoop:
    """One run's part of a :class:`LoopThread`: a task group on it, opened by
    :meth:`start` and cancelled by :meth:`close` (see the module). ``shared``:
    the loop thread of the Runtime the run is of (None: the run starts one of
    its own, and stops it as it closes). A callback must not raise: one that
    does is kept in ``failures`` and the loop goes on."""

    def __init__(self, name: str = "capsule-loop", shared: LoopThread | None = None) -> None:
        self.name = name
        self._shared = shared
        self._host: LoopThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context = contextvars.Context()
        self._group: TaskGroup | None = None
        #: Set once its task group has ended (on the loop's thread).
        self._ended = threading.Event()
        #: Called once it has ended (see when_ended), and their lock.
        self._on_end: list[Callable[[], None]] = []
        self._on_end_lock = threading.Lock()
        self._closed = False
        #: Its timers set on the loop and not yet run (on the loop's thread):
        #: cancelled as its group ends.
        self._timers: set[LoopTimer] = set()
        #: Callbacks given by other threads, not yet run (see soon).
        self._queued: deque[Callable[[], None]] = deque()
        self._drain_due = False
        #: What callbacks raised (a bug in one of them).
        self.failures: list[BaseException] = []
        #: A blocking portal into its task group, once asked for (see portal).
        self._portal: BlockingPortal | None = None
        self._portal_lock = threading.Lock()

    # -- its task group ------------------------------------------------------

    def start(self) -> None:
        """Open its task group on the loop (starting a loop thread of its own
        if it has no shared one); returns once it is open."""
        if self._host is not None:
            raise RuntimeError(f"{self.name} was started already")
        if self._closed:
            raise RuntimeError(f"{self.name} is stopped: its run has ended")
        host = self._shared
        if host is None:
            host = LoopThread(self.name)
            host.start()
        self._host = host
        try:
            self._open(host)
        except BaseException:
            if host is not self._shared:
                host.close()
            raise

    def _open(self, host: LoopThread) -> None:
        opened = threading.Event()
        try:
            loop = host.loop()
            loop.call_soon_threadsafe(
                host.start_soon, partial(self._hold, opened), self.name, context=host.context
            )
        except RuntimeError as exc:  # the shared loop has stopped: its Runtime closed
            raise RuntimeError(f"{self.name} could not start: {exc}") from None
        while not opened.wait(0.5):
            if not host.running:
                raise RuntimeError(f"{self.name} could not start: {host.name} has stopped")
        self._context = host.context
        self._loop = loop

    async def _hold(self, opened: threading.Event) -> None:
        """Its task group, on the loop, until close cancels it. A task of its
        that raises (a host bug) ends it, kept in ``failures``: its run ends,
        not the loop other runs share."""
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                opened.set()
                await anyio.sleep_forever()
        except Exception as exc:
            self.failures.append(exc)
        finally:
            self._closed = True
            for timer in list(self._timers):  # (they were its run's: none runs now)
                timer.cancel()
            self._queued.clear()
            self._ended.set()
            for callback in self._take_on_end():
                callback()

    def when_ended(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once its task group has ended (now if it has;
        else on the loop's thread, as it ends). It must not raise."""
        with self._on_end_lock:
            if not self._ended.is_set():
                self._on_end.append(callback)
                return
        callback()

    def _take_on_end(self) -> list[Callable[[], None]]:
        with self._on_end_lock:
            taken, self._on_end = self._on_end, []
        return taken

    def close(self) -> None:
        """Stop: callbacks and timers not yet run never run, and tasks still
        in its task group (none once its run ended) are cancelled. Returns once
        its group ended, and its own loop thread if it has one (at once if
        called on the loop's thread)."""
        self._closed = True
        host, loop = self._host, self._loop
        if host is None or loop is None:
            return
        group = self._group
        if group is not None:
            try:
                loop.call_soon_threadsafe(group.cancel_scope.cancel, context=self._context)
            except RuntimeError:  # its loop has stopped already (so has its group)
                pass
            if not host.on_loop():
                while not self._ended.wait(0.5) and host.running:
                    pass
        if host is not self._shared:
            host.close()

    @property
    def started(self) -> bool:
        """Whether start was called (and succeeded)."""
        return self._host is not None

    @property
    def running(self) -> bool:
        """Whether its task group is open on a running loop."""
        host = self._host
        return host is not None and host.running and not self._ended.is_set()

    @property
    def closed(self) -> bool:
        """Whether it was stopped (its run ended): what is given to it never runs."""
        return self._closed

    def on_loop(self) -> bool:
        """Whether this is the loop's thread."""
        host = self._host
        return host is not None and host.on_loop()

    # -- what runs on it -----------------------------------------------------

    def call(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop's thread: now if this is it, else as
        soon as the loop gets to it (unless its run has ended by then)."""
        if self.on_loop():
            callback()
        else:
            self._running().call_soon_threadsafe(self._guarded, callback, context=self._context)

    def soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop as soon as it gets to it (never now),
        in the order given. Safe from any thread, also holding locks the
        callback takes."""
        loop = self._running()
        if self.on_loop():
            loop.call_soon(self._guarded, callback, context=self._context)
            return
        # From another thread: queued, and the loop woken only if no drain of
        # the queue is due already (a burst of wake-ups wakes it once).
        self._queued.append(callback)
        if not self._drain_due:
            self._drain_due = True
            loop.call_soon_threadsafe(self._drain, context=self._context)

    def _drain(self) -> None:
        """On the loop: run the callbacks queued from other threads."""
        self._drain_due = False  # (before it looks: one queued from now on is drained next)
        queued = self._queued
        # Those queued meanwhile wait for the next drain: the loop's other
        # callbacks and tasks are not held up behind a stream of them.
        for _ in range(len(queued)):
            if not queued:  # (its group ended meanwhile: they were let go)
                return
            self._guarded(queued.popleft())

    def at(self, when: float, callback: Callable[[], None]) -> LoopTimer:
        """Run ``callback`` at ``when`` (time.monotonic(), the asyncio loop's
        clock), unless cancelled first."""
        loop = self._running()
        timer = LoopTimer(self, when, callback)
        if self.on_loop():
            timer._arm()
        else:
            loop.call_soon_threadsafe(self._guarded, timer._arm, context=self._context)
        return timer

    def start_soon(self, task: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """On the loop's thread: start ``task`` in the run's task group."""
        assert self._group is not None and self.on_loop()
        self._group.start_soon(task, name=name)

    def portal(self) -> BlockingPortal:
        """A blocking portal into its task group, made on first use (from a
        thread other than the loop's): how other threads run coroutines of
        the run's on its loop (its HTTP requests), cancelled with the run.
        RuntimeError once its run has ended."""
        from anyio.from_thread import BlockingPortal

        with self._portal_lock:
            if self._portal is None:
                made: list[BlockingPortal] = []
                ready = threading.Event()

                async def serve() -> None:
                    async with BlockingPortal() as portal:
                        made.append(portal)
                        ready.set()
                        await anyio.sleep_forever()  # (until its group is cancelled)

                self.soon(lambda: self.start_soon(serve, f"{self.name} portal"))
                while not ready.wait(0.5):
                    if not self.running:
                        raise RuntimeError(f"{self.name} is stopped: its run has ended")
                self._portal = made[0]
            return self._portal

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if self._closed or loop is None:
            state = "stopped: its run has ended" if self._closed else "not started"
            raise RuntimeError(f"{self.name} is {state}")
        return loop

    def _guarded(self, callback: Callable[[], None]) -> None:
        if self._closed:  # (given before its run ended: it never runs)
            return
        try:
            callback()
        except Exception as exc:  # a bug: kept, and the loop goes on
            self.failures.append(exc)
