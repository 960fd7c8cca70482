"""Supervision of task invocations: the attempt loop of one invocation (each
attempt in a fresh instance, its children ended with it), its retries with
backoff, its supervisor's restarts (decided in restarts.py), and, in a
resumed run, the outcome or the replay of what the journal holds."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from capsule.actors.router import Message, Router
from capsule.sandbox.config import Limits, TaskConfig
from capsule.sandbox.engine import (
    AttemptOutcome,
    ErrorInfo,
    HostCalls,
    Invocation,
    RefusingHost,
    Sandbox,
    sleep_unless_stopped,
)
from capsule.sandbox.grants import NO_GRANTS, Grants
from capsule.supervisor.events import (
    ErrorDetail,
    EventStream,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskPending,
    TaskReplayed,
    TaskRestarting,
    TaskRetrying,
    TaskStarted,
    preview,
)
from capsule.supervisor.ids import EventIds
from capsule.supervisor.journaled import JournaledSteps
from capsule.supervisor.live import LiveTree
from capsule.supervisor.outcomes import uncollected_failure
from capsule.supervisor.restarts import Restarts
from capsule.supervisor.retry import retryable
from capsule.supervisor.steps import History, PendingMessage, Step
from capsule.supervisor.tree import Attempt, Child, Node, Scope, TaskResult

if TYPE_CHECKING:
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
    ) -> None:
        self.sandbox = sandbox
        self.program = program
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
        history = self.history.tasks.get(task_id) if self.history else None
        if history is not None and history.final is not None:
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
        self.open_mailbox(task_id)
        try:
            result = self._run_attempts(name, task_id, call_json, parent, child)
        finally:
            self.router.close(task_id)
        stopping = self.tree.root.cancelled and result.error is not None
        if not stopping:
            # Durable before the caller sees it. A task cancelled because the run
            # is stopping (interrupted, diverged) is not over: a resume runs it.
            self.journal.write(self.journal.log.task_ended, result, parent.task_id or None)
        return result

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

    def _run_attempts(
        self,
        name: str,
        task_id: str,
        call_json: str,
        parent: Scope,
        child: Child | None,
    ) -> TaskResult:
        config = self.configs[name]
        node = Node(task_id=task_id)
        limits = Limits.for_task(config, self.settings.caps)
        max_attempts = config.max_retries + 1
        emit = self.events.emit
        ids = EventIds(run_id=self.run_id, task_id=task_id, task=name)
        self.before_reporting(parent.task_id)
        emit(
            TaskPending(
                **ids,
                parent_id=parent.task_id or None,
                max_attempts=max_attempts,
                call=preview(call_json),
                actor_name=None if child is None else child.actor_name,
            )
        )
        total_fuel = 0
        total_time = 0.0
        #: Failures since it was last (re)started: its own retries (max_retries);
        #: times its supervisor restarted it (numbered apart from attempts).
        attempt_number, failures, restarts, replay = self._resumed(task_id, node)
        while True:
            attempt_number += 1
            scope = Scope(parent, task_id)
            invocation = Invocation(
                task_id=task_id,
                task=name,
                attempt=attempt_number,
                max_attempts=max_attempts,
                limits=limits,
                host=self.host,
                within=scope,
                # (Every task's: its ended event carries it. ~40 us, and only
                # where the mappings can be asked cheaply: Linux 6.11.)
                measure_memory=True,
                seed=hashlib.blake2b(
                    f"{task_id}:{attempt_number}".encode(), key=self.seed, digest_size=16
                ).hexdigest(),
                grants=self.grants.get(name, NO_GRANTS),
            )
            scope.invocation = invocation
            if parent.check_stop() is not None:
                stopped = ErrorInfo("cancelled", parent.cancellation_message())
                outcome = AttemptOutcome(None, stopped, 0, None, 0.0)
            else:
                self.journal.write(
                    self.journal.log.attempt_started,
                    task_id,
                    name,
                    attempt_number,
                    node.children,
                    node.messages,
                )
                emit(
                    TaskStarted(
                        **ids,
                        attempt=attempt_number,
                        max_attempts=max_attempts,
                        fuel_budget=limits.fuel,
                        restart=restarts,
                    )
                )
                if replay is not None:
                    emit(TaskReplayed(**ids, attempt=attempt_number, steps=len(replay)))
                outcome = self._attempt(invocation, scope, node, child, call_json, replay or [])
                replay = None
                self.before_reporting(task_id)
            total_fuel += outcome.fuel_consumed
            total_time += outcome.duration_s
            if outcome.error is None:
                emit(
                    TaskCompleted(
                        **ids,
                        attempt=attempt_number,
                        duration_ms=outcome.duration_s * 1000,
                        fuel_consumed=outcome.fuel_consumed,
                        peak_memory_bytes=outcome.peak_memory_bytes,
                        result=preview(outcome.result_json),
                    )
                )
                if (
                    child is not None
                    and config.restart == "permanent"
                    and parent.check_stop() is None
                    and self.restarts.allow(child, f"{name!r} ({task_id}) returned")
                ):
                    failures, restarts = 0, restarts + 1
                    emit(
                        TaskRestarting(
                            **ids,
                            reason="it returned, and it is permanent",
                            attempt=attempt_number,
                            restart=restarts,
                        )
                    )
                    continue
                return TaskResult(
                    task_id,
                    name,
                    attempt_number,
                    total_fuel,
                    total_time,
                    outcome.result_json,
                    peak_memory_bytes=outcome.peak_memory_bytes,
                )
            error = ErrorDetail(
                kind=outcome.error.kind,
                message=outcome.error.message,
                task=name,
                traceback=outcome.error.traceback,
                cause=outcome.error.cause,
                retryable=retryable(outcome.error),
            )
            if child is not None and child.restart_reason is not None:
                # A sibling's failure restarts this one too (one_for_all, rest_for_one).
                reason, child.restart_reason = child.restart_reason, None
                if parent.check_stop() is None:
                    failures, restarts = 0, restarts + 1
                    emit(
                        TaskRestarting(
                            **ids,
                            reason=reason,
                            attempt=attempt_number,
                            restart=restarts,
                            fuel_consumed=outcome.fuel_consumed,
                        )
                    )
                    continue
            failures += 1
            # Its own retries: never counted as its supervisor's restarts.
            if error.retryable and failures <= config.max_retries:
                if child is not None:
                    self.restarts.restart_siblings(child, error)
                delay = self.settings.backoff.delay(failures)
                emit(
                    TaskRetrying(
                        **ids,
                        attempt=attempt_number,
                        error=error,
                        backoff_s=delay,
                        fuel_consumed=outcome.fuel_consumed,
                        peak_memory_bytes=outcome.peak_memory_bytes,
                    )
                )
                with self.sandbox.slots.released():
                    resumed = sleep_unless_stopped(parent, delay)
                if resumed:
                    continue
                if self.tree.root.cancelled:
                    # The run is stopping (Ctrl-C, SIGTERM, its journal failed)
                    # during the backoff: the task has not failed, its retry is
                    # the resume's to make. It stays "retrying" in the journal,
                    # and its caller sees it cancelled.
                    interrupted = ErrorDetail(
                        kind="cancelled",
                        message=parent.cancellation_message(),
                        task=name,
                        retryable=False,
                    )
                    return TaskResult(
                        task_id, name, attempt_number, total_fuel, total_time, error=interrupted
                    )
            ended = TaskCancelled if error.kind == "cancelled" else TaskFailed
            emit(
                ended(
                    **ids,
                    attempt=attempt_number,
                    error=error,
                    duration_ms=outcome.duration_s * 1000,
                    fuel_consumed=outcome.fuel_consumed,
                    peak_memory_bytes=outcome.peak_memory_bytes,
                )
            )
            return TaskResult(task_id, name, attempt_number, total_fuel, total_time, error=error)

    def _resumed(self, task_id: str, node: Node) -> tuple[int, int, int, list[Step] | None]:
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

    def _attempt(
        self,
        invocation: Invocation,
        scope: Scope,
        node: Node,
        child: Child | None,
        call_json: str,
        replay: list[Step],
    ) -> AttemptOutcome:
        """One attempt in a fresh instance; its spawned children do not outlive it."""
        attempt = Attempt(invocation, node, scope, replay=deque(replay))
        tree = self.tree
        with tree.lock:
            tree.attempts[invocation] = attempt
        if child is not None:
            child.current = attempt
        try:
            outcome = self.sandbox.invoke(invocation, self.program, call_json)
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
        finally:
            # Structured concurrency: however the attempt ended, its running
            # children are cancelled, and their threads joined, before it counts
            # as ended; so are the operations it started.
            attempt.operations.close()
            self._end_children(attempt)
            self.journal.count(attempt)
            with tree.lock:
                del tree.attempts[invocation]
        return outcome

    def _end_children(self, attempt: Attempt) -> None:
        for child in list(attempt.children.values()):
            if not child.done.is_set():
                self.tree.cancel(child.scope, "cancelled: its parent ended")
        # Joined without the CPU slot: a child may need one to see its cancellation
        # (an inline call's thread still holds its caller's slot here).
        with self.sandbox.slots.released():
            for child in list(attempt.children.values()):
                if child.thread is not None:
                    child.thread.join()
