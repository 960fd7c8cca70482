"""Mailboxes by task id, registered names, and reply slots for ``ask``."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class Waker(Protocol):
    """Something blocked in a host call that a routing change may unblock."""

    def wake(self) -> None: ...


#: How many bytes of messages one receive takes at most (past the first).
RECEIVED_BYTES = 256 * 1024
#: The largest message (bytes of JSON) that may be sent on reserved room: a
#: reservation holds this much of the run's queued size.
RESERVED_MESSAGE_BYTES = 4096


class RoutingError(Exception):
    """A message that cannot be routed; ``kind`` names why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Message(NamedTuple):  # a tuple: made on every send, and cheaper than a frozen dataclass
    id: str
    sender: str
    body_json: str
    #: Set when the sender waits for a reply (``ask``).
    expects_reply: bool = False


@dataclass(eq=False)
class Mailbox:
    task_id: str
    capacity: int
    messages: deque[Message] = field(default_factory=deque)
    #: The receiver, while it is blocked in receive.
    receiver: Waker | None = None
    #: Senders blocked because the mailbox was full.
    blocked_senders: list[Waker] = field(default_factory=list)
    #: Size of the bodies of its messages.
    queued_bytes: int = 0
    #: Places reserved for messages its senders are yet to deliver (see reserve).
    reserved: int = 0


@dataclass(eq=False)
class _ReplySlot:
    asker: Waker
    target_id: str
    reply_json: str | None = None
    #: Why no reply will come (the target ended), if so.
    failure: str | None = None


def _size(message: Message) -> int:
    """Bytes of a message body (JSON text; ASCII unless the guest sent otherwise)."""
    body = message.body_json
    return len(body) if body.isascii() else len(body.encode())


