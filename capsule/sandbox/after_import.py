"""Work a host function leaves for the moment its import has returned, on the
same thread.

A host function of the async core may wake another task's wait while it
holds a lock the wait's check takes (the router's): the check cannot run
there. Rather than send it to another thread (a hop per wake-up), the wake
defers it here, and it runs on this thread as soon as the import served here
returns (capsule.sandbox.wasm_async and async_sandbox serve imports between
:func:`begin` and :func:`end`), before the guest goes on."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from capsule.logs import logger

_log = logger("sandbox")

_local = threading.local()


def defer(work: Callable[[], None]) -> bool:
    """Run ``work`` on this thread once the import served here has returned;
    False (nothing deferred) if no import is served on this thread: the
    caller runs it elsewhere."""
    queue: deque[Callable[[], None]] | None = getattr(_local, "queue", None)
    if queue is None:
        return False
    queue.append(work)
    return True


def begin() -> deque[Callable[[], None]] | None:
    """An import is served on this thread from now: its deferred work's
    queue, to give :func:`end` once it returned (None: it is served within
    another import, whose end runs it). (Two functions, not a context
    manager: they wrap every host call.)"""
    if getattr(_local, "queue", None) is not None:
        return None
    queue: deque[Callable[[], None]] = deque()
    _local.queue = queue
    return queue


def end(queue: deque[Callable[[], None]]) -> None:
    """The import :func:`begin` gave ``queue`` for has returned (or raised):
    its deferred work runs, in order, and so does the work that work defers."""
    try:
        while queue:
            work = queue.popleft()
            try:
                work()
            except Exception:  # (a bug in one: the others still run, the import still returns)
                _log.exception("work deferred to the end of an import failed")
    finally:
        _local.queue = None
