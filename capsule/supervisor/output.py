"""What tasks print: journaled as a step before it is shown, shown once its
batch is committed (as a TaskOutput event), and how much of it waits to be
shown (held by the host, so bounded and counted as the task's memory)."""

from __future__ import annotations

import threading
from functools import partial

from capsule.logs import logger
from capsule.sandbox.engine import Invocation
from capsule.supervisor.events import EventStream, TaskOutput
from capsule.supervisor.journaled import JournaledSteps
from capsule.supervisor.steps import Step

_log = logger("supervisor")

#: Output journaled but not yet shown, in characters, beyond which a task's
#: output waits for its commit (and so for the display).
OUTPUT_UNSHOWN_LIMIT = 1 << 20


class Output:
    """The output of a run's tasks, from the guest's write to the display."""

    def __init__(self, run_id: str, events: EventStream, journal: JournaledSteps) -> None:
        self.run_id = run_id
        self.events = events
        self.journal = journal
        #: Characters of output journaled but not yet shown (see write): in
        #: all, and by task (only tasks with some have an entry).
        self._lock = threading.Lock()
        self._unshown_total = 0
        self._unshown: dict[str, int] = {}
        #: Showing output failed once (a closed pipe): said once, not per line.
        self._failed = False

    def write(self, invocation: Invocation, stream: str, text: str) -> None:
        # Journaled before it is shown, so that a replay knows exactly what was
        # shown already: replayed output is not shown again. The task does not
        # wait for the commit: the line is shown once its batch is committed
        # (lines in bursts share one commit; waiting, each was one). Unless too
        # much waits to be shown already: then it waits.
        task_id, size = invocation.task_id, len(text)
        with self._lock:
            self._unshown_total += size
            self._unshown[task_id] = self._unshown.get(task_id, 0) + size
            durable = self._unshown_total > OUTPUT_UNSHOWN_LIMIT
        replayed: list[Step] = []
        ok, _ = self.journal.step(
            invocation,
            "output",
            (stream, text),
            lambda: (True, ""),
            replayed=replayed.append,
            durable=durable,
        )
        if not ok or replayed:
            self._show(task_id, size, None)
            return
        shown = TaskOutput(
            run_id=self.run_id,
            task_id=task_id,
            task=invocation.task,
            stream="stderr" if stream == "stderr" else "stdout",
            text=text,
        )
        self.journal.write(self.journal.log.after_commit, partial(self._show, task_id, size, shown))

    def _show(self, task_id: str, size: int, event: TaskOutput | None) -> None:
        try:
            if event is not None:
                self.events.emit(event)
        except Exception as exc:
            # It is journaled; the run goes on (it used to fail the task that
            # printed). Said once: a closed pipe fails every line after it.
            if not self._failed:
                self._failed = True
                kept = "; the journal keeps it" if self.journal.journaling else ""
                _log.warning("output can no longer be shown (%r)%s", exc, kept)
        finally:
            # Counted down only once shown: a task whose count is 0 has shown
            # all it printed (see shown).
            with self._lock:
                self._unshown_total -= size
                left = self._unshown.get(task_id, 0) - size
                if left > 0:
                    self._unshown[task_id] = left
                else:
                    self._unshown.pop(task_id, None)

    def shown(self, task_id: str) -> None:
        """Before a task's lifecycle is reported further (it waits, starts a
        child, made an HTTP request, or its attempt ended): what it printed is
        shown first."""
        if self._unshown.get(task_id):
            self.journal.write(self.journal.log.sync)

    def unshown(self, task_id: str) -> int:
        """What the task printed that waits to be shown, in characters."""
        return self._unshown.get(task_id, 0)
