"""The Runtime for code that is not async (scripts, notebooks, threads of a
sync framework): the same methods, blocking, on an event loop that runs on a
thread the SyncRuntime owns."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from capsule.host.requests import JournalSetting
from capsule.host.runtime import DEFAULT_EVENT_BUFFER, RunDetails, Runtime

T = TypeVar("T")

if TYPE_CHECKING:
    from capsule.host.code import CodeGrants, CodeLimits
    from capsule.host.handle import RunHandle
    from capsule.host.live import LiveTask
    from capsule.host.result import RunResult
    from capsule.journal.reader import RunRecord
    from capsule.supervisor.options import RunOptions


class SyncRunHandle:
    """A :class:`RunHandle` for sync code: the same methods, blocking."""

    def __init__(self, handle: RunHandle, portal: BlockingPortal) -> None:
        self._handle = handle
        self._portal = portal
        self.run_id = handle.run_id

    @property
    def done(self) -> bool:
        return self._handle.done

    @property
    def events_dropped(self) -> int:
        return self._handle.events_dropped

    def events(self) -> Iterator[Any]:
        stream = aiter(self._handle.events())
        try:
            while True:
                try:
                    yield self._portal.call(stream.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                self._portal.call(close)

    def result(self) -> RunResult:
        if self._handle.done:  # (its SyncRuntime may be closed: it needs no loop)
            return self._handle.ended_result()
        return self._call(self._handle.result)

    def cancel(self, task_id: str | None = None) -> bool:
        return self._call(self._handle.cancel, task_id)

    def live_tasks(self) -> list[LiveTask]:
        return self._handle.live_tasks()  # (thread-safe: no call into the loop)

    def interrupt(self) -> None:
        self._handle.interrupt()  # (thread-safe: no call into the loop)

    def send(self, name: str, message: Any) -> str:
        message_id: str = self._call(self._handle.send, name, message)
        return message_id

    def ask(self, name: str, message: Any, timeout: float = 60.0) -> Any:
        return self._call(self._handle.ask, name, message, timeout)

    def _call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return self._portal.call(function, *args)
        except RuntimeError as exc:
            if "portal is not running" not in str(exc):
                raise
            raise RuntimeError(
                f"run {self.run_id}'s SyncRuntime is closed; only its result() is left"
            ) from None


class SyncRuntime:
    """A :class:`Runtime` for sync code; use it as a context manager (``with
    SyncRuntime() as rt``). Leaving it cancels the runs still running."""

    def __init__(
        self,
        journal: JournalSetting = None,
        *,
        event_buffer: int = DEFAULT_EVENT_BUFFER,
        prepare: bool = True,
    ) -> None:
        self._runtime = Runtime(journal, event_buffer=event_buffer, prepare=prepare)
        self.journal = self._runtime.journal
        self._portal_context: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._entered: AbstractContextManager[Runtime] | None = None

    def __enter__(self) -> SyncRuntime:
        if self._portal_context is not None:
            raise RuntimeError("this SyncRuntime is already open")
        context = start_blocking_portal()
        portal = context.__enter__()
        try:
            entered = portal.wrap_async_context_manager(self._runtime)
            entered.__enter__()
        except BaseException as exc:
            context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal_context, self._portal, self._entered = context, portal, entered
        return self

    def __exit__(self, *exc_info: Any) -> None:
        context, entered = self._portal_context, self._entered
        self._portal_context = self._portal = self._entered = None
        assert context is not None and entered is not None
        try:
            entered.__exit__(*exc_info)
        finally:
            context.__exit__(None, None, None)

    def _open(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeError("use the SyncRuntime inside `with SyncRuntime() as rt:`")
        return self._portal

    def run(
        self,
        program: str | os.PathLike[str],
        *args: Any,
        entry: str = "main",
        options: RunOptions | None = None,
        run_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> RunResult:
        return self.start(
            program, *args, entry=entry, options=options, run_id=run_id, kwargs=kwargs
        ).result()

    def start(
        self,
        program: str | os.PathLike[str],
        *args: Any,
        entry: str = "main",
        options: RunOptions | None = None,
        run_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        event_types: Collection[str] | None = None,
    ) -> SyncRunHandle:
        portal = self._open()

        async def start() -> RunHandle:
            return await self._runtime.start(
                program,
                *args,
                entry=entry,
                options=options,
                run_id=run_id,
                kwargs=kwargs,
                event_types=event_types,
            )

        return SyncRunHandle(portal.call(start), portal)

    def resume(
        self, run_id: str, *, force: bool = False, options: RunOptions | None = None
    ) -> RunResult:
        return self.start_resume(run_id, force=force, options=options).result()

    def start_resume(
        self,
        run_id: str,
        *,
        force: bool = False,
        options: RunOptions | None = None,
        event_types: Collection[str] | None = None,
    ) -> SyncRunHandle:
        portal = self._open()

        async def start_resume() -> RunHandle:
            return await self._runtime.start_resume(
                run_id, force=force, options=options, event_types=event_types
            )

        return SyncRunHandle(portal.call(start_resume), portal)

    def submit(
        self,
        program: str | os.PathLike[str],
        *args: Any,
        entry: str = "main",
        options: RunOptions | None = None,
        run_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        portal = self._open()

        async def submit() -> str:
            return await self._runtime.submit(
                program, *args, entry=entry, options=options, run_id=run_id, kwargs=kwargs
            )

        return portal.call(submit)

    def run_code(
        self,
        source: str,
        *args: Any,
        limits: CodeLimits | None = None,
        grants: CodeGrants | None = None,
        run_id: str | None = None,
    ) -> RunResult:
        return self.start_code(source, *args, limits=limits, grants=grants, run_id=run_id).result()

    def start_code(
        self,
        source: str,
        *args: Any,
        limits: CodeLimits | None = None,
        grants: CodeGrants | None = None,
        run_id: str | None = None,
    ) -> SyncRunHandle:
        portal = self._open()

        async def start_code() -> RunHandle:
            return await self._runtime.start_code(
                source, *args, limits=limits, grants=grants, run_id=run_id
            )

        return SyncRunHandle(portal.call(start_code), portal)

    def handle(self, run_id: str) -> SyncRunHandle | None:
        portal = self._open()
        handle = self._runtime.handle(run_id)
        return None if handle is None else SyncRunHandle(handle, portal)

    def runs(self) -> list[RunRecord]:
        return self._open().call(self._runtime.runs)

    def find(self, run_id: str | None = None) -> RunRecord:
        return self._open().call(self._runtime.find, run_id)

    def inspect(self, run_id: str) -> RunDetails:
        return self._open().call(self._runtime.inspect, run_id)
