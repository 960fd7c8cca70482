"""Supervision of task invocations: the attempt loop of one invocation (each
attempt in a fresh instance, its children ended with it), its retries with
backoff, its supervisor's restarts (decided in restarts.py), and, in a
resumed run, the outcome or the replay of what the journal holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from capsule.actors.router import Message, Router
from capsule.sandbox.config import TaskConfig
from capsule.sandbox.engine import (
    AttemptOutcome,
    HostCalls,
    RefusingHost,
    Sandbox,
    sleep_unless_stopped,
)
from capsule.sandbox.grants import Grants
from capsule.supervisor.attempt_loop import AttemptLoop
from capsule.supervisor.events import (
    EventStream,
    TaskReplayed,
)
from capsule.supervisor.ids import EventIds
from capsule.supervisor.journaled import JournaledSteps
from capsule.supervisor.live import LiveTree
from capsule.supervisor.outcomes import uncollected_failure
from capsule.supervisor.restarts import Restarts
from capsule.supervisor.steps import History, PendingMessage, Step
from capsule.supervisor.tree import Attempt, Child, Node, Scope, TaskResult

if TYPE_CHECKING:
    from capsule.supervisor.async_core import AsyncCore
    from capsule.supervisor.run import RunSettings


class Supervision:
    """Runs the invocations of a run's tasks through their attempts, retries
    and restarts."""

    def __init__(
        self,
        sandbox: Sandbox,
        program: str,
        configs: dict[str, TaskConfig],
        settings: RunSettings,
        events: EventStream,
        run_id: str,
        journal: JournaledSteps,
        tree: LiveTree,
        router: Router,
        history: History | None,
        seed: bytes,
        grants: dict[str, Grants],
        before_reporting: Callable[[str], None],
        programs: dict[str, str] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.program = program
        #: The program of each task declared by another program than the run's
        #: (a polyglot run's), by task name.
        self.programs = programs or {}
        self.configs = configs
        self.settings = settings
        self.events = events
        self.run_id = run_id
        self.journal = journal
        self.tree = tree
        self.router = router
        self.history = history
        #: Key for the per-attempt seeds of the guests' ``random``.
        self.seed = seed
        #: What each task may reach, by task name (nothing if absent).
        self.grants = grants
        #: Called with a task's id before its lifecycle is reported further
        #: (what it printed is shown first).
        self.before_reporting = before_reporting
        self.restarts = Restarts(configs, tree)
        #: Serves the host calls of the attempts' instances (the run's, once built).
        self.host: HostCalls = RefusingHost()
        #: Runs the invocations of spawned children and direct calls on the
        #: async core (None: each on a task thread).
        self.core: AsyncCore | None = None

    def run_task(
        self,
        name: str,
        task_id: str,
        call_json: str,
        parent: Scope,
        child: Child | None,
    ) -> TaskResult:
        """Run one task invocation, with its retries, on the calling thread,
        with ``call_json`` (checked ``{"args": [...], "kwargs": {...}}``).

        ``parent`` is the scope of the caller's attempt (a direct call), of a
        spawned ``child``, or of the run. The task's mailbox lives as long as this call: messages
        wait in it across retries.

        In a resumed run, a task whose outcome was journaled returns that outcome
        without executing, and the last attempt of one that was in flight
        re-executes with its journaled host calls answered from the journal."""
        final = self.replayed_final(name, task_id)
        if final is not None:
            return final
        self.open_mailbox(task_id)
        try:
            result = self._run_attempts(AttemptLoop(self, name, task_id, call_json, parent, child))
        finally:
            self.router.close(task_id)
        self.ended(result, parent)
        return result

    def replayed_final(self, name: str, task_id: str) -> TaskResult | None:
        """In a resumed run, the journaled outcome of a task that had ended
        (reported replayed), else None."""
        history = self.history.tasks.get(task_id) if self.history else None
        if history is None or history.final is None:
            return None
        final = history.final
        kind = None if final.error is None else final.error.kind
        self.events.emit(
            TaskReplayed(
                **EventIds(run_id=self.run_id, task_id=task_id, task=name),
                attempt=final.attempts,
                steps=0,
                outcome="completed"
                if kind is None
                else "cancelled"
                if kind == "cancelled"
                else "failed",
            )
        )
        return final

    def ended(self, result: TaskResult, parent: Scope) -> None:
        """An invocation ended (its mailbox closed): journaled."""
        stopping = self.tree.root.cancelled and result.error is not None
        if not stopping:
            # Durable before the caller sees it. A task cancelled because the run
            # is stopping (interrupted, diverged) is not over: a resume runs it.
            self.journal.write(self.journal.log.task_ended, result, parent.task_id or None)

    def open_mailbox(self, task_id: str) -> None:
        """Open the task's mailbox, with the messages a resumed run had not
        delivered to it."""
        backlog: list[PendingMessage] = []
        if self.history is not None:
            backlog = self.history.undelivered.pop(task_id, [])
        self.router.open(
            task_id,
            [Message(m.id, m.sender, m.body_json, m.expects_reply) for m in backlog],
        )

    def _run_attempts(self, loop: AttemptLoop) -> TaskResult:
        """The attempts of one invocation, each on this thread, until it ends."""
        while True:
            started = loop.next()
            if isinstance(started, AttemptOutcome):
                outcome = started
            else:
                outcome = self._attempt(started, loop.child, loop.call_json)
                self.before_reporting(loop.task_id)
            decision = loop.decide(outcome)
            if isinstance(decision, TaskResult):
                return decision
            if decision.backoff is None:
                continue
            with self.sandbox.slots.released():
                resumed = sleep_unless_stopped(loop.parent, decision.backoff)
            ended = loop.after_backoff(resumed)
            if ended is not None:
                return ended

    def resumed(self, task_id: str, node: Node) -> tuple[int, int, int, list[Step] | None]:
        """Where an invocation's count of attempts, failures and restarts goes
        on (0 for a new one), and the steps its next attempt replays, if any;
        ``node`` numbers on from where it was."""
        history = self.history.tasks.get(task_id) if self.history else None
        if history is None or not history.attempts:
            return 0, 0, 0, None
        # In flight when the run stopped: its last attempt runs again, its
        # journaled host calls answered from the journal; the count goes on.
        # If that attempt had ended already (it failed and was to be retried,
        # or returned and was to restart), the next one starts afresh.
        last = max(history.attempts)
        if last in history.ended_attempts:
            node.children = history.children_used
            node.messages = history.messages_used
            return last, history.failures, history.restarts, None
        node.children = history.attempts[last].children_before
        node.messages = history.attempts[last].messages_before
        return last - 1, history.failures, history.restarts, history.attempts[last].steps

    def program_of(self, task: str) -> str:
        """The program that declared ``task`` (the module its instances import)."""
        return self.programs.get(task, self.program)

    def _attempt(self, attempt: Attempt, child: Child | None, call_json: str) -> AttemptOutcome:
        """One attempt in a fresh instance; its spawned children do not outlive it."""
        self.begin(attempt, child)
        try:
            outcome = self.concluded(
                attempt,
                self.sandbox.invoke(
                    attempt.invocation, self.program_of(attempt.invocation.task), call_json
                ),
            )
        finally:
            # Structured concurrency: however the attempt ended, its running
            # children are cancelled, and their threads joined, before it counts
            # as ended; so are the operations it started.
            attempt.operations.close()
            self._end_children(attempt)
            self.release(attempt)
        return outcome

    def begin(self, attempt: Attempt, child: Child | None) -> None:
        """An attempt is about to run: it is in the live tree."""
        with self.tree.lock:
            self.tree.attempts[attempt.invocation] = attempt
        if child is not None:
            child.current = attempt

    def concluded(self, attempt: Attempt, outcome: AttemptOutcome) -> AttemptOutcome:
        """The outcome of an attempt whose instance ended, as its invocation
        counts it: a failure if it left a failed child uncollected, or made
        the host record more than it may."""
        invocation = attempt.invocation
        if outcome.error is None:
            failure = uncollected_failure(
                invocation.task,
                invocation.task_id,
                list(attempt.children.values()),
                self.configs,
            )
            if failure is not None:
                outcome.result_json, outcome.error = None, failure
        # Its result and its failure's texts are recorded too (the task's
        # row, its events): they count like its steps.
        error = outcome.error
        attempt.recorded += len(outcome.result_json or "") + (
            0 if error is None else len(error.message) + len(error.traceback or "")
        )
        if outcome.result_json is not None and attempt.recorded > self.journal.max_recorded:
            self.journal.over_limit(attempt)
            outcome.result_json, outcome.error = None, invocation.aborted
        return outcome

    def cancel_children(self, attempt: Attempt) -> None:
        """Its attempt ended: its running children are cancelled."""
        self.tree.cancel_children(attempt, "cancelled: its parent ended")

    def release(self, attempt: Attempt) -> None:
        """An attempt and everything under it ended: out of the live tree."""
        self.journal.count(attempt)
        with self.tree.lock:
            del self.tree.attempts[attempt.invocation]

    def _end_children(self, attempt: Attempt) -> None:
        self.cancel_children(attempt)
        # Joined without the CPU slot: a child may need one to see its cancellation
        # (an inline call's thread still holds its caller's slot here).
        with self.sandbox.slots.released():
            for child in list(attempt.children.values()):
                if child.thread is not None:
                    child.thread.join()
