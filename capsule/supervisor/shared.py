"""What the runs of one host application (a Runtime) share, each made on
first use and stopped as the application closes it: the guests (an engine and
compiled guest runtime per core), the event loop thread the runs on the async
core are task groups on (run_loop.py), and the warm AsyncSandbox whose linker
and poll threads their sandboxes use (each keeps what is its run's own: its
module finder, memory budget, CPU slots and instances)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from capsule.sandbox.guests import SharedGuests

if TYPE_CHECKING:  # (loaded by a run on the async core only)
    from capsule.sandbox.async_sandbox import AsyncSandbox
    from capsule.supervisor.loop_thread import LoopThread


class SharedRuns:
    """The guests, loop thread and warm sandbox a Runtime's runs share (see
    the module). ``guests``: None to have each run load its own (as it starts,
    where an interrupt reaches its build; then no sandbox is shared either).
    ``loop``: a loop thread its owner runs and stops, for the runs to use
    rather than start their own (the ``capsule`` command's; see
    Runtime._on_loop_thread); None: started by the first run that needs one."""

    def __init__(self, guests: SharedGuests | None, loop: LoopThread | None = None) -> None:
        self.guests = guests
        self._lock = threading.Lock()
        self._given = loop
        self._loop: LoopThread | None = None
        self._sandbox: AsyncSandbox | None = None
        self._closed = False

    def loop(self) -> LoopThread:
        """The runs' loop thread, started now if no run started it yet."""
        with self._lock:  # (one loop, however many runs start at once)
            if self._closed:
                raise RuntimeError("the runs' loop is stopped: its Runtime has closed")
            if self._given is not None:
                return self._given
            loop = self._loop
            if loop is None or not loop.running:
                from capsule.supervisor.loop_thread import LoopThread

                loop = LoopThread("capsule-runs")
                loop.start()
                self._loop = loop
            return loop

    def async_sandbox(self) -> AsyncSandbox | None:
        """The warm sandbox of the async core's runs, opened now if no run
        opened it yet (None without shared guests)."""
        guests = self.guests
        if guests is None:
            return None
        guest = guests.for_core("async")
        with self._lock:
            if self._closed:
                raise RuntimeError("the runs' sandbox is closed: its Runtime has closed")
            if self._sandbox is None:
                from capsule.sandbox.async_sandbox import AsyncSandbox

                self._sandbox = AsyncSandbox([], guest=guest).open_warm()
            return self._sandbox

    def close(self) -> None:
        """Stop the loop thread it started and the warm sandbox's poll threads
        (once the runs ended: nothing of theirs is on them by then); returns
        once they ended. A given loop thread is left to its owner."""
        with self._lock:
            self._closed = True
            loop, self._loop = self._loop, None
            sandbox, self._sandbox = self._sandbox, None
        if loop is not None:
            loop.close()
        if sandbox is not None:
            sandbox.close_warm()
