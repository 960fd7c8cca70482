"""The run's memory budget: a bound on the resident memory of the whole run.

Each task has its own ``ram`` cap, but a program may start hundreds of tasks
(``--max-live-tasks``) that each fill theirs: 512 x 256 MB is more than most
machines have, and the kernel's OOM killer would then end the host (or another
process of the machine). So the epoch ticker reads the process's resident
memory at every tick (``/proc/self/statm``, a few microseconds), and while it is
over the budget the tasks executing wasm (only they can grow it) compare the
size of their linear memory: at its next tick the largest is stopped with
``memory_limit``, its instance closed at once, and the memory read again before
another is chosen. A task blocked in a host call is left alone: it grows
nothing meanwhile.

Like the OOM killer, it stops the largest consumer rather than the one that
asked last: a small task that happens to allocate at the wrong moment goes on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Below this, Capsule itself (the host, the compiled runtime, a few instances)
#: does not fit: every running task would be stopped.
MIN_BUDGET_BYTES = 256 * 1024**2
#: A report of a task's size older than this is stale: it stopped running
#: (blocked, or waiting for a CPU slot) and grows nothing.
_REPORT_TTL_S = 0.05

_PAGE = os.sysconf("SC_PAGE_SIZE")


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's
    limit if lower (a container's ``memory.max``)."""
    total = os.sysconf("SC_PHYS_PAGES") * _PAGE
    for limit_file in (
        "/sys/fs/cgroup/memory.max",  # cgroup v2
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
    ):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_budget() -> int:
    """Half of what :func:`machine_memory` says, and never below the minimum."""
    return max(machine_memory() // 2, MIN_BUDGET_BYTES)


class MemoryBudget:
    """Resident memory of the run, against ``limit_bytes``. Thread-safe:
    ``sample`` runs on the epoch ticker, ``stop`` on task threads at their
    epoch ticks, ``forget`` when a task's attempt ends. ``measure``, called on
    a task's thread, gives the size of its linear memory (None: unknown,
    counted as 0)."""

    def __init__(self, limit_bytes: int, measure: Callable[[], int | None]) -> None:
        self.limit_bytes = limit_bytes
        self._measure = measure
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        self._lock = threading.Lock()
        #: Sizes of linear memory the running tasks reported while over, and when.
        self._reports: dict[object, tuple[int, float]] = {}
        #: The task chosen to stop, until its instance is closed.
        self._stopping: object | None = None
        #: Resident bytes at the last sample.
        self.resident = 0
        #: Tasks stopped for it so far (for tests and diagnostics).
        self.stopped = 0
        self.sample()

    def close(self) -> None:
        fd, self._statm = self._statm, -1
        if fd >= 0:
            os.close(fd)

    @property
    def over(self) -> bool:
        return self.resident > self.limit_bytes

    def sample(self) -> None:
        """Read the process's resident memory (on the ticker, every tick)."""
        try:
            fields = os.pread(self._statm, 128, 0).split()
        except (OSError, ValueError):  # closed
            return
        self.resident = int(fields[1]) * _PAGE
        if not self.over and self._reports:
            with self._lock:
                self._reports.clear()

    def stop(self, task: object) -> str | None:
        """At an epoch tick of ``task`` while :attr:`over`: why it must stop now,
        if it is the largest of the tasks running, else None.

        Its first report only registers it: the other running tasks report at
        their own ticks, within one, before anyone is chosen."""
        size = self._measure() or 0
        now = time.monotonic()
        with self._lock:
            first = task not in self._reports
            self._reports[task] = size, now
            if first or self._stopping is not None:
                return None
            largest = max(
                (reported for reported, at in self._reports.values() if now - at <= _REPORT_TTL_S),
                default=0,
            )
            if size < largest:
                return None
            self._stopping = task
            self.stopped += 1
        return (
            f"the run's resident memory ({self.resident / 1024**2:,.0f} MB) went over its "
            f"budget of {self.limit_bytes / 1024**2:,.0f} MB (--max-total-ram); this task "
            f"had the largest memory of those running ({size / 1024**2:,.0f} MB)"
        )

    def stopping(self, task: object) -> bool:
        """Whether ``task`` is the one chosen to stop (its instance must be
        closed at once, not handed to a thread that closes it later)."""
        return self._stopping is task

    def forget(self, task: object) -> None:
        """``task``'s attempt ended and its instance is closed."""
        with self._lock:
            self._reports.pop(task, None)
            if self._stopping is not task:
                return
            self._stopping = None
        self.sample()  # (its memory is gone: decide on fresh figures)
