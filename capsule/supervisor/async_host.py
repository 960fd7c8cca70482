"""The host calls that may wait, for a run on the async core: the sandbox's
WaitingHost. Each is the same journaled step as on task threads (the same
live call, whose wait is a waits.Wait), but its wait runs by continuation:
the call answers at once, or with a Pending the continuation resolves later,
and no thread waits meanwhile. HTTP requests and operations (asyncio code)
are refused on this core for now."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from capsule.actors.router import Message
from capsule.sandbox.async_sandbox import Attempt as Running
from capsule.sandbox.async_sandbox import Received
from capsule.sandbox.engine import Answer, Envelope, Invocation, refusal
from capsule.sandbox.guest_data import TaskCall
from capsule.sandbox.wasm_async import Pending, current_future
from capsule.supervisor.continuations import Continuations
from capsule.supervisor.journaled import JournaledSteps
from capsule.supervisor.live import LiveTree
from capsule.supervisor.messages import MessageCalls
from capsule.supervisor.steps import Request, received_messages
from capsule.supervisor.task_calls import TaskCalls
from capsule.supervisor.time_calls import TimeCalls
from capsule.supervisor.waits import Waiting

#: Why a host call this core does not serve yet is refused.
NOT_YET = "core='async' does not yet run {what}: run it with core='threads' (--core threads)"


class AsyncHostCalls:
    """Serves the waiting imports of a run's attempts on the async core."""

    def __init__(
        self,
        journal: JournaledSteps,
        continuations: Continuations,
        tree: LiveTree,
        tasks: TaskCalls,
        messages: MessageCalls,
        time: TimeCalls,
        hibernate: Callable[[Running], object],
        hibernate_after: float | None,
    ) -> None:
        self.journal = journal
        self.continuations = continuations
        self.tree = tree
        self.tasks = tasks
        self.messages = messages
        self.time = time
        #: Gives back the pages a waiting attempt only read (as a task thread's
        #: wait does once it lasted ``hibernate_after`` seconds; None: never).
        self.hibernate = hibernate
        self.hibernate_after = hibernate_after

    def _later(
        self,
        caller: Invocation,
        kind: str,
        request: Request,
        live: Callable[[], Waiting],
        then: Callable[[Answer], Any] | None = None,
    ) -> Any:
        """The step's answer (through ``then``) if it is over at once, else a
        Pending resolved with it once its wait is over."""
        pending = Pending()
        lock = threading.Lock()
        returned = False
        now: list[Answer | BaseException] = []

        def answered(answer: Answer | BaseException) -> None:
            nonlocal returned
            with lock:
                if not returned:
                    now.append(answer)
                    return
            # (A host bug's exception fails the call: the sandbox keeps why.)
            pending.resolve(
                answer if then is None or isinstance(answer, BaseException) else then(answer)
            )

        self.journal.step_later(caller, kind, request, live, self.continuations.run, answered)
        with lock:
            returned = True
            if not now:
                self._hibernate_later(pending)
                return pending
        answer = now[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer if then is None else then(answer)

    def _hibernate_later(self, pending: Pending) -> None:
        """Once the wait has lasted hibernate_after, its attempt hibernates."""
        future = current_future()
        running = None if future is None else future.data
        after = self.hibernate_after
        if after is None or not isinstance(running, Running):
            return

        def hibernate() -> None:
            if not pending.resolved:
                self.hibernate(running)

        self.continuations.timers.at(time.monotonic() + after, hibernate)

    def call_task(self, caller: Invocation, call: TaskCall) -> Answer | Pending:
        return self._later(  # type: ignore[no-any-return]
            caller,
            "call",
            (call.name, call.call_json),
            partial(self.tasks.direct_call, caller, call),
        )

    def wait(
        self, caller: Invocation, task_ids: list[str], timeout: float | None, any_ended: bool
    ) -> Answer | Pending:
        return self._later(  # type: ignore[no-any-return]
            caller,
            "wait_any" if any_ended else "wait",
            tuple(task_ids),
            partial(self.tasks.waiting_on, caller, task_ids, timeout, any_ended),
        )

    def sleep(self, caller: Invocation, seconds: float) -> Pending | None:
        return self._later(  # type: ignore[no-any-return]
            caller, "sleep", repr(seconds), partial(self.time.sleeping, caller, seconds), _nothing
        )

    def send(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> Answer | Pending:
        attempt = self.tree.attempts[caller]

        def noted(answer: Answer) -> Answer:
            # (As MessageSteps.send tells the guest of its credit.)
            note = attempt.credit_note
            if not note:
                return answer
            attempt.credit_note = ""
            return True, f"{answer[1][:-1]}{note}}}"

        return self._later(  # type: ignore[no-any-return]
            caller,
            "send",
            (target, body_json),
            partial(self.messages.send, attempt, target, body_json, timeout),
            noted,
        )

    def receive(self, caller: Invocation, timeout: float | None) -> Received | Pending:
        attempt = self.tree.attempts[caller]
        taken: list[Message] = []

        def received(answer: Answer) -> tuple[bool, Sequence[Envelope] | str]:
            ok, text = answer
            if not ok:
                return False, text
            return True, taken or received_messages(text)

        return self._later(  # type: ignore[no-any-return]
            caller,
            "receive",
            "",
            partial(self.messages.receive, attempt, timeout, taken),
            received,
        )

    def ask(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> Answer | Pending:
        attempt = self.tree.attempts[caller]
        return self._later(  # type: ignore[no-any-return]
            caller,
            "ask",
            (target, body_json),
            partial(self.messages.ask, attempt, target, body_json, timeout),
        )

    def http(self, caller: Invocation, request_json: str) -> Answer | Pending:
        return refusal(caller.task, NOT_YET.format(what="HTTP requests"))

    def poll(self, caller: Invocation, timeout: float | None) -> Answer | Pending:
        return refusal(caller.task, NOT_YET.format(what="asyncio operations"))


def _nothing(_: Answer) -> None:
    return None
