"""Errors that user code sees."""

from __future__ import annotations

from typing import Any


class TaskError(Exception):
    """A task failed after all its attempts.

    Raised in the caller of a child task. ``kind`` is one of ``exception``,
    ``timeout``, ``fuel_exhausted``, ``memory_limit``, ``trap``, ``cancelled``,
    ``child_failed`` (a child of its own failed unwatched), ``restart_intensity``,
    ``bad_arguments`` (the arguments do not fit the task's signature; not retried)
    or ``limit`` (the host refused to start it: too deep, too many children or live
    tasks);
    ``traceback`` is the guest's traceback text when the failure was a Python
    exception. When the child failed only because a TaskError of its own went
    unhandled, ``cause`` holds the original failure: ``{"task", "kind",
    "message", "via"}``, ``via`` being the tasks it propagated through.
    """

    def __init__(
        self,
        kind: str,
        task: str,
        message: str,
        traceback: str | None = None,
        attempts: int | None = None,
        cause: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"task {task!r} failed ({kind}): {message}")
        self.kind = kind
        self.task = task
        self.message = message
        self.traceback = traceback
        self.attempts = attempts
        self.cause = cause

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "task": self.task,
            "message": self.message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "cause": self.cause,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskError:
        return cls(
            kind=str(data.get("kind", "exception")),
            task=str(data.get("task", "?")),
            message=str(data.get("message", "")),
            traceback=data.get("traceback"),
            attempts=data.get("attempts"),
            cause=data.get("cause"),
        )


def unhandled(exc: TaskError) -> tuple[str, dict[str, Any]]:
    """The message and ``cause`` of a task that failed only because ``exc`` (the
    TaskError of a task it called or waited on) went unhandled in it. The original
    failure is named once, however many callers it went through, instead of one
    message wrapped in another at every level."""
    if exc.cause:
        cause = dict(exc.cause)
        cause["via"] = [exc.task, *cause.get("via", [])][:16]
    else:
        cause = {"task": exc.task, "kind": exc.kind, "message": exc.message, "via": []}
    via = cause["via"]
    shown = ", ".join(repr(t) for t in via[:3]) + (", ..." if len(via) > 3 else "")
    through = f" (through {shown})" if via else ""
    message = (
        f"unhandled TaskError: task {cause['task']!r} failed ({cause['kind']}){through}: "
        f"{cause['message']}"
    )
    return message, cause


class ReceiveTimeout(TimeoutError):
    """``receive`` or ``ask`` got no message or reply in time."""


class SendTimeout(TimeoutError):
    """``send`` found the target's mailbox full until its timeout."""


class MessageError(Exception):
    """A message that could not be sent or replied to. ``kind``: ``too_large``,
    ``no_such_actor``, ``no_reply_expected``, ``already_replied`` or ``actor_ended``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def message_error(data: dict[str, Any]) -> Exception:
    """The exception for a JSON error object the host returned for a message call."""
    kind = str(data.get("kind", "error"))
    text = str(data.get("message", ""))
    if kind == "receive_timeout":
        return ReceiveTimeout(text)
    if kind == "send_timeout":
        return SendTimeout(text)
    return MessageError(kind, text)
