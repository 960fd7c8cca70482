"""Local mode: tasks called in plain Python (pytest, a REPL) run in-process, with
the control flow of ``capsule run``.

:class:`LocalBackend` is the backend the SDK uses when no sandbox backend is
installed. A task called from plain Python starts a local run, which that call
owns with everything under it:

- a task call runs the function on the caller's thread, attempt after attempt up
  to ``max_retries`` (without backoff), and a failure reaches the caller as the
  TaskError the host would report;
- a spawned child runs on a thread of its own, owned by the attempt that spawned
  it: when that attempt ends, its children still running are cancelled, and
  every one of them is joined;
- mailboxes, registered names and replies live in the run, with the real run's
  semantics; arguments, results and message bodies go through strict JSON.

Cancellation and deadlines are cooperative: a task learns of them in a call that
waits (``receive``, ``ask``, ``send``, ``result``, ``sleep``) or at its next call
into Capsule, which raises :class:`TaskStopped`; a task that computes past its
deadline fails when it returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from capsule.sdk import task as _task
from capsule.sdk.errors import MessageError, ReceiveTimeout, SendTimeout, TaskError, unhandled
from capsule.sdk.options import DEFAULT_MAX_RETRIES, parse_max_retries, parse_timeout

#: Messages a mailbox holds before ``send`` waits (the host's default).
MAILBOX_CAPACITY = 1000
#: Failure kinds that are not retried (those of the host's that local mode reports).
_NOT_RETRIED = frozenset({"cancelled", "bad_arguments"})


class TaskStopped(BaseException):
    """Ends the attempt of a local task that was cancelled or ran past a
    deadline, as the real run ends its instance. Not an ``Exception``: a task's
    ``except Exception`` does not swallow it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(eq=False)
class _Scope:
    """What stops an attempt: its cancellation or deadline, or those of the
    tasks above it (``parent``: its caller's attempt, or the scope through which
    its spawner cancels it)."""

    parent: _Scope | None
    timeout_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    #: Why it was cancelled, once it is.
    cancelled: str | None = None
    #: (kind, message) of a failure that stops this attempt itself (a linked
    #: child's), once there is one.
    failed: tuple[str, str] | None = None

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.started + self.timeout_s

    def stop(self) -> tuple[str, str] | None:
        """(kind, message) of why the attempt must stop now, or None."""
        if self.failed is not None:
            return self.failed
        now = time.monotonic()
        node: _Scope | None = self
        while node is not None:
            if node.cancelled is not None:
                return "cancelled", node.cancelled
            if node.failed is not None:
                return "cancelled", "cancelled because its caller stopped"
            deadline = node.deadline
            if deadline is not None and now >= deadline:
                if node is self:
                    return "timeout", f"deadline of {node.timeout_s:g}s exceeded"
                return "cancelled", "cancelled because its caller stopped"
            node = node.parent
        return None

    def nearest_deadline(self) -> float | None:
        node: _Scope | None = self
        deadlines = []
        while node is not None:
            if node.deadline is not None:
                deadlines.append(node.deadline)
            node = node.parent
        return min(deadlines, default=None)

    def check(self) -> None:
        stop = self.stop()
        if stop is not None:
            raise TaskStopped(*stop)


@dataclass(frozen=True)
class _Envelope:
    id: str
    sender: str
    body_json: str
    expects_reply: bool


@dataclass(eq=False)
class _ReplySlot:
    target_id: str
    reply_json: str | None = None
    #: Why no reply will come (the target ended), if so.
    failure: str | None = None


