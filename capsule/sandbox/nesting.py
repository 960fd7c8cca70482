"""Room for nested task calls on one thread, borrowed from the interpreter's
process-wide settings only while needed and given back.

A direct task call runs inline: host Python calls into wasm, whose import calls
back into host Python, which runs the callee's wasm, and so on, one level per
nested call on the same thread. That needs a native stack deep enough for every
level's wasm and host frames, and a recursion limit that lets the host frames
pile up. CPython has neither per thread: ``threading.stack_size`` applies to
every thread started while it is set, and ``sys.setrecursionlimit`` to every
thread. So the stack size is set only around starting one task thread (under a
lock), and the recursion limit is raised only while some thread's calls nest
deeper than it allows (:func:`nested_call`), then restored; an application's
own change made meanwhile is left as it is. Most programs never nest that deep,
and never touch it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

#: Stack for threads that run task trees. Nested calls run inline, one wasm
#: activation above another on the same native stack, so it must hold
#: MAX_DEPTH of them (wasmtime lets each use 512 KiB) plus the host frames
#: between; reserved address space, committed only as used.
TASK_THREAD_STACK = 256 * 1024**2

_stack_lock = threading.Lock()


def start_deep_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread with a TASK_THREAD_STACK stack. The size is
    process-wide while set (CPython takes no per-thread size), so it is set only
    for the start of this one thread and then put back: an application thread
    started at that same moment is the only other one that could get it."""
    with _stack_lock:
        previous = threading.stack_size(TASK_THREAD_STACK)
        try:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread


class _RecursionHeadroom:
    """The recursion limit raised while any holder needs more than it was, and
    put back when the last holder ends (unless someone else set it meanwhile).
    Holders overlap (runs on several threads), so no holder restores the limit
    under another one that still nests deep."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        #: The limit before the first holder, and the one holders raised it to.
        self._original = 0
        self._raised: int | None = None

    @contextmanager
    def hold(self, limit: int) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._original, self._raised = sys.getrecursionlimit(), None
            self._holders += 1
            current = sys.getrecursionlimit()
            if self._raised is not None and current != self._raised:
                # Set by someone else since a holder raised it: theirs to keep.
                self._original, self._raised = current, None
            if current < limit:
                sys.setrecursionlimit(limit)
                self._raised = limit
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if (
                    self._holders == 0
                    and self._raised is not None
                    and sys.getrecursionlimit() == self._raised
                ):
                    sys.setrecursionlimit(self._original)


_HEADROOM = _RecursionHeadroom()


def recursion_headroom(limit: int) -> AbstractContextManager[None]:
    """Hold the recursion limit at ``limit`` or above (never lowered) for the
    ``with`` block; see _RecursionHeadroom."""
    return _HEADROOM.hold(limit)


#: Python frames the host adds per level of nested task calls (about 20
#: measured; with margin).
HOST_FRAMES_PER_LEVEL = 40
#: Frames left for what the host does at the deepest level (json, journal).
HOST_FRAMES_MARGIN = 300

_levels = threading.local()


@contextmanager
def nested_call() -> Iterator[None]:
    """Around a direct task call made on this thread (which runs the callee
    inline, one level deeper): raises the recursion limit for the call if the
    levels now under way on this thread need more than it allows. Task
    threads are Capsule's own, so their depth is that of their calls alone."""
    level = getattr(_levels, "count", 0) + 1
    _levels.count = level
    needed = (level + 1) * HOST_FRAMES_PER_LEVEL + HOST_FRAMES_MARGIN
    try:
        with recursion_headroom(needed) if needed > sys.getrecursionlimit() else nullcontext():
            yield
    finally:
        _levels.count = level - 1
