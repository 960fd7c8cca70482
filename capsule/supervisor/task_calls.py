"""The host calls about other tasks, as journaled steps: call one inline,
spawn a child, wait on children (all, any, or as an operation), cancel one;
and what a child's end does to its parent (a linked failure)."""

from __future__ import annotations

import json
import re
import threading
from functools import partial
from typing import Any

from capsule.actors.external import EXTERNAL_SENDER
from capsule.actors.router import Router, RoutingError
from capsule.sandbox.config import TaskConfig
from capsule.sandbox.engine import ErrorInfo, Invocation, refusal
from capsule.sandbox.guest_data import SpawnOptions, TaskCall
from capsule.supervisor.admission import Admission
from capsule.supervisor.journaled import JournaledSteps, StepDriver
from capsule.supervisor.live import LiveTree
from capsule.supervisor.operation_calls import OperationCalls
from capsule.supervisor.operations import Operation, condition
from capsule.supervisor.outcomes import delivered_positions, linked_failure, outcomes_answer
from capsule.supervisor.supervision import Supervision
from capsule.supervisor.tree import Attempt, Child, Scope, TaskResult, start_task_thread
from capsule.supervisor.waits import Answer, Wait, Waiting, over

#: What task ids look like ("main", "main/2/1"): no registered name may (see
#: TaskCalls._spawn).
TASK_ID_SHAPE = re.compile(r"main(/[0-9]+)*")


