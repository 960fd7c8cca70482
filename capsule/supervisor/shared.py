"""What the runs of one host application (a Runtime) share, each made on
first use and stopped as the application closes it: the guests (an engine and
compiled guest runtime per core) and the event loop thread the runs on the
async core are task groups on (run_loop.py)."""

from __future__ import annotations

import threading

from capsule.sandbox.guests import SharedGuests
from capsule.supervisor.run_loop import LoopThread


class SharedRuns:
    """The guests and loop thread a Runtime's runs share (see the module).
    ``guests``: None to have each run load its own (as it starts, where an
    interrupt reaches its build)."""

    def __init__(self, guests: SharedGuests | None) -> None:
        self.guests = guests
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._closed = False

    def loop(self) -> LoopThread:
        """The runs' loop thread, started now if no run started it yet."""
        with self._lock:  # (one loop, however many runs start at once)
            if self._closed:
                raise RuntimeError("the runs' loop is stopped: its Runtime has closed")
            loop = self._loop
            if loop is None or not loop.running:
                loop = LoopThread("capsule-loop")
                loop.start()
                self._loop = loop
            return loop

    def close(self) -> None:
        """Stop the loop thread (once the runs on it ended: they hold no task
        on it by then); returns once it ended."""
        with self._lock:
            self._closed = True
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()
