"""The messaging host calls of a run: send, receive, ask and reply.

Routing is the Router's (capsule.actors); a call that must wait returns its
wait (waits.py), which the run's driver runs; this module puts the two
together and reports the typed message events.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import partial

from capsule.actors.router import RESERVED_MESSAGE_BYTES, Message, Router, RoutingError
from capsule.sandbox import guest_data
from capsule.sandbox.channel import Channel
from capsule.sandbox.engine import ErrorInfo, Invocation
from capsule.supervisor.events import (
    EventStream,
    MessageReceived,
    MessageSent,
    MessagesReturned,
)
from capsule.supervisor.steps import (
    History,
    PendingMessage,
    json_string,
    received_answer,
    received_messages,
)
from capsule.supervisor.tree import Attempt
from capsule.supervisor.waits import Answer, Wait, Waiting

#: What a send does once its message was delivered (or refused: None): the
#: host call's answer, or its next wait (an ask's reply).
AfterSend = Callable[[Answer, Message | None], Waiting]

#: How many places a send reserves in its target's mailbox for the sender's next
#: messages to it, which its guest then writes to its channel instead of making
#: a host call each (see capsule/sandbox/channel.py): FIRST_CREDIT, then twice
#: as many each time the sender used all it had, up to CREDIT. (A task sending
#: one message to each of many targets holds few places in each.)
FIRST_CREDIT = 4
CREDIT = 32
#: How many waiting messages one receive hands over at most (the guest counts
#: them in a byte).
BATCH = 64


class MessageCalls:
    """Messages between the tasks of one run, on behalf of their running attempts."""

    def __init__(
        self,
        router: Router,
        events: EventStream,
        run_id: str,
        max_message_bytes: int,
        mailbox_capacity: int,
        on_ask: Callable[[PendingMessage], None],
        open_channel: Callable[[], Channel | None],
        history: History | None = None,
        journaling: bool = True,
    ) -> None:
        #: Whether answers are journaled (else a receive's journal form is not made).
        self.journaling = journaling
        #: The calling task's channel, opened on first use (on its thread).
        self.open_channel = open_channel
        self.on_ask = on_ask
        self.history = history
        self.router = router
        self.emit = events.emit
        self.wants = events.wants
        self.run_id = run_id
        self.max_message_bytes = max_message_bytes
        self.mailbox_capacity = mailbox_capacity
        #: The largest message a guest may write to its channel.
        self.credit_bytes = min(RESERVED_MESSAGE_BYTES, max_message_bytes)
        #: Held while a message is delivered and its message_sent emitted, and
        #: while a message_received is emitted: a receiver that takes a message
        #: the moment it arrives reports it after its sending, not before.
        self._reporting = threading.Lock()

    # -- credit: room reserved for a sender's next messages ------------------
    #
    # A send the host delivered also reserves places in the target's mailbox
    # for the sender's next messages to it (FIRST_CREDIT, growing to CREDIT);
    # the guest writes those to its channel, and the host delivers them into
    # the places (gathered). The places count against the mailbox's capacity
    # until used or given back (and are made only while the run's queued size
    # has room for them), so the guest holds credit only while it runs: it
    # forgets it, and the host gives the places back, at every call that may
    # wait or tell it more about its targets (ENDS_CREDIT, a send that had to
    # wait or failed), and when the attempt ends.

    def send(self, attempt: Attempt, target: str, body_json: str, timeout: float | None) -> Waiting:
        # Its own places for this target must not make the mailbox look full.
        used_up = self._release_credit(attempt, target)
        # (Looked up here, on the caller's thread: its answer may be made on
        # another, once it waited.)
        channel = self.open_channel() is not None
        return self._send(
            attempt,
            target,
            body_json,
            timeout,
            False,
            partial(self._credited, attempt, target, used_up, channel),
        )

    def _credited(
        self,
        attempt: Attempt,
        target: str,
        used_up: int,
        channel: bool,
        answer: Answer,
        message: Message | None,
    ) -> Answer:
        """A send's answer, with the credit it gives (see below) if the
        caller has a ``channel``."""
        if message is None:  # refused: the guest forgets its credit (as after a wait)
            self.end_credit(attempt)
            attempt.credit_forgotten = False
        elif channel:
            places = self._reserve(
                attempt, target, min(CREDIT, 2 * used_up) if used_up else FIRST_CREDIT
            )
            forgot = 1 if attempt.credit_forgotten else 0
            attempt.credit_forgotten = False
            # For the guest alone (see MessageSteps.send): [places, size, forget the rest].
            attempt.credit_note = f', "credit": [{places}, {self.credit_bytes}, {forgot}]'
        return answer

    def _reserve(self, attempt: Attempt, target: str, wanted: int) -> int:
        try:
            target_id = self.router.resolve(target)
        except RoutingError:  # it ended just now
            return 0
        places = self.router.reserve(target_id, wanted)
        if places:
            attempt.credit[target] = [target_id, places, places]
        return places

    def _release_credit(self, attempt: Attempt, target: str) -> int:
        """Give back the places held for ``target``; returns how many it was
        given if it used them all (else 0)."""
        credit = attempt.credit.pop(target, None)
        if credit is None:
            return 0
        target_id, left, given = credit
        self.router.release(target_id, left)
        return given if left == 0 else 0

    def end_credit(self, attempt: Attempt) -> None:
        """The guest forgot its credit (it made a call that may wait, or tell it
        more about its targets, or it ended): give the places back."""
        credit = attempt.credit
        if credit:
            for target_id, places, _ in credit.values():
                self.router.release(target_id, places)
            credit.clear()

    def gathered(self, attempt: Attempt, target: str, body_json: str) -> tuple[bool, str]:
        """Deliver a message the guest wrote to its channel (a send it made on
        credit): into the place reserved for it, which neither waits nor fails.
        A guest that wrote one without credit is ended."""
        caller = attempt.invocation
        message_id = attempt.node.next_message_id()
        credit = attempt.credit.get(target)
        if credit is None or credit[1] <= 0 or len(body_json) > self.credit_bytes:
            caller.aborted = ErrorInfo(
                "trap",
                f"the task wrote a message for {target!r} to its channel without room "
                f"reserved for it",
            )
            return False, "{}"
        # (At most credit_bytes: never too many items. Malformed, the sender fails.)
        guest_data.json_value(body_json, lambda: f"the body of a message to {target!r:.80}")
        credit[1] -= 1
        target_id = credit[0]
        message = Message(message_id, caller.task_id, body_json)
        if self.history is not None and message.id in self.history.received:
            self.router.release(target_id, 1)  # received before the resume
            if self.wants("message_sent"):
                self._sent_event(caller, message, target_id)
        else:

            def deliver() -> bool:
                self.router.deliver_reserved(target_id, message)
                return True

            self._delivered(deliver, caller, message, target_id)
        return True, _sent(message.id, target_id)

    def _send(
        self,
        attempt: Attempt,
        target: str,
        body_json: str,
        timeout: float | None,
        ask: bool,
        then: AfterSend,
    ) -> Waiting:
        """Deliver a message (waiting while its target's mailbox is full), then
        ``then(answer, the message, or None if it was refused)``."""
        caller = attempt.invocation
        # Numbered first, whatever happens next, so that a replay numbers alike.
        message_id = attempt.node.next_message_id()
        if len(body_json) > self.max_message_bytes:
            error = _message_error(
                "too_large",
                f"a message of {len(body_json):,} bytes (as JSON) exceeds the limit of "
                f"{self.max_message_bytes:,} bytes",
            )
            return then(error, None)
        refused = _refused_body(body_json, target)
        if refused is not None:
            return then(refused, None)
        try:
            target_id = self.router.resolve(target)
        except RoutingError as exc:
            return then(_message_error(exc.kind, str(exc)), None)
        message = Message(message_id, caller.task_id, body_json, ask)
        if ask:
            self.router.expect_reply(message.id, attempt, target_id)
            if self.history is not None and message.id in self.history.sent:
                # Asked before the resume: the message was delivered then (or is
                # back in the target's mailbox); only the reply is still awaited
                # (the router holds it if it came already).
                return then((True, ""), message)
        if self.history is not None and message.id in self.history.received:
            # Received before the resume, though the crash lost its send step.
            return then((True, _sent(message.id, target_id)), message)
        try:
            # Room in the mailbox is the common case: no wait set up for it.
            sent = self._delivered(
                lambda: self.router.try_send(target_id, message, attempt),
                caller,
                message,
                target_id,
            )
        except RoutingError as exc:  # the target ended, or the run's queue is full
            self.router.forget_sender(target_id, attempt)
            return then(_message_error(exc.kind, str(exc)), None)
        if sent:
            return self._sent(attempt, message, target_id, then)
        return self._wait_for_room(attempt, target, target_id, message, timeout, then)

    def _sent(self, attempt: Attempt, message: Message, target_id: str, then: AfterSend) -> Waiting:
        if message.expects_reply:
            # A sent message's id and target are in its send step's answer; an
            # ask's answer is the reply, so the message is recorded on its own.
            self.on_ask(
                PendingMessage(message.id, message.sender, target_id, message.body_json, True)
            )
        return then((True, _sent(message.id, target_id)), message)

    def _wait_for_room(
        self,
        attempt: Attempt,
        target: str,
        target_id: str,
        message: Message,
        timeout: float | None,
        then: AfterSend,
    ) -> Wait:
        caller = attempt.invocation
        failed: list[RoutingError] = []

        def delivered() -> bool:
            try:
                return self._delivered(
                    lambda: self.router.try_send(target_id, message, attempt),
                    caller,
                    message,
                    target_id,
                )
            except RoutingError as exc:  # the target ended, or the run's queue is full
                failed.append(exc)
                return True

        def finish(sent: bool) -> Waiting:
            if failed:
                self.router.forget_sender(target_id, attempt)
                return then(_message_error(failed[0].kind, str(failed[0])), None)
            if sent:
                return self._sent(attempt, message, target_id, then)
            self.router.forget_sender(target_id, attempt)
            if caller.check_stop() is not None:
                return then((False, "{}"), None)  # the sandbox ends the caller
            return then(
                _message_error(
                    "send_timeout",
                    f"the mailbox of {target!r} stayed full ({self.mailbox_capacity} "
                    f"messages) for {timeout:g}s",
                ),
                None,
            )

        # Waiting, it holds no places anywhere (others' room may be what it waits
        # for); its answer tells the guest to forget its credit.
        if attempt.credit:
            self.end_credit(attempt)
            attempt.credit_forgotten = True
        return Wait(attempt, "send", delivered, finish, timeout)

    def _delivered(
        self, deliver: Callable[[], bool], caller: Invocation, message: Message, target_id: str
    ) -> bool:
        """Whether ``deliver()`` put ``message`` in its target's mailbox (then
        reported: its message_sent comes before its message_received)."""
        if not self.wants("message_sent"):
            return deliver()
        with self._reporting:
            delivered = deliver()
            if delivered:
                self._sent_event(caller, message, target_id)
        return delivered

    def _sent_event(self, caller: Invocation, message: Message, target_id: str) -> None:
        self.emit(
            MessageSent(
                run_id=self.run_id,
                task_id=caller.task_id,
                task=caller.task,
                message_id=message.id,
                target_id=target_id,
                size=len(message.body_json),
                expects_reply=message.expects_reply,
            )
        )

    def receive(self, attempt: Attempt, timeout: float | None, taken: list[Message]) -> Waiting:
        """Take the oldest message (or all waiting, up to BATCH) into ``taken``;
        the answer is their journal form (steps.received_answer)."""
        caller = attempt.invocation
        attempt.batch = None  # (the guest asks only once it took all of it)
        # Every message waiting goes at once if the guest can count them in its
        # channel: one host call for a burst.
        most = BATCH if caller.channel is not None or self.open_channel() is not None else 1
        # A waiting message is the common case on a busy mailbox: taken at once.
        messages = self.router.try_receive(caller.task_id, attempt, most)
        if messages:
            return self._received(attempt, messages, taken)

        def arrived() -> bool:
            messages.extend(self.router.try_receive(caller.task_id, attempt, most))
            return bool(messages)

        def finish(got: bool) -> Answer:
            if got:
                return self._received(attempt, messages, taken)
            if caller.check_stop() is not None:
                return False, "{}"
            return _message_error("receive_timeout", f"no message arrived within {timeout:g}s")

        return Wait(attempt, "receive", arrived, finish, timeout)

    def _received(self, attempt: Attempt, messages: list[Message], taken: list[Message]) -> Answer:
        """A receive took ``messages``: reported, and handed to the guest."""
        caller = attempt.invocation
        if self.wants("message_received"):
            with self._reporting:
                for message in messages:
                    self.emit(
                        MessageReceived(
                            run_id=self.run_id,
                            task_id=caller.task_id,
                            task=caller.task,
                            message_id=message.id,
                            sender_id=message.sender,
                        )
                    )
        if len(messages) > 1:
            self.batch_handed(attempt, messages)
        taken.extend(messages)
        return True, received_answer(messages) if self.journaling else ""

    def batch_handed(self, attempt: Attempt, messages: list[Message]) -> None:
        """The guest got ``messages`` at once, and gives them to the task's code
        one by one, counting them in its channel."""
        attempt.batch = messages
        channel = attempt.invocation.channel
        if channel is not None:
            channel.batch_handed()

    def replayed_receive(self, attempt: Attempt, answer: str) -> None:
        """A receive answered from the journal: a batch is the guest's to hand
        out as it was live (and what it does not take goes back at its end)."""
        attempt.batch = None
        batch = [Message(*message) for message in received_messages(answer)]
        if len(batch) < 2:
            return
        self.open_channel()
        self.batch_handed(attempt, batch)

    def ending(self, attempt: Attempt, batch_taken: int | None) -> None:
        """The attempt ends: give back its reserved places, and put the messages
        of its last batch that its code never took back in its mailbox (the
        next attempt, or a restart, gets them)."""
        self.end_credit(attempt)
        batch, attempt.batch = attempt.batch, None
        if batch_taken is None:
            # A replayed batch whose instance's channel could not be opened (a
            # resume on a machine without /proc/self/pagemap): how many its code
            # took is unknown. All go back: some may come twice, none is lost.
            batch_taken = 0
        if batch is None or batch_taken >= len(batch):
            return
        caller = attempt.invocation
        returned = batch[batch_taken:]
        self.router.put_back(caller.task_id, returned)
        self.emit(
            MessagesReturned(
                run_id=self.run_id,
                task_id=caller.task_id,
                task=caller.task,
                attempt=caller.attempt,
                message_ids=[message.id for message in returned],
            )
        )

    def send_ask(self, attempt: Attempt, target: str, body_json: str, then: AfterSend) -> Waiting:
        """The sending half of an ask (waiting while the target's mailbox is
        full), then ``then(answer, the message whose reply is now expected, or
        None if it was refused)``. After a resume, one sent before is not sent
        again."""
        return self._send(attempt, target, body_json, None, True, then)

    def ask(self, attempt: Attempt, target: str, body_json: str, timeout: float | None) -> Waiting:
        started = time.monotonic()
        return self._send(
            attempt,
            target,
            body_json,
            timeout,
            True,
            partial(self._await_reply, attempt, target, timeout, started),
        )

    def _await_reply(
        self,
        attempt: Attempt,
        target: str,
        timeout: float | None,
        started: float,
        sent: Answer,
        message: Message | None,
    ) -> Waiting:
        """An ask's second half: the wait for the reply to ``message`` (asked
        at ``started``, given ``timeout`` in all)."""
        if message is None:
            return sent
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return self.reply_wait(attempt, target, message, left)

    def reply_wait(
        self, attempt: Attempt, target: str, message: Message, timeout: float | None
    ) -> Wait:
        """The wait for the reply to ``message``, asked of ``target``."""
        caller = attempt.invocation
        answer: list[tuple[str | None, str | None]] = []

        def answered() -> bool:
            reply, failure = self.router.take_reply(message.id)
            if reply is not None or failure is not None:
                answer.append((reply, failure))
            return bool(answer)

        def finish(got: bool) -> Answer:
            if not got:
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

        return Wait(attempt, "receive", answered, finish, timeout)

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]:
        if len(body_json) > self.max_message_bytes:
            return _message_error(
                "too_large",
                f"a reply of {len(body_json):,} bytes (as JSON) exceeds the limit of "
                f"{self.max_message_bytes:,} bytes",
            )
        refused = _refused_body(body_json, message_id, "the reply to")
        if refused is not None:
            return refused
        try:
            self.router.reply(message_id, caller.task_id, body_json)
        except RoutingError as exc:
            return _message_error(exc.kind, str(exc))
        return True, ""


def _refused_body(
    body_json: str, target: str, whose: str = "the body of a message to"
) -> tuple[bool, str] | None:
    """None if a message's body is one strict JSON value; the answer refusing
    it if it has more items than the host takes (an honest task may send
    that); ProtocolError (the sender fails) if it is malformed."""
    try:
        guest_data.json_value(body_json, lambda: f"{whose} {target!r:.80}")
    except guest_data.TooLarge as exc:
        return _message_error("too_large", str(exc))
    return None


def _sent(message_id: str, target_id: str) -> str:
    """A send's answer, as json.dumps({"id": ..., "to": ...}) writes it (built
    on every message: json.dumps of a small dict costs ten times more)."""
    return f'{{"id": {json_string(message_id)}, "to": {json_string(target_id)}}}'


def _message_error(kind: str, message: str) -> tuple[bool, str]:
    return False, json.dumps({"kind": kind, "message": message})
