"""The ``@task`` decorator and the running task's identity.

A decorated function becomes a :class:`TaskFunction`. What calling it does depends
on where it runs:

- inside the sandbox, the guest runtime has installed a :class:`Backend`, and the
  call asks the host to run the task as a child in a fresh instance;
- in plain Python (no backend installed), local mode's backend runs it in-process
  with the same control flow (capsule.sdk.local), so tasks can be unit-tested
  with pytest.

The options given to ``@task`` are recorded as declared, unvalidated: the host
validates them (with pydantic, which cannot run in the sandbox) when it loads the
program, and that validated copy is the only one limits are taken from.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, ParamSpec, Protocol, TypeVar, overload

from capsule.sdk.errors import NonRetryable, TaskError

P = ParamSpec("P")
R = TypeVar("R")

#: Exception classes as ``retry_on`` and ``no_retry_on`` take them: one, or a
#: tuple (or list) of them, as ``except`` does.
ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...] | list[type[BaseException]]


@dataclass(frozen=True)
class TaskInfo:
    """Who is running: returned by :func:`current`."""

    id: str
    name: str
    attempt: int
    max_attempts: int


class Backend(Protocol):
    """How task calls leave the running code; installed by the guest runtime."""

    def call_task(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...

    def spawn_task(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        actor_name: str | None,
        link: bool,
    ) -> str:
        """Start a child concurrently; returns its task id. Its outcome is
        kept for the caller until a ``wait`` returns it. ``link``: its failure
        fails the caller at once instead (kind ``child_failed``), unless the
        caller is waiting on it then."""
        ...

    def wait(
        self, task_ids: list[str], timeout: float | None, any_ended: bool = False
    ) -> list[tuple[bool, Any] | None]:
        """Wait for children to end: per id, (True, value), (False, TaskError),
        or None for one that has not ended. Each outcome is returned once.

        - ``any_ended=False``: until all have ended (no None); raises
          TimeoutError, returning no outcome, if they have not all ended in time.
        - ``any_ended=True``: until at least one has ended, or ``timeout``
          (then all may be None; no error)."""
        ...

    def cancel(self, task_id: str) -> None: ...

    def sleep(self, seconds: float) -> None: ...

    def send(self, target: str, body: Any, timeout: float | None) -> None: ...

    def receive(self, timeout: float | None) -> tuple[str, str, Any, bool]:
        """The next message: (id, sender, body, expects_reply)."""
        ...

    def ask(self, target: str, body: Any, timeout: float | None) -> Any: ...

    def reply(self, message_id: str, body: Any) -> None: ...

    def http(self, request: dict[str, Any]) -> dict[str, Any]:
        """Perform an HTTP request (see capsule.sdk.http): the response as a dict,
        or raises HttpError."""
        ...

    def http_async(self, request: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """Start an HTTP request without waiting for it, on the running event
        loop: awaiting the result gives what ``http`` returns (or raises)."""
        ...

    def wait_async(self, task_ids: list[str]) -> Awaitable[list[tuple[bool, Any]]]:
        """``wait`` without a timeout, without blocking the running event loop."""
        ...

    def receive_async(self, timeout: float | None) -> Awaitable[tuple[str, str, Any, bool]]:
        """``receive``, without blocking the running event loop."""
        ...

    def ask_async(self, target: str, body: Any, timeout: float | None) -> Awaitable[Any]:
        """``ask``, without blocking the running event loop while it waits for
        the reply."""
        ...

    def current(self) -> TaskInfo | None: ...


_backend: Backend | None = None

#: Every task declared in this interpreter, by name.
registry: dict[str, TaskFunction[Any, Any]] = {}


def install_backend(backend: Backend | None) -> None:
    """Route task calls through ``backend`` (``None`` restores local mode)."""
    global _backend
    _backend = backend


def active_backend() -> Backend:
    """The installed backend, or else local mode's."""
    backend = _backend
    if backend is None:
        from capsule.sdk.local import LOCAL  # (never loaded in the sandbox)

        backend = LOCAL
    return backend


class TaskDefinitionError(ValueError):
    """A ``@task`` declaration that can never work (for example a duplicate name)."""


