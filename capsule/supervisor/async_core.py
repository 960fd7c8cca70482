"""The async core: a run's task invocations with no thread of their own.
Each invocation is an anyio task on the run's event loop (run_loop.py),
started in its parent's attempt's task group (the root's in the loop's own),
so an attempt's children end before it does. Each attempt is a call future
on the sandbox's poll threads (AsyncSandbox.start) whose end the task awaits;
its waiting host calls are answered by continuation (async_host.py). What
follows an attempt is decided, as on task threads, by its AttemptLoop.

Stops are cancel scopes: an attempt's deadline, and its task's stop (what it
runs within cancelled or past its deadline, from LiveTree.wake_all), cancel
the scope its call is awaited in, which has the sandbox end the call
(AsyncSandbox.stop); the same cut a retry's backoff short."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from capsule.sandbox.async_sandbox import AsyncSandbox, WaitingHost
from capsule.sandbox.async_sandbox import Attempt as Running
from capsule.sandbox.engine import AttemptOutcome
from capsule.supervisor.attempt_loop import HOST_FAILED, AttemptLoop
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.run_loop import RunLoop
from capsule.supervisor.supervision import Supervision
from capsule.supervisor.tree import Attempt, Child, Scope, TaskResult, nearest_deadline

#: Takes how an invocation ended.
OnEnd = Callable[[TaskResult], None]


class AsyncCore:
    """Starts a run's task invocations on the async core, as tasks on the
    run's loop."""

    def __init__(
        self,
        supervision: Supervision,
        sandbox: AsyncSandbox,
        waiting: WaitingHost,
        loop: RunLoop,
    ) -> None:
        self.supervision = supervision
        self.sandbox = sandbox
        self.waiting = waiting
        self.loop = loop
        #: The task group of each running attempt, by its scope (on the loop's
        #: thread only): where the invocations it starts run.
        self.groups: dict[Scope, TaskGroup] = {}
        #: The invocations started by a first attempt whose task group is not
        #: open yet (its call started where it was made, before its task ran),
        #: by its scope: they start in it once it opens.
        self.early: dict[Scope, list[Callable[[TaskGroup], object]]] = {}

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
        return: from any thread, it is reported pending here and runs on the
        loop, in the task group of the attempt that made it (``parent`` is
        that attempt's scope, or the scope of a child it spawned, or the
        run's). ``on_end`` gets how it ended (on this thread if it ends at
        once, else on the loop's)."""
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
            on_end(host_failed(name, task_id))
            return
        invocation = _Invocation(self, loop, on_end)
        made: Attempt | AttemptOutcome | None = None
        try:
            # Its first attempt is made (reported started) and its call
            # started before its maker goes on, as on task threads (where the
            # instance is made: the loop never waits for one).
            made = loop.next()
            first: AttemptOutcome | _Call
            if isinstance(made, Attempt):
                self.early[made.scope] = []
                first = invocation.call(made)
            else:
                first = made
        except Exception:
            if isinstance(made, Attempt):
                self.early.pop(made.scope, None)
            supervision.router.close(task_id)
            on_end(invocation._failed(traceback.format_exc()))
            return
        self.loop.soon(lambda: self._start(invocation, first, parent))

    def _start(self, invocation: _Invocation, first: AttemptOutcome | _Call, parent: Scope) -> None:
        """On the loop: ``invocation`` starts in its parent attempt's group,
        with its ``first`` attempt's call (or that attempt's outcome if it
        could not start)."""
        # A spawned child's scope is its parent attempt's child; a direct
        # call's is that attempt's own; the root's is the run's.
        owner = parent if parent.invocation is not None else parent.parent
        name = f"capsule-task {invocation.loop.task_id}"
        run = partial(invocation.run, first)
        group = None if owner is None else self.groups.get(owner)
        if group is not None:
            group.start_soon(run, name=name)
        elif owner is not None and owner in self.early:
            self.early[owner].append(partial(_start_soon, run=run, name=name))
        else:
            # The root; or one whose parent attempt ended before it could
            # start (it was cancelled with it, and ends at once): the run's.
            self.loop.start_soon(run, name)


class _Invocation:
    """One task invocation on the async core, from its first attempt to its
    end: an anyio task on the run's loop."""

    def __init__(self, core: AsyncCore, loop: AttemptLoop, on_end: OnEnd) -> None:
        self.core = core
        self.loop = loop
        self.on_end = on_end
        #: Its attempt running now, as the tree sees it.
        self.attempt: Attempt | None = None

    def call(self, attempt: Attempt) -> _Call:
        """Start ``attempt``'s call (from any thread): it is in the live tree."""
        core = self.core
        core.supervision.begin(attempt, self.loop.child)
        self.attempt = attempt
        return _Call(core, attempt, self.loop.call_json)

    async def run(self, first: AttemptOutcome | _Call) -> None:
        """Its attempts from its ``first``, retries and restarts, to its end.
        A host bug while driving it fails it, not the loop (nor its parent's
        task group)."""
        try:
            result = await self._attempts(first)
        except _HostBug as bug:
            result = self._failed(str(bug))
        except Exception:
            result = self._failed(traceback.format_exc())
        supervision = self.core.supervision
        try:
            supervision.router.close(self.loop.task_id)
            supervision.ended(result, self.loop.parent)
        except Exception:
            self.core.loop.failures.append(_HostBug(traceback.format_exc()))
        finally:
            self.on_end(result)

    async def _attempts(self, started: Attempt | AttemptOutcome | _Call) -> TaskResult:
        loop = self.loop
        while True:
            outcome = started if isinstance(started, AttemptOutcome) else await self._run(started)
            decision = loop.decide(outcome)
            if isinstance(decision, TaskResult):
                return decision
            if decision.backoff is not None:
                ended = loop.after_backoff(await self._backed_off(decision.backoff))
                if ended is not None:
                    return ended
            started = loop.next()

    async def _run(self, started: Attempt | _Call) -> AttemptOutcome:
        """One attempt (its call started already, or started here), in its
        task group: its call, then its children cancelled, and ended (the
        group's end), before it counts as ended."""
        core, supervision = self.core, self.core.supervision
        attempt = started if isinstance(started, Attempt) else started.attempt
        failure: str | None = None
        async with anyio.create_task_group() as children:
            core.groups[attempt.scope] = children
            for start in core.early.pop(attempt.scope, ()):
                start(children)
            try:
                call = self.call(started) if isinstance(started, Attempt) else started
                outcome = supervision.concluded(attempt, await self._ended(call))
            except Exception:  # (kept: an error here must not cancel its children's tasks)
                failure = traceback.format_exc()
            try:
                attempt.operations.close()
                supervision.cancel_children(attempt)
            except Exception:
                failure = failure or traceback.format_exc()
        del core.groups[attempt.scope]
        if failure is not None:
            raise _HostBug(failure)
        self.attempt = None
        supervision.release(attempt)
        supervision.before_reporting(self.loop.task_id)
        return outcome

    async def _ended(self, call: _Call) -> AttemptOutcome:
        """Its attempt's call, to its end (on a poll thread), ended by the
        sandbox once its task must stop."""
        core, attempt = self.core, call.attempt
        # (Its own deadline, or a caller's before it: either stops it.)
        deadline = nearest_deadline(attempt.scope)
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as stopping:
            self._watch(attempt.scope, stopping)
            try:
                await call.ended()
            finally:
                core.supervision.tree.unwatch(self)
        if not call.over:  # it must stop: the sandbox ends its call
            core.sandbox.stop(call.running)
            await call.ended()
        # A wait of its still hooked (it was stopped while waiting) ends now.
        attempt.wake()
        assert call.running.outcome is not None
        return call.running.outcome

    async def _backed_off(self, delay: float) -> bool:
        """A retry's backoff: True once it passed, False if its task must
        stop first (what it runs within cancelled, or past its deadline)."""
        parent = self.loop.parent
        deadline = nearest_deadline(parent)
        until = time.monotonic() + delay
        # (Again if cut short by nothing: asyncio ends a scope at its deadline
        # up to its clock's resolution early.)
        while parent.check_stop() is None and time.monotonic() < until:
            with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as stopping:
                self._watch(parent, stopping)
                try:
                    await anyio.sleep_until(until)
                finally:
                    self.core.supervision.tree.unwatch(self)
        return parent.check_stop() is None

    def _watch(self, scope: Scope, stopping: anyio.CancelScope) -> None:
        """``stopping`` is cancelled once what runs in ``scope`` must stop
        (on the loop: the stop may come from any thread)."""
        loop = self.core.loop
        self.core.supervision.tree.watch(self, scope, lambda: loop.soon(stopping.cancel))
        if scope.check_stop() is not None:  # (stopped before it watched)
            stopping.cancel()

    def _failed(self, text: str) -> TaskResult:
        """A host bug while driving it: it ends failed, reported (never
        silently: its traceback, ``text``, is kept), out of the live tree if
        it was in it."""
        attempt, self.attempt = self.attempt, None
        tree = self.core.supervision.tree
        if attempt is not None:
            with tree.lock:
                tree.attempts.pop(attempt.invocation, None)
        try:
            return self.loop.host_failed(text)
        except Exception:  # (reporting it failed too: it ends all the same)
            return host_failed(self.loop.name, self.loop.task_id, text)


class _Call:
    """An attempt's call on the sandbox's poll threads, started from any
    thread; its end is signalled to the loop, where its invocation awaits it."""

    def __init__(self, core: AsyncCore, attempt: Attempt, call_json: str) -> None:
        self.attempt = attempt
        self._loop = core.loop
        #: Its call has ended (on the loop's thread).
        self.over = False
        self._ending: anyio.Event | None = None
        self.running = core.sandbox.start(
            attempt.invocation,
            core.supervision.program_of(attempt.invocation.task),
            call_json,
            core.waiting,
            self._done,
        )

    def _done(self, _: Running) -> None:
        try:
            self._loop.soon(self._over)
        except RuntimeError:  # its run's loop has ended: no one awaits it
            pass

    def _over(self) -> None:
        self.over = True
        if self._ending is not None:
            self._ending.set()

    async def ended(self) -> None:
        """On the loop: until its call has ended."""
        if not self.over:
            if self._ending is None:
                self._ending = anyio.Event()
            await self._ending.wait()


def _start_soon(group: TaskGroup, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    group.start_soon(run, name=name)


class _HostBug(Exception):
    """A host bug while an attempt ended (its traceback, as text)."""


def host_failed(name: str, task_id: str, text: str | None = None) -> TaskResult:
    """How an invocation the host failed to drive ended (``text``: the
    traceback; by default the one being handled)."""
    error = ErrorDetail(
        kind="trap",
        message=HOST_FAILED,
        task=name,
        traceback=text or traceback.format_exc(),
        retryable=False,
    )
    return TaskResult(task_id, name, 0, 0, 0.0, error=error)
