"""The ``@task`` decorator and the running task's identity.

A decorated function becomes a :class:`TaskFunction`. What calling it does depends
on where it runs:

- inside the sandbox, the guest runtime has installed a :class:`Backend`, and the
  call asks the host to run the task as a child in a fresh instance;
- in plain Python (no backend), the call runs the function directly, so tasks can
  be unit-tested with pytest.

The options given to ``@task`` are recorded as declared, unvalidated: the host
validates them (with pydantic, which cannot run in the sandbox) when it loads the
program, and that validated copy is the only one limits are taken from.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import types
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

from capsule.sdk.errors import TaskError

P = ParamSpec("P")
R = TypeVar("R")


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
        awaited: bool,
    ) -> str:
        """Start a child concurrently; returns its task id. ``awaited``: the
        caller will wait for it, so its failure is reported there."""
        ...

    def wait(self, task_ids: list[str], timeout: float | None) -> list[tuple[bool, Any]]:
        """Wait for children to end: per id, (True, value) or (False, TaskError).
        Raises TimeoutError if they have not all ended in time."""
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
_local_current: contextvars.ContextVar[TaskInfo | None] = contextvars.ContextVar(
    "capsule_local_current", default=None
)

#: Every task declared in this interpreter, by name.
registry: dict[str, TaskFunction[Any, Any]] = {}


def install_backend(backend: Backend | None) -> None:
    """Route task calls through ``backend`` (``None`` restores local mode)."""
    global _backend
    _backend = backend


class TaskDefinitionError(ValueError):
    """A ``@task`` declaration that can never work (for example a duplicate name)."""


class TaskFunction(Generic[P, R]):
    """A function declared as a Capsule task."""

    def __init__(self, func: Callable[P, R], options: dict[str, Any]) -> None:
        self.func = func
        self.options = options
        name = options.get("name")
        self.name: str = name if isinstance(name, str) and name else func.__name__
        functools.update_wrapper(self, func)

    @property
    def qualified_name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.is_async and _loop_running():
            # From async code, an async task is awaited, as its function would
            # be: under ``capsule run`` it runs as a child meanwhile.
            awaited: R = self._call_async(args, kwargs)  # type: ignore[assignment]
            return awaited
        backend = _backend
        if backend is not None:
            result: R = backend.call_task(self.name, tuple(args), dict(kwargs))
            return result
        return self._call_local(*args, **kwargs)

    @functools.cached_property
    def is_async(self) -> bool:
        """Whether the task's function is an ``async def``."""
        import inspect  # (here: it would double the time ``import capsule`` takes)

        return inspect.iscoroutinefunction(self.func)

    async def _call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _backend is None:
            parent = _local_current.get()
            ident = f"{parent.id}/{self.name}" if parent else self.name
            info = TaskInfo(id=ident, name=self.name, attempt=1, max_attempts=1)
            token = _local_current.set(info)
            try:
                return await self.func(*args, **kwargs)  # type: ignore[misc]
            finally:
                _local_current.reset(token)
        return await self._spawn(args, kwargs, None, awaited=True).result_async()

    def spawn(self, *args: Any, name: str | None = None, **kwargs: Any) -> TaskHandle[R]:
        """Start this task as a concurrent child and return its handle at once.

        ``name`` registers the child under that name for the run, for
        ``capsule.send`` and ``capsule.ask``; every other keyword goes to the task.
        A child that fails while nobody waits on it fails its parent too
        (kind ``child_failed``); waiting on it (``result``, ``gather``) gets
        its TaskError instead.
        """
        return self._spawn(args, kwargs, name, awaited=False)

    def map(self, items: Iterable[Any]) -> list[R]:
        """Run one child per item, concurrently; the results in input order."""
        handles = [self._spawn((item,), {}, None, awaited=True) for item in items]
        return gather(*handles)

    def _spawn(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None, awaited: bool
    ) -> TaskHandle[R]:
        backend = _backend
        if backend is None:
            return TaskHandle._local(self, args, kwargs)
        task_id = backend.spawn_task(self.name, tuple(args), dict(kwargs), name, awaited)
        return TaskHandle(task_id, self.name)

    def _call_local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        parent = _local_current.get()
        ident = f"{parent.id}/{self.name}" if parent else self.name
        token = _local_current.set(TaskInfo(id=ident, name=self.name, attempt=1, max_attempts=1))
        try:
            result = self.func(*args, **kwargs)
            if isinstance(result, types.CoroutineType):  # an async def task, from sync code
                import asyncio

                result = asyncio.run(result)
            return result
        finally:
            _local_current.reset(token)

    def __repr__(self) -> str:
        return f"<capsule task {self.name!r} ({self.qualified_name})>"


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
) -> TaskFunction[P, R] | Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Declare a function as a Capsule task: ``@task`` or ``@task(name=..., ...)``.

    - ``name``: task identifier, defaults to the function name.
    - ``compute``: ``"LOW"``, ``"MEDIUM"``, ``"HIGH"`` or an integer amount of fuel.
    - ``ram``: memory cap such as ``"64MB"``, ``"2GB"`` or a number of bytes.
    - ``timeout``: wall-clock limit such as ``"500ms"``, ``"30s"``, ``"5m"`` or seconds.
    - ``max_retries``: attempts after the first failure (default 1).

    As a spawned child (supervised by the task that spawned it):

    - ``restart``: ``"transient"`` (default: restart after a failure, up to
      ``max_retries``), ``"permanent"`` (also after a normal return) or
      ``"temporary"`` (never; its failure does not fail the parent).

    As a parent of spawned children:

    - ``strategy``: ``"one_for_one"`` (default: restart only the child that
      failed), ``"one_for_all"`` (restart them all) or ``"rest_for_one"`` (restart
      it and those spawned after it).
    - ``max_restarts`` within ``restart_window``: more restarts than that fail
      this task (default 3 in 5 s), and its own supervisor takes over.

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

    def decorate(fn: Callable[P, R]) -> TaskFunction[P, R]:
        if not callable(fn):
            raise TaskDefinitionError(f"@task must decorate a function, not {fn!r}")
        wrapped = TaskFunction(fn, declared)
        _register(wrapped)
        return wrapped

    if func is not None:
        return decorate(func)
    return decorate


