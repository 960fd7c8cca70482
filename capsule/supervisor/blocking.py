"""The thread driver of waits (see waits.py): how a task waits in a blocking
host call (a receive, a wait on children, a sleep, an HTTP request) on its
own thread: without its CPU slot, woken by what it waits on or by its stop,
reported as waiting once the wait lasts, and hibernated once it lasts longer."""

from __future__ import annotations

import time
from collections.abc import Callable

from capsule.sandbox.engine import Sandbox
from capsule.supervisor.events import (
    EventStream,
    TaskHibernated,
    TaskResumed,
    TaskWaiting,
    WaitReason,
)
from capsule.supervisor.ids import EventIds
from capsule.supervisor.tree import Attempt, nearest_deadline
from capsule.supervisor.waits import Answer, Wait, Waiting

#: How long a task waits in a host call before it is reported as waiting.
WAITING_GRACE_S = 0.005


class Blocking:
    """Blocks the tasks of one run in their host calls."""

    def __init__(
        self,
        sandbox: Sandbox,
        events: EventStream,
        run_id: str,
        hibernate_after: float | None,
        before_waiting: Callable[[str], None],
    ) -> None:
        self.sandbox = sandbox
        self.events = events
        self.run_id = run_id
        self.hibernate_after = hibernate_after
        #: Called with the task's id before it is reported as waiting (its
        #: output is shown first).
        self.before_waiting = before_waiting

    def run(self, waiting: Waiting) -> Answer:
        """The answer of a host call that may wait, once its wait (and the
        next ones it makes) is over, waiting on the calling thread."""
        while isinstance(waiting, Wait):
            wait = waiting
            if wait.inline is not None:
                wait.inline()  # (what it waits for is over once this returns)
                waiting = wait.finish(True)
            else:
                waiting = wait.finish(
                    self.block(wait.attempt, wait.ready, wait.timeout, wait.reason)
                )
        return waiting

    def block(
        self, attempt: Attempt, ready: Callable[[], bool], timeout: float | None, on: WaitReason
    ) -> bool:
        """Block the caller until ``ready()``, ``timeout`` or it must stop.
        Returns whether it became ready."""
        if ready():  # the common case on a busy mailbox: no slot handover, no events
            return True
        invocation = attempt.invocation
        started = time.monotonic()
        limit = None if timeout is None else started + timeout
        # A wait is reported (a waiting event, then a resumed one) once it has
        # lasted WAITING_GRACE_S: the waits of an ask/reply exchange are far
        # shorter, and reporting each doubled what journaling an exchange cost.
        report_at = started + WAITING_GRACE_S
        after = self.hibernate_after
        hibernate_at = None if after is None else started + after
        ids = EventIds(run_id=self.run_id, task_id=invocation.task_id, task=invocation.task)
        waiting = False
        try:
            # (One that must stop takes its slot back first: its instance, and
            # memory, go sooner.)
            with self.sandbox.slots.released(lambda: invocation.check_stop() is not None):
                while True:
                    if ready():
                        return True
                    if invocation.check_stop() is not None:
                        return False
                    now = time.monotonic()
                    if limit is not None and now >= limit:
                        return False
                    if not waiting and now >= report_at:
                        self.before_waiting(invocation.task_id)
                        self.events.emit(TaskWaiting(**ids, on=on))
                        waiting = True
                    if hibernate_at is not None and now >= hibernate_at:
                        released = self.sandbox.hibernate()
                        if released and waiting:  # (a wait too short to report, silent)
                            self.events.emit(TaskHibernated(**ids, released_bytes=released))
                        hibernate_at = None
                        now = time.monotonic()  # (it took a few milliseconds)
                    # Woken by a child ending, a cancellation or an abort; the
                    # timed wait covers deadlines (checked by check_stop).
                    bound = nearest_deadline(attempt.scope)
                    ends = [t for t in (limit, bound, hibernate_at) if t is not None]
                    if not waiting:
                        ends.append(report_at)
                    attempt.wait_for_wakeup(min([*ends, now + 1.0]) - now)
        finally:
            if waiting:
                self.events.emit(TaskResumed(**ids))