class Router:
    """Routes messages between the live tasks of one run. Thread-safe.

    Messages sent and not yet received live in the host's memory. A full mailbox
    (``mailbox_capacity`` messages) makes its senders wait; their total size in
    the run is bounded too (``max_queued_bytes``), so that guests cannot make the
    host hold more however many mailboxes they fill: a send over that is refused
    at once (kind ``queue_full``), naming the mailbox that holds the most. (It
    does not wait: a receiver that stopped would hold up unrelated senders, and
    small sends could keep overtaking a large one.)

    A sender may reserve room in a mailbox (``reserve``) and deliver into it
    later without a check that could fail or wait (``deliver_reserved``): its
    task gathers those messages in its own memory and the host delivers them
    in bulk. A reservation counts as a message in the mailbox until used or
    released. It is made only while the run's queued size has room for it (at
    RESERVED_MESSAGE_BYTES a place), and reservations take at most a quarter of
    that size: the messages held may exceed ``max_queued_bytes`` by that
    quarter, and a send is never refused for room merely reserved."""

    def __init__(self, mailbox_capacity: int, max_queued_bytes: int) -> None:
        self.mailbox_capacity = mailbox_capacity
        self.max_queued_bytes = max_queued_bytes
        self._lock = threading.Lock()
        #: Size of the bodies of every message sent and not yet received.
        self._queued_bytes = 0
        #: RESERVED_MESSAGE_BYTES for every reserved place.
        self._reserved_bytes = 0
        self._mailboxes: dict[str, Mailbox] = {}
        self._names: dict[str, str] = {}
        self._replies: dict[str, _ReplySlot] = {}
        #: Asks sent before a resume (by message id, the task asked): their
        #: replies may come before the asker, replaying, asks again; such
        #: replies (from that task alone) wait here for it.
        self._early_targets: dict[str, str] = {}
        self._early: dict[str, str] = {}

    # -- lifetimes -------------------------------------------------------------

    def open(self, task_id: str, backlog: Iterable[Message] = ()) -> None:
        """Give a task its mailbox (it keeps it across retries). ``backlog``:
        messages it is owed from before a resume, put in ahead of any new one."""
        with self._lock:
            if task_id not in self._mailboxes:
                mailbox = self._mailboxes[task_id] = Mailbox(task_id, self.mailbox_capacity)
                mailbox.messages.extend(backlog)
                mailbox.queued_bytes = sum(_size(message) for message in backlog)
                self._queued_bytes += mailbox.queued_bytes

    def close(self, task_id: str) -> list[Message]:
        """The task has ended: drop its mailbox and name, fail asks waiting on it
        and wake blocked senders. Returns the messages it never received."""
        with self._lock:
            mailbox = self._mailboxes.pop(task_id, None)
            for name in [n for n, owner in self._names.items() if owner == task_id]:
                del self._names[name]
            to_wake: list[Waker] = list(mailbox.blocked_senders) if mailbox else []
            if mailbox is not None:
                self._queued_bytes -= mailbox.queued_bytes
                self._reserved_bytes -= mailbox.reserved * RESERVED_MESSAGE_BYTES
            for slot in self._replies.values():
                if slot.target_id == task_id and slot.reply_json is None and slot.failure is None:
                    slot.failure = f"{task_id} ended without replying"
                    to_wake.append(slot.asker)
        for waker in to_wake:
            waker.wake()
        return list(mailbox.messages) if mailbox else []

    def register(self, name: str, task_id: str) -> None:
        with self._lock:
            owner = self._names.get(name)
            if owner is not None:
                raise RoutingError(
                    "name_taken", f"the name {name!r} is already registered to task {owner}"
                )
            self._names[name] = task_id

    def resolve(self, target: str) -> str:
        """The task id a target (registered name or task id) stands for."""
        with self._lock:
            task_id = self._names.get(target, target)
            if task_id not in self._mailboxes:
                raise RoutingError(
                    "no_such_actor",
                    f"no live task has the id or registered name {target!r}",
                )
            return task_id

    # -- messages --------------------------------------------------------------

    def try_send(self, target_id: str, message: Message, sender: Waker) -> bool:
        """Deliver, or return False (mailbox full: ``sender`` is woken when it
        may try again). Raises RoutingError if the target has ended, or if the
        run's messages not yet received would be over ``max_queued_bytes``."""
        with self._lock:
            mailbox = self._mailboxes.get(target_id)
            if mailbox is None:
                raise RoutingError("no_such_actor", f"task {target_id} has ended")
            if len(mailbox.messages) + mailbox.reserved >= mailbox.capacity:
                if sender not in mailbox.blocked_senders:
                    mailbox.blocked_senders.append(sender)
                return False
            size = _size(message)
            if self._queued_bytes + size > self.max_queued_bytes:
                raise self._queue_full(size)
            receiver = self._enqueue(mailbox, message, size)
        if receiver is not None:
            receiver.wake()
        return True

    def _enqueue(self, mailbox: Mailbox, message: Message, size: int) -> Waker | None:
        """Holding the lock: put ``message`` in; returns its receiver to wake."""
        self._queued_bytes += size
        mailbox.queued_bytes += size
        mailbox.messages.append(message)
        receiver, mailbox.receiver = mailbox.receiver, None
        return receiver

    def reserve(self, target_id: str, wanted: int) -> int:
        """Reserve up to ``wanted`` places in a mailbox for one sender's next
        messages (each of at most RESERVED_MESSAGE_BYTES); returns how many.
        Reservations take at most half a mailbox and a quarter of the run's
        queued size, so that messages themselves always have room."""
        with self._lock:
            mailbox = self._mailboxes.get(target_id)
            if mailbox is None:
                return 0
            places = min(
                wanted,
                mailbox.capacity - len(mailbox.messages) - mailbox.reserved,
                mailbox.capacity // 2 - mailbox.reserved,
                (self.max_queued_bytes - self._queued_bytes - self._reserved_bytes)
                // RESERVED_MESSAGE_BYTES,
                (self.max_queued_bytes // 4 - self._reserved_bytes) // RESERVED_MESSAGE_BYTES,
            )
            if places <= 0:
                return 0
            mailbox.reserved += places
            self._reserved_bytes += places * RESERVED_MESSAGE_BYTES
            return places

    def release(self, target_id: str, places: int) -> None:
        """Give back reserved places the sender did not use."""
        with self._lock:
            mailbox = self._mailboxes.get(target_id)
            if mailbox is None or places <= 0:
                return
            mailbox.reserved -= places
            self._reserved_bytes -= places * RESERVED_MESSAGE_BYTES
            senders, mailbox.blocked_senders = mailbox.blocked_senders, []
        for sender in senders:
            sender.wake()

    def deliver_reserved(self, target_id: str, message: Message) -> None:
        """Deliver a message into a place reserved for it. A mailbox gone (its
        task ended since) drops it, as it drops the messages in it."""
        with self._lock:
            mailbox = self._mailboxes.get(target_id)
            if mailbox is None:
                return
            mailbox.reserved -= 1
            self._reserved_bytes -= RESERVED_MESSAGE_BYTES
            receiver = self._enqueue(mailbox, message, _size(message))
        if receiver is not None:
            receiver.wake()

    def try_receive(self, task_id: str, receiver: Waker, most: int = 1) -> list[Message]:
        """The oldest messages, up to ``most`` (past the first, as many as fit in
        RECEIVED_BYTES), or none (``receiver`` is woken when one arrives)."""
        with self._lock:
            mailbox = self._mailboxes[task_id]
            messages = mailbox.messages
            if not messages:
                mailbox.receiver = receiver
                return []
            taken = [messages.popleft()]
            size = _size(taken[0])
            while messages and len(taken) < most:
                next_size = _size(messages[0])
                if size + next_size > RECEIVED_BYTES:
                    break
                taken.append(messages.popleft())
                size += next_size
            self._queued_bytes -= size
            mailbox.queued_bytes -= size
            senders, mailbox.blocked_senders = mailbox.blocked_senders, []
        for sender in senders:
            sender.wake()
        return taken

    def watch(self, task_id: str, receiver: Waker) -> bool:
        """Whether a message waits in a mailbox (none is taken); if none does,
        ``receiver`` is woken when one arrives."""
        with self._lock:
            mailbox = self._mailboxes.get(task_id)
            if mailbox is None:
                return False
            if mailbox.messages:
                return True
            mailbox.receiver = receiver
            return False

    def put_back(self, task_id: str, messages: list[Message]) -> None:
        """Return messages taken and not consumed to the front of a mailbox, in
        their order (over its capacity if need be: they were in it before)."""
        with self._lock:
            mailbox = self._mailboxes.get(task_id)
            if mailbox is None:
                return
            mailbox.messages.extendleft(reversed(messages))
            size = sum(_size(message) for message in messages)
            self._queued_bytes += size
            mailbox.queued_bytes += size

    def forget_sender(self, target_id: str, sender: Waker) -> None:
        with self._lock:
            mailbox = self._mailboxes.get(target_id)
            if mailbox is not None and sender in mailbox.blocked_senders:
                mailbox.blocked_senders.remove(sender)

    def _queue_full(self, size: int) -> RoutingError:
        # Holding the lock.
        fullest = max(self._mailboxes.values(), key=lambda mailbox: mailbox.queued_bytes)
        return RoutingError(
            "queue_full",
            f"a message of {size:,} bytes would take the run's messages not yet received "
            f"over {self.max_queued_bytes:,} bytes (the run option max_queued_size); the most wait for "
            f"task {fullest.task_id} ({fullest.queued_bytes:,} bytes in its mailbox)",
        )

    def queued_bytes(self) -> int:
        with self._lock:
            return self._queued_bytes

    def queued_bytes_for(self, task_id: str) -> int:
        """Size of the messages waiting in a task's mailbox."""
        with self._lock:
            mailbox = self._mailboxes.get(task_id)
            return mailbox.queued_bytes if mailbox else 0

    def depth(self, task_id: str) -> int:
        with self._lock:
            mailbox = self._mailboxes.get(task_id)
            return len(mailbox.messages) if mailbox else 0

    # -- ask / reply -----------------------------------------------------------

    def allow_early_replies(self, asked: Mapping[str, str], replies: dict[str, str]) -> None:
        """After a resume: the messages of ``asked`` were asked before it, each
        of the task it maps to (``replies``: the answers already given), so a
        reply to one may arrive, from that task, before its ask."""
        with self._lock:
            self._early_targets = dict(asked)
            self._early = dict(replies)

    def expect_reply(self, message_id: str, asker: Waker, target_id: str) -> None:
        with self._lock:
            slot = self._replies[message_id] = _ReplySlot(asker, target_id)
            slot.reply_json = self._early.pop(message_id, None)

    def reply(self, message_id: str, replier_id: str, reply_json: str) -> None:
        with self._lock:
            slot = self._replies.get(message_id)
            if slot is None and self._early_targets.get(message_id) == replier_id:
                self._early.setdefault(message_id, reply_json)
                return
            if slot is None or slot.target_id != replier_id:
                raise RoutingError(
                    "no_reply_expected",
                    f"message {message_id} awaits no reply from task {replier_id}",
                )
            if slot.reply_json is not None or slot.failure is not None:
                raise RoutingError(
                    "already_replied", f"message {message_id} was already replied to"
                )
            slot.reply_json = reply_json
        slot.asker.wake()

    def take_reply(self, message_id: str) -> tuple[str | None, str | None]:
        """(reply JSON, failure): both None while the reply is still to come."""
        with self._lock:
            slot = self._replies[message_id]
            if slot.reply_json is None and slot.failure is None:
                return None, None
            del self._replies[message_id]
            return slot.reply_json, slot.failure

    def abandon_replies(self, message_ids: Iterable[str]) -> None:
        with self._lock:
            for message_id in message_ids:
                self._replies.pop(message_id, None)
