"""Journaled host calls: each host call of a task (a step) is answered live and
recorded, or, while its attempt replays a resumed run, answered from the
journal; a replay that asks for something else has diverged. Also what
recording may cost (per attempt and per run) and what stops the run when the
journal cannot take more."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol, overload

from capsule.sandbox.engine import ErrorInfo, Invocation
from capsule.supervisor.live import LiveTree
from capsule.supervisor.option_specs import resume_with, size_text
from capsule.supervisor.steps import JournalFailure, Request, Step, StepLog, request_text
from capsule.supervisor.tree import Attempt
from capsule.supervisor.waits import Answer, Resolve, Wait, Waiting

#: What a step costs to record beyond its request and answer (the step's own
#: entry in its batch, and the waiting and resumed events a blocking one
#: adds), counted against RunSettings.max_task_output_bytes.
STEP_RECORD_OVERHEAD = 128
#: An attempt adds what it recorded to the run's total in steps of this much
#: (and when it ends): the total may lag by this much per live attempt.
RECORDED_COUNT_STEP = 1 << 20
#: Steps before which a guest forgets the credit its sends were given (they may
#: wait, holding places others need, or tell it more about its targets: that
#: one ended, say), and the host gives back the places reserved for it (see
#: MessageCalls.send).
ENDS_CREDIT = frozenset(
    {"call", "spawn", "wait", "wait_any", "cancel", "sleep", "ask", "http", "receive"}
    | {"http_start", "wait_start", "receive_start", "ask_start", "poll"}
)

#: Whether a step waits for its commit before its answer is given: always, or
#: as its live answer says (called once it is made: a poll that reported
#: operations which ended).
Durable = bool | Callable[[], bool]


@dataclass(frozen=True)
class Divergence:
    """Where a resumed run's replay diverged from its journal: step ``step``
    of attempt ``attempt`` of the task ``task`` (``task_id``), and why."""

    task: str
    task_id: str
    attempt: int
    step: int
    message: str


class StepDriver(Protocol):
    """Runs the steps that may wait, as the run's core does: the thread core's
    is :meth:`JournaledSteps.step` (the calling thread waits, and gets the
    answer), the async core's runs the wait by continuation and returns the
    answer, or a Pending resolved with it later (async_host.py). Each such
    step is declared once, by the host call that makes it, with what a replay
    and the journal need, and runs on either core alike.

    ``then`` makes what the guest gets from the step's answer (not journaled:
    a send's credit, a receive's messages). Returns what ``then`` made (the
    answer without one), or, on the async core, a Pending of it (typed Any:
    which of them is the run's core's to say)."""

    def __call__(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        live: Callable[[], Waiting],
        replayed: Callable[[Step], object] | None = None,
        durable: Durable = False,
        for_journal: Callable[[str], str] | None = None,
        then: Callable[[Answer], Any] | None = None,
    ) -> Any: ...


class JournaledSteps:
    """Records and replays the steps of a run's attempts in its journal."""

    def __init__(
        self,
        tree: LiveTree,
        log: StepLog,
        journaling: bool,
        run_id: str,
        max_task_output_bytes: int,
        max_run_journal_bytes: int,
        recorded: int,
    ) -> None:
        self.tree = tree
        self.log = log
        #: Without a journal, steps are only counted: nothing is serialised.
        self.journaling = journaling
        self.run_id = run_id
        self.max_task_output_bytes = max_task_output_bytes
        self.max_run_journal_bytes = max_run_journal_bytes
        #: What the run's steps recorded (see count), from its start.
        self.recorded = recorded
        #: What an attempt may record (without a journal nothing is kept).
        self.max_recorded = max_task_output_bytes if journaling else float("inf")
        #: Gives back the credit of an attempt's sends (see ENDS_CREDIT).
        self.end_credit: Callable[[Attempt], None] = _no_credit
        #: Runs a step's wait on the calling thread (the run's Blocking.run).
        self.run_wait: Callable[[Wait], Answer] = _no_waiting
        #: Why the run was stopped: a replay diverged, or the journal failed.
        self.divergence: Divergence | None = None
        self.journal_failure: JournalFailure | None = None

    @overload
    def step(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        live: Callable[[], Waiting],
        replayed: Callable[[Step], object] | None = None,
        durable: Durable = False,
        for_journal: Callable[[str], str] | None = None,
        then: None = None,
    ) -> Answer: ...

    @overload
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
    ) -> Any: ...

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
        """Answer one host call of ``caller`` (a step): from the journal while its
        attempt replays one, else ``live()`` (once its wait, if it returns one,
        is over: see waits.py), journaled before the guest sees it.

        Journaled means queued in the journal's one write order; ``durable``
        steps (those the outside world sees at once, like output) also wait for
        the commit, which commits everything queued before them. Everything a
        guest or a parent does after seeing an answer is queued after it, so a
        crash loses only a suffix of that order: never an answer whose effects
        were kept, and never one whose effects left the process.

        ``replayed`` redoes what a replayed step must still do inside this process
        (number a child, start a spawned child again, route a reply);
        ``for_journal`` gives the answer as it is recorded (secrets redacted);
        ``then`` makes what the guest gets of it (see StepDriver: this is the
        thread core's). ``request`` may be given as the strings of a JSON
        array: its text is built only when a replay compares it (on every host
        call, it cost a few microseconds).

        This path runs with the GIL held on every host call; with two busy
        actors contending for it, each microsecond here cost two to three
        (measured): keep it short."""
        attempt = self.tree.attempts[caller]
        if (
            attempt.replay
            or attempt.recorded > self.max_recorded
            or (attempt.credit and kind in ENDS_CREDIT)
        ):
            begun = self._begin(caller, kind, request, replayed)
            if isinstance(begun, tuple):
                return begun if then is None else then(begun)
            number = begun
        else:  # (the common case, inline: what _begin does then)
            attempt.steps_taken += 1
            number = attempt.steps_taken
            if self.journaling:
                attempt.recorded += STEP_RECORD_OVERHEAD + (
                    len(request) if request.__class__ is str else sum(map(len, request))
                )
        answer = live()
        if isinstance(answer, Wait):
            answer = self.run_wait(answer)
        if self.journaling:
            self._record(attempt, number, kind, request, answer, durable, for_journal)
        return answer if then is None else then(answer)

    def settle(self, waiting: Waiting) -> Answer:
        """The answer of a host call that may wait, waiting on this thread: a
        wait made while a replayed step is redone (for children the journal
        says ended), or one that cannot wait (no timeout, what it waits for
        holds)."""
        return self.run_wait(waiting) if isinstance(waiting, Wait) else waiting

    def step_later(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        live: Callable[[], Waiting],
        run: Callable[[Waiting, Resolve], None],
        answered: Resolve,
        replayed: Callable[[Step], object] | None = None,
        durable: Durable = False,
        for_journal: Callable[[str], str] | None = None,
    ) -> None:
        """A step (see :meth:`step`) whose wait runs by continuation: ``run``
        (the continuation driver's) runs what ``live()`` returns, and
        ``answered`` gets the answer once it is over, journaled first (and,
        ``durable``, committed: the journal writer calls on once it is, no
        thread waits meanwhile); from the journal at once while the attempt
        replays."""
        begun = self._begin(caller, kind, request, replayed)
        if isinstance(begun, tuple):
            answered(begun)
            return

        def record(answer: Answer | BaseException) -> None:
            attempt = self.tree.attempts.get(caller)
            # (No attempt: it ended while its wait ran; no guest sees the answer.)
            if self.journaling and attempt is not None and not isinstance(answer, BaseException):
                committed = durable if isinstance(durable, bool) else durable()
                self._record(attempt, begun, kind, request, answer, False, for_journal)
                if committed:
                    self._once_committed(answer, answered)
                    return
            answered(answer)

        run(live(), record)

    def _once_committed(self, answer: Answer, answered: Resolve) -> None:
        """``answered(answer)`` once everything journaled so far is committed
        (on the journal writer's thread); if the journal fails first, the run
        stops, and the caller gets the answer of one that must stop."""

        def committed(failure: JournalFailure | None) -> None:
            if failure is None:
                answered(answer)
                return
            self.failed(failure)
            answered((False, "{}"))  # the sandbox ends the caller; never seen

        try:
            self.log.when_committed(committed)
        except JournalFailure as exc:  # it had failed already
            committed(exc)

    def committed(self) -> Future[None] | None:
        """A future done once everything journaled so far is committed: what
        an effect that leaves the process (an HTTP request) waits for before
        it goes, so that a crash cannot lose its inputs (random values, clock
        readings the guest drew) once it went: a resume sends it again with
        the same. No thread waits meanwhile (the journal writer calls on). If
        the journal fails first, the run stops and the future fails; None
        without a journal (nothing to wait for)."""
        if not self.journaling:
            return None
        done: Future[None] = Future()

        def committed(failure: JournalFailure | None) -> None:
            if failure is not None:
                self.failed(failure)
            # (Cancelled meanwhile, it is no one's: its effect was abandoned.)
            with contextlib.suppress(InvalidStateError):
                if failure is None:
                    done.set_result(None)
                else:
                    done.set_exception(failure)

        try:
            self.log.when_committed(committed)
        except JournalFailure as exc:  # it had failed already
            committed(exc)
        return done

    def _begin(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        replayed: Callable[[Step], object] | None,
    ) -> int | Answer:
        """Count a step of ``caller``: its number if it is to be answered live,
        else its answer (from the journal, or refused)."""
        attempt = self.tree.attempts[caller]
        if attempt.recorded > self.max_recorded:
            self.over_limit(attempt)
            return False, "{}"  # the sandbox ends the caller; never seen
        attempt.steps_taken += 1
        number = attempt.steps_taken
        if attempt.credit and kind in ENDS_CREDIT:  # as the guest forgot its credit
            self.end_credit(attempt)
        if self.journaling:  # (what it records counts only where it is recorded)
            attempt.recorded += STEP_RECORD_OVERHEAD + (
                len(request) if request.__class__ is str else sum(map(len, request))
            )
        if attempt.replay:
            request = request_text(request)
            recorded = attempt.replay.popleft()
            if recorded.kind != kind or recorded.request != request:
                self._diverged(attempt, number, recorded, Step(kind, request, True, ""))
                return False, "{}"  # the sandbox ends the caller; never seen
            if replayed is not None:
                replayed(recorded)
            attempt.recorded += len(recorded.answer)
            return recorded.ok, recorded.answer
        return number

    def _record(
        self,
        attempt: Attempt,
        number: int,
        kind: str,
        request: Request,
        answer: Answer,
        durable: Durable,
        for_journal: Callable[[str], str] | None,
    ) -> None:
        """Journal the live answer of step ``number`` of ``attempt`` (and wait
        for its commit if it is ``durable``)."""
        caller = attempt.invocation
        ok, text = answer
        attempt.recorded += len(text)
        if attempt.recorded - attempt.recorded_counted >= RECORDED_COUNT_STEP:
            self.count(attempt)
        # A failure may be the caller's stop ("{}", never seen): not journaled.
        if ok or caller.check_stop() is None:
            journaled = text if for_journal is None else for_journal(text)
            if not isinstance(durable, bool):
                durable = durable()
            try:  # (not through write: one call fewer on every journaled step)
                self.log.step(
                    caller.task_id,
                    caller.attempt,
                    number,
                    kind,
                    request,
                    ok,
                    journaled,
                    durable,
                    None if journaled == text else text,
                )
            except JournalFailure as exc:
                self.failed(exc)

    def write(self, record: Callable[..., None], *args: Any) -> None:
        """Write to the journal; if it cannot be written, stop the run (what is
        journaled so far stays consistent, and resumable)."""
        try:
            record(*args)
        except JournalFailure as exc:
            self.failed(exc)

    def failed(self, exc: JournalFailure) -> None:
        """The journal cannot be written (or may take no more): the run stops."""
        with self.tree.lock:
            if self.journal_failure is None:
                self.journal_failure = exc
        self.tree.cancel(self.tree.root, f"cancelled: the journal failed: {exc}")

    def count(self, attempt: Attempt) -> None:
        """Add what ``attempt`` recorded since the last count to the run's
        total; over the run's journal limit, the run stops."""
        with self.tree.lock:
            self.recorded += attempt.recorded - attempt.recorded_counted
            attempt.recorded_counted = attempt.recorded
            over = self.journaling and self.recorded > self.max_run_journal_bytes
        if over and self.journal_failure is None:
            limit, recorded, run_id = self.max_run_journal_bytes, self.recorded, self.run_id
            self.failed(
                JournalFailure(
                    lambda name: (
                        f"run {run_id} recorded {_amount(recorded)} in its journal; its "
                        f"limit is {size_text(limit)} ({name('max_run_journal')}, or "
                        f"max_run_journal in capsule.toml's [policy]). It can be resumed with "
                        f"a larger one: "
                        f"{resume_with(name, run_id, 'max_run_journal', 'SIZE')}"
                    )
                )
            )

    def over_limit(self, attempt: Attempt) -> None:
        """The attempt made the host record more than it may: it ends."""
        invocation = attempt.invocation
        if invocation.aborted is None:
            limit = self.max_task_output_bytes
            invocation.aborted = ErrorInfo(
                "output_limit",
                f"task {invocation.task!r} ({invocation.task_id}) made the host record "
                f"{attempt.recorded / 2**20:.1f} MB of output, messages and host calls in "
                f"attempt {invocation.attempt}; the limit is {limit / 2**20:.1f} MB per "
                f"attempt (the run option max_task_output, or max_task_output in capsule.toml's "
                f"[policy])",
            )

    def _diverged(self, attempt: Attempt, number: int, expected: Step, actual: Step) -> None:
        """A replayed task asked for something else than its journal holds: the
        program no longer does what the run did. The whole run stops."""
        invocation = attempt.invocation
        message = (
            f"task {invocation.task!r} ({invocation.task_id}) diverged from the journal at "
            f"step {number} of attempt {invocation.attempt}: the journal has "
            f"{_describe(expected)}, the program now makes {_describe(actual)}"
        )
        invocation.aborted = ErrorInfo("divergence", message)
        with self.tree.lock:
            if self.divergence is None:
                self.divergence = Divergence(
                    invocation.task, invocation.task_id, invocation.attempt, number, message
                )
        self.tree.cancel(self.tree.root, f"cancelled: {message}")


def _no_credit(attempt: Attempt) -> None:
    pass


def _no_waiting(wait: Wait) -> Answer:
    raise RuntimeError("no driver runs the waits of this run's host calls")


def _describe(step: Step) -> str:
    request = step.request if len(step.request) <= 200 else step.request[:200] + "..."
    return f"{step.kind}({request})"


def _amount(size: int) -> str:
    """A size recorded (not a round one): in MB from 1 MB, else in bytes."""
    return f"{size / 2**20:,.1f} MB" if size >= 2**20 else f"{size:,} bytes"
