"""One run of a program: load it, then run its tasks as a tree of invocations,
supervised (retries, restarts, strategies, intensity) and scheduled.

``main`` runs on a task thread owned by :meth:`Run.run_main`. Each attempt of an
invocation runs in a fresh sandbox instance. A task calling another task reaches
:meth:`Run.call_task` through a host import, on its own thread, which is blocked
in that call anyway: the child (with its retries) runs right there, in its own
instance, and its result is returned to the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

from capsule.actors.external import EXTERNAL_SENDER, ExternalMessages
from capsule.actors.router import Message, Router, RoutingError
from capsule.net.http import HttpClient, HttpFailure, HttpRequest, HttpResponse, Transfer
from capsule.net.redact import Secrets, redact_url
from capsule.sandbox import guest_data
from capsule.sandbox.config import HostCaps, Limits, TaskConfig, validate_program
from capsule.sandbox.engine import (
    AttemptOutcome,
    Envelope,
    ErrorInfo,
    Invocation,
    Prepared,
    PrepareError,
    RefusingHost,
    Sandbox,
    refusal,
    sleep_unless_stopped,
)
from capsule.sandbox.grants import NO_GRANTS, Grants
from capsule.sandbox.guest_data import ProtocolError, SpawnOptions, TaskCall
from capsule.supervisor.events import (
    ErrorDetail,
    EventStream,
    HttpExchange,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskHibernated,
    TaskOutput,
    TaskPending,
    TaskReplayed,
    TaskRestarting,
    TaskResumed,
    TaskRetrying,
    TaskStarted,
    TaskWaiting,
    WaitReason,
    preview,
)
from capsule.supervisor.intensity import restart_intensity_error
from capsule.supervisor.messages import MessageCalls
from capsule.supervisor.operation_calls import OperationCalls
from capsule.supervisor.operations import (
    MAX_IN_FLIGHT,
    Operation,
    condition,
    http_operation,
    too_many_in_flight,
)
from capsule.supervisor.option_specs import (
    DEFAULT_HIBERNATE_AFTER_S,
    DEFAULT_MAILBOX_CAPACITY,
    DEFAULT_MAX_CHILDREN,
    DEFAULT_MAX_LIVE_TASKS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_RUN_JOURNAL_BYTES,
    DEFAULT_MAX_TASK_OUTPUT_BYTES,
    DEFAULT_RETRY_BACKOFF_S,
)
from capsule.supervisor.outcomes import (
    delivered_positions,
    linked_failure,
    outcomes_answer,
    uncollected_failure,
)
from capsule.supervisor.retry import retryable
from capsule.supervisor.steps import (
    History,
    JournalFailure,
    NoStepLog,
    PendingMessage,
    Request,
    Step,
    StepLog,
    received_messages,
    request_text,
)
from capsule.supervisor.tree import (
    Attempt,
    Child,
    LiveTask,
    Node,
    Scope,
    TaskResult,
    nearest_deadline,
    run_interruptibly,
    start_task_thread,
)

#: How deep task calls may nest before the call is refused.
MAX_DEPTH = 64
#: Python frames the host adds per level of nested task calls (with margin).
HOST_FRAMES_PER_LEVEL = 40
#: What task ids look like ("main", "main/2/1"): no registered name may (see
#: Run._spawn_task).
TASK_ID_SHAPE = re.compile(r"main(/[0-9]+)*")
#: What a step costs to record beyond its request and answer (the step's own
#: entry in its batch, and the waiting and resumed events a blocking one
#: adds), counted against RunSettings.max_task_output_bytes.
STEP_RECORD_OVERHEAD = 128
#: What the host keeps of a child that ended until its parent waits on it,
#: besides its result (its thread, scope and outcome): counted as the
#: parent's memory by the run's memory budget.
ENDED_CHILD_BYTES = 10 * 1024
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


class ProgramError(Exception):
    """The program cannot be run at all (missing file, import error, no main task).

    Distinct from a config error (exit code 2) only in how it is reported; both stop
    the run before any task starts.
    """

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


class RunInterrupted(Exception):
    """The run was interrupted (Ctrl-C); the tree was cancelled and has stopped."""

    def __init__(self, result: TaskResult) -> None:
        super().__init__("the run was interrupted")
        self.result = result


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: ``initial * factor ** (n - 1)``, capped."""

    initial_s: float = DEFAULT_RETRY_BACKOFF_S
    factor: float = 2.0
    max_s: float = 5.0

    def delay(self, failed_attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * self.factor ** (failed_attempt - 1)))


@dataclass(frozen=True)
class RunSettings:
    caps: HostCaps = field(default_factory=HostCaps)
    backoff: Backoff = field(default_factory=Backoff)
    #: Fresh instances kept ready with the program imported (0: prepare on demand).
    pool_size: int = 2
    #: Tasks alive at once in the run (each holds an instance and a thread).
    max_live_tasks: int = DEFAULT_MAX_LIVE_TASKS
    #: Spawned children alive at once under one task.
    max_children: int = DEFAULT_MAX_CHILDREN
    #: Messages a mailbox holds before ``send`` waits.
    mailbox_capacity: int = DEFAULT_MAILBOX_CAPACITY
    #: Largest message body, as JSON.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Total size of the messages sent and not yet received in the run: the
    #: host memory guests can fill with them (a send over it is refused).
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    #: Largest HTTP response body a task may receive.
    max_response_bytes: int = 10 * 1024**2
    #: What one attempt of a journaled run may make the host record, in
    #: characters: its output, random bytes, messages, HTTP exchanges and other
    #: host calls. Past it the attempt fails with kind output_limit (what it
    #: journals is bounded by this, plus its last answer).
    max_task_output_bytes: int = DEFAULT_MAX_TASK_OUTPUT_BYTES
    #: What the whole run may record in its journal, in characters (steps and
    #: their overhead, counted as above). Past it the run stops, as when its
    #: journal cannot be written: resumable, with a larger limit.
    max_run_journal_bytes: int = DEFAULT_MAX_RUN_JOURNAL_BYTES
    #: Seconds a task waits in receive, result, sleep (any blocking call)
    #: before it hibernates: the memory pages it has only read are given back
    #: (None: never). Like gen_server's hibernate_after, for idle actors.
    hibernate_after: float | None = DEFAULT_HIBERNATE_AFTER_S


def new_run_id() -> str:
    """A fresh, short, unique run id."""
    return uuid.uuid4().hex[:12]


def program_module(path: Path) -> str:
    """The module name a program file is imported under in the guest."""
    if path.suffix != ".py":
        raise ProgramError(f"{path}: a Capsule program is a Python file ending in .py")
    if not path.stem.isidentifier():
        raise ProgramError(
            f"{path}: the file name must be a valid Python module name (letters, digits, _)"
        )
    return path.stem


