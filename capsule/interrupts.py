"""How a run is interrupted (Ctrl-C, SIGTERM): on the main thread, where
signals land, as a KeyboardInterrupt; on a thread an owner drives the run
from (the host API's worker threads, where no signal lands), by the owner's
StopRequest for that thread. The waits that can be interrupted (the
program's import, the task tree, the guest runtime's build) heed both, so a
run stops the same way wherever it is driven from."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

#: How often a wait on the main thread looks up from its wait: a timed wait,
#: so that a signal is seen promptly.
POLL_SECONDS = 0.1

_thread = threading.local()


class StopRequest:
    """A stop asked of a run by its owner, from any thread: each wait of the
    run in progress is interrupted at once, and any begun later at its start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next_key = 0

    @property
    def requested(self) -> bool:
        return self._requested

    def request(self) -> None:
        """Stop the run (once; a second request does nothing)."""
        with self._lock:
            if self._requested:
                return
            self._requested = True
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            callback()

    @contextmanager
    def calling(self, callback: Callable[[], None]) -> Iterator[None]:
        """While in this block, a request calls ``callback`` (at once if one
        came before)."""
        with self._lock:
            key = self._next_key
            self._next_key += 1
            self._callbacks[key] = callback
            requested = self._requested
        try:
            if requested:
                callback()
            yield
        finally:
            with self._lock:
                del self._callbacks[key]


@contextmanager
def interrupted_by(stop: StopRequest) -> Iterator[None]:
    """While in this block, ``stop`` interrupts this thread's run as Ctrl-C
    interrupts one on the main thread."""
    previous: StopRequest | None = getattr(_thread, "stop", None)
    _thread.stop = stop
    try:
        yield
    finally:
        _thread.stop = previous


def on_stop(callback: Callable[[], None]) -> AbstractContextManager[None]:
    """While in this block, a stop of this thread's run calls ``callback``
    (a thread without a StopRequest is stopped by signals alone)."""
    stop: StopRequest | None = getattr(_thread, "stop", None)
    return nullcontext() if stop is None else stop.calling(callback)


def stop_requested() -> bool:
    """Whether this thread's run was asked to stop by its owner."""
    stop: StopRequest | None = getattr(_thread, "stop", None)
    return stop is not None and stop.requested


def wait_interruptibly(finished: threading.Event, interrupt: Callable[[], None]) -> bool:
    """Wait until ``finished`` is set; each interrupt meanwhile calls
    ``interrupt`` (which must make it set soon) and the wait goes on. Whether
    it was interrupted."""
    interrupted = False

    def stopped() -> None:
        nonlocal interrupted
        interrupted = True
        interrupt()

    with on_stop(stopped):
        while not finished.is_set():
            try:
                finished.wait(POLL_SECONDS)
            except KeyboardInterrupt:
                interrupted = True
                interrupt()
    return interrupted
