"""The host calls of a run's tasks (the sandbox's HostCalls, and on the async
core its WaitingHost too), each handed to the part of the run that serves its
kind: tasks, messages, time, HTTP, operations, output; and what the host holds
for a task, for its memory.

The host calls that may wait (a task call, a wait, a sleep, send, receive,
ask, an HTTP request, a poll) are steps run by the run's StepDriver
(journaled.py): on task threads they return their answer; on the async core,
that or a Pending of it (their return type says Any: the core's to say)."""

from __future__ import annotations

from typing import Any

from capsule.actors.router import Router
from capsule.sandbox.engine import Invocation
from capsule.sandbox.guest_data import SpawnOptions, TaskCall
from capsule.supervisor.http_calls import HttpCalls
from capsule.supervisor.live import LiveTree
from capsule.supervisor.message_steps import MessageSteps
from capsule.supervisor.operation_calls import OperationCalls
from capsule.supervisor.output import Output
from capsule.supervisor.task_calls import TaskCalls
from capsule.supervisor.time_calls import TimeCalls

#: What the host keeps of a child that ended until its parent waits on it,
#: besides its result (its thread, scope and outcome): counted as the
#: parent's memory by the run's memory budget.
ENDED_CHILD_BYTES = 10 * 1024


class RunHostCalls:
    """Serves the host calls of one run's instances."""

    def __init__(
        self,
        tasks: TaskCalls,
        messages: MessageSteps,
        time: TimeCalls,
        http: HttpCalls,
        operations: OperationCalls,
        output: Output,
        tree: LiveTree,
        router: Router,
    ) -> None:
        self.tasks = tasks
        self.messages = messages
        self.time = time
        self.http_calls = http
        self.operations = operations
        self.output_of_tasks = output
        self.tree = tree
        self.router = router

    # -- tasks -------------------------------------------------------------------

    def call_task(self, caller: Invocation, call: TaskCall) -> Any:
        return self.tasks.call_task(caller, call)

    def spawn_task(
        self, caller: Invocation, call: TaskCall, options: SpawnOptions
    ) -> tuple[bool, str]:
        return self.tasks.spawn_task(caller, call, options)

    def wait(
        self,
        caller: Invocation,
        task_ids: list[str],
        timeout: float | None,
        any_ended: bool = False,
    ) -> Any:
        return self.tasks.wait(caller, task_ids, timeout, any_ended)

    def cancel(self, caller: Invocation, task_id: str) -> None:
        self.tasks.cancel(caller, task_id)

    # -- messages ------------------------------------------------------------------

    def send(self, caller: Invocation, target: str, body_json: str, timeout: float | None) -> Any:
        return self.messages.send(caller, target, body_json, timeout)

    def gathered(self, caller: Invocation, records: list[tuple[str, str]]) -> None:
        self.messages.gathered(caller, records)

    def ending(self, caller: Invocation, batch_taken: int | None) -> None:
        self.messages.ending(caller, batch_taken)

    def receive(self, caller: Invocation, timeout: float | None) -> Any:
        """(True, the messages) or (False, error JSON), as the driver returns it."""
        return self.messages.receive(caller, timeout)

    def ask(self, caller: Invocation, target: str, body_json: str, timeout: float | None) -> Any:
        return self.messages.ask(caller, target, body_json, timeout)

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]:
        return self.messages.reply(caller, message_id, body_json)

    # -- time and randomness ---------------------------------------------------------

    def sleep(self, caller: Invocation, seconds: float) -> Any:
        return self.time.sleep(caller, seconds)

    def wall_clock_ns(self, caller: Invocation) -> int:
        return self.time.wall_clock_ns(caller)

    def monotonic_ns(self, caller: Invocation) -> int:
        return self.time.monotonic_ns(caller)

    def random_bytes(self, caller: Invocation, count: int) -> bytes:
        return self.time.random_bytes(caller, count)

    # -- HTTP ------------------------------------------------------------------------

    def http(self, caller: Invocation, request_json: str) -> Any:
        return self.http_calls.http(caller, request_json)

    # -- operations started without waiting (see operations.py) -------------------

    def start_http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        return self.http_calls.start_http(caller, request_json)

    def start_wait(self, caller: Invocation, task_ids: list[str]) -> tuple[bool, str]:
        return self.tasks.start_wait(caller, task_ids)

    def start_receive(self, caller: Invocation) -> tuple[bool, str]:
        return self.messages.start_receive(caller)

    def start_ask(self, caller: Invocation, target: str, body_json: str) -> tuple[bool, str]:
        return self.messages.start_ask(caller, target, body_json)

    def poll(self, caller: Invocation, timeout: float | None) -> Any:
        return self.operations.poll(self.tree.attempts[caller], timeout)

    def abandon(self, caller: Invocation, handle: int) -> None:
        self.operations.abandon(self.tree.attempts[caller], handle)

    # -- output, wake-ups and memory -----------------------------------------------

    def output(self, invocation: Invocation, stream: str, text: str) -> None:
        self.output_of_tasks.write(invocation, stream, text)

    def wake(self, invocation: Invocation) -> None:
        # (Its descendants too: a child it runs inline blocks its thread.)
        self.tree.wake_all()

    def held_bytes(self, invocation: Invocation) -> int:
        # Its mailbox (dropped when it ends), its output waiting to be shown,
        # its HTTP exchange in flight, and its children that ended and were
        # not yet waited on (kept, with their results, until it does).
        task_id = invocation.task_id
        attempt = self.tree.attempts.get(invocation)
        held = self.router.queued_bytes_for(task_id) + self.output_of_tasks.unshown(task_id)
        if attempt is not None:
            if attempt.transfer is not None:
                held += attempt.transfer.bytes
            held += attempt.operations.held_bytes()
            for child in list(attempt.children.values()):
                result = child.result
                if result is not None:
                    held += ENDED_CHILD_BYTES + len(result.result_json or "")
        return held
