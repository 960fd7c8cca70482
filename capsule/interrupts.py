"""How a run is interrupted (Ctrl-C, SIGTERM): on the main thread, where
signals land, as a KeyboardInterrupt; on a thread an owner drives the run
from (the host API's worker threads, where no signal lands), by the owner
setting the stop event it gave that thread. The waits that can be
interrupted (the program's import, the task tree, the guest runtime's build)
watch both, so a run stops the same way wherever it is driven from."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: How often a wait looks for an interrupt: a timed wait, so that a signal on
#: the main thread (and a stop event elsewhere) is seen promptly.
POLL_SECONDS = 0.1

_thread = threading.local()


@contextmanager
def interrupted_by(stop: threading.Event) -> Iterator[None]:
    """While in this block, setting ``stop`` interrupts this thread's run as
    Ctrl-C interrupts one on the main thread."""
    previous: threading.Event | None = getattr(_thread, "stop", None)
    _thread.stop = stop
    try:
        yield
    finally:
        _thread.stop = previous


def stop_event() -> threading.Event | None:
    """The stop event this thread's run watches (None: only signals stop it)."""
    stop: threading.Event | None = getattr(_thread, "stop", None)
    return stop


def wait_interruptibly(finished: threading.Event, interrupt: Callable[[], None]) -> bool:
    """Wait until ``finished`` is set; each interrupt meanwhile calls
    ``interrupt`` (which must make it set soon) and the wait goes on. Whether
    it was interrupted."""
    stop = stop_event()
    interrupted = False
    while not finished.is_set():
        try:
            finished.wait(POLL_SECONDS)
            if stop is not None and stop.is_set() and not interrupted:
                interrupted = True
                interrupt()
        except KeyboardInterrupt:
            interrupted = True
            interrupt()
    return interrupted
