"""An anyio event loop (the asyncio backend) on a thread of its own: what a
Runtime's runs on the async core are task groups on (run_loop.py), and the
``capsule`` command's loop, where its Runtime runs (and, on the async core,
its run too). Its own module: a command whose run is on task threads starts
one, and loads nothing of the runs' loop (timers, callbacks)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup


class LoopThread:
    """An anyio event loop (the asyncio backend) on a thread of its own, whose
    task group owns the task groups on it: the runs' and the command's (see
    the module); :meth:`close` cancels them."""

    def __init__(self, name: str = "capsule-loop") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The context callbacks run in: the loop's, where anyio knows its
        #: backend (a callback starts tasks and cancels scopes).
        self.context = contextvars.Context()
        self._group: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._ready = threading.Event()
        self._closed = False
        #: Why its loop ended other than by close (a bug), if it did.
        self.failures: list[BaseException] = []

    def start(self) -> None:
        """Start its thread; returns once the loop runs."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was started already")
        if self._closed:
            raise RuntimeError(f"{self.name} is stopped")
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
        self.context = contextvars.copy_context()
        self._thread_id = threading.get_ident()
        async with anyio.create_task_group() as group:
            self._group = group
            self._ready.set()
            await anyio.sleep_forever()  # (until close cancels the group)

    def close(self) -> None:
        """Stop: the task groups still on it (none once their runs ended) are
        cancelled. Returns once its thread ended (at once if called on it)."""
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

    def on_loop(self) -> bool:
        """Whether this is the loop's thread."""
        return threading.get_ident() == self._thread_id

    def loop(self) -> asyncio.AbstractEventLoop:
        """Its asyncio loop; RuntimeError unless it runs."""
        loop = self._loop
        if self._closed or loop is None:
            raise RuntimeError(f"{self.name} is {'stopped' if self._closed else 'not started'}")
        return loop

    def start_soon(self, task: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """On the loop's thread: start ``task`` in its own task group."""
        assert self._group is not None and self.on_loop()
        self._group.start_soon(task, name=name)
