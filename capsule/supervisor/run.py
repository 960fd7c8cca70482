"""One run of a program: its tasks run as a tree of invocations, supervised
(retries, restarts, strategies, intensity) and scheduled. :class:`Run` is the
run as the rest of Capsule sees it: it puts together the parts that each do
one thing (see the package's docstring) and runs ``main``.

``main`` runs on a task thread owned by :meth:`Run.run_main`. Each attempt of an
invocation runs in a fresh sandbox instance. A task calling another task reaches
:meth:`TaskCalls.call_task` through a host import, on its own thread, which is
blocked in that call anyway: the child (with its retries) runs right there, in
its own instance, and its result is returned to the caller.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from capsule.actors.external import ExternalMessages
from capsule.actors.router import Message, Router
from capsule.interrupts import wait_interruptibly
from capsule.net.http import HttpClient
from capsule.sandbox.config import HostCaps, TaskConfig
from capsule.sandbox.engine import Invocation, Prepared, Sandbox
from capsule.sandbox.grants import Grants
from capsule.supervisor.admission import Admission
from capsule.supervisor.blocking import Blocking
from capsule.supervisor.events import ErrorDetail, EventStream
from capsule.supervisor.host_calls import RunHostCalls
from capsule.supervisor.http_calls import HttpCalls
from capsule.supervisor.inbox import RunInbox
from capsule.supervisor.journaled import Divergence, JournaledSteps, StepDriver
from capsule.supervisor.live import LiveTree
from capsule.supervisor.loading import ProgramError, load_program, no_entry, program_module
from capsule.supervisor.message_steps import MessageSteps
from capsule.supervisor.messages import MessageCalls
from capsule.supervisor.operation_calls import OperationCalls
from capsule.supervisor.option_specs import (
    DEFAULT_CORE,
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
from capsule.supervisor.output import Output
from capsule.supervisor.steps import History, JournalFailure, NoStepLog, PendingMessage, StepLog
from capsule.supervisor.supervision import Supervision
from capsule.supervisor.task_calls import TaskCalls
from capsule.supervisor.time_calls import TimeCalls
from capsule.supervisor.tree import LiveTask, Scope, TaskResult, run_interruptibly

if TYPE_CHECKING:
    # (The async core's modules load only for a run on it; the run's loop and
    # its continuation driver, with anyio and asyncio, only for a run whose
    # waits run by continuation.)
    from capsule.sandbox.async_sandbox import AsyncSandbox
    from capsule.supervisor.async_core import AsyncCore
    from capsule.supervisor.continuations import Continuations
    from capsule.supervisor.loop_thread import LoopThread
    from capsule.supervisor.run_loop import RunLoop

__all__ = [
    "Backoff",
    "ProgramError",
    "Run",
    "RunInterrupted",
    "RunSettings",
    "new_run_id",
    "program_module",
]


#: How a run whose replay diverged goes on (its error says it after where).
DIVERGED_HINT = (
    "The run is resumable once its program agrees with its journal again: fix the "
    "program (or restore the code the run ran with), then resume it"
)


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
    #: How tasks run: "async" (call futures on the sandbox's poll threads: it
    #: must be an AsyncSandbox) or "threads" (a thread per live task).
    core: str = DEFAULT_CORE


def new_run_id() -> str:
    """A fresh, short, unique run id."""
    return uuid.uuid4().hex[:12]


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
        loop: LoopThread | None = None,
        first: Prepared | None = None,
        programs: dict[str, str] | None = None,
    ) -> None:
        """``programs``: the program (module) of each task declared by another
        program than ``program`` (a polyglot run's, see Sandbox.add_program).
        ``first``: the instance the program was loaded in, the one main runs
        in (None: main takes a fresh one). It is the run's from this call:
        closed by close() (or at once if the run cannot be made), unless
        run_main has given it to the sandbox's pool by then."""
        # What the run makes to run on is closed by close(), whoever calls it
        # (run_main as it ends, or whoever made the run), or here if making
        # it fails.
        self._owned = made = ExitStack()
        self._first = first
        made.callback(self._close_first)
        try:
            self.sandbox = sandbox
            self.program = program
            self.configs = configs
            self.events = events
            self.settings = settings = settings or RunSettings()
            self.run_id = run_id = run_id or new_run_id()
            self._router = router = Router(settings.mailbox_capacity, settings.max_queued_bytes)
            if history is not None:
                router.allow_early_replies(history.asked, history.replies)
            log: StepLog = steps or NoStepLog()
            self._log = log
            #: Without a journal, steps are only counted: nothing is serialised.
            journaling = steps is not None and not isinstance(steps, NoStepLog)
            #: What each task may reach, by task name (nothing if absent).
            self.grants = grants = grants or {}
            #: The run's part of an event loop (on ``loop``, its host
            #: application's, else on a thread of the run's own), and the driver
            #: of the waits that run by continuation on it: made for the async
            #: core (or where waits run by continuation), opened with the run and
            #: closed when it ends (after what runs on it); never on task threads.
            self._loop_thread = loop
            self._loop: RunLoop | None = None
            self._continuations: Continuations | None = None
            made.callback(self._close_loop)
            self._http = HttpClient(
                settings.max_response_bytes,
                granted=[value for task in grants.values() for value in task.env.values()],
                # (On the async core its requests run on the run's loop: no loop
                # thread of their own.)
                portal=(lambda: self._continued().timers.portal())
                if settings.core == "async"
                else None,
            )
            made.callback(self._http.close)  # (before the loop its requests may run on)
            if any(task_grants.hosts for task_grants in grants.values()):
                self._http.warm_up()  # some task may make requests: ready for the first
            #: Set by stop(): the run was stopped from outside (like Ctrl-C).
            self.stopped = False

            self._tree = tree = LiveTree()
            self._journal = journal = JournaledSteps(
                tree,
                log,
                journaling,
                run_id,
                settings.max_task_output_bytes,
                settings.max_run_journal_bytes,
                recorded=history.recorded if history else 0,
            )
            self._output = output = Output(run_id, events, journal)
            blocking = Blocking(
                sandbox, events, run_id, settings.hibernate_after, before_waiting=output.shown
            )
            journal.run_wait = blocking.run
            # The steps that may wait (declared once, by the host calls that make
            # them) run as the run's core runs them: on the task's thread, or by
            # continuation with no thread waiting.
            drive: StepDriver = journal.step
            async_sandbox: AsyncSandbox | None = None
            if settings.core == "async":
                from capsule.sandbox.async_sandbox import AsyncSandbox
                from capsule.supervisor.async_host import ContinuedSteps

                if not isinstance(sandbox, AsyncSandbox):
                    raise TypeError(
                        f"run {run_id}: core='async' (the default) runs its tasks in an "
                        f"AsyncSandbox, not a {type(sandbox).__name__}; for a Sandbox, pass "
                        "RunSettings(core='threads')"
                    )
                async_sandbox = sandbox
                drive = ContinuedSteps(
                    journal, self._continued(), sandbox.hibernate_waiting, settings.hibernate_after
                ).step
            operations = OperationCalls(journal.step, drive)
            messages = MessageCalls(
                router,
                events,
                run_id,
                max_message_bytes=settings.max_message_bytes,
                mailbox_capacity=settings.mailbox_capacity,
                on_ask=lambda message: journal.write(log.ask_sent, message),
                journaling=journaling,
                open_channel=sandbox.open_channel,
                history=history,
            )
            journal.end_credit = messages.end_credit
            self._supervision = supervision = Supervision(
                sandbox,
                program,
                configs,
                settings,
                events,
                run_id,
                journal,
                tree,
                router,
                history,
                seed or os.urandom(16),
                grants,
                before_reporting=output.shown,
                programs=programs,
            )
            admission = Admission(configs, tree, settings.max_live_tasks, settings.max_children)
            # Guests never see the monotonic clock go back, also across a resume.
            monotonic_offset = max(
                0, (history.monotonic_ns if history else 0) + 1 - time.monotonic_ns()
            )
            host = RunHostCalls(
                TaskCalls(
                    supervision, admission, configs, router, journal, tree, operations, drive
                ),
                MessageSteps(messages, router, journal, tree, operations, drive),
                TimeCalls(journal, tree, monotonic_offset, drive),
                HttpCalls(
                    self._http, journal, tree, operations, events, run_id, output.shown, drive
                ),
                operations,
                output,
                tree,
                router,
            )
            supervision.host = host
            if async_sandbox is not None:
                # The waits a host call that does not wait may still make run by
                # continuation too: they cannot wait (a timeout of 0), or are over
                # at once (a replayed wait on children the journal says ended).
                from capsule.supervisor.async_core import AsyncCore
                from capsule.supervisor.continuations import wait_here

                continuations = self._continued()
                journal.run_wait = partial(wait_here, continuations, async_sandbox.slots)
                supervision.core = AsyncCore(supervision, async_sandbox, host, continuations.timers)

            #: Messages from outside the run (`capsule send`, `capsule ask`).
            self.external = ExternalMessages(
                router, settings.max_message_bytes, self._external_sent
            )
        except BaseException:
            made.close()
            raise

    def wait_by_continuation(self) -> None:
        """Run the waits of this run's host calls by continuation (see
        continuations.py) instead of on their threads: each task thread waits,
        without its CPU slot, for the answer the driver gives (nor hibernated).
        How the waits of async imports run, on today's threads. Call it before
        run_main: the run's loop starts now. (The thread core's: the async
        core runs every wait so.)"""
        if self._supervision.core is not None:
            raise RuntimeError(
                f"run {self.run_id} is on the async core: its waits run by continuation already"
            )
        from capsule.supervisor.continuations import wait_here

        continuations = self._continued()
        continuations.timers.start()
        self._journal.run_wait = partial(wait_here, continuations, self.sandbox.slots)

    def _continued(self) -> Continuations:
        """The driver of this run's waits by continuation, and the run's loop
        it runs them on, made on first use."""
        if self._continuations is None:
            from capsule.supervisor.continuations import Continuations
            from capsule.supervisor.run_loop import RunLoop

            self._loop = RunLoop(f"capsule-loop {self.run_id}", self._loop_thread)
            self._continuations = Continuations(
                self._loop, self.events, self.run_id, self._output.shown
            )
        return self._continuations

    def _close_loop(self) -> None:
        if self._loop is not None:
            self._loop.close()

    def listen(self) -> None:
        """Let `capsule send` and `capsule ask` reach the run until it closes
        (see RunInbox), on its loop if it has one (the async core's, started
        now); InboxError if its socket cannot be made (the run goes on)."""
        if self._supervision.core is not None:
            run_loop = self._continued().timers
            if not run_loop.started:
                run_loop.start()
        loop = self._loop if self._loop is not None and self._loop.running else None
        inbox = RunInbox(self.run_id, self.external, loop)
        # (Closed before the loop it serves on: it answers what it read first;
        # and if it starts only in part, what it made is let go all the same.)
        self._owned.callback(inbox.close)
        inbox.start()

    @property
    def divergence(self) -> Divergence | None:
        """Where the run was stopped, if a replay diverged from its journal."""
        return self._journal.divergence

    @property
    def journal_failure(self) -> JournalFailure | None:
        """Why the run was stopped, if its journal could not be written."""
        return self._journal.journal_failure

    def _external_sent(self, message: Message, target_id: str) -> None:
        """Journal a message from outside, durably before its sender is told
        it was delivered: a resume delivers it again if it was not received."""
        pending = PendingMessage(
            message.id, message.sender, target_id, message.body_json, message.expects_reply
        )
        self._journal.write(self._log.ask_sent, pending)
        self._journal.write(self._log.sync)

    def snapshot(self) -> list[LiveTask]:
        """The attempts running now, with the fuel each has used so far (read at
        every epoch tick, so live for code that calls functions; a loop that
        calls nothing shows its fuel when it next does, or ends)."""
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
            for a in self._tree.running()
        ]

    def cancel_task(self, task_id: str, reason: str = "cancelled by the user") -> bool:
        """Cancel a running task (and everything under it) from outside the run;
        False if no such task is running. Cancelling ``main`` stops the run."""
        if task_id == "main":
            self.stop(reason)
            return True
        return self._tree.cancel_task(task_id, reason)

    def stop(self, reason: str = "cancelled: the run was stopped") -> None:
        """Cancel the whole tree; the run ends as interrupted (and resumable)."""
        self.stopped = True
        self._tree.cancel(self._tree.root, reason)

    @staticmethod
    def load(
        sandbox: Sandbox,
        program: str,
        output: Callable[[Invocation, str, str], None],
        task_defaults: dict[str, Any] | None = None,
    ) -> tuple[dict[str, TaskConfig], Prepared]:
        """Import the program in a sandbox and validate the tasks it declares
        (see loading.load_program)."""
        return load_program(sandbox, program, output, task_defaults)

    def run_main(
        self, args: list[Any], kwargs: dict[str, Any] | None = None, entry: str = "main"
    ) -> TaskResult:
        """Run the task named ``entry`` (``main`` unless the user chose another)
        as the root of the tree, to the end, and return how it ended. Whatever
        its name, the root's task id is ``main``. The run is closed as this
        returns (or raises): what it made to run on stops.

        The task tree runs on task threads: the root on one this call owns, each
        spawned child on one its parent's attempt owns (and joins before it ends);
        a direct call runs inline on its caller's thread. Interrupting the wait
        (Ctrl-C) cancels the whole tree: every instance traps at its next epoch
        tick, every blocked host call returns, and RunInterrupted is raised once
        the tree has stopped.
        """
        with self:
            if entry not in self.configs:
                raise ProgramError(no_entry(entry, sorted(self.configs)))
            try:
                call_json = json.dumps({"args": args, "kwargs": kwargs or {}}, allow_nan=False)
            except ValueError as exc:  # (a host API caller's NaN: never a guest's)
                raise ProgramError(f"the arguments to main are not strict JSON: {exc}") from None
            self.sandbox.start_pool(self.program, self.settings.pool_size, self._first)
            self._first = None  # (the pool's now)
            root = self._tree.root
            core = self._supervision.core
            if core is not None:
                result, interrupted = _run_on_core(core, entry, call_json, root)
            else:
                # (Nested calls run inline on the task thread: the sandbox raises the
                # recursion limit while they nest deep; see capsule/sandbox/nesting.py.)
                result, interrupted = run_interruptibly(
                    lambda: self._supervision.run_task(entry, "main", call_json, root, None),
                    lambda: self._tree.cancel(root, "cancelled: the run was interrupted"),
                    name="capsule-main",
                )
        return self._outcome(result, interrupted)

    def close(self) -> None:
        """Stop what the run made to run on (its HTTP client, its loop) and
        close its first instance if its pool never took it. Safe to call
        again; run_main calls it as it ends."""
        self._owned.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _close_first(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            first.store.close()

    def _outcome(self, result: TaskResult, interrupted: bool) -> TaskResult:
        """How the run ended, from how its root did."""
        failure = self._journal.journal_failure
        if failure is not None:
            # (A new one: that one was raised on a task's thread, or never.)
            raise JournalFailure(failure.wording)
        if interrupted or self.stopped:
            raise RunInterrupted(result)
        divergence = self._journal.divergence
        if divergence is not None:
            # Not over: the tasks it stopped are in flight in the journal.
            result.error = ErrorDetail(
                kind="divergence",
                message=f"{divergence.message}. {DIVERGED_HINT}",
                task=divergence.task,
                retryable=False,
            )
            result.result_json = None
        return result


def _run_on_core(
    core: AsyncCore, entry: str, call_json: str, root: Scope
) -> tuple[TaskResult, bool]:
    """Run the root invocation on the async core while this thread waits for
    its end: (how it ended, whether the wait was interrupted). An interrupt
    (Ctrl-C) cancels the tree, and the wait goes on until it has stopped. The
    root runs on the run's loop, started here: no wasm runs where a signal
    lands."""
    from capsule.supervisor.async_core import host_failed

    ended: list[TaskResult] = []
    finished = threading.Event()

    def end(result: TaskResult) -> None:
        ended.append(result)
        finished.set()

    loop = core.loop
    if not loop.started:  # (it may serve the run's inbox already)
        loop.start()
    # (Its loop's task group ending under it, a host bug, ends the wait too.)
    loop.when_ended(finished.set)
    loop.soon(lambda: core.start_task(entry, "main", call_json, root, None, end))
    interrupted = wait_interruptibly(
        finished, lambda: core.supervision.tree.cancel(root, "cancelled: the run was interrupted")
    )
    if not ended:
        failure = loop.failures[-1] if loop.failures else None
        text = "".join(traceback.format_exception(failure)) if failure else "its run's loop ended"
        return host_failed(entry, "main", text), interrupted
    return ended[0], interrupted
