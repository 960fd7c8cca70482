"""What comes next for one task invocation after each of its attempts: its
next attempt (at once, or after a retry's backoff), or its end, with the
events that report it. The decisions only: whoever runs the attempts (a task
thread, or completions of call futures) waits where it says."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capsule.sandbox.config import Limits
from capsule.sandbox.engine import AttemptOutcome, ErrorInfo, Invocation
from capsule.sandbox.grants import NO_GRANTS
from capsule.supervisor.events import (
    ErrorDetail,
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
from capsule.supervisor.retry import retryable
from capsule.supervisor.tree import Attempt, Child, Node, Scope, TaskResult

if TYPE_CHECKING:
    from capsule.supervisor.supervision import Supervision


#: Why an invocation whose driver failed (a host bug) ended.
HOST_FAILED = "the host failed while running the task"


@dataclass(frozen=True)
class Again:
    """Another attempt follows: at once (``backoff`` None), or once the
    retry's backoff has passed, unless its task must stop meanwhile (then
    AttemptLoop.after_backoff says how it ended)."""

    backoff: float | None = None


class AttemptLoop:
    """The attempts of one task invocation (see the module); reported pending
    when made."""

    def __init__(
        self,
        supervision: Supervision,
        name: str,
        task_id: str,
        call_json: str,
        parent: Scope,
        child: Child | None,
    ) -> None:
        self.supervision = supervision
        self.name = name
        self.task_id = task_id
        self.call_json = call_json
        self.parent = parent
        self.child = child
        self.config = config = supervision.configs[name]
        self.node = Node(task_id=task_id)
        self.limits = Limits.for_task(config, supervision.settings.caps)
        self.max_attempts = config.max_retries + 1
        self.ids = EventIds(run_id=supervision.run_id, task_id=task_id, task=name)
        self.total_fuel = 0
        self.total_time = 0.0
        #: Failures since it was last (re)started: its own retries (max_retries);
        #: times its supervisor restarted it (numbered apart from attempts).
        self.number, self.failures, self.restarts, self.replay = supervision.resumed(
            task_id, self.node
        )
        #: The failure a retry's backoff follows (reported if it is not retried).
        self._failed: tuple[ErrorDetail, AttemptOutcome] | None = None
        supervision.before_reporting(parent.task_id)
        supervision.events.emit(
            TaskPending(
                **self.ids,
                parent_id=parent.task_id or None,
                max_attempts=self.max_attempts,
                call=preview(call_json),
                actor_name=None if child is None else child.actor_name,
            )
        )

    def next(self) -> Attempt | AttemptOutcome:
        """The next attempt, to run now in a fresh instance (reported started;
        its host calls replay its journaled ones, if any), or the outcome of
        one that cannot start: what it runs within must stop."""
        supervision = self.supervision
        self.number += 1
        scope = Scope(self.parent, self.task_id)
        invocation = Invocation(
            task_id=self.task_id,
            task=self.name,
            attempt=self.number,
            max_attempts=self.max_attempts,
            limits=self.limits,
            host=supervision.host,
            within=scope,
            # (Every task's: its ended event carries it. ~40 us, and only
            # where the mappings can be asked cheaply: Linux 6.11.)
            measure_memory=True,
            seed=hashlib.blake2b(
                f"{self.task_id}:{self.number}".encode(), key=supervision.seed, digest_size=16
            ).hexdigest(),
            grants=supervision.grants.get(self.name, NO_GRANTS),
        )
        scope.invocation = invocation
        if self.parent.check_stop() is not None:
            stopped = ErrorInfo("cancelled", self.parent.cancellation_message())
            return AttemptOutcome(None, stopped, 0, None, 0.0)
        journal = supervision.journal
        journal.write(
            journal.log.attempt_started,
            self.task_id,
            self.name,
            self.number,
            self.node.children,
            self.node.messages,
        )
        emit = supervision.events.emit
        if supervision.events.wants("started"):  # (an event nobody takes is not built)
            emit(
                TaskStarted(
                    **self.ids,
                    attempt=self.number,
                    max_attempts=self.max_attempts,
                    fuel_budget=self.limits.fuel,
                    restart=self.restarts,
                )
            )
        replay, self.replay = self.replay, None
        if replay is not None:
            emit(TaskReplayed(**self.ids, attempt=self.number, steps=len(replay)))
        return Attempt(invocation, self.node, scope, replay=deque(replay or []))

    def decide(self, outcome: AttemptOutcome) -> TaskResult | Again:
        """What follows an attempt's ``outcome``: the invocation's end, or
        another attempt (reported: completed, restarting, retrying, failed)."""
        supervision = self.supervision
        emit = supervision.events.emit
        ids, number, name, parent, child = self.ids, self.number, self.name, self.parent, self.child
        self.total_fuel += outcome.fuel_consumed
        self.total_time += outcome.duration_s
        if outcome.error is None:
            emit(
                TaskCompleted(
                    **ids,
                    attempt=number,
                    duration_ms=outcome.duration_s * 1000,
                    fuel_consumed=outcome.fuel_consumed,
                    peak_memory_bytes=outcome.peak_memory_bytes,
                    result=preview(outcome.result_json),
                )
            )
            if (
                child is not None
                and self.config.restart == "permanent"
                and parent.check_stop() is None
                and supervision.restarts.allow(child, f"{name!r} ({self.task_id}) returned")
            ):
                self.failures, self.restarts = 0, self.restarts + 1
                emit(
                    TaskRestarting(
                        **ids,
                        reason="it returned, and it is permanent",
                        attempt=number,
                        restart=self.restarts,
                    )
                )
                return Again()
            return TaskResult(
                self.task_id,
                name,
                number,
                self.total_fuel,
                self.total_time,
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
                self.failures, self.restarts = 0, self.restarts + 1
                emit(
                    TaskRestarting(
                        **ids,
                        reason=reason,
                        attempt=number,
                        restart=self.restarts,
                        fuel_consumed=outcome.fuel_consumed,
                    )
                )
                return Again()
        self.failures += 1
        # Its own retries: never counted as its supervisor's restarts.
        if error.retryable and self.failures <= self.config.max_retries:
            if child is not None:
                supervision.restarts.restart_siblings(child, error)
            delay = supervision.settings.backoff.delay(self.failures)
            emit(
                TaskRetrying(
                    **ids,
                    attempt=number,
                    error=error,
                    backoff_s=delay,
                    fuel_consumed=outcome.fuel_consumed,
                    peak_memory_bytes=outcome.peak_memory_bytes,
                )
            )
            self._failed = (error, outcome)
            return Again(delay)
        return self._failure(error, outcome)

    def after_backoff(self, resumed: bool) -> TaskResult | None:
        """A retry's backoff is over: None if the next attempt follows
        (``resumed``), else how the invocation ended (what it runs within
        must stop)."""
        assert self._failed is not None
        error, outcome = self._failed
        self._failed = None
        if resumed:
            return None
        if self.supervision.tree.root.cancelled:
            # The run is stopping (Ctrl-C, SIGTERM, its journal failed)
            # during the backoff: the task has not failed, its retry is
            # the resume's to make. It stays "retrying" in the journal,
            # and its caller sees it cancelled.
            interrupted = ErrorDetail(
                kind="cancelled",
                message=self.parent.cancellation_message(),
                task=self.name,
                retryable=False,
            )
            return TaskResult(
                self.task_id,
                self.name,
                self.number,
                self.total_fuel,
                self.total_time,
                error=interrupted,
            )
        return self._failure(error, outcome)

    def host_failed(self, traceback: str) -> TaskResult:
        """The host failed while driving the invocation (a bug, whose
        ``traceback`` is kept): it ends failed, reported so, never retried."""
        error = ErrorDetail(
            kind="trap",
            message=HOST_FAILED,
            task=self.name,
            traceback=traceback,
            retryable=False,
        )
        return self._failure(error, AttemptOutcome(None, None, 0, None, 0.0))

    def _failure(self, error: ErrorDetail, outcome: AttemptOutcome) -> TaskResult:
        ended = TaskCancelled if error.kind == "cancelled" else TaskFailed
        self.supervision.events.emit(
            ended(
                **self.ids,
                attempt=self.number,
                error=error,
                duration_ms=outcome.duration_s * 1000,
                fuel_consumed=outcome.fuel_consumed,
                peak_memory_bytes=outcome.peak_memory_bytes,
            )
        )
        return TaskResult(
            self.task_id, self.name, self.number, self.total_fuel, self.total_time, error=error
        )