class _Run:
    """The shared state of one local run: its mailboxes, registered names and
    awaited replies, guarded by one condition that every change notifies."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.mailboxes: dict[str, deque[_Envelope]] = {}
        self.names: dict[str, str] = {}
        self.replies: dict[str, _ReplySlot] = {}

    def block(self, scope: _Scope, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``ready()`` (True) or ``timeout`` seconds (False). Raises
        TaskStopped if the waiting attempt must stop meanwhile."""
        until = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                scope.check()
                if ready():
                    return True
                now = time.monotonic()
                if until is not None and now >= until:
                    return False
                # Woken by any change, or at the nearest deadline above it.
                wakes = [t for t in (until, scope.nearest_deadline()) if t is not None]
                self.cond.wait(None if not wakes else max(0.0, min(wakes) - now))

    def open(self, task_id: str) -> None:
        """Give a task its mailbox (it keeps it across retries)."""
        with self.cond:
            self.mailboxes.setdefault(task_id, deque())

    def close(self, task_id: str) -> None:
        """The task ended: drop its mailbox and names; asks awaiting its reply fail."""
        with self.cond:
            self.mailboxes.pop(task_id, None)
            for name in [name for name, owner in self.names.items() if owner == task_id]:
                del self.names[name]
            for slot in self.replies.values():
                if slot.target_id == task_id and slot.reply_json is None:
                    slot.failure = slot.failure or f"{task_id} ended without replying"
            self.cond.notify_all()

    def resolve(self, target: str) -> str:
        """The task id a registered name or a task id stands for."""
        with self.cond:
            task_id = self.names.get(target, target)
            if task_id not in self.mailboxes:
                raise MessageError(
                    "no_such_actor", f"no live task has the id or registered name {target!r}"
                )
            return task_id


@dataclass(frozen=True)
class _Policy:
    """The options local mode reads from a task's declaration."""

    max_attempts: int
    timeout_s: float | None
    #: ``restart="temporary"``: spawned, it is never retried, and its failure
    #: never fails its parent.
    temporary: bool

    @classmethod
    def of(cls, fn: _task.TaskFunction[Any, Any]) -> _Policy:
        options = fn.options
        try:
            max_retries = parse_max_retries(options.get("max_retries", DEFAULT_MAX_RETRIES))
        except ValueError as exc:
            raise _task.TaskDefinitionError(
                f"task {fn.name!r}: max_retries={options['max_retries']!r} is not valid; "
                f"expected {exc}"
            ) from None
        timeout = options.get("timeout")
        try:
            timeout_s = None if timeout is None else parse_timeout(timeout)
        except ValueError as exc:
            raise _task.TaskDefinitionError(
                f"task {fn.name!r}: timeout={timeout!r} is not valid; expected {exc}"
            ) from None
        return cls(max_retries + 1, timeout_s, options.get("restart") == "temporary")


@dataclass(eq=False)
class _Invocation:
    """A task invocation across its attempts: numbers its children and messages
    as the host does (its id, then ``/n`` or ``#n``; attempts continue the count)."""

    run: _Run
    task_id: str
    fn: _task.TaskFunction[Any, Any]
    policy: _Policy
    children: int = 0
    messages: int = 0

    def next_child_id(self) -> str:
        self.children += 1
        return f"{self.task_id}/{self.children}"

    def next_message_id(self) -> str:
        self.messages += 1
        return f"{self.task_id}#{self.messages}"


@dataclass(eq=False)
class _Child:
    """A spawned child, from its parent attempt's side."""

    task_id: str
    name: str
    #: Cancelling it cancels the child's attempt and everything under it.
    scope: _Scope
    temporary: bool
    #: spawn(link=True): its failure fails the parent at once (see _linked_failure).
    link: bool = False
    #: The parent attempt's scope, which a linked failure stops.
    parent_scope: _Scope | None = None
    #: Whether the parent is waiting on it now (its failure then goes there).
    waited_on: bool = False
    thread: threading.Thread | None = None
    #: (True, value) or (False, TaskError), once it ended (under the run's condition).
    outcome: tuple[bool, Any] | None = None


@dataclass(eq=False)
class _Attempt:
    invocation: _Invocation
    info: _task.TaskInfo
    scope: _Scope
    #: Children spawned and not yet waited on.
    children: dict[str, _Child] = field(default_factory=dict)

    @property
    def run(self) -> _Run:
        return self.invocation.run


#: The attempt running on this thread (or context), if any.
_current: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "capsule_local_attempt", default=None
)


