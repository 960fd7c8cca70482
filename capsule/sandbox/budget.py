"""The run's memory budget: a bound on the memory of the whole run.

Each task has its own ``ram`` cap, but a program may start hundreds of tasks
(``--max-live-tasks``) that each fill theirs: 512 x 256 MB is more than most
machines have, and the kernel's OOM killer would then end the host (or another
process of the machine). So the epoch ticker reads the process's anonymous
resident memory at every tick (``/proc/self/statm``, a few microseconds: what
guests wrote, and the host's own heap; not the pages of the runtime's image
that instances only read, which exist once however many map them). When it is
over the budget, the budget's own thread looks at the size of every live
task's linear memory (8 ms for 400 tasks, 14 ms the first time: not on the
ticker, which deadlines and time slices depend on), and the largest task is
stopped with ``memory_limit``, running or blocked, like the kernel's OOM killer
does: not whichever task happens to allocate next. A task whose memory cannot
be found (its guest overwrote the bytes that find it) counts as the largest.
It gets the next CPU slot, its instance is closed as it stops, and the memory is
read again before another is chosen.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

from capsule.logs import logger

_log = logger("sandbox")

#: Below this, Capsule itself (the host, a few instances) does not fit.
MIN_BUDGET_BYTES = 256 * 1024**2

_PAGE = os.sysconf("SC_PAGE_SIZE")
_STATM = "/proc/self/statm"


def machine_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of memory this process may use: the machine's, or the lowest
    limit of its cgroup and the cgroups above it (a container's), if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * _PAGE
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return total
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: memory.max along the path
            directory, limit_file = cgroups / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            directory, limit_file = cgroups / "memory" / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        for level in (directory, *directory.parents):
            try:
                text = (level / limit_file).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                total = min(total, int(text))
            if level == cgroups:
                break
    return total


def default_budget() -> int:
    """Half of what :func:`machine_memory` says, and never below the minimum."""
    return max(machine_memory() // 2, MIN_BUDGET_BYTES)


def can_read_memory() -> bool:
    """Whether this system tells a process its resident memory (Linux)."""
    return os.access(_STATM, os.R_OK)


class MemoryBudget:
    """The run's anonymous resident memory against ``limit_bytes``.

    Tasks are registered while their attempt's instance is open. ``measure``
    gives the size of the linear memory of each of the tasks it is handed
    (None: not known); ``stop`` is called with the one chosen to stop and why;
    both on the budget's thread, which ``close`` stops. Thread-safe: ``sample``
    runs on the epoch ticker, ``register`` and ``forget`` on task threads."""

    def __init__(
        self,
        limit_bytes: int,
        measure: Callable[[list[object]], list[int | None]],
        stop: Callable[[object, str], None],
    ) -> None:
        self.limit_bytes = limit_bytes
        self._measure = measure
        self._stop = stop
        self._statm = os.open(_STATM, os.O_RDONLY)
        #: Held while reading the memory, so a stale reading never lands last.
        #: (Reentrant: an allocation under it may collect a lost store, whose
        #: close tells ``forget``.)
        self._lock = threading.RLock()
        self._tasks: dict[object, None] = {}
        #: The task chosen to stop, until its instance is closed.
        self._stopping: object | None = None
        #: Anonymous resident bytes at the last reading.
        self.resident = 0
        #: Tasks stopped for it so far (for tests and diagnostics).
        self.stopped = 0
        #: Set when the memory is over the budget and no task is being stopped.
        self._over = threading.Event()
        self._closed = False
        #: Started the first time the memory is over the budget.
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        """Stop the budget's thread and close the file it reads."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._over.set()
        if thread is not None:
            thread.join()
        with self._lock:
            fd, self._statm = self._statm, -1
        if fd >= 0:
            os.close(fd)

    def register(self, task: object) -> None:
        with self._lock:
            self._tasks[task] = None

    def stopping(self, task: object) -> bool:
        """Whether ``task`` is the one chosen to stop (its instance must be
        closed at once, not handed to a thread that closes it later)."""
        return self._stopping is task

    def forget(self, task: object) -> None:
        """``task``'s attempt ended and its instance is closed."""
        with self._lock:
            self._tasks.pop(task, None)
            if self._stopping is task:
                self._stopping = None
                self._read()  # (its memory is gone: decide on fresh figures)

    def sample(self) -> None:
        """Read the memory; if it is over the budget and no task is being
        stopped already, have the budget's thread stop the largest. On the
        epoch ticker, every tick."""
        with self._lock:
            self._read()
            if self.resident <= self.limit_bytes or self._stopping is not None:
                return
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._watch, name="capsule-memory", daemon=True
                )
                self._thread.start()
        self._over.set()

    def _watch(self) -> None:
        while True:
            self._over.wait()
            self._over.clear()
            if self._closed:
                return
            try:
                self._choose()
            except Exception:  # (a look at /proc that failed: try at the next tick)
                _log.exception("the memory budget failed choosing a task to stop; tried again")

    def _choose(self) -> None:
        with self._lock:
            if self.resident <= self.limit_bytes or self._stopping is not None:
                return
            tasks = list(self._tasks)
        # (Outside the lock: task threads register and forget meanwhile.)
        # A task whose memory cannot be found while others' can (its guest
        # overwrote the bytes that find it) comes first: hiding must not make a
        # task immune.
        measured = self._measure(tasks)
        if all(size is None for size in measured):
            return  # (the host could not look: no grounds to choose anyone)
        sizes = [math.inf if size is None else size for size in measured]
        size, task = max(zip(sizes, tasks, strict=True), key=lambda pair: pair[0])
        with self._lock:
            if task not in self._tasks or self._stopping is not None:
                return  # (it ended meanwhile)
            self._stopping = task
            self.stopped += 1
            resident = self.resident
        mb = 1024**2
        held = "its memory could not be found" if size == math.inf else f"{size / mb:,.1f} MB"
        try:
            self._stop(
                task,
                f"the run's memory ({resident / mb:,.1f} MB) went over its budget of "
                f"{self.limit_bytes / mb:,.1f} MB (the run option max_total_ram), and this task held "
                f"the most of any ({held})",
            )
        except BaseException:
            with self._lock:
                self._stopping = None
            raise

    def _read(self) -> None:
        """Holding the lock."""
        if self._statm < 0:
            return
        fields = os.pread(self._statm, 128, 0).split()
        # (Resident minus shared: pages of files, like the runtime's image, are
        # in the page cache once however many instances map them.)
        self.resident = (int(fields[1]) - int(fields[2])) * _PAGE
