"""One run's event loop: an anyio event loop (the asyncio backend) on one
thread the run owns, started with the run (on the async core, or where waits
run by continuation) and stopped when it ends. Its task group holds the root
invocation, under which every other one is a task (async_core.py), and the
waits run by continuation (continuations.py); callbacks (:meth:`RunLoop.soon`)
and timers (:meth:`RunLoop.at`) come to it from any thread.

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
from typing import Any

import anyio
from anyio.abc import TaskGroup


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
        handle = self.handle
        if handle is not None:
            try:
                # (A loop's timer is cancelled on its own thread: it counts them.)
                self.owner.call(handle.cancel)
            except RuntimeError:  # its loop has stopped: the timer went with it
                pass

    def _arm(self) -> None:
        """On the loop's thread: set the loop's timer, unless cancelled."""
        if not self.cancelled:
            self.handle = self.owner._running().call_at(
                self.when, self._fire, context=self.owner._context
            )

    def _fire(self) -> None:
        if self.cancelled:
            return
        if time.monotonic() < self.when:
            # (asyncio runs a timer up to its clock's resolution early: a
            # check at a deadline must find it passed.)
            self._arm()
            return
        self.cancelled = True  # (it runs now: cancelling it is too late)
        self.owner._guarded(self.callback)


class RunLoop:
    """An anyio event loop on a thread of its own (see the module). A callback
    must not raise: one that does is kept in ``failures`` and the loop goes on."""

    def __init__(self, name: str = "capsule-loop") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The context callbacks run in: the loop's, where anyio knows its
        #: backend (a callback starts tasks and cancels scopes).
        self._context = contextvars.Context()
        self._group: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._ready = threading.Event()
        self._closed = False
        #: Callbacks given by other threads, not yet run (see soon).
        self._queued: deque[Callable[[], None]] = deque()
        self._drain_due = False
        #: What callbacks raised (a bug in one of them).
        self.failures: list[BaseException] = []

    # -- its thread --------------------------------------------------------

    def start(self) -> None:
        """Start its thread; returns once the loop runs."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was started already")
        if self._closed:
            raise RuntimeError(f"{self.name} is stopped: its run has ended")
        failed: list[BaseException] = []

        def run() -> None:
            try:
                anyio.run(self._main, backend="asyncio")
            except BaseException as exc:  # (seen by start, or kept: a bug)
                failed.append(exc)
                self.failures.append(exc)
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if failed:
            raise RuntimeError(f"{self.name} could not start its event loop") from failed[0]

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        self._thread_id = threading.get_ident()
        async with anyio.create_task_group() as group:
            self._group = group
            self._ready.set()
            await anyio.sleep_forever()  # (until close cancels the group)

    def close(self) -> None:
        """Stop: callbacks and timers not yet run never run, and tasks still
        in its task group (none once its run ended) are cancelled. Returns once
        its thread ended (at once if called on it)."""
        self._closed = True
        thread, loop, group = self._thread, self._loop, self._group
        if thread is None or loop is None or group is None:
            return
        try:
            loop.call_soon_threadsafe(group.cancel_scope.cancel)
        except RuntimeError:  # its loop has stopped already
            pass
        if thread is not threading.current_thread():
            thread.join()

    @property
    def running(self) -> bool:
        """Whether its thread runs (started and not yet ended)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def closed(self) -> bool:
        """Whether it was stopped (its run ended): what is given to it never runs."""
        return self._closed

    def on_loop(self) -> bool:
        """Whether this is the loop's thread."""
        return threading.get_ident() == self._thread_id

    # -- what runs on it -----------------------------------------------------

    def call(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop's thread: now if this is it, else as
        soon as the loop gets to it."""
        if self.on_loop():
            callback()
        else:
            self._running().call_soon_threadsafe(callback, context=self._context)

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
            self._guarded(queued.popleft())

    def at(self, when: float, callback: Callable[[], None]) -> LoopTimer:
        """Run ``callback`` at ``when`` (time.monotonic(), the asyncio loop's
        clock), unless cancelled first."""
        loop = self._running()
        timer = LoopTimer(self, when, callback)
        if self.on_loop():
            timer._arm()
        else:
            loop.call_soon_threadsafe(timer._arm, context=self._context)
        return timer

    def start_soon(self, task: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """On the loop's thread: start ``task`` in the loop's own task group."""
        assert self._group is not None and self.on_loop()
        self._group.start_soon(task, name=name)

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if self._closed or loop is None:
            state = "stopped: its run has ended" if self._closed else "not started"
            raise RuntimeError(f"{self.name} is {state}")
        return loop

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception as exc:  # a bug: kept, and the loop goes on
            self.failures.append(exc)
