"""Messages between running tasks: ``send``, ``receive``, ``ask`` and replies.

Targets are a :class:`~capsule.sdk.task.TaskHandle`, a task id, or a name given
at spawn (``worker.spawn(name="critic")``). Bodies are JSON values. In local mode
(outside ``capsule run``) mailboxes are in-process, with the same semantics.
"""

from __future__ import annotations

from typing import Any

from capsule.sdk import task as _task
from capsule.sdk.errors import MessageError


class Message:
    """A received message: ``body``, ``sender`` (a task id) and ``reply(value)``."""

    def __init__(self, message_id: str, sender: str, body: Any, expects_reply: bool) -> None:
        self.id = message_id
        self.sender = sender
        self.body = body
        self.expects_reply = expects_reply
        self._replied = False

    def reply(self, value: Any) -> None:
        """Answer the ``ask`` this message came from (once)."""
        if self._replied:
            raise MessageError("already_replied", f"message {self.id} was already replied to")
        _task.active_backend().reply(self.id, value)
        self._replied = True

    def __repr__(self) -> str:
        return f"<Message {self.id} from {self.sender}: {self.body!r}>"


def _target(target: Any) -> str:
    if isinstance(target, _task.TaskHandle):
        return target.id
    if isinstance(target, str):
        return target
    raise TypeError(f"a message target is a TaskHandle, a task id or a name, not {target!r}")


def send(target: Any, message: Any, timeout: float | None = None) -> None:
    """Send ``message`` to ``target``. Waits while its mailbox is full; raises
    SendTimeout if it stays full for ``timeout`` seconds."""
    _task.active_backend().send(_target(target), message, timeout)


def receive(timeout: float | None = None) -> Message:
    """The next message for this task; raises ReceiveTimeout after ``timeout`` seconds."""
    message_id, sender, body, expects_reply = _task.active_backend().receive(timeout)
    return Message(message_id, sender, body, expects_reply)


async def receive_async(timeout: float | None = None) -> Message:
    """``receive`` for async code: the task's other coroutines run while it
    waits for a message."""
    message_id, sender, body, expects_reply = await _task.active_backend().receive_async(timeout)
    return Message(message_id, sender, body, expects_reply)


def ask(target: Any, message: Any, timeout: float | None = None) -> Any:
    """Send ``message`` and wait for the reply; raises ReceiveTimeout after ``timeout``."""
    return _task.active_backend().ask(_target(target), message, timeout)


async def ask_async(target: Any, message: Any, timeout: float | None = None) -> Any:
    """``ask`` for async code: the task's other coroutines run while it waits
    for the reply."""
    return await _task.active_backend().ask_async(_target(target), message, timeout)
