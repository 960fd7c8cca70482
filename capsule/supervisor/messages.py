"""The messaging host calls of a run: send, receive, ask and reply.

Routing is the Router's (capsule.actors); waiting is the run's (its ``block``,
which frees the CPU slot and wakes on cancellation); this module puts the two
together and reports the typed message events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from capsule.actors.router import Message, Router, RoutingError
from capsule.sandbox.engine import Invocation
from capsule.supervisor.events import EventStream, MessageReceived, MessageSent, WaitReason
from capsule.supervisor.steps import History, PendingMessage, json_string
from capsule.supervisor.tree import Attempt

#: The run's blocking wait: (attempt, ready, timeout, what it waits on) -> became ready.
Block = Callable[[Attempt, Callable[[], bool], float | None, WaitReason], bool]


class MessageCalls:
    """Messages between the tasks of one run, on behalf of their running attempts."""

    def __init__(
        self,
        router: Router,
        events: EventStream,
        run_id: str,
        block: Block,
        max_message_bytes: int,
        mailbox_capacity: int,
        on_ask: Callable[[PendingMessage], None],
        history: History | None = None,
    ) -> None:
        self.on_ask = on_ask
        self.history = history
        self.router = router
        self.emit = events.emit
        self.wants = events.wants
        self.run_id = run_id
        self.block = block
        self.max_message_bytes = max_message_bytes
        self.mailbox_capacity = mailbox_capacity

    def send(
        self, attempt: Attempt, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        return self._send(attempt, target, body_json, timeout, ask=False)[0]

    def _send(
        self, attempt: Attempt, target: str, body_json: str, timeout: float | None, ask: bool
    ) -> tuple[tuple[bool, str], Message | None]:
        caller = attempt.invocation
        # Numbered first, whatever happens next, so that a replay numbers alike.
        message_id = attempt.node.next_message_id()
        if len(body_json) > self.max_message_bytes:
            error = _message_error(
                "too_large",
                f"a message of {len(body_json):,} bytes (as JSON) exceeds the limit of "
                f"{self.max_message_bytes:,} bytes",
            )
            return error, None
        try:
            target_id = self.router.resolve(target)
        except RoutingError as exc:
            return _message_error(exc.kind, str(exc)), None
        message = Message(message_id, caller.task_id, body_json, ask)
        if ask:
            self.router.expect_reply(message.id, attempt, target_id)
            if self.history is not None and message.id in self.history.sent:
                # Asked before the resume: the message was delivered then (or is
                # back in the target's mailbox); only the reply is still awaited
                # (the router holds it if it came already).
                return (True, ""), message
        if self.history is not None and message.id in self.history.received:
            # Received before the resume, though the crash lost its send step.
            return (True, _sent(message.id, target_id)), message
        try:
            # Room in the mailbox is the common case: no wait set up for it.
            sent = self.router.try_send(target_id, message, attempt) or self.block(
                attempt, lambda: self.router.try_send(target_id, message, attempt), timeout, "send"
            )
        except RoutingError as exc:  # the target ended, or the run's queue is full
            self.router.forget_sender(target_id, attempt)
            return _message_error(exc.kind, str(exc)), None
        if not sent:
            self.router.forget_sender(target_id, attempt)
            if caller.check_stop() is not None:
                return (False, "{}"), None  # the sandbox ends the caller
            return _message_error(
                "send_timeout",
                f"the mailbox of {target!r} stayed full ({self.mailbox_capacity} "
                f"messages) for {timeout:g}s",
            ), None
        if ask:
            # A sent message's id and target are in its send step's answer; an
            # ask's answer is the reply, so the message is recorded on its own.
            self.on_ask(PendingMessage(message.id, caller.task_id, target_id, body_json, ask))
        if self.wants("message_sent"):
            self.emit(
                MessageSent(
                    run_id=self.run_id,
                    task_id=caller.task_id,
                    task=caller.task,
                    message_id=message.id,
                    target_id=target_id,
                    size=len(body_json),
                    expects_reply=ask,
                )
            )
        # The guest ignores what an ok send carries; the journal keeps it.
        return (True, _sent(message.id, target_id)), message

    def receive(self, attempt: Attempt, timeout: float | None) -> tuple[bool, str]:
        caller = attempt.invocation
        # A waiting message is the common case on a busy mailbox: taken at once.
        message = self.router.try_receive(caller.task_id, attempt)
        if message is None:
            got: list[Message] = []

            def arrived() -> bool:
                message = self.router.try_receive(caller.task_id, attempt)
                if message is not None:
                    got.append(message)
                return bool(got)

            if not self.block(attempt, arrived, timeout, "receive"):
                if caller.check_stop() is not None:
                    return False, "{}"
                return _message_error("receive_timeout", f"no message arrived within {timeout:g}s")
            message = got[0]
        if self.wants("message_received"):
            self.emit(
                MessageReceived(
                    run_id=self.run_id,
                    task_id=caller.task_id,
                    task=caller.task,
                    message_id=message.id,
                    sender_id=message.sender,
                )
            )
        # [id, sender, body, expects_reply]: an array, which the guest reads in
        # half the time of an object. The body is JSON already: spliced in, not
        # parsed and dumped again.
        return True, (
            f"[{json_string(message.id)},{json_string(message.sender)},{message.body_json},"
            f"{'true' if message.expects_reply else 'false'}]"
        )

    def ask(
        self, attempt: Attempt, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        caller = attempt.invocation
        started = time.monotonic()
        sent, message = self._send(attempt, target, body_json, timeout, ask=True)
        if message is None:
            return sent
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        answer: list[tuple[str | None, str | None]] = []

        def answered() -> bool:
            reply, failure = self.router.take_reply(message.id)
            if reply is not None or failure is not None:
                answer.append((reply, failure))
            return bool(answer)

        if not self.block(attempt, answered, left, "receive"):
            self.router.abandon_replies([message.id])
            if caller.check_stop() is not None:
                return False, "{}"
            return _message_error(
                "receive_timeout", f"no reply from {target!r} within {timeout:g}s"
            )
        reply, failure = answer[0]
        if failure is not None:
            return _message_error("actor_ended", failure)
        assert reply is not None
        return True, reply

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]:
        if len(body_json) > self.max_message_bytes:
            return _message_error(
                "too_large",
                f"a reply of {len(body_json):,} bytes (as JSON) exceeds the limit of "
                f"{self.max_message_bytes:,} bytes",
            )
        try:
            self.router.reply(message_id, caller.task_id, body_json)
        except RoutingError as exc:
            return _message_error(exc.kind, str(exc))
        return True, ""


def _sent(message_id: str, target_id: str) -> str:
    """A send's answer, as json.dumps({"id": ..., "to": ...}) writes it (built
    on every message: json.dumps of a small dict costs ten times more)."""
    return f'{{"id": {json_string(message_id)}, "to": {json_string(target_id)}}}'


def _message_error(kind: str, message: str) -> tuple[bool, str]:
    return False, json.dumps({"kind": kind, "message": message})
