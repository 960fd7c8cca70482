"""The continuation driver of waits (see waits.py): a host call's wait runs
without a thread of its own. It is checked at once; if it must wait, it hooks
its attempt's wake-ups (Attempt.wake: a message came, a child ended, it was
cancelled, an operation ended) and sets timers on the run's timer service for
its timeout, its attempt's deadline and the moment it is reported waiting.
Each wake-up and timer re-checks it on the timer service's thread; once it is
ready, timed out or its task must stop, its ``finish`` makes the answer, which
goes to a callback (an async import's ``Pending.resolve``, say).

A wait is checked by one thread at a time and finished once, however many
wake-ups race; a wake-up never runs a check on the waker's thread (it may
hold the router's lock, which a check takes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from capsule.sandbox.scheduler import CpuSlots
from capsule.supervisor.blocking import WAITING_GRACE_S
from capsule.supervisor.events import EventStream, TaskResumed, TaskWaiting
from capsule.supervisor.ids import EventIds
from capsule.supervisor.tree import nearest_deadline
from capsule.supervisor.waits import Answer, Resolve, Wait, Waiting


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class TimerService(Protocol):
    """Where waits run by continuation are checked and timed: the thread
    core's Timers, or the async core's RunLoop."""

    def at(self, when: float, callback: Callable[[], None]) -> Cancellable: ...

    def soon(self, callback: Callable[[], None]) -> None: ...


class Continuations:
    """Runs the waits of one run's host calls by continuation."""

    def __init__(
        self,
        timers: TimerService,
        events: EventStream,
        run_id: str,
        before_waiting: Callable[[str], None],
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.timers = timers
        self.events = events
        self.run_id = run_id
        #: Called with the task's id before it is reported as waiting (its
        #: output is shown first).
        self.before_waiting = before_waiting
        #: Where the check a wake-up queues runs (never on the waker's
        #: thread): the timer service's thread unless given (a poll thread's
        #: run queue, say).
        self.schedule = timers.soon if schedule is None else schedule

    def run(self, waiting: Waiting, resolve: Resolve) -> None:
        """Give ``resolve`` the answer of a host call that may wait, once its
        wait (and the next ones it makes) is over: on this thread if it is
        over at once, else later, on the timer service's thread."""
        if isinstance(waiting, Wait):
            _Continuation(self, waiting, resolve).begin()
        else:
            resolve(waiting)

    def finished(self, wait: Wait, ready: bool, resolve: Resolve) -> None:
        """``wait`` is over (``ready``: what it waited for holds)."""
        try:
            waiting = wait.finish(ready)
        except Exception as exc:  # a host bug: its host call fails, not this thread
            resolve(exc)
            return
        self.run(waiting, resolve)


def wait_here(driver: Continuations, slots: CpuSlots, waiting: Waiting) -> Answer:
    """Run a wait by continuation while the calling thread waits for its
    answer, without its CPU slot meanwhile: a task thread's host call, driven
    as an async import's will be."""
    if not isinstance(waiting, Wait):
        return waiting
    invocation = waiting.attempt.invocation
    over = threading.Event()
    answers: list[Answer | BaseException] = []

    def resolve(answer: Answer | BaseException) -> None:
        answers.append(answer)
        over.set()

    driver.run(waiting, resolve)
    if not over.is_set():
        with slots.released(lambda: invocation.check_stop() is not None):
            over.wait()
    answer = answers[0]
    if isinstance(answer, BaseException):
        raise answer
    return answer


class _Continuation:
    """One wait run by continuation, from its start to its finish."""

    def __init__(self, driver: Continuations, wait: Wait, resolve: Resolve) -> None:
        self.driver = driver
        self.wait = wait
        self.resolve = resolve
        self.started = time.monotonic()
        self.limit = None if wait.timeout is None else self.started + wait.timeout
        #: Guards the checks and the end: one thread at a time.
        self.lock = threading.Lock()
        self.over = False
        #: A check is queued on the timer service (set by a wake, cleared by
        #: the check before it looks).
        self.queued = False
        self.reported = False
        self.timers: list[Cancellable] = []
        #: What its attempt's wake calls while it waits (one object, to unhook it).
        self.hook = self.woken

    def begin(self) -> None:
        with self.lock:
            # Hooked before it is first checked: a wake-up from then on is
            # seen by that check or queues another.
            self.wait.attempt.waker = self.hook
            outcome = self._decide(starting=True)
            if outcome is None:
                try:
                    self._set_timers()
                except Exception as exc:  # (its run ended: the timer service is closed)
                    self._end()
                    outcome = exc
        if outcome is not None:
            self._deliver(outcome)

    def _set_timers(self) -> None:
        """Holding the lock: the checks due at its timeout and its attempt's
        deadline (what stops it too), and its report as waiting."""
        timers = self.driver.timers
        wait = self.wait
        if not wait.until_ready:
            for when in (self.limit, nearest_deadline(wait.attempt.scope)):
                if when is not None:
                    self.timers.append(timers.at(when, self.check))
        self.timers.append(timers.at(self.started + WAITING_GRACE_S, self.report))

    def woken(self) -> None:
        """Its attempt was woken (on the waker's thread): a check is queued."""
        if self.queued or self.over:
            return
        self.queued = True
        self.driver.schedule(self.check)

    def check(self) -> None:
        self.queued = False  # (before it looks: a wake from now on queues another)
        with self.lock:
            if self.over:
                return
            outcome = self._decide()
        if outcome is not None:
            self._deliver(outcome)

    def _decide(self, starting: bool = False) -> bool | BaseException | None:
        """Holding the lock: whether it became ready, or what its check
        raised, if it is over now (then it has ended); None while it waits on.
        ``starting``: what it waits for is started first."""
        try:
            start = self.wait.start
            if starting and start is not None:
                start()
            outcome: bool | BaseException | None = self._outcome()
        except Exception as exc:  # a host bug: its host call fails
            outcome = exc
        if outcome is not None:
            self._end()
        return outcome

    def _deliver(self, outcome: bool | BaseException) -> None:
        """Outside the lock: the answer of a wait that is over goes on."""
        if isinstance(outcome, BaseException):
            self.resolve(outcome)
        else:
            self.driver.finished(self.wait, outcome, self.resolve)

    def _outcome(self) -> bool | None:
        """Holding the lock: True once what it waits for holds, False once it
        timed out or its task must stop, None while it waits on."""
        wait = self.wait
        if wait.ready():
            return True
        if wait.until_ready:
            return None
        if wait.attempt.invocation.check_stop() is not None:
            return False
        if self.limit is not None and time.monotonic() >= self.limit:
            return False
        return None

    def _end(self) -> None:
        """Holding the lock: it is over; unhooked, its timers cancelled, and
        reported resumed if it was reported waiting."""
        self.over = True
        attempt = self.wait.attempt
        if attempt.waker is self.hook:
            attempt.waker = None
        for timer in self.timers:
            timer.cancel()
        if self.reported:
            self.driver.events.emit(TaskResumed(**self._ids()))

    def report(self) -> None:
        """It has waited WAITING_GRACE_S: reported waiting (as the thread
        driver reports it)."""
        with self.lock:
            if self.over:
                return
            self.reported = True
            invocation = self.wait.attempt.invocation
            self.driver.before_waiting(invocation.task_id)
            self.driver.events.emit(TaskWaiting(**self._ids(), on=self.wait.reason))

    def _ids(self) -> EventIds:
        invocation = self.wait.attempt.invocation
        return EventIds(run_id=self.driver.run_id, task_id=invocation.task_id, task=invocation.task)