class LocalBackend:
    """The :class:`~capsule.sdk.task.Backend` of local mode."""

    # -- task calls -------------------------------------------------------------

    def call_task(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn, policy, call_json = _prepare(name, args, kwargs)
        caller = _current.get()
        if caller is None:  # called from plain Python: a new run, which this call owns
            run, task_id, above = _Run(), name, None
        else:
            caller.scope.check()
            run, task_id, above = caller.run, caller.invocation.next_child_id(), caller.scope
        ok, value = _invoke(_Invocation(run, task_id, fn, policy), call_json, above, None)
        if caller is not None:
            caller.scope.check()  # (the child may have ended because its caller must)
        if not ok:
            raise value
        return value

    def spawn_task(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        actor_name: str | None,
        link: bool,
    ) -> str:
        parent = _require(f"{name}.spawn()")
        fn, policy, call_json = _prepare(name, args, kwargs)
        parent.scope.check()
        run = parent.run
        task_id = parent.invocation.next_child_id()
        child = _Child(
            task_id,
            name,
            _Scope(parent.scope),
            policy.temporary,
            link=link,
            parent_scope=parent.scope,
        )
        invocation = _Invocation(run, task_id, fn, policy)
        with run.cond:
            if actor_name is not None:
                owner = run.names.get(actor_name)
                if owner is not None:
                    raise TaskError(
                        "exception",
                        name,
                        f"the name {actor_name!r} is already registered to task {owner}",
                    )
                run.names[actor_name] = task_id
            # Its mailbox (and name) exist before spawn returns: the parent may
            # message it at once.
            run.open(task_id)
        child.thread = threading.Thread(
            target=_invoke,
            args=(invocation, call_json, child.scope, child),
            name=f"capsule-local {task_id}",
        )
        try:
            child.thread.start()
        except RuntimeError as exc:  # the OS refused another thread
            run.close(task_id)
            raise TaskError(
                "limit", name, f"cannot start a thread for a local task: {exc}"
            ) from None
        parent.children[task_id] = child
        return task_id

    def wait(
        self, task_ids: list[str], timeout: float | None, any_ended: bool = False
    ) -> list[tuple[bool, Any] | None]:
        attempt = _require("waiting on a TaskHandle")
        _check_timeout(timeout)
        children = []
        for task_id in task_ids:
            child = attempt.children.get(task_id)
            if child is None:
                raise TaskError(
                    "exception",
                    "?",
                    f"{attempt.info.name!r} can only wait on its own running or unreported "
                    f"children, not {task_id!r}",
                )
            children.append(child)
        with attempt.run.cond:
            for child in children:
                child.waited_on = True
        try:
            ended = _wait_for_children(attempt, children, timeout, any if any_ended else all)
        finally:
            with attempt.run.cond:
                for child in children:
                    child.waited_on = False
        if not ended and not any_ended:
            with attempt.run.cond:
                for child in children:  # (those that failed, undelivered)
                    _linked_failure(child)
            pending = [child.task_id for child in children if child.outcome is None]
            raise TimeoutError(f"children {pending} had not ended after {timeout:g}s")
        # Reported: the handles keep the outcomes; the attempt forgets the children.
        outcomes: list[tuple[bool, Any] | None] = []
        for child in children:
            if child.outcome is None:
                outcomes.append(None)
                continue
            _join(child)
            attempt.children.pop(child.task_id, None)
            outcomes.append(child.outcome)
        return outcomes

    def cancel(self, task_id: str) -> None:
        attempt = _require("TaskHandle.cancel()")
        attempt.scope.check()
        child = attempt.children.get(task_id)
        if child is not None:
            _cancel(attempt.run, [child], "cancelled by its parent")

    def sleep(self, seconds: float) -> None:
        _check_timeout(seconds)
        attempt = _current.get()
        if attempt is None:
            time.sleep(seconds)
            return
        attempt.run.block(attempt.scope, lambda: False, seconds)

    # -- messages ---------------------------------------------------------------

    def send(self, target: str, body: Any, timeout: float | None) -> None:
        attempt = _require("capsule.send()")
        body_json = _body_json(target, body)
        _check_timeout(timeout)
        attempt.scope.check()
        _deliver(attempt, target, body_json, timeout, expects_reply=False)

    def receive(self, timeout: float | None) -> tuple[str, str, Any, bool]:
        attempt = _require("capsule.receive()")
        _check_timeout(timeout)
        run = attempt.run
        with run.cond:
            mailbox = run.mailboxes[attempt.invocation.task_id]
            if not run.block(attempt.scope, lambda: bool(mailbox), timeout):
                raise ReceiveTimeout(f"no message arrived within {timeout:g}s")
            message = mailbox.popleft()
            run.cond.notify_all()  # (a sender may wait for room)
        return message.id, message.sender, json.loads(message.body_json), message.expects_reply

    def ask(self, target: str, body: Any, timeout: float | None) -> Any:
        attempt = _require("capsule.ask()")
        body_json = _body_json(target, body)
        _check_timeout(timeout)
        attempt.scope.check()
        started = time.monotonic()
        message_id = _deliver(attempt, target, body_json, timeout, expects_reply=True)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        run = attempt.run
        with run.cond:
            slot = run.replies[message_id]
            try:
                answered = run.block(
                    attempt.scope,
                    lambda: slot.reply_json is not None or slot.failure is not None,
                    left,
                )
            finally:
                del run.replies[message_id]
        if not answered:
            raise ReceiveTimeout(f"no reply from {target!r} within {timeout:g}s")
        if slot.reply_json is None:
            raise MessageError("actor_ended", slot.failure or "")
        return json.loads(slot.reply_json)

    def reply(self, message_id: str, body: Any) -> None:
        attempt = _require("Message.reply()")
        body_json = _body_json(message_id, body)
        me = attempt.invocation.task_id
        run = attempt.run
        with run.cond:
            slot = run.replies.get(message_id)
            if slot is None or slot.target_id != me:
                raise MessageError(
                    "no_reply_expected", f"message {message_id} awaits no reply from task {me}"
                )
            if slot.reply_json is not None or slot.failure is not None:
                raise MessageError(
                    "already_replied", f"message {message_id} was already replied to"
                )
            slot.reply_json = body_json
            run.cond.notify_all()

    # -- the rest -----------------------------------------------------------------

    def http(self, request: dict[str, Any]) -> dict[str, Any]:
        from capsule.sdk.http import request_directly

        return request_directly(request)

    # -- async forms: the blocking call on a thread (in the caller's context), so
    # that the caller's event loop goes on meanwhile --------------------------

    async def http_async(self, request: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.http, request)

    async def wait_async(self, task_ids: list[str]) -> list[tuple[bool, Any]]:
        outcomes = await asyncio.to_thread(self.wait, task_ids, None)
        return [outcome for outcome in outcomes if outcome is not None]

    async def receive_async(self, timeout: float | None) -> tuple[str, str, Any, bool]:
        return await asyncio.to_thread(self.receive, timeout)

    async def ask_async(self, target: str, body: Any, timeout: float | None) -> Any:
        return await asyncio.to_thread(self.ask, target, body, timeout)

    def current(self) -> _task.TaskInfo | None:
        attempt = _current.get()
        return None if attempt is None else attempt.info


# -- running a task ---------------------------------------------------------------


def _prepare(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[_task.TaskFunction[Any, Any], _Policy, str]:
    """The task, its policy and its call as JSON, checked as the real run checks
    them before a call leaves the caller."""
    fn = _task.registry.get(name)
    if fn is None:
        raise TaskError("exception", name, f"no task named {name!r} is declared")
    policy = _Policy.of(fn)
    try:
        call_json = _strict_json({"args": list(args), "kwargs": kwargs})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arguments to task {name!r} are not JSON-serializable: {exc}") from None
    return fn, policy, call_json


def _invoke(
    invocation: _Invocation, call_json: str, above: _Scope | None, child: _Child | None
) -> tuple[bool, Any]:
    """Run an invocation, attempt after attempt; its outcome. The task's mailbox
    lives as long as this call. A spawned ``child`` gets its outcome (and its
    parent is woken) at the moment its mailbox closes."""
    run = invocation.run
    run.open(invocation.task_id)
    outcome: tuple[bool, Any] | None = None
    try:
        outcome = _attempts(invocation, call_json, above, spawned=child is not None)
        return outcome
    except BaseException as exc:  # (KeyboardInterrupt, SystemExit: not the task's failure)
        outcome = (False, TaskError("exception", invocation.fn.name, _exception_text(exc)))
        raise
    finally:
        with run.cond:
            run.close(invocation.task_id)
            if child is not None:
                child.outcome = outcome
                _linked_failure(child)


def _linked_failure(child: _Child) -> None:
    """A linked child that failed while its parent was not waiting on it fails
    the parent at once (kind ``child_failed``), as in the real run. Under the
    run's condition."""
    outcome = child.outcome
    if (
        not child.link
        or child.parent_scope is None
        or outcome is None
        or outcome[0]
        or child.temporary
        or child.waited_on
        or child.scope.cancelled is not None
        or child.parent_scope.failed is not None
    ):
        return
    error: TaskError = outcome[1]
    child.parent_scope.failed = (
        "child_failed",
        f"linked child {child.name!r} ({child.task_id}) failed ({error.kind}): {error.message}",
    )


def _attempts(
    invocation: _Invocation, call_json: str, above: _Scope | None, spawned: bool
) -> tuple[bool, Any]:
    policy = invocation.policy
    number = 0
    while True:
        number += 1
        scope = _Scope(above, policy.timeout_s)
        stop = scope.stop()  # (its caller stopped meanwhile: no attempt at all)
        if stop is None:
            ok, value = _attempt(invocation, number, scope, call_json)
        else:
            ok, value = False, TaskError(stop[0], invocation.fn.name, stop[1])
        if ok:
            return True, value
        error: TaskError = value
        error.attempts = number
        if error.kind in _NOT_RETRIED or not error.retryable or number >= policy.max_attempts:
            return False, error


def _attempt(
    invocation: _Invocation, number: int, scope: _Scope, call_json: str
) -> tuple[bool, Any]:
    """One attempt: (True, the result through JSON) or (False, TaskError)."""
    fn, name = invocation.fn, invocation.fn.name
    info = _task.TaskInfo(invocation.task_id, name, number, invocation.policy.max_attempts)
    attempt = _Attempt(invocation, info, scope)
    call = json.loads(call_json)  # (each attempt gets its own copy, as in the real run)
    token = _current.set(attempt)
    try:
        value, failure, stopped = _run_function(fn, name, call)
    finally:
        try:
            unwaited = _end_children(attempt)
        finally:
            _current.reset(token)
    stop = scope.stop() or (None if stopped is None else (stopped.kind, stopped.message))
    if stop is not None:
        return False, TaskError(stop[0], name, stop[1])
    if failure is not None:
        return False, failure
    if unwaited is not None:
        return False, unwaited
    return True, value


def _run_function(
    fn: _task.TaskFunction[Any, Any], name: str, call: dict[str, Any]
) -> tuple[Any, TaskError | None, TaskStopped | None]:
    """Call the task's function: (its result through JSON, its failure, what
    stopped it)."""
    try:
        result = fn.func(*call["args"], **call["kwargs"])
        if inspect.iscoroutine(result):  # an async def task: run on its own loop
            result = asyncio.run(result)
    except TaskStopped as exc:
        return None, None, exc
    except TypeError as exc:
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
            # Raised by the call itself: the arguments do not fit the signature.
            message = f"task {name!r} cannot take these arguments: {exc}"
            return None, _failed("bad_arguments", name, exc, message), None
        return None, _failure(name, exc, fn.retries(exc)), None
    except Exception as exc:
        return None, _failure(name, exc, fn.retries(exc)), None
    try:
        return json.loads(_strict_json(result)), None, None
    except (TypeError, ValueError) as exc:
        message = (
            f"task {name!r} returned a value that is not JSON-serializable "
            f"({type(result).__name__}): {exc}"
        )
        return None, _failed("exception", name, exc, message, retryable=False), None


def _end_children(attempt: _Attempt) -> TaskError | None:
    """Structured concurrency: the attempt's children still running are
    cancelled, and all of them joined. Returns the child_failed error if a child
    failed and the attempt never waited on it."""
    children = list(attempt.children.values())
    try:
        _cancel(attempt.run, children, "cancelled: its parent ended")
    finally:
        for child in children:
            _join(child)
    attempt.children.clear()
    for child in children:
        assert child.outcome is not None
        ok, error = child.outcome
        if not ok and not child.temporary and child.scope.cancelled is None:
            return TaskError(
                "child_failed",
                attempt.info.name,
                f"child {child.name!r} ({child.task_id}) failed ({error.kind}) and was never "
                f"waited on: {error.message}",
                traceback=error.traceback,
                retryable=error.retryable,
            )
    return None


def _cancel(run: _Run, children: Iterable[_Child], message: str) -> None:
    with run.cond:
        for child in children:
            if child.outcome is None and child.scope.cancelled is None:
                child.scope.cancelled = message
        run.cond.notify_all()


def _join(child: _Child) -> None:
    if child.thread is not None:
        child.thread.join()


def _wait_for_children(
    attempt: _Attempt,
    children: list[_Child],
    timeout: float | None,
    until: Callable[[Iterable[bool]], bool],
) -> bool:
    """Wait until ``until`` holds of which children ended (``all``, ``any``), or
    ``timeout`` seconds (False)."""
    return attempt.run.block(
        attempt.scope, lambda: until(child.outcome is not None for child in children), timeout
    )


# -- messages -----------------------------------------------------------------------


def _deliver(
    attempt: _Attempt, target: str, body_json: str, timeout: float | None, expects_reply: bool
) -> str:
    """Put a message in the target's mailbox (waiting while it is full); its id."""
    run = attempt.run
    message_id = attempt.invocation.next_message_id()  # numbered first, as the host does
    with run.cond:
        target_id = run.resolve(target)

        def room() -> bool:
            mailbox = run.mailboxes.get(target_id)
            if mailbox is None:
                raise MessageError("no_such_actor", f"task {target_id} has ended")
            return len(mailbox) < MAILBOX_CAPACITY

        if not run.block(attempt.scope, room, timeout):
            raise SendTimeout(
                f"the mailbox of {target!r} stayed full ({MAILBOX_CAPACITY} messages) "
                f"for {timeout:g}s"
            )
        sender = attempt.invocation.task_id
        run.mailboxes[target_id].append(_Envelope(message_id, sender, body_json, expects_reply))
        if expects_reply:
            run.replies[message_id] = _ReplySlot(target_id)
        run.cond.notify_all()
    return message_id


def _body_json(target: str, body: Any) -> str:
    try:
        return _strict_json(body)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message for {target!r} is not JSON-serializable: {exc}") from None


# -- helpers --------------------------------------------------------------------------


def _require(what: str) -> _Attempt:
    attempt = _current.get()
    if attempt is None:
        raise RuntimeError(
            f"{what} was called outside a running task: in local mode (outside "
            f"`capsule run`) spawned children and messages belong to a task; call a "
            f"task that does this (in a test, a small @task that spawns, sends or "
            f"receives and returns what it saw)"
        )
    return attempt


def _strict_json(value: Any) -> str:
    """``value`` as the strict JSON the host takes: no NaN or Infinity, and no
    string with a lone surrogate (which UTF-8 cannot carry)."""
    text = json.dumps(value, allow_nan=False)
    if "\\ud" in text or "\\uD" in text:  # (rare: only then look closer)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    return text


def _check_timeout(seconds: float | None) -> None:
    if seconds is not None and seconds < 0:
        raise ValueError(f"a timeout must be >= 0 seconds, not {seconds!r}")


def _exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failure(name: str, exc: Exception, retryable: bool) -> TaskError:
    """The TaskError of a task whose code raised ``exc``, as the guest reports it
    (``retryable``: as the task's retry rules say of it)."""
    if isinstance(exc, TaskError):
        message, cause = unhandled(exc)
        return _failed("exception", name, exc, message, cause, retryable)
    return _failed("exception", name, exc, _exception_text(exc), retryable=retryable)


def _failed(
    kind: str,
    name: str,
    exc: BaseException,
    message: str,
    cause: dict[str, Any] | None = None,
    retryable: bool = True,
) -> TaskError:
    error = TaskError(kind, name, message, _traceback_text(exc), cause=cause, retryable=retryable)
    error.__cause__ = exc  # (shown by pytest: the task's own traceback)
    return error


def _traceback_text(exc: BaseException) -> str:
    """The traceback from the task's code down, without this module's frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb, chain=False))


#: The backend of every task called outside ``capsule run``.
LOCAL = LocalBackend()