class TaskCalls:
    """Task calls, spawns, waits and cancellations of a run's tasks."""

    def __init__(
        self,
        supervision: Supervision,
        admission: Admission,
        configs: dict[str, TaskConfig],
        router: Router,
        journal: JournaledSteps,
        tree: LiveTree,
        operations: OperationCalls,
        drive: StepDriver,
    ) -> None:
        self.supervision = supervision
        self.admission = admission
        self.configs = configs
        self.router = router
        self.journal = journal
        self.tree = tree
        self.operations = operations
        #: Runs the steps that may wait, as the run's core does.
        self.drive = drive

    def call_task(self, caller: Invocation, call: TaskCall) -> Any:
        """A task called another: a wait on the child's end (see
        direct_call). Returns as the run's StepDriver does."""
        node = self.tree.attempts[caller].node
        return self.drive(
            caller,
            "call",
            (call.name, call.call_json),
            lambda: self.direct_call(caller, call),
            replayed=lambda _: node.next_child_id(),
        )

    def direct_call(self, caller: Invocation, call: TaskCall) -> Waiting:
        """The wait of a direct call on its child's end, which its driver runs.

        The thread driver runs the child right here, inline: the caller's thread
        is blocked in this host call anyway, so the child runs on it, in its own
        fresh instance, with no thread or event-loop hop on the path of a call.
        The continuation driver starts it as a task of its own. Either way the
        child sees its caller's deadline and cancellation through its scope,
        under its caller's, and the wait lasts until it ended."""
        attempt = self.tree.attempts[caller]
        # Numbered first, whatever happens next, so that a replay numbers alike.
        task_id = attempt.node.next_child_id()
        refused = self.admission.admit(attempt, call.name, spawned=False)
        if refused is not None:
            return refused
        ended: list[TaskResult | BaseException] = []
        thread: list[threading.Thread] = []

        def run_child() -> None:
            try:
                ended.append(
                    self.supervision.run_task(
                        call.name, task_id, call.call_json, attempt.scope, None
                    )
                )
            finally:
                self.admission.release()

        def start_child() -> None:
            core = self.supervision.core
            if core is not None:
                # A task of its own, as a spawned child is.
                def child_ended(result: TaskResult) -> None:
                    self.admission.release()
                    with self.tree.lock:
                        ended.append(result)
                        attempt.calling -= 1
                    attempt.wake()

                with self.tree.lock:
                    attempt.calling += 1
                core.start_task(
                    call.name, task_id, call.call_json, attempt.scope, None, child_ended
                )
                return

            def body() -> None:
                try:
                    run_child()
                except BaseException as exc:  # re-raised by the caller's finish
                    ended.append(exc)
                finally:
                    attempt.wake()

            try:
                thread.append(start_task_thread(body, name=f"capsule-task {task_id}"))
            except RuntimeError:  # the OS refused another thread: the call fails
                self.admission.release()
                raise

        def finish(_: bool) -> Answer:
            for started in thread:
                started.join()  # (it ended: only its last lines are left)
            result = ended[0]
            if isinstance(result, BaseException):
                raise result
            return _as_reply(result)

        return Wait(
            attempt,
            "result",
            lambda: bool(ended),
            finish,
            until_ready=True,
            inline=run_child,
            start=start_child,
        )

    def spawn_task(
        self, caller: Invocation, call: TaskCall, options: SpawnOptions
    ) -> tuple[bool, str]:
        def spawn() -> tuple[bool, str]:
            return self._spawn(caller, call, options)

        # Replayed, the child is started again all the same: it returns its
        # journaled outcome at once if it had ended, or resumes where it was.
        return self.journal.step(
            caller,
            "spawn",
            (call.name, call.call_json, options.text),
            spawn,
            replayed=lambda _: spawn(),
        )

    def _spawn(self, caller: Invocation, call: TaskCall, options: SpawnOptions) -> tuple[bool, str]:
        attempt = self.tree.attempts[caller]
        task_id = attempt.node.next_child_id()  # first, as in _call
        name, actor_name = call.name, options.actor_name
        refused = self.admission.admit(attempt, name, spawned=True)
        if refused is not None:
            return refused
        if actor_name is not None and (
            TASK_ID_SHAPE.fullmatch(actor_name) or actor_name == EXTERNAL_SENDER
        ):
            # Names are looked up before ids: a task registered under another
            # task's id (or a future one's) would get its messages, and answer
            # its asks; one registered as the sender of messages from outside
            # would get the replies meant for it.
            self.admission.release(attempt)
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
        self.supervision.open_mailbox(task_id)
        if actor_name is not None:
            try:
                self.router.register(actor_name, task_id)
            except RoutingError as exc:
                self.router.close(task_id)
                self.admission.release(attempt)
                return refusal(name, str(exc))
        scope = Scope(attempt.scope, task_id=caller.task_id)
        child = Child(
            task_id=task_id,
            name=name,
            scope=scope,
            link=options.link,
            parent_attempt=attempt,
            actor_name=actor_name,
        )
        attempt.children[task_id] = child
        core = self.supervision.core
        if core is not None:  # an attempt of its own, on no thread

            def ended(result: TaskResult) -> None:
                child.result = result
                self.admission.release(attempt)
                child.done.set()
                self._child_ended(attempt, child)

            core.start_task(name, task_id, call.call_json, scope, child, ended)
            return True, task_id

        def body() -> None:
            try:
                child.result = self.supervision.run_task(
                    name, task_id, call.call_json, scope, child
                )
            finally:
                self.admission.release(attempt)
                child.done.set()
                self._child_ended(attempt, child)

        try:
            child.thread = start_task_thread(body, name=f"capsule-task {task_id}")
        except RuntimeError as exc:  # the OS refused another thread
            del attempt.children[task_id]
            self.router.close(task_id)
            self.admission.release(attempt)
            return refusal(name, f"the host cannot start another task thread: {exc}", "limit")
        return True, task_id

    def _child_ended(self, parent: Attempt, child: Child) -> None:
        # Its outcome stays with its parent until a wait collects it (see
        # outcomes); only a linked child's failure fails the parent now.
        with self.tree.lock:
            failure = None if child.waited_on else linked_failure(child, self.configs)
        if failure is not None:
            _linked_failed(parent, failure)
        parent.wake()

    def wait(
        self,
        caller: Invocation,
        task_ids: list[str],
        timeout: float | None,
        any_ended: bool = False,
    ) -> Any:
        """Wait on children (see waiting_on). Returns as the run's
        StepDriver does."""
        # Replayed, the children the journaled answer delivered (all, any, or
        # none: it timed out) are joined and forgotten as they were, never
        # waited for again: the guest sees the same ones ended.
        return self.drive(
            caller,
            "wait_any" if any_ended else "wait",
            tuple(task_ids),
            partial(self.waiting_on, caller, task_ids, timeout, any_ended),
            replayed=lambda step: self._rewait(caller, task_ids, step.answer),
        )

    def _rewait(self, caller: Invocation, ids: list[str], answer: str) -> None:
        """Deliver again the children of ``ids`` a journaled wait's ``answer``
        delivered (their outcomes are journaled: they have ended)."""
        delivered = [ids[index] for index in delivered_positions(answer) if index < len(ids)]
        if delivered:
            self.journal.settle(self.waiting_on(caller, delivered, None, False))

    def waiting_on(
        self, caller: Invocation, ids: list[str], timeout: float | None, any_ended: bool
    ) -> Waiting:
        """Wait until every child in ``ids`` has ended (or, ``any_ended``, one
        of them), or ``timeout``; deliver the outcomes of those that ended (all
        or none of them, unless ``any_ended``) and forget those children."""
        attempt = self.tree.attempts[caller]
        unknown = [task_id for task_id in ids if task_id not in attempt.children]
        if unknown:
            return refusal(
                "?",
                f"{caller.task!r} can only wait on its own children whose outcomes it has "
                f"not collected yet, not {unknown[0]!r}",
            )
        children = [attempt.children[task_id] for task_id in ids]
        lock = self.tree.lock
        with lock:
            for child in children:
                child.waited_on = True

        def ready() -> bool:
            ended = (c.done.is_set() for c in children)
            return any(ended) or not children if any_ended else all(ended)

        def finish(done: bool) -> Answer:
            return self._waited(attempt, children, timeout, any_ended, done)

        return Wait(attempt, "result", ready, finish, timeout)

    def _waited(
        self,
        attempt: Attempt,
        children: list[Child],
        timeout: float | None,
        any_ended: bool,
        done: bool,
    ) -> Answer:
        """The answer of a wait on ``children`` that ended (``done``: what it
        waited for holds)."""
        caller = attempt.invocation
        lock = self.tree.lock
        stopping = caller.check_stop() is not None
        with lock:
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
                _linked_failed(attempt, failure)
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

    def start_wait(self, caller: Invocation, task_ids: list[str]) -> tuple[bool, str]:
        """Start waiting on children as an operation (see operations.py)."""
        attempt = self.tree.attempts[caller]
        if any(task_id not in attempt.children for task_id in task_ids):
            # (Refused as a blocking wait refuses it.)
            return self.journal.step(
                caller,
                "wait_start",
                tuple(task_ids),
                lambda: self.journal.settle(self.waiting_on(caller, task_ids, 0, False)),
            )

        def operation(handle: int) -> Operation:
            # Waits as a blocking wait on them waits (a linked child's failure
            # now goes to this wait).
            waiting = self.waiting_on(caller, task_ids, None, False)
            wait = waiting if isinstance(waiting, Wait) else over(attempt, "result", waiting)

            def replayed() -> None:
                # Replayed, the children are still joined and forgotten as they were.
                self.journal.settle(wait)

            return condition(handle, wait, replayed)

        return self.operations.start(attempt, "wait_start", tuple(task_ids), operation)

    def cancel(self, caller: Invocation, task_id: str) -> None:
        def cancel() -> tuple[bool, str]:
            child = self.tree.attempts[caller].children.get(task_id)
            if child is not None and not child.done.is_set():
                self.tree.cancel(child.scope, "cancelled by its parent")
            return True, ""

        self.journal.step(caller, "cancel", task_id, cancel, replayed=lambda _: cancel())


def _linked_failed(parent: Attempt, failure: ErrorInfo) -> None:
    invocation = parent.invocation
    if invocation.check_stop() is None and invocation.aborted is None:
        invocation.aborted = failure  # its own supervisor takes it from there


def _as_reply(result: TaskResult) -> tuple[bool, str]:
    if result.error is None:
        assert result.result_json is not None
        return True, result.result_json
    return False, json.dumps({**result.error.model_dump(), "attempts": result.attempts})
