"""The messaging host calls as journaled steps: send (and the sends a guest
wrote to its channel), receive, ask and reply, blocking or started as
operations. What each does live is MessageCalls' (messages.py); this module
records it, and redoes on replay what a replayed call must still do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from capsule.actors.router import Message, Router, RoutingError
from capsule.sandbox.engine import Envelope, Invocation
from capsule.supervisor.journaled import JournaledSteps, StepDriver
from capsule.supervisor.live import LiveTree
from capsule.supervisor.messages import MessageCalls
from capsule.supervisor.operation_calls import OperationCalls
from capsule.supervisor.operations import (
    MAX_IN_FLIGHT,
    Operation,
    condition,
    too_many_in_flight,
)
from capsule.supervisor.steps import Step, received_messages
from capsule.supervisor.tree import Attempt
from capsule.supervisor.waits import Answer, Wait, Waiting, over

# A replayed send or ask is not delivered again: its message was received
# then, or is put back in the target's mailbox when that opens (History).

# The message calls hand the step a partial, not a lambda: one Python frame
# fewer on every message (each costs about a microsecond on a busy run).


class MessageSteps:
    """Messages of a run's tasks, journaled and replayed."""

    def __init__(
        self,
        messages: MessageCalls,
        router: Router,
        journal: JournaledSteps,
        tree: LiveTree,
        operations: OperationCalls,
        drive: StepDriver,
    ) -> None:
        self.messages = messages
        self.router = router
        self.journal = journal
        self.tree = tree
        self.operations = operations
        #: Runs the steps that may wait, as the run's core does.
        self.drive = drive

    # The steps that may wait (send, receive, ask) return as the run's
    # StepDriver does: their answer, or on the async core a Pending of it.

    def send(self, caller: Invocation, target: str, body_json: str, timeout: float | None) -> Any:
        attempt = self.tree.attempts[caller]
        return self.drive(
            caller,
            "send",
            (target, body_json),
            partial(self.messages.send, attempt, target, body_json, timeout),
            replayed=lambda _: attempt.node.next_message_id(),  # numbered as it was
            then=partial(_with_credit, attempt),
        )

    def gathered(self, caller: Invocation, records: list[tuple[str, str]]) -> None:
        # Each a send step, in the guest's order and before the step of the
        # call during which they are taken (if any), as if sent one by one.
        attempt = self.tree.attempts[caller]
        deliver = self.messages.gathered
        for target, body_json in records:
            ok, _ = self.journal.step(
                caller,
                "send",
                (target, body_json),
                partial(deliver, attempt, target, body_json),
                replayed=lambda _: attempt.node.next_message_id(),
            )
            if not ok:  # written without credit, or the replay diverged: it ends
                return

    def ending(self, caller: Invocation, batch_taken: int | None) -> None:
        attempt = self.tree.attempts.get(caller)
        if attempt is not None:
            self.messages.ending(attempt, batch_taken)

    def receive(self, caller: Invocation, timeout: float | None) -> Any:
        attempt = self.tree.attempts[caller]
        taken: list[Message] = []
        return self.drive(
            caller,
            "receive",
            "",
            partial(self.messages.receive, attempt, timeout, taken),
            # (A receive that failed, its time out say, handed over nothing.)
            replayed=lambda step: (
                self.messages.replayed_receive(attempt, step.answer) if step.ok else None
            ),
            then=partial(_received, taken),
        )

    def ask(self, caller: Invocation, target: str, body_json: str, timeout: float | None) -> Any:
        attempt = self.tree.attempts[caller]
        return self.drive(
            caller,
            "ask",
            (target, body_json),
            partial(self.messages.ask, attempt, target, body_json, timeout),
            replayed=lambda _: attempt.node.next_message_id(),  # numbered as it was
        )

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]:
        def route_again(_: Step) -> None:
            # The asker may be waiting live for this reply (its ask was not journaled).
            try:
                self.router.reply(message_id, caller.task_id, body_json)
            except RoutingError:
                pass

        return self.journal.step(
            caller,
            "reply",
            (message_id, body_json),
            lambda: self.messages.reply(caller, message_id, body_json),
            replayed=route_again,
        )

    def start_receive(self, caller: Invocation) -> tuple[bool, str]:
        """Start waiting for a message as an operation (see operations.py)."""
        attempt = self.tree.attempts[caller]
        task_id = caller.task_id

        def operation(handle: int) -> Operation:
            # (It takes no message: the guest's receive that follows does.)
            arrived = Wait(
                attempt, "receive", lambda: self.router.watch(task_id, attempt), _arrived
            )
            return condition(handle, arrived)

        return self.operations.start(attempt, "receive_start", "", operation)

    def start_ask(self, caller: Invocation, target: str, body_json: str) -> tuple[bool, str]:
        """Ask, and wait for the reply as an operation (see operations.py)."""
        attempt = self.tree.attempts[caller]
        operations = attempt.operations

        def operation_for(
            refused: tuple[bool, str], message: Message | None
        ) -> Callable[[int], Operation]:
            def operation(handle: int) -> Operation:
                if message is None:  # (replayed, and refused now: it ends so)
                    return condition(handle, over(attempt, "receive", refused))
                # Waits as a blocking ask waits for its reply.
                reply = self.messages.reply_wait(attempt, target, message, None)
                stop = partial(self.router.abandon_replies, [message.id])
                return condition(handle, reply, stop, stop)

            return operation

        def started(answer: Answer, message: Message | None) -> Answer:
            if message is None:
                return answer
            return True, str(operations.add(operation_for(answer, message), live=True))

        def start() -> Waiting:
            if operations.in_flight() >= MAX_IN_FLIGHT:
                attempt.node.next_message_id()  # (numbered all the same, as a replay does)
                return False, too_many_in_flight(caller)
            return self.messages.send_ask(attempt, target, body_json, started)

        def added(answer: Answer, message: Message | None) -> Answer:
            operations.add(operation_for(answer, message), live=False)
            return answer

        def replayed(step: Step) -> None:
            if not step.ok:
                attempt.node.next_message_id()  # numbered as it was
                return
            # Asked again: numbered alike, not sent again (see MessageCalls._send):
            # no wait. Its reply is awaited unless a replayed poll reports it.
            self.journal.settle(self.messages.send_ask(attempt, target, body_json, added))

        return self.journal.step(caller, "ask_start", (target, body_json), start, replayed=replayed)


def _with_credit(attempt: Attempt, answer: Answer) -> Answer:
    """A send's answer as its guest gets it: with the credit it was given.
    Credit goes to the guest, not to the journal: a replay's sends all go
    through the host, and are the same steps in the same order."""
    note = attempt.credit_note
    if not note:
        return answer
    attempt.credit_note = ""
    return True, f"{answer[1][:-1]}{note}}}"


def _received(taken: list[Message], answer: Answer) -> tuple[bool, Sequence[Envelope] | str]:
    """A receive's answer as its guest gets it: live, the messages themselves;
    replayed, those of the journaled answer."""
    ok, text = answer
    if not ok:
        return False, text
    return True, taken or received_messages(text)


def _arrived(_: bool) -> Answer:
    return True, '""'
