"""The async core's step driver (see journaled.StepDriver): a host call that
may wait is the same step as on task threads, declared once by the code that
serves it (task_calls.py, message_steps.py, time_calls.py, http_calls.py,
operation_calls.py), but its wait runs by continuation: the call answers at
once, or with a Pending the continuation resolves later, and no thread waits
meanwhile (nor for a durable step's commit: the journal writer calls on)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from capsule.sandbox.async_sandbox import Attempt as Running
from capsule.sandbox.engine import Answer, Invocation
from capsule.sandbox.wasm_async import Pending, current_future
from capsule.supervisor.blocking import WAITING_GRACE_S
from capsule.supervisor.continuations import LAZY_START_S, Continuations
from capsule.supervisor.events import TaskHibernated
from capsule.supervisor.journaled import Durable, JournaledSteps
from capsule.supervisor.steps import Request, Step
from capsule.supervisor.waits import Waiting

#: What _StepAnswer.now holds until the answer comes.
_NOT_YET: Any = object()


class _StepAnswer:
    """Where a step's answer goes (its Resolve): kept for the step to return
    if it comes before the step returned, else given to the step's Pending
    (made then: a step answered at once makes none)."""

    __slots__ = ("lock", "now", "pending", "then")

    def __init__(self, then: Callable[[Answer], Any] | None) -> None:
        #: Guards the moment the step returns against an answer from another thread.
        self.lock = threading.Lock()
        self.now: Answer | BaseException = _NOT_YET
        self.pending: Pending | None = None
        self.then = then

    def __call__(self, answer: Answer | BaseException) -> None:
        with self.lock:
            pending = self.pending
            if pending is None:
                self.now = answer
                return
        then = self.then
        # (A host bug's exception fails the call: the sandbox keeps why.)
        if then is not None and not isinstance(answer, BaseException):
            try:
                answer = then(answer)
            except Exception as exc:
                answer = exc
        pending.resolve(answer)


class ContinuedSteps:
    """Runs the steps that may wait of a run on the async core."""

    def __init__(
        self,
        journal: JournaledSteps,
        continuations: Continuations,
        hibernate: Callable[[Running], int],
        hibernate_after: float | None,
    ) -> None:
        self.journal = journal
        self.continuations = continuations
        #: Gives back the pages a waiting attempt only read, the bytes it gave
        #: back (as a task thread's wait does once it lasted
        #: ``hibernate_after`` seconds; None: never).
        self.hibernate = hibernate
        self.hibernate_after = hibernate_after

    def step(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        live: Callable[[], Waiting],
        replayed: Callable[[Step], object] | None = None,
        durable: Durable = False,
        for_journal: Callable[[str], str] | None = None,
        then: Callable[[Answer], Any] | None = None,
    ) -> Any:
        """The step's answer (through ``then``) if it is over at once, else a
        Pending resolved with it once its wait (and its commit, if durable)
        is over."""
        answer_to = _StepAnswer(then)
        self.journal.step_later(
            caller,
            kind,
            request,
            live,
            self.continuations.run,
            answer_to,
            replayed=replayed,
            durable=durable,
            for_journal=for_journal,
        )
        with answer_to.lock:
            answer = answer_to.now
            if answer is _NOT_YET:
                pending = answer_to.pending = Pending()
        if answer is _NOT_YET:
            if self.hibernate_after is not None:
                self._hibernate_later(pending)
            return pending
        if isinstance(answer, BaseException):
            raise answer
        return answer if then is None else then(answer)

    def _hibernate_later(self, pending: Pending) -> None:
        """Once the wait has lasted hibernate_after, its attempt hibernates."""
        future = current_future()
        running = None if future is None else future.data
        after = self.hibernate_after
        if after is None or not isinstance(running, Running):
            return
        hibernation = _Hibernation(self, pending, running, time.monotonic() + after)
        if after < 2 * LAZY_START_S:
            self.continuations.timers.at(hibernation.when, hibernation.hibernate)
        else:
            self.continuations.later(hibernation.arm)


class _Hibernation:
    """A waiting step's attempt, to hibernate at ``when`` if its step still
    waits then (one object, not closures: most waiting steps make one)."""

    __slots__ = ("pending", "running", "steps", "when")

    def __init__(
        self, steps: ContinuedSteps, pending: Pending, running: Running, when: float
    ) -> None:
        self.steps = steps
        self.pending = pending
        self.running = running
        self.when = when

    def arm(self) -> None:
        """On the loop, LAZY_START_S after the step began waiting: its timer
        is set if it still waits (most waits are over before: no timer)."""
        if not self.pending.resolved:
            self.steps.continuations.timers.at(self.when, self.hibernate)

    def hibernate(self) -> None:
        if self.pending.resolved:
            return
        steps, running = self.steps, self.running
        released = steps.hibernate(running)
        after = steps.hibernate_after
        # Reported as the thread core reports it: after its wait was
        # (a wait too short to report hibernates silently).
        if released and after is not None and after >= WAITING_GRACE_S:
            invocation = running.invocation
            continuations = steps.continuations
            continuations.events.emit(
                TaskHibernated(
                    run_id=continuations.run_id,
                    task_id=invocation.task_id,
                    task=invocation.task,
                    released_bytes=released,
                )
            )
