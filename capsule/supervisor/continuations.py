"""The continuation driver of waits (see waits.py): a host call's wait runs
without a thread of its own. It is checked at once; if it must wait, it
hooks its attempt's wake-ups (Attempt.wake: a message came, a child ended,
it was cancelled, an operation ended), and each wake-up has it checked
again: on the waker's thread once the import that woke it has returned, if
the waker is a host function (capsule.sandbox.after_import), else on the
run's event loop (RunLoop). A wait still waiting LAZY_START_S after it began
(most waits are answered sooner) gets a task on the loop, which checks it
in a cancel scope whose deadline is its timeout or its attempt's deadline
(what stops it too), whichever is first, and a timer that reports it
waiting; one whose deadline is nearer gets its task at once. Once it is
ready, timed out or its task must stop, its ``finish`` makes the answer,
which goes to a callback (an async import's ``Pending.resolve``, say).

A wait is checked by one thread at a time and finished once, however many
wake-ups race; a wake-up never runs a check while its waker may hold the
router's lock (which a check takes)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import anyio

from capsule.sandbox import after_import
from capsule.sandbox.scheduler import CpuSlots
from capsule.supervisor.blocking import WAITING_GRACE_S
from capsule.supervisor.events import EventStream, TaskResumed, TaskWaiting
from capsule.supervisor.ids import EventIds
from capsule.supervisor.run_loop import LoopTimer, RunLoop
from capsule.supervisor.tree import nearest_deadline
from capsule.supervisor.waits import Answer, Resolve, Wait, Waiting

#: How long a wait goes without a task on the loop (nor its timers): one
#: answered sooner (a reply to an ask, a message to a busy receiver) costs
#: the loop nothing. Well under WAITING_GRACE_S, when its task reports it.
LAZY_START_S = 0.002


class Continuations:
    """Runs the waits of one run's host calls by continuation."""

    def __init__(
        self,
        timers: RunLoop,
        events: EventStream,
        run_id: str,
        before_waiting: Callable[[str], None],
    ) -> None:
        #: The run's loop, where waits are awaited and timed (async_host.py
        #: sets the timers of its hibernations there too).
        self.timers = timers
        self.events = events
        self.run_id = run_id
        #: Called with the task's id before it is reported as waiting (its
        #: output is shown first).
        self.before_waiting = before_waiting
        #: What runs on the loop LAZY_START_S after it came (see later), in
        #: the order it came, and whether a sweep of it is due already.
        self._later: deque[tuple[float, Callable[[], None]]] = deque()
        self._sweep_due = False
        self._later_lock = threading.Lock()

    def run(self, waiting: Waiting, resolve: Resolve) -> None:
        """Give ``resolve`` the answer of a host call that may wait, once its
        wait (and the next ones it makes) is over: on this thread if it is
        over at once, else later, on the loop's thread."""
        if isinstance(waiting, Wait):
            _Continuation(self, waiting, resolve).begin()
        else:
            resolve(waiting)

    def later(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop LAZY_START_S from now (from any
        thread). One timer of the loop's sweeps them all, and is set again
        by the loop itself while any is left: a stream of them costs no
        thread a wake-up of the loop. RuntimeError if the loop has stopped
        (its run ended)."""
        if self.timers.closed:
            raise RuntimeError(f"{self.timers.name} is stopped: its run has ended")
        with self._later_lock:
            self._later.append((time.monotonic() + LAZY_START_S, callback))
            if self._sweep_due:
                return
            self._sweep_due = True
        try:
            self.timers.soon(self._sweep)
        except BaseException:
            with self._later_lock:
                self._sweep_due = False
                self._later.clear()
            raise

    def _sweep(self) -> None:
        """On the loop: run what is due, and sweep again when the next is."""
        now = time.monotonic()
        due: list[Callable[[], None]] = []
        with self._later_lock:
            later = self._later
            while later and later[0][0] <= now:
                due.append(later.popleft()[1])
            try:
                if later:
                    self.timers.at(later[0][0], self._sweep)
                else:
                    self._sweep_due = False
            except RuntimeError:  # its loop is stopping: what is left never runs
                later.clear()
        for callback in due:
            try:
                callback()
            except Exception as exc:  # a bug: kept, as the loop keeps its callbacks'
                self.timers.failures.append(exc)


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

    __slots__ = (
        "driver",
        "hook",
        "limit",
        "lock",
        "over",
        "queued",
        "report_timer",
        "reported",
        "resolve",
        "started",
        "started_task",
        "wait",
        "woken_event",
    )

    def __init__(self, driver: Continuations, wait: Wait, resolve: Resolve) -> None:
        self.driver = driver
        self.wait = wait
        self.resolve = resolve
        self.started = time.monotonic()
        self.limit = None if wait.timeout is None else self.started + wait.timeout
        #: Guards the checks and the end: one thread at a time.
        self.lock = threading.Lock()
        self.over = False
        #: A check is due after a wake-up (set by a wake, cleared by what
        #: checks, before it looks).
        self.queued = False
        #: What a wake-up sets while its task awaits it (made by the task).
        self.woken_event: anyio.Event | None = None
        self.reported = False
        self.report_timer: LoopTimer | None = None
        #: Its task on the loop has started (on the loop's thread).
        self.started_task = False
        #: What its attempt's wake calls while it waits (one object, to unhook it).
        self.hook = self.woken

    def begin(self) -> None:
        with self.lock:
            # Hooked before it is first checked: a wake-up from then on is
            # seen by that check or by a later one.
            self.wait.attempt.waker = self.hook
            outcome = self._decide(starting=True)
            if outcome is None:
                try:
                    if self._deadline_near():
                        self.driver.timers.soon(self._start)
                    else:
                        self.driver.later(self._start)
                except Exception as exc:  # (its run ended: the loop is closed)
                    self._end()
                    outcome = exc
        if outcome is not None:
            self._deliver(outcome)

    def _deadline_near(self) -> bool:
        """Whether its time is up within 2 * LAZY_START_S of its start (then
        its task starts at once: its lazy start would come too late)."""
        wait = self.wait
        if wait.until_ready:
            return False
        near = self.started + 2 * LAZY_START_S
        if self.limit is not None and self.limit < near:
            return True
        deadline = nearest_deadline(wait.attempt.scope)
        return deadline is not None and deadline < near

    def _deadline(self) -> float:
        """When its time is up (its timeout, or its attempt's deadline); inf: never."""
        wait = self.wait
        deadline = math.inf
        if not wait.until_ready:
            for when in (self.limit, nearest_deadline(wait.attempt.scope)):
                if when is not None:
                    deadline = min(deadline, when)
        return deadline

    def _start(self) -> None:
        """On the loop: its task starts, in the loop's task group, unless it
        is over already."""
        if self.over:
            return
        self.started_task = True
        invocation = self.wait.attempt.invocation
        self.driver.timers.start_soon(self._waiting, f"capsule-wait {invocation.task_id}")

    async def _waiting(self) -> None:
        """Its task: checks it after each wake-up, and once its time is up,
        until it is over."""
        deadline = self._deadline()
        self.report_timer = self.driver.timers.at(self.started + WAITING_GRACE_S, self.report)
        while True:
            self.woken_event = woken = anyio.Event()
            self.queued = False  # (before it looks: a wake from now on sets this event)
            if self._settled():
                return
            if deadline == math.inf:  # (no scope to make: most waits have no time limit)
                await woken.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await woken.wait()

    def woken(self) -> None:
        """Its attempt was woken (on the waker's thread): it is checked once
        the waker's import returned, or on the loop."""
        if self.queued or self.over:
            return
        self.queued = True
        if not after_import.defer(self._check):
            self.driver.timers.soon(self._wake)

    def _wake(self) -> None:
        """On the loop: its task checks it (it checks first once started),
        or, before it has one, this callback does."""
        if not self.started_task:
            self._check()
            return
        woken = self.woken_event
        if woken is not None:
            woken.set()

    def _check(self) -> None:
        """After a wake-up, where no lock is held: checked, and finished if
        it is over (a wait still waiting waits for the next wake-up, or for
        its task's deadline)."""
        self.queued = False  # (before it looks: a wake from now on checks again)
        self._settled()

    def _settled(self) -> bool:
        """Checked (one thread at a time): whether it is over, its answer
        delivered (outside the lock) if it just ended."""
        with self.lock:
            if self.over:
                return True
            outcome = self._decide()
        if outcome is None:
            return False
        self._deliver(outcome)
        return True

    def _decide(self, starting: bool = False) -> bool | BaseException | None:
        """Holding the lock: True once what it waits for holds, False once it
        timed out or its task must stop, or what its check raised, if it is
        over now (then it has ended); None while it waits on. ``starting``:
        what it waits for is started first."""
        wait = self.wait
        outcome: bool | BaseException | None = None
        try:
            start = wait.start
            if starting and start is not None:
                start()
            if wait.ready():
                outcome = True
            elif wait.until_ready:
                return None
            elif wait.attempt.invocation.check_stop() is not None or (
                self.limit is not None and time.monotonic() >= self.limit
            ):
                outcome = False
            else:
                return None
        except Exception as exc:  # a host bug: its host call fails
            outcome = exc
        self._end()
        return outcome

    def _deliver(self, outcome: bool | BaseException) -> None:
        """Outside the lock: the answer of a wait that is over goes on."""
        if isinstance(outcome, BaseException):
            self.resolve(outcome)
            return
        try:
            waiting = self.wait.finish(outcome)
        except Exception as exc:  # a host bug: its host call fails, not this thread
            self.resolve(exc)
            return
        if isinstance(waiting, Wait):
            _Continuation(self.driver, waiting, self.resolve).begin()
        else:
            self.resolve(waiting)

    def _end(self) -> None:
        """Holding the lock: it is over; unhooked, its report's timer
        cancelled, and reported resumed if it was reported waiting."""
        self.over = True
        attempt = self.wait.attempt
        if attempt.waker is self.hook:
            attempt.waker = None
        if self.report_timer is not None:
            self.report_timer.cancel()
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
