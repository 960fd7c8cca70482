"""The host calls of a run's operations (see operations.py): starting one,
polling for those that ended, abandoning one; each a step, journaled and
replayed. What each kind of operation is (an HTTP request, a wait for
children, for a message) is the run's to say when it starts one."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from capsule.sandbox.engine import completions
from capsule.supervisor.journaled import StepDriver
from capsule.supervisor.operations import MAX_IN_FLIGHT, Ended, Operation, too_many_in_flight
from capsule.supervisor.steps import Request, Step
from capsule.supervisor.tree import Attempt
from capsule.supervisor.waits import Answer, Wait, Waiting

#: The run's step (JournaledSteps.step): (caller, kind, request, live, replayed=...,
#: for_journal=...) -> the answer.
StepCall = Callable[..., tuple[bool, str]]


class OperationCalls:
    """Starts, polls and abandons the operations of a run's attempts."""

    def __init__(self, step: StepCall, drive: StepDriver) -> None:
        self.step = step
        #: Runs the steps that may wait (a poll), as the run's core does.
        self.drive = drive

    def start(
        self,
        attempt: Attempt,
        kind: str,
        request: Request,
        operation: Callable[[int], Operation],
    ) -> tuple[bool, str]:
        """A step that starts ``operation(handle)``: (True, its handle) or a
        refusal (too many in flight)."""
        caller = attempt.invocation
        operations = attempt.operations

        def start() -> tuple[bool, str]:
            if operations.in_flight() >= MAX_IN_FLIGHT:
                return False, too_many_in_flight(caller)
            return True, str(operations.add(operation, live=True))

        def replayed(step: Step) -> None:
            if step.ok:  # (numbered alike; performed only if no poll reports it)
                operations.add(operation, live=False)

        return self.step(caller, kind, request, start, replayed=replayed)

    def poll(self, attempt: Attempt, timeout: float | None) -> Any:
        """A step that waits (up to ``timeout``; 0: not at all) for operations
        to end: JSON [[handle, ok, payload], ...] of those that did. Returns
        as the run's StepDriver does."""
        caller = attempt.invocation
        operations = attempt.operations
        ended: list[tuple[int, Ended]] = []

        def polled(_: bool) -> Answer:
            if caller.check_stop() is not None:
                return False, "{}"  # the sandbox ends the caller; never seen
            ended.extend(operations.take_ended())
            return True, json.dumps([[handle, ok, payload] for handle, (ok, payload, _) in ended])

        def poll() -> Waiting:
            operations.start_unstarted()
            if timeout == 0:
                return polled(True)
            return Wait(attempt, operations.wait_reason(), operations.any_ended, polled, timeout)

        def for_journal(answer: str) -> str:
            return json.dumps([[handle, ok, kept] for handle, (ok, _, kept) in ended])

        def replayed(step: Step) -> None:
            operations.forget([handle for handle, _, _ in completions(step.answer)])

        # Durable once it reports operations that ended (as a blocking
        # request's step is): a crash must not send a request again once its
        # response was seen.
        return self.drive(
            caller,
            "poll",
            "" if timeout is None else repr(timeout),
            poll,
            replayed=replayed,
            durable=lambda: bool(ended),
            for_journal=for_journal,
        )

    def abandon(self, attempt: Attempt, handle: int) -> None:
        """A step that stops an operation, which is never reported."""
        operations = attempt.operations

        def abandon() -> tuple[bool, str]:
            operations.abandon(handle)
            return True, ""

        self.step(attempt.invocation, "abandon", str(handle), abandon, replayed=lambda _: abandon())