class TaskHandle(Generic[R]):
    """A child task started with ``spawn``: wait for it, or cancel it."""

    def __init__(self, task_id: str, name: str) -> None:
        self.id = task_id
        self.name = name
        #: The child's outcome, once known: (True, value) or (False, TaskError).
        self._local_outcome: tuple[bool, Any] | None = None

    @classmethod
    def _local(
        cls, fn: TaskFunction[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskHandle[R]:
        # Local mode runs the child to the end right away, in plain Python.
        handle: TaskHandle[R] = cls(f"local/{fn.name}", fn.name)
        try:
            handle._local_outcome = (True, fn._call_local(*args, **kwargs))
        except Exception as exc:
            handle._local_outcome = (
                False,
                TaskError("exception", fn.name, f"{type(exc).__name__}: {exc}"),
            )
        return handle

    def result(self, timeout: float | None = None) -> R:
        """The child's value once it ends; raises TaskError if it failed, or
        TimeoutError if it has not ended within ``timeout`` seconds."""
        ((ok, value),) = _wait([self], timeout)
        if not ok:
            raise value
        result: R = value
        return result

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
        backend = _backend
        if backend is not None:
            backend.cancel(self.id)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id} ({self.name})>"


def _wait(handles: Sequence[TaskHandle[Any]], timeout: float | None) -> list[tuple[bool, Any]]:
    backend = _backend
    if backend is None:
        return [
            h._local_outcome or (False, TaskError("cancelled", h.name, "not run")) for h in handles
        ]
    # A handle keeps its child's outcome once collected: the host forgets a child
    # it has reported, so that a long-lived task spawning many does not grow.
    pending = list({h.id: h for h in handles if h._local_outcome is None}.values())
    if pending:
        for handle, outcome in zip(
            pending, backend.wait([h.id for h in pending], timeout), strict=True
        ):
            handle._local_outcome = outcome
    return [h._local_outcome for h in handles]  # type: ignore[misc]


async def _wait_async(
    handles: Sequence[TaskHandle[Any]], timeout: float | None
) -> list[tuple[bool, Any]]:
    backend = _backend
    pending = list({h.id: h for h in handles if h._local_outcome is None}.values())
    if backend is None or not pending:
        return _wait(handles, timeout)
    waiting = backend.wait_async([h.id for h in pending])
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


def _loop_running() -> bool:
    """Whether this code runs in an asyncio event loop (without importing
    asyncio, which ``import capsule`` must not)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and asyncio.events._get_running_loop() is not None


def sleep(seconds: float) -> None:
    """Sleep on the host: the task's CPU slot is free meanwhile."""
    backend = _backend
    if backend is None:
        import time

        time.sleep(seconds)
    else:
        backend.sleep(seconds)


def current() -> TaskInfo:
    """The task this code runs in: its id, name and attempt number."""
    backend = _backend
    info = backend.current() if backend is not None else _local_current.get()
    if info is None:
        raise RuntimeError("capsule.current() was called outside a running task")
    return info