class TaskFunction(Generic[P, R]):
    """A function declared as a Capsule task."""

    def __init__(
        self,
        func: Callable[P, R],
        options: dict[str, Any],
        retry_on: tuple[type[BaseException], ...] = (),
        no_retry_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.func = func
        self.options = options
        name = options.get("name")
        self.name: str = name if isinstance(name, str) and name else func.__name__
        #: The classes themselves (the options hold their names, for the host).
        self.retry_on = retry_on
        self.no_retry_on = no_retry_on
        functools.update_wrapper(self, func)

    def retries(self, exc: BaseException) -> bool:
        """Whether a failure of this task with ``exc`` may be retried: not a
        NonRetryable, nor one of ``no_retry_on``; one of ``retry_on`` if given."""
        if not _retryable_itself(exc):
            return False
        if self.no_retry_on and isinstance(exc, self.no_retry_on):
            return False
        return not self.retry_on or isinstance(exc, self.retry_on)

    @property
    def qualified_name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.is_async and _loop_running():
            # From async code, an async task is awaited, as its function would
            # be: under ``capsule run`` it runs as a child meanwhile.
            awaited: R = self._call_async(args, kwargs)  # type: ignore[assignment]
            return awaited
        result: R = active_backend().call_task(self.name, tuple(args), dict(kwargs))
        return result

    @functools.cached_property
    def is_async(self) -> bool:
        """Whether the task's function is an ``async def``."""
        import inspect  # (here: it would double the time ``import capsule`` takes)

        return inspect.iscoroutinefunction(self.func)

    async def _call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _backend is None:
            # Local mode: the call runs on a thread (in the calling task's
            # context), so that this event loop goes on meanwhile.
            import asyncio

            call = active_backend().call_task
            return await asyncio.to_thread(call, self.name, tuple(args), dict(kwargs))
        return await self._spawn(args, kwargs, None, link=False).result_async()

    def spawn(
        self, *args: Any, name: str | None = None, link: bool = False, **kwargs: Any
    ) -> TaskHandle[R]:
        """Start this task as a concurrent child and return its handle at once.

        ``name`` registers the child under that name for the run, for
        ``capsule.send`` and ``capsule.ask``; every other keyword goes to the task.
        The child's outcome belongs to the handle: ``result``, ``gather``,
        ``capsule.wait`` or ``as_completed`` deliver it whenever they are called
        (a failure as its TaskError). If the parent returns without ever
        collecting a failure, the parent fails (kind ``child_failed``), unless
        the child is ``temporary``. ``link=True``: the child's failure fails the
        parent at once instead (OTP's link), unless it is waiting on it then.
        """
        return self._spawn(args, kwargs, name, link=bool(link))

    def map(self, items: Iterable[Any], return_exceptions: bool = False) -> list[R]:
        """Run one child per item, concurrently; the results in input order.
        A failed child raises its TaskError once all have ended, or with
        ``return_exceptions=True`` stands in the list in its place."""
        handles = [self._spawn((item,), {}, None, link=False) for item in items]
        return gather(*handles, return_exceptions=return_exceptions)

    def _spawn(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None, link: bool
    ) -> TaskHandle[R]:
        task_id = active_backend().spawn_task(self.name, tuple(args), dict(kwargs), name, link)
        return TaskHandle(task_id, self.name)

    def __repr__(self) -> str:
        return f"<capsule task {self.name!r} ({self.qualified_name})>"


def _retryable_itself(exc: BaseException) -> bool:
    if isinstance(exc, NonRetryable):
        return False
    return not isinstance(exc, TaskError) or exc.retryable


def _exception_types(option: str, value: ExceptionTypes | None) -> tuple[type[BaseException], ...]:
    """``retry_on``/``no_retry_on`` as a tuple of exception classes, or
    TaskDefinitionError naming what is not one."""
    if value is None:
        return ()
    classes = tuple(value) if isinstance(value, tuple | list) else (value,)
    for item in classes:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TaskDefinitionError(
                f"@task({option}=...) takes exception classes (ValueError, or a tuple of "
                f"them), not {item!r}"
            )
    return classes


def _qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(fn: TaskFunction[Any, Any]) -> None:
    existing = registry.get(fn.name)
    # Re-executing the same definition (a module reloaded in a test) is not a clash.
    if existing is not None and existing.qualified_name != fn.qualified_name:
        raise TaskDefinitionError(
            f"two tasks are named {fn.name!r}: {existing.qualified_name} and "
            f"{fn.qualified_name}; task names must be unique (set name=... on one of them)"
        )
    registry[fn.name] = fn


@overload
def task(func: Callable[P, R], /) -> TaskFunction[P, R]: ...


@overload
def task(
    func: None = None,
    /,
    *,
    name: str | None = None,
    compute: str | int | None = None,
    ram: str | int | None = None,
    timeout: str | int | float | None = None,
    max_retries: int | None = None,
    restart: str | None = None,
    strategy: str | None = None,
    max_restarts: int | None = None,
    restart_window: str | int | float | None = None,
    allowed_hosts: list[str] | None = None,
    env: list[str] | None = None,
    allowed_files: list[str] | None = None,
    retry_on: ExceptionTypes | None = None,
    no_retry_on: ExceptionTypes | None = None,
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...


def task(
    func: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    compute: str | int | None = None,
    ram: str | int | None = None,
    timeout: str | int | float | None = None,
    max_retries: int | None = None,
    restart: str | None = None,
    strategy: str | None = None,
    max_restarts: int | None = None,
    restart_window: str | int | float | None = None,
    allowed_hosts: list[str] | None = None,
    env: list[str] | None = None,
    allowed_files: list[str] | None = None,
    retry_on: ExceptionTypes | None = None,
    no_retry_on: ExceptionTypes | None = None,
) -> TaskFunction[P, R] | Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Declare a function as a Capsule task: ``@task`` or ``@task(name=..., ...)``.

    - ``name``: task identifier, defaults to the function name.
    - ``compute``: ``"LOW"``, ``"MEDIUM"``, ``"HIGH"`` or an integer amount of fuel.
    - ``ram``: memory cap such as ``"64MB"``, ``"2GB"`` or a number of bytes.
    - ``timeout``: wall-clock limit such as ``"500ms"``, ``"30s"``, ``"5m"`` or seconds.
    - ``max_retries``: attempts after the first failure (default 1).
    - ``retry_on``: exception classes (one, or a tuple) worth a retry; an
      exception of any other class fails the task at once. ``no_retry_on``:
      classes that fail it at once (it wins over ``retry_on``). A
      :class:`capsule.NonRetryable` is never retried.

    As a spawned child (supervised by the task that spawned it):

    - ``restart``: ``"transient"`` (default: retried after a failure, up to
      ``max_retries``), ``"permanent"`` (also restarted after a normal return)
      or ``"temporary"`` (retried, never restarted by its parent; its failure
      never fails the parent).

    As a parent of spawned children:

    - ``strategy``: ``"one_for_one"`` (default: restart only the child that
      failed), ``"one_for_all"`` (restart them all) or ``"rest_for_one"`` (restart
      it and those spawned after it).
    - ``max_restarts`` within ``restart_window``: more restarts of its children
      than that (permanent ones that returned, siblings restarted by the
      strategy; not a child's own retries) fail this task (default 3 in 5 s),
      and its own supervisor takes over.

    What it may reach (nothing by default; checked by the host, never inherited):

    - ``allowed_hosts``: hosts for ``capsule.http``: ``"api.example.com"``,
      ``"*.example.com"`` (subdomains), ``"*"``; optionally ``"https://host:port"``.
    - ``env``: names of host environment variables it can read (``os.environ``),
      from the environment of ``capsule run`` or ``.env`` beside the program.
    - ``allowed_files``: directories of the program it can read, as relative
      paths (``"data"``); ``"out:rw"`` can also be written.
    """
    given = {
        "name": name,
        "compute": compute,
        "ram": ram,
        "timeout": timeout,
        "max_retries": max_retries,
        "restart": restart,
        "strategy": strategy,
        "max_restarts": max_restarts,
        "restart_window": restart_window,
        "allowed_hosts": allowed_hosts,
        "env": env,
        "allowed_files": allowed_files,
    }
    declared = {key: value for key, value in given.items() if value is not None}
    retry_classes = _exception_types("retry_on", retry_on)
    no_retry_classes = _exception_types("no_retry_on", no_retry_on)
    # The host records them by name (it validates and shows them); the guest
    # decides with the classes, which know their subclasses.
    if retry_on is not None:
        declared["retry_on"] = [_qualified(cls) for cls in retry_classes]
    if no_retry_on is not None:
        declared["no_retry_on"] = [_qualified(cls) for cls in no_retry_classes]

    def decorate(fn: Callable[P, R]) -> TaskFunction[P, R]:
        if not callable(fn):
            raise TaskDefinitionError(f"@task must decorate a function, not {fn!r}")
        wrapped = TaskFunction(fn, declared, retry_classes, no_retry_classes)
        _register(wrapped)
        return wrapped

    if func is not None:
        return decorate(func)
    return decorate


def task_ref(name: str) -> TaskFunction[..., Any]:
    """A task another program of the run declares, by its name: a TypeScript
    or JavaScript task (or another Python file's) that the program's
    ``capsule.toml`` lists under ``[program] modules``. Call it, ``spawn`` it
    or ``map`` it as a task of this program: it runs in a sandbox of its own
    language, as a child of the caller."""
    if not isinstance(name, str) or not name:
        raise TaskDefinitionError(f"task_ref takes a task's name, not {name!r:.80}")

    def elsewhere(*args: Any, **kwargs: Any) -> Any:
        raise TaskDefinitionError(f"task {name!r} is another program's: it runs only as a task")

    elsewhere.__name__ = elsewhere.__qualname__ = name
    elsewhere.__module__ = "<another program>"
    return TaskFunction(elsewhere, {"name": name})


class TaskHandle(Generic[R]):
    """A child task started with ``spawn``: wait for it, or cancel it. The
    child's outcome belongs to its handle once the child ends, until (and
    after) a wait collects it."""

    def __init__(self, task_id: str, name: str) -> None:
        self.id = task_id
        self.name = name
        #: The child's outcome, once collected: (True, value) or (False, TaskError).
        self._local_outcome: tuple[bool, Any] | None = None

    def result(self, timeout: float | None = None) -> R:
        """The child's value once it ends; raises TaskError if it failed, or
        TimeoutError if it has not ended within ``timeout`` seconds."""
        ((ok, value),) = _wait([self], timeout)
        if not ok:
            raise value
        result: R = value
        return result

    def done(self) -> bool:
        """Whether the child has ended (without waiting): its outcome is then
        this handle's, and ``result()`` returns at once."""
        if self._local_outcome is None:
            _collect([self], 0, any_ended=True)
        return self._local_outcome is not None

    async def result_async(self, timeout: float | None = None) -> R:
        """``result`` for async code: the task's other coroutines run while it
        waits (``await handle`` is the same, without a timeout)."""
        ((ok, value),) = await _wait_async([self], timeout)
        if not ok:
            raise value
        result: R = value
        return result

    def __await__(self) -> Generator[Any, None, R]:
        return self.result_async().__await__()

    def cancel(self) -> None:
        """Cancel the child (and its own children); waiting on it then raises
        TaskError with kind ``cancelled``."""
        active_backend().cancel(self.id)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id} ({self.name})>"


def _collect(handles: Iterable[TaskHandle[Any]], timeout: float | None, any_ended: bool) -> None:
    """Ask the host for the outcomes of those of ``handles`` that have none
    yet (see Backend.wait); each handle keeps its own. The host forgets a child
    once it has delivered its outcome, so a long-lived task spawning many does
    not grow."""
    pending = list({h.id: h for h in handles if h._local_outcome is None}.values())
    if not pending:
        return
    outcomes = active_backend().wait([h.id for h in pending], timeout, any_ended)
    for handle, outcome in zip(pending, outcomes, strict=True):
        if outcome is not None:
            handle._local_outcome = outcome


def _wait(handles: Sequence[TaskHandle[Any]], timeout: float | None) -> list[tuple[bool, Any]]:
    _collect(handles, timeout, any_ended=False)
    return [h._local_outcome for h in handles]  # type: ignore[misc]


async def _wait_async(
    handles: Sequence[TaskHandle[Any]], timeout: float | None
) -> list[tuple[bool, Any]]:
    pending = list({h.id: h for h in handles if h._local_outcome is None}.values())
    if not pending:
        return [h._local_outcome for h in handles]  # type: ignore[misc]
    waiting = active_backend().wait_async([h.id for h in pending])
    if timeout is None:
        outcomes = await waiting
    else:
        import asyncio

        try:
            outcomes = await asyncio.wait_for(waiting, timeout)
        except TimeoutError:
            ids = [h.id for h in pending]
            raise TimeoutError(f"children {ids} had not ended after {timeout:g}s") from None
    for handle, outcome in zip(pending, outcomes, strict=True):
        handle._local_outcome = outcome
    return [h._local_outcome for h in handles]  # type: ignore[misc]


def gather(*handles: TaskHandle[Any], return_exceptions: bool = False) -> list[Any]:
    """Wait for every handle; their values in order. A failed child raises its
    TaskError, or with ``return_exceptions=True`` stands in the list in its place."""
    outcomes = _wait(handles, None)
    if not return_exceptions:
        for ok, value in outcomes:
            if not ok:
                raise value
    return [value for _, value in outcomes]


#: When ``wait`` returns (as in concurrent.futures).
FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"
_RETURN_WHEN = (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED)


class DoneAndPending(NamedTuple):
    """What ``wait`` returns: the handles whose children ended, and the others."""

    done: set[TaskHandle[Any]]
    pending: set[TaskHandle[Any]]


def wait(
    handles: Iterable[TaskHandle[Any]],
    return_when: str = ALL_COMPLETED,
    timeout: float | None = None,
) -> DoneAndPending:
    """Wait for children, as ``concurrent.futures.wait`` does for futures:
    until one has ended (``FIRST_COMPLETED``), one has failed or all have ended
    (``FIRST_EXCEPTION``), or all have ended (``ALL_COMPLETED``, the default),
    or ``timeout`` seconds have passed. Returns ``(done, pending)``, two sets
    of handles; no failure is raised: each done handle's ``result()`` returns
    its value or raises its TaskError, at once."""
    if return_when not in _RETURN_WHEN:
        raise ValueError(
            f"return_when must be capsule.FIRST_COMPLETED, FIRST_EXCEPTION or "
            f"ALL_COMPLETED, not {return_when!r}"
        )
    chosen = _handles(handles, "wait")
    deadline = _deadline(timeout)
    if return_when == ALL_COMPLETED:
        try:
            _collect(chosen, timeout, any_ended=False)
        except TimeoutError:
            _collect(chosen, 0, any_ended=True)  # (those that have ended meanwhile)
    else:
        while not _wait_is_over(chosen, return_when):
            left = _left(deadline)
            _collect(chosen, left, any_ended=True)
            if left is not None and _left(deadline) == 0:
                break
    done = {h for h in chosen if h._local_outcome is not None}
    return DoneAndPending(done, set(chosen) - done)


def as_completed(
    handles: Iterable[TaskHandle[Any]], timeout: float | None = None
) -> Iterator[TaskHandle[Any]]:
    """The handles, each as its child ends (those ended already first), as
    ``concurrent.futures.as_completed`` yields futures; its ``result()``
    returns at once. Raises TimeoutError if ``timeout`` seconds (from this
    call) pass before all have ended."""
    chosen = _handles(handles, "as_completed")
    deadline = _deadline(timeout)
    return _completed(chosen, deadline, timeout)


def _completed(
    chosen: list[TaskHandle[Any]], deadline: float | None, timeout: float | None
) -> Iterator[TaskHandle[Any]]:
    pending = list(chosen)
    while pending:
        ended = [h for h in pending if h._local_outcome is not None]
        if not ended:
            left = _left(deadline)
            _collect(pending, left, any_ended=True)
            ended = [h for h in pending if h._local_outcome is not None]
            if not ended:
                if left is not None and _left(deadline) == 0:
                    raise TimeoutError(
                        f"{len(pending)} of {len(chosen)} children had not ended after {timeout:g}s"
                    )
                continue
        for handle in ended:
            pending.remove(handle)
            yield handle


def _handles(handles: Iterable[TaskHandle[Any]], caller: str) -> list[TaskHandle[Any]]:
    """``handles``, each once, in order; TypeError if one is not a TaskHandle."""
    chosen = list(dict.fromkeys(handles))
    for handle in chosen:
        if not isinstance(handle, TaskHandle):
            raise TypeError(
                f"capsule.{caller} takes TaskHandles (from some_task.spawn()), "
                f"not {type(handle).__name__}"
            )
    return chosen


def _wait_is_over(handles: list[TaskHandle[Any]], return_when: str) -> bool:
    outcomes = [h._local_outcome for h in handles]
    if all(outcome is not None for outcome in outcomes):
        return True
    if return_when == FIRST_COMPLETED:
        return any(outcome is not None for outcome in outcomes)
    return any(outcome is not None and not outcome[0] for outcome in outcomes)


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"a timeout must be >= 0 seconds, not {timeout!r}")
    return time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    """Seconds to ``deadline`` (never below 0), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _loop_running() -> bool:
    """Whether this code runs in an asyncio event loop (without importing
    asyncio, which ``import capsule`` must not)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and asyncio.events._get_running_loop() is not None


def sleep(seconds: float) -> None:
    """Sleep on the host: the task's CPU slot is free meanwhile."""
    active_backend().sleep(seconds)


def current() -> TaskInfo:
    """The task this code runs in: its id, name and attempt number."""
    info = active_backend().current()
    if info is None:
        raise RuntimeError("capsule.current() was called outside a running task")
    return info