class Run:
    """Runs the tasks of one loaded program in a sandbox."""

    def __init__(
        self,
        sandbox: Sandbox,
        program: str,
        configs: dict[str, TaskConfig],
        events: EventStream,
        settings: RunSettings | None = None,
        run_id: str | None = None,
        steps: StepLog | None = None,
        history: History | None = None,
        seed: bytes = b"",
        grants: dict[str, Grants] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.program = program
        self.configs = configs
        self.events = events
        self.settings = settings or RunSettings()
        self.run_id = run_id or new_run_id()
        self._lock = threading.Lock()
        self._attempts: dict[Invocation, Attempt] = {}
        self._live_tasks = 0
        self._router = Router(self.settings.mailbox_capacity, self.settings.max_queued_bytes)
        if history is not None:
            self._router.allow_early_replies(history.asked, history.replies)
        self._steps: StepLog = steps or NoStepLog()
        #: Without a journal, steps are only counted: nothing is serialised.
        self._journaling = steps is not None and not isinstance(steps, NoStepLog)
        #: Characters of output journaled but not yet shown (see output): in
        #: all, and by task (only tasks with some have an entry).
        self._output_lock = threading.Lock()
        self._unshown_total = 0
        self._unshown: dict[str, int] = {}
        #: Showing output failed once (a closed pipe): said once, not per line.
        self._output_failed = False
        #: What each task may reach, by task name (nothing if absent).
        self.grants = grants or {}
        self._http = HttpClient(
            self.settings.max_response_bytes,
            granted=[value for task in self.grants.values() for value in task.env.values()],
        )
        if any(task_grants.hosts for task_grants in self.grants.values()):
            self._http.warm_up()  # some task may make requests: ready for the first
        self._history = history
        #: Key for the per-attempt seeds of the guests' ``random``.
        self._seed = seed or os.urandom(16)
        # Guests never see the monotonic clock go back, also across a resume.
        self._monotonic_offset = max(
            0, (history.monotonic_ns if history else 0) + 1 - time.monotonic_ns()
        )
        self._root = Scope(None, task_id="", task="<run>")
        #: What the run's steps recorded (see _count_recorded), from its start.
        self._recorded = history.recorded if history else 0
        #: What an attempt may record (without a journal nothing is kept).
        self._max_recorded = (
            self.settings.max_task_output_bytes if self._journaling else float("inf")
        )
        #: Why the run was stopped: a replay diverged, or the journal failed.
        self.divergence: ErrorInfo | None = None
        self.journal_failure: str | None = None
        #: Set by stop(): the run was stopped from outside (like Ctrl-C).
        self.stopped = False
        self._operations = OperationCalls(
            self._step, self._block, lambda: self._log(self._steps.sync), self._journaling
        )
        self._messages = MessageCalls(
            self._router,
            self.events,
            self.run_id,
            self._block,
            max_message_bytes=self.settings.max_message_bytes,
            mailbox_capacity=self.settings.mailbox_capacity,
            on_ask=lambda message: self._log(self._steps.ask_sent, message),
            journaling=self._journaling,
            open_channel=self.sandbox.open_channel,
            history=history,
        )

        #: Messages from outside the run (`capsule send`, `capsule ask`).
        self.external = ExternalMessages(
            self._router, self.settings.max_message_bytes, self._external_sent
        )

    def _external_sent(self, message: Message, target_id: str) -> None:
        """Journal a message from outside, durably before its sender is told
        it was delivered: a resume delivers it again if it was not received."""
        pending = PendingMessage(
            message.id, message.sender, target_id, message.body_json, message.expects_reply
        )
        self._log(self._steps.ask_sent, pending)
        self._log(self._steps.sync)

    def snapshot(self) -> list[LiveTask]:
        """The attempts running now, with the fuel each has used so far (read at
        every epoch tick, so live for code that calls functions; a loop that
        calls nothing shows its fuel when it next does, or ends)."""
        with self._lock:
            attempts = list(self._attempts.values())
        return [
            LiveTask(
                task_id=a.invocation.task_id,
                task=a.invocation.task,
                attempt=a.invocation.attempt,
                fuel_budget=a.invocation.limits.fuel,
                fuel_used=0
                if a.invocation.fuel_left is None
                else a.invocation.limits.fuel - a.invocation.fuel_left,
                mailbox_depth=self._router.depth(a.invocation.task_id),
            )
            for a in attempts
        ]

    def cancel_task(self, task_id: str, reason: str = "cancelled by the user") -> bool:
        """Cancel a running task (and everything under it) from outside the run;
        False if no such task is running. Cancelling ``main`` stops the run."""
        if task_id == "main":
            self.stop(reason)
            return True
        with self._lock:
            attempts = list(self._attempts.values())
        for attempt in attempts:
            child = attempt.children.get(task_id)
            if child is not None and not child.done.is_set():
                self._cancel_scope(child.scope, reason)  # as its parent would
                return True
        for attempt in attempts:
            invocation = attempt.invocation
            if invocation.task_id == task_id:  # a direct call: its caller sees the error
                invocation.cancel_message = reason
                invocation.cancelled = True
                self._wake_all()
                return True
        return False

    def stop(self, reason: str = "cancelled: the run was stopped") -> None:
        """Cancel the whole tree; the run ends as interrupted (and resumable)."""
        self.stopped = True
        self._cancel_scope(self._root, reason)

    # -- loading -------------------------------------------------------------

    @staticmethod
    def load(
        sandbox: Sandbox,
        program: str,
        output: Callable[[Invocation, str, str], None],
        task_defaults: dict[str, Any] | None = None,
    ) -> tuple[dict[str, TaskConfig], Prepared]:
        """Import the program in a sandbox and validate the tasks it declares.

        Returns the configs and the instance the program was imported in, still
        unused by any task, so the first invocation can start in it."""

        class LoadHost(RefusingHost):
            def output(self, invocation: Invocation, stream: str, text: str) -> None:
                output(invocation, stream, text)

        # Off the main thread, which waits: Ctrl-C or SIGTERM there must not land
        # in a host call of the instance importing the program (it corrupted the
        # process), and stop the import instead (KeyboardInterrupt, once it has).
        scope = Scope(None, task_id="", task="<load>")

        def interrupt() -> None:
            scope.cancel_message = "cancelled: the run was interrupted while it loaded"
            scope.cancelled = True

        try:
            prepared, interrupted = run_interruptibly(
                lambda: sandbox.prepare(program, LoadHost(), describe=True, parent=scope),
                interrupt,
                name="capsule-load",
            )
        except PrepareError as exc:
            if scope.cancelled:
                raise KeyboardInterrupt from None
            raise ProgramError(
                f"importing the program failed ({exc.error.kind}): {exc.error.message}",
                exc.error.traceback,
            ) from None
        if interrupted:
            prepared.store.close()
            raise KeyboardInterrupt
        try:
            return validate_program(_declared_tasks(prepared.declared), task_defaults), prepared
        except BaseException:
            prepared.store.close()
            raise

    # -- running -------------------------------------------------------------

    def run_main(
        self,
        args: list[Any],
        kwargs: dict[str, Any] | None = None,
        first: Prepared | None = None,
        entry: str = "main",
    ) -> TaskResult:
        """Run the task named ``entry`` (``main`` unless the user chose another)
        as the root of the tree, to the end, and return how it ended. Whatever
        its name, the root's task id is ``main``.

        The task tree runs on task threads: the root on one this call owns, each
        spawned child on one its parent's attempt owns (and joins before it ends);
        a direct call runs inline on its caller's thread. Interrupting the wait
        (Ctrl-C) cancels the whole tree: every instance traps at its next epoch
        tick, every blocked host call returns, and RunInterrupted is raised once
        the tree has stopped.
        """
        if entry not in self.configs:
            if first is not None:
                first.store.close()
            raise ProgramError(_no_entry(entry, sorted(self.configs)))
        try:
            call_json = json.dumps({"args": args, "kwargs": kwargs or {}}, allow_nan=False)
        except ValueError as exc:  # (a host API caller's NaN: never a guest's)
            raise ProgramError(f"the arguments to main are not strict JSON: {exc}") from None
        self.sandbox.start_pool(self.program, self.settings.pool_size, first)
        root = self._root
        # Nested calls run inline: each level adds host frames (about 20) on the
        # task thread, whose stack is sized for MAX_DEPTH levels; the interpreter's
        # recursion limit must allow them too.
        recursion_limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(recursion_limit, HOST_FRAMES_PER_LEVEL * MAX_DEPTH + 1000))
        try:
            result, interrupted = run_interruptibly(
                lambda: self.run_task(entry, "main", call_json, root, None),
                lambda: self._cancel_scope(root, "cancelled: the run was interrupted"),
                name="capsule-main",
            )
        finally:
            try:
                self._http.close()
            finally:
                sys.setrecursionlimit(recursion_limit)
        if self.journal_failure is not None:
            raise JournalFailure(self.journal_failure)
        if interrupted or self.stopped:
            raise RunInterrupted(result)
        if self.divergence is not None:
            result.error = ErrorDetail(
                kind="divergence",
                message=self.divergence.message,
                task=result.task,
                retryable=False,
            )
            result.result_json = None
        return result

    def run_task(
        self,
        name: str,
        task_id: str,
        call_json: str,
        parent: Invocation,
        child: Child | None,
    ) -> TaskResult:
        """Run one task invocation, with its retries, on the calling thread,
        with ``call_json`` (checked ``{"args": [...], "kwargs": {...}}``).

        ``parent`` is the caller's invocation (a direct call) or the scope of a
        spawned ``child``. The task's mailbox lives as long as this call: messages
        wait in it across retries.

        In a resumed run, a task whose outcome was journaled returns that outcome
        without executing, and the last attempt of one that was in flight
        re-executes with its journaled host calls answered from the journal."""
        history = self._history.tasks.get(task_id) if self._history else None
        if history is not None and history.final is not None:
            final = history.final
            kind = None if final.error is None else final.error.kind
            self.events.emit(
                TaskReplayed(
                    **_EventIds(run_id=self.run_id, task_id=task_id, task=name),
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
        self._open_mailbox(task_id)
        try:
            result = self._run_attempts(name, task_id, call_json, parent, child)
        finally:
            self._router.close(task_id)
        stopping = self._root.cancelled and result.error is not None
        if not stopping:
            # Durable before the caller sees it. A task cancelled because the run
            # is stopping (interrupted, diverged) is not over: a resume runs it.
            self._log(self._steps.task_ended, result, parent.task_id or None)
        return result

    def _open_mailbox(self, task_id: str) -> None:
        backlog: list[PendingMessage] = []
        if self._history is not None:
            backlog = self._history.undelivered.pop(task_id, [])
        self._router.open(
            task_id,
            [Message(m.id, m.sender, m.body_json, m.expects_reply) for m in backlog],
        )

    def _log(self, record: Callable[..., None], *args: Any) -> None:
        """Write to the journal; if it cannot be written, stop the run (what is
        journaled so far stays consistent, and resumable)."""
        try:
            record(*args)
        except JournalFailure as exc:
            self._journal_failed(exc)

    def _journal_failed(self, exc: JournalFailure) -> None:
        with self._lock:
            if self.journal_failure is None:
                self.journal_failure = str(exc)
        self._cancel_scope(self._root, f"cancelled: the journal failed: {exc}")

    def _run_attempts(
        self,
        name: str,
        task_id: str,
        call_json: str,
        parent: Invocation,
        child: Child | None,
    ) -> TaskResult:
        config = self.configs[name]
        node = Node(task_id=task_id)
        limits = Limits.for_task(config, self.settings.caps)
        max_attempts = config.max_retries + 1
        emit = self.events.emit
        ids = _EventIds(run_id=self.run_id, task_id=task_id, task=name)
        self._output_shown(parent.task_id)
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
        attempt_number = 0
        #: Failures since it was last (re)started: its own retries (max_retries).
        failures = 0
        #: Times its supervisor restarted it (numbered apart from attempts).
        restarts = 0
        replay: list[Step] | None = None
        history = self._history.tasks.get(task_id) if self._history else None
        if history is not None and history.attempts:
            # In flight when the run stopped: its last attempt runs again, its
            # journaled host calls answered from the journal; the count goes on.
            # If that attempt had ended already (it failed and was to be retried,
            # or returned and was to restart), the next one starts afresh.
            last = max(history.attempts)
            failures, restarts = history.failures, history.restarts
            if last in history.ended_attempts:
                attempt_number = last
                node.children = history.children_used
                node.messages = history.messages_used
            else:
                attempt_number = last - 1
                node.children = history.attempts[last].children_before
                node.messages = history.attempts[last].messages_before
                replay = history.attempts[last].steps
        while True:
            attempt_number += 1
            invocation = Invocation(
                task_id=task_id,
                task=name,
                attempt=attempt_number,
                max_attempts=max_attempts,
                limits=limits,
                host=self,
                parent=parent,
                # (Every task's: its ended event carries it. ~40 us, and only
                # where the mappings can be asked cheaply: Linux 6.11.)
                measure_memory=True,
                seed=hashlib.blake2b(
                    f"{task_id}:{attempt_number}".encode(), key=self._seed, digest_size=16
                ).hexdigest(),
                grants=self.grants.get(name, NO_GRANTS),
            )
            if parent.check_stop() is not None:
                stopped = ErrorInfo("cancelled", parent.cancellation_message())
                outcome = AttemptOutcome(None, stopped, 0, None, 0.0)
            else:
                self._log(
                    self._steps.attempt_started,
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
                outcome = self._attempt(invocation, node, child, call_json, replay or [])
                replay = None
                self._output_shown(task_id)
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
                    and self._allow_restart(child, f"{name!r} ({task_id}) returned")
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
                    self._restart_siblings(child, error)
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
                if self._root.cancelled:
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

    def _allow_restart(self, child: Child, what: str) -> bool:
        """Count a supervisor restart (a permanent child that returned, or
        siblings restarted by one_for_all / rest_for_one) against the parent's
        intensity (``max_restarts`` within ``restart_window``). Over it, the
        parent fails instead, and its own supervisor takes over (escalation).
        A child's own retries (``max_retries``) never count."""
        parent = child.parent_attempt
        config = self.configs[parent.invocation.task]
        now = time.monotonic()
        with self._lock:
            while parent.restarts and parent.restarts[0] <= now - config.restart_window_s:
                parent.restarts.popleft()
            if len(parent.restarts) >= config.max_restarts:
                if parent.invocation.aborted is None:
                    parent.invocation.aborted = restart_intensity_error(
                        parent.invocation, config, what
                    )
                allowed = False
            else:
                parent.restarts.append(now)
                allowed = True
        if not allowed:
            parent.wake()
        return allowed

    def _restart_siblings(self, child: Child, error: ErrorDetail) -> None:
        """Apply the parent's strategy to a child that is about to be retried:
        restarting its running siblings is one restart of the parent's."""
        parent = child.parent_attempt
        strategy = self.configs[parent.invocation.task].strategy
        if strategy == "one_for_one":
            return
        siblings = list(parent.children.values())
        if strategy == "rest_for_one":
            siblings = siblings[siblings.index(child) + 1 :]
        restarted = [
            sibling
            for sibling in siblings
            if sibling is not child
            and not sibling.done.is_set()
            and sibling.current is not None
            and self.configs[sibling.name].restart != "temporary"  # (never restarted)
        ]
        what = f"{child.name!r} ({child.task_id}) failed ({error.kind}) under {strategy}"
        if not restarted or not self._allow_restart(child, what):
            return
        reason = f"its sibling {child.name!r} ({child.task_id}) failed ({strategy})"
        for sibling in restarted:
            current = sibling.current
            assert current is not None
            sibling.restart_reason = reason
            current.invocation.cancel_message = f"restarting: {reason}"
            current.invocation.cancelled = True
        self._wake_all()

    def _attempt(
        self,
        invocation: Invocation,
        node: Node,
        child: Child | None,
        call_json: str,
        replay: list[Step],
    ) -> AttemptOutcome:
        """One attempt in a fresh instance; its spawned children do not outlive it."""
        attempt = Attempt(invocation, node, replay=deque(replay))
        with self._lock:
            self._attempts[invocation] = attempt
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
            if outcome.result_json is not None and attempt.recorded > self._max_recorded:
                self._output_limit(attempt)
                outcome.result_json, outcome.error = None, invocation.aborted
        finally:
            # Structured concurrency: however the attempt ended, its running
            # children are cancelled, and their threads joined, before it counts
            # as ended; so are the operations it started.
            attempt.operations.close()
            self._end_children(attempt)
            self._count_recorded(attempt)
            with self._lock:
                del self._attempts[invocation]
        return outcome

    # -- the task tree ---------------------------------------------------------

    def _admit(self, caller: Attempt, name: str, spawned: bool) -> tuple[bool, str] | None:
        """The refusal (as a host-call reply) of a new task under ``caller``, or
        None: admitted, and counted as live until ``_release``."""
        if name not in self.configs:
            return refusal(
                name,
                f"{caller.invocation.task!r} called a task named {name!r}, "
                f"but the program declares no such task",
            )
        depth = caller.node.task_id.count("/") + 1
        if depth >= MAX_DEPTH:
            return refusal(
                name, f"task calls are nested {depth} deep; the limit is {MAX_DEPTH}", "limit"
            )
        with self._lock:
            if self._live_tasks >= self.settings.max_live_tasks:
                return refusal(
                    name,
                    f"the run already has {self._live_tasks} live tasks, its limit; "
                    f"{caller.invocation.task!r} cannot start {name!r}",
                    "limit",
                )
            if spawned:
                alive = sum(1 for c in caller.children.values() if not c.done.is_set())
                if alive >= self.settings.max_children:
                    return refusal(
                        name,
                        f"{caller.invocation.task!r} already has {alive} running children, "
                        f"its limit; it cannot spawn {name!r}",
                        "limit",
                    )
            self._live_tasks += 1
        return None

    def _release(self) -> None:
        with self._lock:
            self._live_tasks -= 1

    def _end_children(self, attempt: Attempt) -> None:
        for child in list(attempt.children.values()):
            if not child.done.is_set():
                self._cancel_scope(child.scope, "cancelled: its parent ended")
        # Joined without the CPU slot: a child may need one to see its cancellation
        # (an inline call's thread still holds its caller's slot here).
        with self.sandbox.slots.released():
            for child in list(attempt.children.values()):
                if child.thread is not None:
                    child.thread.join()

    def _cancel_scope(self, scope: Scope, message: str) -> None:
        """Cancel everything under ``scope``: instances running wasm trap at their
        next epoch tick; tasks blocked in a host call are woken now."""
        scope.cancel_message = message
        scope.cancelled = True
        self._wake_all()

    def wake(self, invocation: Invocation) -> None:
        # (Its descendants too: a child it runs inline blocks its thread.)
        self._wake_all()

    def held_bytes(self, invocation: Invocation) -> int:
        # Its mailbox (dropped when it ends), its output waiting to be shown,
        # its HTTP exchange in flight, and its children that ended and were
        # not yet waited on (kept, with their results, until it does).
        task_id = invocation.task_id
        attempt = self._attempts.get(invocation)
        held = self._router.queued_bytes_for(task_id) + self._unshown.get(task_id, 0)
        if attempt is not None:
            if attempt.transfer is not None:
                held += attempt.transfer.bytes
            held += attempt.operations.held_bytes()
            for child in list(attempt.children.values()):
                result = child.result
                if result is not None:
                    held += ENDED_CHILD_BYTES + len(result.result_json or "")
        return held

    def _wake_all(self) -> None:
        """Wake every blocked task that must now stop."""
        with self._lock:
            attempts = list(self._attempts.values())
        for attempt in attempts:
            if attempt.invocation.check_stop() is not None:
                attempt.wake()

    # -- host calls (on the calling task's thread) ----------------------------

    def _step(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        live: Callable[[], tuple[bool, str]],
        replayed: Callable[[Step], object] | None = None,
        durable: bool = False,
        for_journal: Callable[[str], str] | None = None,
    ) -> tuple[bool, str]:
        """Answer one host call of ``caller`` (a step): from the journal while its
        attempt replays one, else ``live()``, journaled before the guest sees it.

        Journaled means queued in the journal's one write order; ``durable``
        steps (those the outside world sees at once, like output) also wait for
        the commit, which commits everything queued before them. Everything a
        guest or a parent does after seeing an answer is queued after it, so a
        crash loses only a suffix of that order: never an answer whose effects
        were kept, and never one whose effects left the process.

        ``replayed`` redoes what a replayed step must still do inside this process
        (number a child, start a spawned child again, route a reply);
        ``for_journal`` gives the answer as it is recorded (secrets redacted).
        ``request`` may be given as the strings of a JSON array: its text is
        built only when a replay compares it (on every host call, it cost a few
        microseconds).

        This path runs with the GIL held on every host call; with two busy
        actors contending for it, each microsecond here cost two to three
        (measured): keep it short."""
        attempt = self._attempts[caller]
        if attempt.recorded > self._max_recorded:
            self._output_limit(attempt)
            return False, "{}"  # the sandbox ends the caller; never seen
        attempt.steps_taken += 1
        number = attempt.steps_taken
        if attempt.credit and kind in ENDS_CREDIT:  # as the guest forgot its credit
            self._messages.end_credit(attempt)
        journaling = self._journaling
        if journaling:  # (what it records counts only where it is recorded)
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
        ok, answer = live()
        if not journaling:
            return ok, answer
        attempt.recorded += len(answer)
        if attempt.recorded - attempt.recorded_counted >= RECORDED_COUNT_STEP:
            self._count_recorded(attempt)
        # A failure may be the caller's stop ("{}", never seen): not journaled.
        if ok or caller.check_stop() is None:
            journaled = answer if for_journal is None else for_journal(answer)
            try:  # (not through _log: one call fewer on every journaled step)
                self._steps.step(
                    caller.task_id,
                    caller.attempt,
                    number,
                    kind,
                    request,
                    ok,
                    journaled,
                    durable,
                    None if journaled == answer else answer,
                )
            except JournalFailure as exc:
                self._journal_failed(exc)
        return ok, answer

    def _count_recorded(self, attempt: Attempt) -> None:
        """Add what ``attempt`` recorded since the last count to the run's
        total; over the run's journal limit, the run stops."""
        with self._lock:
            self._recorded += attempt.recorded - attempt.recorded_counted
            attempt.recorded_counted = attempt.recorded
            over = self._journaling and self._recorded > self.settings.max_run_journal_bytes
        if over and self.journal_failure is None:
            limit = self.settings.max_run_journal_bytes
            self._journal_failed(
                JournalFailure(
                    f"run {self.run_id} recorded {self._recorded / 2**20:.1f} MB in its journal; "
                    f"its limit is {limit / 2**20:.1f} MB (--max-run-journal, or max_run_journal "
                    f"in capsule.toml's [policy]). It can be resumed with a larger one: "
                    f"`capsule resume {self.run_id} --max-run-journal SIZE`"
                )
            )

    def _output_limit(self, attempt: Attempt) -> None:
        """The attempt made the host record more than it may: it ends."""
        invocation = attempt.invocation
        if invocation.aborted is None:
            limit = self.settings.max_task_output_bytes
            invocation.aborted = ErrorInfo(
                "output_limit",
                f"task {invocation.task!r} ({invocation.task_id}) made the host record "
                f"{attempt.recorded / 2**20:.1f} MB of output, messages and host calls in "
                f"attempt {invocation.attempt}; the limit is {limit / 2**20:.1f} MB per "
                f"attempt (--max-task-output, or max_task_output in capsule.toml's [policy])",
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
        error = ErrorInfo("divergence", message)
        invocation.aborted = error
        with self._lock:
            if self.divergence is None:
                self.divergence = error
        self._cancel_scope(self._root, f"cancelled: {message}")

    def call_task(self, caller: Invocation, call: TaskCall) -> tuple[bool, str]:
        """A task called another: run the child to the end, inline.

        The caller's thread is blocked in this host call anyway, so the child runs
        right here, in its own fresh instance: no thread or event-loop hop on the
        path of a call. The child sees its caller's deadline and cancellation
        through ``Invocation.parent``."""
        node = self._attempts[caller].node
        return self._step(
            caller,
            "call",
            (call.name, call.call_json),
            lambda: self._call_task(caller, call),
            replayed=lambda _: node.next_child_id(),
        )

    def _call_task(self, caller: Invocation, call: TaskCall) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        # Numbered first, whatever happens next, so that a replay numbers alike.
        task_id = attempt.node.next_child_id()
        refused = self._admit(attempt, call.name, spawned=False)
        if refused is not None:
            return refused
        try:
            result = self.run_task(call.name, task_id, call.call_json, caller, None)
        finally:
            self._release()
        return _as_reply(result)

    def spawn_task(
        self, caller: Invocation, call: TaskCall, options: SpawnOptions
    ) -> tuple[bool, str]:
        def spawn() -> tuple[bool, str]:
            return self._spawn_task(caller, call, options)

        # Replayed, the child is started again all the same: it returns its
        # journaled outcome at once if it had ended, or resumes where it was.
        return self._step(
            caller,
            "spawn",
            (call.name, call.call_json, options.text),
            spawn,
            replayed=lambda _: spawn(),
        )

    def _spawn_task(
        self, caller: Invocation, call: TaskCall, options: SpawnOptions
    ) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        task_id = attempt.node.next_child_id()  # first, as in _call_task
        name, actor_name = call.name, options.actor_name
        refused = self._admit(attempt, name, spawned=True)
        if refused is not None:
            return refused
        if actor_name is not None and (
            TASK_ID_SHAPE.fullmatch(actor_name) or actor_name == EXTERNAL_SENDER
        ):
            # Names are looked up before ids: a task registered under another
            # task's id (or a future one's) would get its messages, and answer
            # its asks; one registered as the sender of messages from outside
            # would get the replies meant for it.
            self._release()
            what = (
                "is the sender of messages from outside the run"
                if actor_name == EXTERNAL_SENDER
                else "has the form of a task id"
            )
            return refusal(
                name, f"the name {actor_name!r} {what}; a task cannot be registered under it"
            )
        # The mailbox (and name) exist before spawn returns, so the caller can
        # message the child at once.
        self._open_mailbox(task_id)
        if actor_name is not None:
            try:
                self._router.register(actor_name, task_id)
            except RoutingError as exc:
                self._router.close(task_id)
                self._release()
                return refusal(name, str(exc))
        scope = Scope(caller, task_id=caller.task_id, task=caller.task)
        child = Child(
            task_id=task_id,
            name=name,
            scope=scope,
            link=options.link,
            parent_attempt=attempt,
            actor_name=actor_name,
        )
        attempt.children[task_id] = child

        def body() -> None:
            try:
                child.result = self.run_task(name, task_id, call.call_json, scope, child)
            finally:
                self._release()
                child.done.set()
                self._child_ended(attempt, child)

        try:
            child.thread = start_task_thread(body, name=f"capsule-task {task_id}")
        except RuntimeError as exc:  # the OS refused another thread
            del attempt.children[task_id]
            self._router.close(task_id)
            self._release()
            return refusal(name, f"the host cannot start another task thread: {exc}", "limit")
        return True, task_id

    def _child_ended(self, parent: Attempt, child: Child) -> None:
        # Its outcome stays with its parent until a wait collects it (see
        # outcomes); only a linked child's failure fails the parent now.
        with self._lock:
            failure = None if child.waited_on else linked_failure(child, self.configs)
        if failure is not None:
            self._linked_failed(parent, failure)
        parent.wake()

    def _linked_failed(self, parent: Attempt, failure: ErrorInfo) -> None:
        invocation = parent.invocation
        if invocation.check_stop() is None and invocation.aborted is None:
            invocation.aborted = failure  # its own supervisor takes it from there

    def wait(
        self,
        caller: Invocation,
        task_ids: list[str],
        timeout: float | None,
        any_ended: bool = False,
    ) -> tuple[bool, str]:
        if any_ended:
            # Replayed, the children the journaled answer delivered are joined
            # and forgotten as they were: the guest sees the same ones ended.
            return self._step(
                caller,
                "wait_any",
                tuple(task_ids),
                partial(self._wait, caller, task_ids, timeout, True),
                replayed=lambda step: self._rewait(caller, task_ids, step.answer),
            )

        def wait() -> tuple[bool, str]:
            return self._wait(caller, task_ids, timeout, False)

        # Replayed, the children are still joined and forgotten as they were.
        return self._step(caller, "wait", tuple(task_ids), wait, replayed=lambda _: wait())

    def _rewait(self, caller: Invocation, ids: list[str], answer: str) -> None:
        delivered = [ids[index] for index in delivered_positions(answer) if index < len(ids)]
        if delivered:
            self._wait(caller, delivered, None, False)

    def _wait(
        self, caller: Invocation, ids: list[str], timeout: float | None, any_ended: bool
    ) -> tuple[bool, str]:
        """Block until every child in ``ids`` has ended (or, ``any_ended``, one
        of them), or ``timeout``; deliver the outcomes of those that ended (all
        or none of them, unless ``any_ended``) and forget those children."""
        attempt = self._attempts[caller]
        unknown = [task_id for task_id in ids if task_id not in attempt.children]
        if unknown:
            return refusal(
                "?",
                f"{caller.task!r} can only wait on its own children whose outcomes it has "
                f"not collected yet, not {unknown[0]!r}",
            )
        children = [attempt.children[task_id] for task_id in ids]
        with self._lock:
            for child in children:
                child.waited_on = True

        def ready() -> bool:
            ended = (c.done.is_set() for c in children)
            return any(ended) or not children if any_ended else all(ended)

        done = False
        try:
            done = self._block(attempt, ready, timeout, "result")
        finally:
            stopping = caller.check_stop() is not None
            with self._lock:
                delivered = (
                    []
                    if stopping or not (done or any_ended)
                    else [c for c in children if c.done.is_set()]
                )
                for child in children:
                    child.waited_on = False
                for child in delivered:
                    child.collected = True
                # A linked child that failed during the wait and was not delivered.
                missed = [linked_failure(c, self.configs) for c in children if not c.collected]
        for failure in missed:
            if failure is not None:
                self._linked_failed(attempt, failure)
        if stopping:
            return False, "{}"  # the sandbox ends the caller; the payload is never seen
        if not done and not any_ended:
            pending = [c.task_id for c in children if not c.done.is_set()]
            message = f"children {pending} had not ended after {timeout:g}s"
            return False, json.dumps(
                {"kind": "wait_timeout", "task": caller.task, "message": message}
            )
        reply = outcomes_answer(children, {child.task_id for child in delivered})
        # Collected: the guest's handles keep the outcomes; forget these children
        # (their threads have ended) so a long-lived parent does not accumulate them.
        for child in delivered:
            if child.thread is not None:
                child.thread.join()
            attempt.children.pop(child.task_id, None)
        return True, reply

    def cancel(self, caller: Invocation, task_id: str) -> None:
        def cancel() -> tuple[bool, str]:
            child = self._attempts[caller].children.get(task_id)
            if child is not None and not child.done.is_set():
                self._cancel_scope(child.scope, "cancelled by its parent")
            return True, ""

        self._step(caller, "cancel", task_id, cancel, replayed=lambda _: cancel())

    def sleep(self, caller: Invocation, seconds: float) -> None:
        attempt = self._attempts[caller]

        def sleep() -> tuple[bool, str]:
            self._block(attempt, lambda: False, max(0.0, seconds), "sleep")
            if caller.check_stop() is not None:
                return False, "{}"  # cut short: the sandbox ends the caller
            return True, ""

        # A replayed sleep has been slept.
        self._step(caller, "sleep", repr(seconds), sleep)

    # -- messages (see messages.MessageCalls) -----------------------------------

    # A replayed send or ask is not delivered again: its message was received
    # then, or is put back in the target's mailbox when that opens (History).

    # The message calls hand _step a partial, not a lambda: one Python frame
    # fewer on every message (each costs about a microsecond on a busy run).

    def send(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        answer = self._outgoing(caller, "send", target, body_json, timeout)
        attempt = self._attempts[caller]
        note = attempt.credit_note
        if not note:
            return answer
        # Credit goes to the guest, not to the journal: a replay's sends all go
        # through the host, and are the same steps in the same order.
        attempt.credit_note = ""
        return True, f"{answer[1][:-1]}{note}}}"

    def gathered(self, caller: Invocation, records: list[tuple[str, str]]) -> None:
        # Each a send step, in the guest's order and before the step of the
        # call during which they are taken (if any), as if sent one by one.
        attempt = self._attempts[caller]
        deliver = self._messages.gathered
        for target, body_json in records:
            ok, _ = self._step(
                caller,
                "send",
                (target, body_json),
                partial(deliver, attempt, target, body_json),
                replayed=lambda _: attempt.node.next_message_id(),
            )
            if not ok:  # written without credit, or the replay diverged: it ends
                return

    def ending(self, caller: Invocation, batch_taken: int | None) -> None:
        attempt = self._attempts.get(caller)
        if attempt is not None:
            self._messages.ending(attempt, batch_taken)

    def receive(
        self, caller: Invocation, timeout: float | None
    ) -> tuple[bool, Sequence[Envelope] | str]:
        attempt = self._attempts[caller]
        taken: list[Message] = []
        ok, answer = self._step(
            caller,
            "receive",
            "",
            partial(self._messages.receive, attempt, timeout, taken),
            replayed=lambda step: self._messages.replayed_receive(attempt, step.answer),
        )
        if not ok:
            return False, answer
        # Live, the messages themselves; replayed, those of the journaled answer.
        return True, taken or received_messages(answer)

    def ask(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        return self._outgoing(caller, "ask", target, body_json, timeout)

    def _outgoing(
        self, caller: Invocation, kind: str, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        deliver = self._messages.ask if kind == "ask" else self._messages.send
        return self._step(
            caller,
            kind,
            (target, body_json),
            partial(deliver, attempt, target, body_json, timeout),
            replayed=lambda _: attempt.node.next_message_id(),  # numbered as it was
        )

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]:
        def route_again(_: Step) -> None:
            # The asker may be waiting live for this reply (its ask was not journaled).
            try:
                self._router.reply(message_id, caller.task_id, body_json)
            except RoutingError:
                pass

        return self._step(
            caller,
            "reply",
            (message_id, body_json),
            lambda: self._messages.reply(caller, message_id, body_json),
            replayed=route_again,
        )

    def output(self, invocation: Invocation, stream: str, text: str) -> None:
        # Journaled before it is shown, so that a replay knows exactly what was
        # shown already: replayed output is not shown again. The task does not
        # wait for the commit: the line is shown once its batch is committed
        # (lines in bursts share one commit; waiting, each was one). Unless too
        # much waits to be shown already: then it waits.
        task_id, size = invocation.task_id, len(text)
        with self._output_lock:
            self._unshown_total += size
            self._unshown[task_id] = self._unshown.get(task_id, 0) + size
            durable = self._unshown_total > OUTPUT_UNSHOWN_LIMIT
        replayed: list[Step] = []
        ok, _ = self._step(
            invocation,
            "output",
            (stream, text),
            lambda: (True, ""),
            replayed=replayed.append,
            durable=durable,
        )
        if not ok or replayed:
            self._show_output(task_id, size, None)
            return
        shown = TaskOutput(
            run_id=self.run_id,
            task_id=task_id,
            task=invocation.task,
            stream="stderr" if stream == "stderr" else "stdout",
            text=text,
        )
        self._log(self._steps.after_commit, partial(self._show_output, task_id, size, shown))

    def _show_output(self, task_id: str, size: int, event: TaskOutput | None) -> None:
        try:
            if event is not None:
                self.events.emit(event)
        except Exception as exc:
            # It is journaled; the run goes on (it used to fail the task that
            # printed). Said once: a closed pipe fails every line after it.
            if not self._output_failed:
                self._output_failed = True
                kept = "; the journal keeps it" if self._journaling else ""
                _say(f"capsule: output can no longer be shown ({exc!r}){kept}")
        finally:
            # Counted down only once shown: a task whose count is 0 has shown
            # all it printed (see _output_shown).
            with self._output_lock:
                self._unshown_total -= size
                left = self._unshown.get(task_id, 0) - size
                if left > 0:
                    self._unshown[task_id] = left
                else:
                    self._unshown.pop(task_id, None)

    def _output_shown(self, task_id: str) -> None:
        """Before a task's lifecycle is reported further (it waits, starts a
        child, made an HTTP request, or its attempt ended): what it printed is
        shown first."""
        if self._unshown.get(task_id):
            self._log(self._steps.sync)

    # -- HTTP: performed on the run's client, journaled with secrets redacted ----

    def _http_request(
        self, caller: Invocation, kind: str, request_json: str
    ) -> HttpRequest | tuple[bool, str]:
        """The guest's request, parsed; or, for a malformed one, the answer of
        its step (recorded by its digest: it may still carry secrets)."""
        try:
            return HttpRequest.from_json(request_json)
        except HttpFailure as exc:
            invalid = (False, exc.redacted(self._http.secrets.granted).to_json())
            digest = hashlib.sha256(request_json.encode()).hexdigest()
            return self._step(caller, kind, json.dumps({"invalid": digest}), lambda: invalid)

    def http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        known = self._http.secrets
        request = self._http_request(caller, "http", request_json)
        if not isinstance(request, HttpRequest):
            return request
        secrets = known.learn(request.credentials)
        # The response, for its journaled form (made only if it is journaled).
        received: list[HttpResponse] = []

        def perform() -> tuple[bool, str]:
            started = time.monotonic()
            attempt.transfer = Transfer()
            future = self._http.start(request, caller.grants.allows, secrets, attempt.transfer)
            future.add_done_callback(lambda _: attempt.wake())
            try:
                if not self._block(attempt, future.done, None, "http"):
                    future.cancel()  # the caller must stop; the request is abandoned
                    return False, "{}"
            finally:
                attempt.transfer = None
            return self._http_ended(caller, request, secrets, future, started, received)

        def for_journal(answer: str) -> str:
            return received[0].journal_json(secrets) if received else answer

        # Durable: once a request has been sent, a crash must not send it again.
        return self._step(
            caller,
            "http",
            request.journal_form(known.granted),
            perform,
            durable=True,
            for_journal=for_journal,
        )

    def _http_ended(
        self,
        caller: Invocation,
        request: HttpRequest,
        secrets: Secrets,
        future: Future[HttpResponse],
        started: float,
        received: list[HttpResponse],
    ) -> tuple[bool, str]:
        """The answer of a request that ended (its response is added to
        ``received``), reported as an HttpExchange event."""
        status: int | None = None
        error_kind: str | None = None
        try:
            response = future.result()
            received.append(response)
            status = response.status
            answer = True, response.to_json()
        except HttpFailure as exc:  # (its message redacted by the client)
            error_kind = exc.kind
            answer = False, exc.to_json()
        self._output_shown(caller.task_id)
        self.events.emit(
            HttpExchange(
                **_EventIds(run_id=self.run_id, task_id=caller.task_id, task=caller.task),
                method=request.method,
                url=redact_url(request.url, secrets),
                status=status,
                error_kind=error_kind,
                duration_ms=(time.monotonic() - started) * 1000,
                request_bytes=len(request.body),
                response_bytes=len(received[0].body) if received else 0,
            )
        )
        return answer

    # -- operations started without waiting (see operations.py) ---------------

    def start_http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        known = self._http.secrets
        request = self._http_request(caller, "http_start", request_json)
        if not isinstance(request, HttpRequest):
            return request
        secrets = known.learn(request.credentials)

        def operation(handle: int) -> Operation:
            return http_operation(
                handle,
                lambda transfer: self._http.start(request, caller.grants.allows, secrets, transfer),
                lambda future, started, received: self._http_ended(
                    caller, request, secrets, future, started, received
                ),
                secrets,
            )

        return self._start_operation(
            caller, "http_start", request.journal_form(known.granted), operation
        )

    def start_wait(self, caller: Invocation, task_ids: list[str]) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        if any(task_id not in attempt.children for task_id in task_ids):
            # (Refused as a blocking wait refuses it.)
            return self._step(
                caller,
                "wait_start",
                tuple(task_ids),
                lambda: self._wait(caller, task_ids, 0, False),
            )

        def operation(handle: int) -> Operation:
            children = [attempt.children[task_id] for task_id in task_ids]
            with self._lock:  # (a linked child's failure now goes to this wait)
                for child in children:
                    child.waited_on = True

            def replayed() -> None:
                # Replayed, the children are still joined and forgotten as they were.
                self._wait(caller, task_ids, None, False)

            return condition(
                handle,
                "result",
                lambda: all(child.done.is_set() for child in children),
                lambda: self._wait(caller, task_ids, 0, False),
                replayed,
            )

        return self._start_operation(caller, "wait_start", tuple(task_ids), operation)

    def start_receive(self, caller: Invocation) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        task_id = caller.task_id

        def operation(handle: int) -> Operation:
            return condition(
                handle,
                "receive",
                lambda: self._router.watch(task_id, attempt),
                lambda: (True, '""'),
            )

        return self._start_operation(caller, "receive_start", "", operation)

    def start_ask(self, caller: Invocation, target: str, body_json: str) -> tuple[bool, str]:
        attempt = self._attempts[caller]
        operations = attempt.operations

        def operation_for(
            refused: tuple[bool, str], message: Message | None
        ) -> Callable[[int], Operation]:
            def operation(handle: int) -> Operation:
                if message is None:  # (replayed, and refused now: it ends so)
                    return condition(handle, "receive", lambda: True, lambda: refused)
                reply: list[tuple[str | None, str | None]] = []

                def ready() -> bool:
                    if not reply:
                        answer = self._router.take_reply(message.id)
                        if answer != (None, None):
                            reply.append(answer)
                    return bool(reply)

                def answered() -> tuple[bool, str]:
                    text, failure = reply[0]
                    if text is None:
                        error = {"kind": "actor_ended", "message": failure}
                        return False, json.dumps(error)
                    return True, text

                def stop() -> None:
                    self._router.abandon_replies([message.id])

                return condition(handle, "receive", ready, answered, stop, stop)

            return operation

        def start() -> tuple[bool, str]:
            if operations.in_flight() >= MAX_IN_FLIGHT:
                attempt.node.next_message_id()  # (numbered all the same, as a replay does)
                return False, too_many_in_flight(caller)
            answer, message = self._messages.send_ask(attempt, target, body_json)
            if message is None:
                return answer
            return True, str(operations.add(operation_for(answer, message), live=True))

        def replayed(step: Step) -> None:
            if not step.ok:
                attempt.node.next_message_id()  # numbered as it was
                return
            # Asked again: numbered alike, not sent again (see MessageCalls._send);
            # its reply is awaited unless a replayed poll reports it.
            answer, message = self._messages.send_ask(attempt, target, body_json)
            operations.add(operation_for(answer, message), live=False)

        return self._step(caller, "ask_start", (target, body_json), start, replayed=replayed)

    def _start_operation(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        operation: Callable[[int], Operation],
    ) -> tuple[bool, str]:
        return self._operations.start(self._attempts[caller], kind, request, operation)

    def poll(self, caller: Invocation, timeout: float | None) -> tuple[bool, str]:
        return self._operations.poll(self._attempts[caller], timeout)

    def abandon(self, caller: Invocation, handle: int) -> None:
        self._operations.abandon(self._attempts[caller], handle)

    # -- time and randomness: journaled, so that a replay sees the same --------

    def wall_clock_ns(self, caller: Invocation) -> int:
        ok, answer = self._step(caller, "wall_clock", "", lambda: (True, str(time.time_ns())))
        return int(answer) if ok else 0

    def monotonic_ns(self, caller: Invocation) -> int:
        def now() -> tuple[bool, str]:
            return True, str(time.monotonic_ns() + self._monotonic_offset)

        ok, answer = self._step(caller, "monotonic", "", now)
        return int(answer) if ok else 0

    def random_bytes(self, caller: Invocation, count: int) -> bytes:
        ok, answer = self._step(
            caller, "random", str(count), lambda: (True, os.urandom(count).hex())
        )
        return bytes.fromhex(answer) if ok else bytes(count)

    def _block(
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
        after = self.settings.hibernate_after
        hibernate_at = None if after is None else started + after
        ids = _EventIds(run_id=self.run_id, task_id=invocation.task_id, task=invocation.task)
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
                        self._output_shown(invocation.task_id)
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
                    bound = nearest_deadline(invocation)
                    ends = [t for t in (limit, bound, hibernate_at) if t is not None]
                    if not waiting:
                        ends.append(report_at)
                    attempt.wait_for_wakeup(min([*ends, now + 1.0]) - now)
        finally:
            if waiting:
                self.events.emit(TaskResumed(**ids))


#: How long a task waits in a host call before it is reported as waiting.
WAITING_GRACE_S = 0.005
#: Output journaled but not yet shown, in characters, beyond which a task's
#: output waits for its commit (and so for the display).
OUTPUT_UNSHOWN_LIMIT = 1 << 20


class _EventIds(TypedDict):
    run_id: str
    task_id: str
    task: str


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except Exception:
        pass  # stderr is gone too


def _no_entry(entry: str, names: list[str]) -> str:
    """Why a run cannot start at ``entry``: the tasks it could start at."""
    found = ", ".join(names) or "none"
    if entry == "main":
        return (
            f"the program has no task named 'main' (tasks found: {found}); declare the "
            f'entry point with @task(name="main"), or run another task with --entry NAME'
        )
    return (
        f"the program has no task named {entry!r} to run as the entry point (tasks "
        f"found: {found}); pass one of them to --entry (or FILE:TASK)"
    )


def _describe(step: Step) -> str:
    request = step.request if len(step.request) <= 200 else step.request[:200] + "..."
    return f"{step.kind}({request})"


#: Most tasks a program may declare.
MAX_DECLARED_TASKS = 10_000


def _declared_tasks(loaded: str) -> list[dict[str, Any]]:
    """The tasks the program declared, from what its import returned (the
    guest's word: module-level code may have replaced the SDK): a list of
    {"name", "function", "options"}; ProgramError if it is anything else."""
    try:
        value = guest_data.json_value(loaded, "the program's description of its tasks")
    except ProtocolError as exc:
        raise ProgramError(str(exc)) from None
    tasks = value.get("tasks") if isinstance(value, dict) else None
    if (
        not isinstance(tasks, list)
        or len(tasks) > MAX_DECLARED_TASKS
        or not all(
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("function"), str)
            and isinstance(entry.get("options", {}), dict)
            for entry in tasks
        )
    ):
        raise ProgramError(
            "the program's description of its tasks is malformed (its module-level code "
            f"replaced the SDK?); expected at most {MAX_DECLARED_TASKS:,} tasks, each "
            '{"name": text, "function": text, "options": {...}}'
        )
    return tasks


def _as_reply(result: TaskResult) -> tuple[bool, str]:
    if result.error is None:
        assert result.result_json is not None
        return True, result.result_json
    return False, json.dumps({**result.error.model_dump(), "attempts": result.attempts})
