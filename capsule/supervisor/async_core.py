"""The async core: a run's task invocations with no thread of their own.
Each attempt is a call future on the sandbox's poll threads
(AsyncSandbox.start); its waiting host calls are answered by continuation
(async_host.py). What follows an attempt is decided, as on task threads, by
its AttemptLoop, and is driven by completions: the attempt's end, its
children's ends, the timer of a retry's backoff."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

from capsule.sandbox.async_sandbox import AsyncSandbox, WaitingHost
from capsule.sandbox.async_sandbox import Attempt as Running
from capsule.sandbox.engine import AttemptOutcome
from capsule.supervisor.attempt_loop import AttemptLoop
from capsule.supervisor.continuations import TimerService
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.supervision import Supervision
from capsule.supervisor.tree import Attempt, Child, Scope, TaskResult

#: How often a retry's backoff checks whether its task must stop meanwhile.
BACKOFF_CHECK_S = 0.05

#: Takes how an invocation ended.
OnEnd = Callable[[TaskResult], None]


class AsyncCore:
    """Starts a run's task invocations on the async core."""

    def __init__(
        self,
        supervision: Supervision,
        sandbox: AsyncSandbox,
        waiting: WaitingHost,
        timers: TimerService,
    ) -> None:
        self.supervision = supervision
        self.sandbox = sandbox
        self.waiting = waiting
        self.timers = timers

    def start_task(
        self,
        name: str,
        task_id: str,
        call_json: str,
        parent: Scope,
        child: Child | None,
        on_end: OnEnd,
    ) -> None:
        """Start one task invocation (as Supervision.run_task runs one) and
        return; ``on_end`` gets how it ended, from whichever thread ends it
        (this one if it ends at once)."""
        supervision = self.supervision
        final = supervision.replayed_final(name, task_id)
        if final is not None:
            on_end(final)
            return
        supervision.open_mailbox(task_id)
        try:
            loop = AttemptLoop(supervision, name, task_id, call_json, parent, child)
        except Exception:  # a host bug: the invocation fails, the run goes on
            supervision.router.close(task_id)
            on_end(_host_failed(name, task_id))
            return
        _Invocation(self, loop, on_end).next()


class _Invocation:
    """One task invocation on the async core, from its first attempt to its
    end: each step runs when what it waits for completes."""

    def __init__(self, core: AsyncCore, loop: AttemptLoop, on_end: OnEnd) -> None:
        self.core = core
        self.loop = loop
        self.on_end = on_end
        #: Its attempt running now, as the tree sees it.
        self.attempt: Attempt | None = None
        self.ended = False

    def next(self) -> None:
        """Start its next attempt (or decide what its not starting means)."""
        try:
            started = self.loop.next()
            if isinstance(started, AttemptOutcome):
                self._decided(started)
                return
            self.attempt = started
            supervision = self.core.supervision
            supervision.begin(started, self.loop.child)
            self.core.sandbox.start(
                started.invocation,
                supervision.program,
                self.loop.call_json,
                self.core.waiting,
                self._attempt_done,
            )
        except Exception:
            self._failed()

    def _attempt_done(self, running: Running) -> None:
        """Its attempt's call ended (on a poll thread): its children are
        cancelled, and it counts as ended once they have."""
        try:
            attempt = self.attempt
            assert attempt is not None and running.outcome is not None
            supervision = self.core.supervision
            outcome = supervision.concluded(attempt, running.outcome)
            attempt.operations.close()
            supervision.cancel_children(attempt)
            self._once_children_ended(attempt, lambda: self._attempt_ended(attempt, outcome))
        except Exception:
            self._failed()

    def _once_children_ended(self, attempt: Attempt, then: Callable[[], None]) -> None:
        """Call ``then`` once every child of ``attempt`` (spawned, or run by a
        direct call) has ended: now, or on the loop after the wake-up
        of the last one's end."""
        lock = threading.Lock()
        done = False
        earlier = attempt.waker  # (a wait of its may still be hooked: it is woken too)

        def check() -> None:
            nonlocal done
            with lock:
                if done:
                    return
                with self.core.supervision.tree.lock:
                    running = attempt.calling > 0 or any(
                        not child.done.is_set() for child in attempt.children.values()
                    )
                if running:
                    return
                done = True
            try:
                then()
            except Exception:
                self._failed()

        def woken() -> None:
            if earlier is not None:
                earlier()
            if not done:
                self.core.timers.soon(check)  # (never on the waker's thread)

        attempt.waker = woken
        if earlier is not None:
            earlier()  # (a wait of an attempt stopped while it waited ends now)
        check()

    def _attempt_ended(self, attempt: Attempt, outcome: AttemptOutcome) -> None:
        supervision = self.core.supervision
        self.attempt = None
        supervision.release(attempt)
        supervision.before_reporting(self.loop.task_id)
        self._decided(outcome)

    def _decided(self, outcome: AttemptOutcome) -> None:
        decision = self.loop.decide(outcome)
        if isinstance(decision, TaskResult):
            self._end(decision)
        elif decision.backoff is None:
            self.next()
        else:
            self._back_off(time.monotonic() + decision.backoff)

    def _back_off(self, until: float) -> None:
        """Wait, on a timer, for a retry's backoff to pass (or for its task
        to have to stop: checked every BACKOFF_CHECK_S)."""
        stopped = self.loop.parent.check_stop() is not None
        now = time.monotonic()
        if stopped or now >= until:
            try:
                ended = self.loop.after_backoff(not stopped)
            except Exception:
                self._failed()
                return
            if ended is None:
                self.next()
            else:
                self._end(ended)
            return
        self.core.timers.at(min(until, now + BACKOFF_CHECK_S), lambda: self._back_off(until))

    def _end(self, result: TaskResult) -> None:
        if self.ended:
            return
        self.ended = True
        supervision = self.core.supervision
        try:
            supervision.router.close(self.loop.task_id)
            supervision.ended(result, self.loop.parent)
        finally:
            self.on_end(result)

    def _failed(self) -> None:
        """A host bug while driving it: it ends failed (never silently: the
        traceback is kept), out of the live tree if it was in it."""
        text = traceback.format_exc()
        attempt, self.attempt = self.attempt, None
        tree = self.core.supervision.tree
        if attempt is not None:
            with tree.lock:
                tree.attempts.pop(attempt.invocation, None)
        self._end(_host_failed(self.loop.name, self.loop.task_id, text))


def _host_failed(name: str, task_id: str, text: str | None = None) -> TaskResult:
    error = ErrorDetail(
        kind="trap",
        message="the host failed while running the task",
        task=name,
        traceback=text or traceback.format_exc(),
        retryable=False,
    )
    return TaskResult(task_id, name, 0, 0, 0.0, error=error)
