"""The Runtime: what a host application holds to run Capsule programs. It owns
everything it starts (runs execute on worker threads it owns, inside an anyio
task group) and shares across them one engine and compiled guest runtime per
core and, for the async core, one event loop thread and warm sandbox
(capsule/supervisor/shared.py), stopped as it closes."""

from __future__ import annotations

import asyncio
import os
import traceback
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from capsule.host.errors import (
    InvalidRequest,
    JournalUnavailable,
    NotResumable,
    RunError,
    RunNotFound,
    RuntimeFailure,
)
from capsule.host.handle import CANCELLED_BY_HOST, RunHandle
from capsule.host.requests import (
    JournalSetting,
    arguments,
    checked_run_id,
    journal_path,
    program_path,
    run_options,
    run_request,
)
from capsule.host.result import RunFailure, RunResult, record_result, report_result
from capsule.supervisor.events import EVENT_TYPES, MESSAGE_EVENT_TYPES
from capsule.supervisor.options import RunOptions

if TYPE_CHECKING:
    from capsule.host.code import CodeGrants, CodeLimits, CodeRunner
    from capsule.journal.location import Journal
    from capsule.journal.reader import RunRecord, TaskRecord
    from capsule.journal.submissions import Claim
    from capsule.sandbox.guests import SharedGuests
    from capsule.supervisor.loop_thread import LoopThread
    from capsule.supervisor.program import RunReport, RunRequest
    from capsule.supervisor.shared import SharedRuns

#: The events a handle carries: all but one per message sent or received.
HANDLE_EVENT_TYPES = EVENT_TYPES - MESSAGE_EVENT_TYPES
#: Events a handle keeps for its consumers, by default.
DEFAULT_EVENT_BUFFER = 10_000
#: The most it may keep (a deque's length past sys.maxsize overflows when a
#: run starts; well before that, the buffer is memory the host holds).
MAX_EVENT_BUFFER = 10_000_000


@dataclass(frozen=True)
class RunDetails:
    """A run as the journal holds it, and its tasks."""

    run: RunRecord
    tasks: list[TaskRecord]


class Runtime:
    """Runs Capsule programs inside an async application. Use it as an async
    context manager (``async with Runtime() as rt``); leaving it cancels the
    runs still running (they end as interrupted, and stay resumable).

    ``journal``: the SQLite journal runs are recorded in (None: the file
    ``$CAPSULE_JOURNAL`` names, else ``.capsule/journal.db`` in the current
    directory; ``False``: none, and runs cannot be resumed or listed).
    ``event_buffer``: the events each run's handle keeps for its consumers.
    ``prepare``: build (or load) the guest runtime, and open the journal, as
    the Runtime opens, where their errors are raised (False: each run does so
    itself as it starts, where they end that run; for a Runtime that makes one
    run, as the ``capsule`` command does: a Ctrl-C while the runtime is built
    then interrupts the run, and nothing is made that the run does not use)."""

    def __init__(
        self,
        journal: JournalSetting = None,
        *,
        event_buffer: int = DEFAULT_EVENT_BUFFER,
        prepare: bool = True,
    ) -> None:
        self.journal = journal_path(journal)
        if not isinstance(prepare, bool):
            raise InvalidRequest(f"prepare {prepare!r:.80} is invalid; expected True or False")
        self._prepare = prepare
        if (
            isinstance(event_buffer, bool)
            or not isinstance(event_buffer, int)
            or not 1 <= event_buffer <= MAX_EVENT_BUFFER
        ):
            raise InvalidRequest(
                f"event_buffer {event_buffer!r:.80} is invalid; expected a whole number "
                f"from 1 to {MAX_EVENT_BUFFER:,}"
            )
        self._event_buffer = event_buffer
        self._task_group: TaskGroup | None = None
        #: The engine and compiled guest runtime of each core its runs (and
        #: run_code's runner) use, shared by them, each made on first use (the
        #: default core's as the Runtime opens, with ``prepare``).
        self._guests: SharedGuests | None = None
        #: What its runs share (the guests, with ``prepare``; the async core's
        #: event loop thread): stopped as it closes.
        self._shared: SharedRuns | None = None
        self._live: dict[str, RunHandle] = {}
        # Runs get threads of their own, not the application's (anyio's default
        # limiter, which its to_thread calls share).
        self._limiter = anyio.CapacityLimiter(float("inf"))
        self._code: CodeRunner | None = None
        self._code_lock = anyio.Lock()
        #: The loop thread its runs on the async core use, if it is given one
        #: (see _on_loop_thread); None: they start one of their own.
        self._runs_loop: LoopThread | None = None

    @classmethod
    def _on_loop_thread(cls, loop: LoopThread, journal: JournalSetting, prepare: bool) -> Runtime:
        """A Runtime to be entered on ``loop``, whose runs on the async core
        use that loop too rather than start a thread of their own: the
        ``capsule`` command's. An application's loop is not shared so (see
        docs/architecture.md, "the runs' loop"): the command's side of it
        only hands each event on to its output thread and never holds the
        loop up, so its runs' tasks do not wait behind it, nor it behind them."""
        runtime = cls(journal, prepare=prepare)
        runtime._runs_loop = loop
        return runtime

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        if self._task_group is not None:
            raise RuntimeError("this Runtime is already open")
        from capsule.sandbox.guests import SharedGuests
        from capsule.sandbox.runtime import RuntimeBuildError
        from capsule.supervisor.option_specs import DEFAULT_CORE
        from capsule.supervisor.shared import SharedRuns

        guests = SharedGuests()
        if self._prepare:
            if self.journal is not None:
                await anyio.to_thread.run_sync(_open_journal, self.journal)
            try:
                # (A run on the other core builds its guest as it starts: from
                # the compiled runtime cached now, without building it.)
                await anyio.to_thread.run_sync(guests.for_core, DEFAULT_CORE)
            except RuntimeBuildError as exc:
                raise RuntimeFailure(str(exc)) from None
        self._guests = guests
        self._shared = SharedRuns(guests if self._prepare else None, self._runs_loop)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        task_group = self._task_group
        assert task_group is not None
        task_group.cancel_scope.cancel()
        exc = exc_info[1]
        try:
            if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
                return await task_group.__aexit__(*exc_info)
            # The block's own error goes on as it is, not in an exception
            # group: the runs (which never raise) are only waited for.
            await task_group.__aexit__(None, None, None)
            return None
        finally:
            self._task_group = None
            shared, self._shared = self._shared, None
            with anyio.CancelScope(shield=True):
                if self._code is not None:
                    code, self._code = self._code, None
                    await anyio.to_thread.run_sync(code.close)
                if shared is not None:  # (its runs have ended: nothing of theirs is on it)
                    await anyio.to_thread.run_sync(shared.close)

    def _open(self) -> TaskGroup:
        if self._task_group is None:
            raise RuntimeError("use the Runtime inside `async with Runtime() as rt:`")
        return self._task_group

    # -- runs --------------------------------------------------------------

    async def run(
        self,
        program: str | os.PathLike[str],
        *args: Any,
        entry: str = "main",
        options: RunOptions | None = None,
        run_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Run the task ``entry`` of the program file ``program`` with ``args``
        and ``kwargs`` to its end. Cancelling the caller cancels the run (it
        ends as interrupted, resumable with :meth:`resume`)."""
        handle = await self.start(
            program, *args, entry=entry, options=options, run_id=run_id, kwargs=kwargs
        )
        return await _awaited(handle)

    async def start(
        self,
        program: str | os.PathLike[str],
        *args: Any,
        entry: str = "main",
        options: RunOptions | None = None,
        run_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        event_types: Collection[str] | None = None,
    ) -> RunHandle:
        """Start a run (see :meth:`run`) and return its handle at once. With a
        ``run_id`` this Runtime runs, or the journal holds, the existing run's
        handle is returned instead (whatever the other arguments).
        ``event_types``: the types of the events its handle carries (default:
        all but the per-message ones; ``run_ended`` always); a run builds no
        event it has no use for."""
        self._open()
        request = _checked_request(program, args, kwargs, entry, options)
        types = handle_event_types(event_types)
        return await self._launch(run_id, partial(self._execute, request, types))

    async def resume(
        self, run_id: str, *, force: bool = False, options: RunOptions | None = None
    ) -> RunResult:
        """Resume a run that stopped before it ended (cancelled, or its process
        died) to its end: tasks that ended keep their outcome, those in flight
        replay their journaled steps and go on. ``force``: resume even if the
        program's source changed since it ran (it may diverge); ``options``:
        the run options to change from the run's (those a resume may change:
        limits and sizes, not what the replay depends on)."""
        return await _awaited(await self.start_resume(run_id, force=force, options=options))

    async def start_resume(
        self,
        run_id: str,
        *,
        force: bool = False,
        options: RunOptions | None = None,
        event_types: Collection[str] | None = None,
    ) -> RunHandle:
        """Start resuming ``run_id`` (see :meth:`resume`; ``event_types`` as
        for :meth:`start`); its handle."""
        self._open()
        journal = self._need_journal("resume")
        run_id = checked_run_id(run_id)
        if not isinstance(force, bool):
            raise InvalidRequest(f"force {force!r:.80} is invalid; expected True or False")
        overrides = None if options is None else resume_options(options)
        types = handle_event_types(event_types)
        live = self._live.get(run_id)
        if live is not None:
            return live
        record = await self._record(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id!r} in the journal {journal}")
        live = self._live.get(run_id)
        if live is not None:
            return live
        return self._begin(run_id, partial(self._execute_resume, run_id, force, overrides, types))

    async def submit(
        self,
        program: str | os.PathLike[str],
        *args: Any,
        entry: str = "main",
        options: RunOptions | None = None,
        run_id: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue a run of ``program`` (as :meth:`run` takes it) in the journal,
        with its directory's source files, for a worker (``capsule worker``, on
        any machine sharing the journal) to run; its run id. It runs once a
        worker takes it; :meth:`find` and :meth:`inspect` follow it."""
        from capsule.supervisor.run import new_run_id

        self._open()
        journal = self._need_journal("submit")
        request = _checked_request(program, args, kwargs, entry, options)
        run_id = new_run_id() if run_id is None else checked_run_id(run_id)
        from capsule.journal.schema import JournalError
        from capsule.journal.session import submit_journaled

        try:
            await anyio.to_thread.run_sync(submit_journaled, request, journal, run_id)
        except JournalError as exc:
            raise JournalUnavailable(str(exc)).naming(exc) from None
        return run_id

    def _start_claimed(self, claim: Claim, program: Path) -> RunHandle:
        """Run a submitted run a worker claimed, from its sources unpacked at
        ``program`` (see capsule.worker); its handle."""
        return self._begin(claim.run_id, partial(self._execute_claimed, claim, program))

    def _execute_claimed(self, claim: Claim, program: Path, handle: RunHandle) -> RunResult:
        from capsule.journal.schema import JournalError
        from capsule.journal.session import run_claimed
        from capsule.supervisor.program import run_program

        journal = self.journal
        assert journal is not None

        def run() -> RunResult:
            try:
                report = run_claimed(
                    journal,
                    claim,
                    program,
                    handle._on_event,
                    event_types=HANDLE_EVENT_TYPES,
                    on_run=handle._on_run,
                    runner=partial(run_program, shared=self._shared),
                )
            except JournalError as exc:
                raise NotResumable(str(exc)).naming(exc) from None
            return report_result(_ended(report, handle))

        return _interruptible(handle, run)

    def handle(self, run_id: str) -> RunHandle | None:
        """The handle of a run live in this Runtime (None if there is none)."""
        return self._live.get(run_id)

    # -- untrusted code ----------------------------------------------------

    async def run_code(
        self,
        source: str,
        *args: Any,
        limits: CodeLimits | None = None,
        grants: CodeGrants | None = None,
        run_id: str | None = None,
    ) -> RunResult:
        """Run ``source`` (Python code, e.g. what a model wrote) in a fresh
        sandbox, as a one-task program: ``args`` are its ``args`` variable,
        what it assigns to ``result`` is the run's value, what it prints is
        on the result (``stdout``, ``stderr``). ``limits`` and ``grants`` bound
        what it may use and reach (default: CodeLimits(); no grants)."""
        return await _awaited(
            await self.start_code(source, *args, limits=limits, grants=grants, run_id=run_id)
        )

    async def start_code(
        self,
        source: str,
        *args: Any,
        limits: CodeLimits | None = None,
        grants: CodeGrants | None = None,
        run_id: str | None = None,
    ) -> RunHandle:
        """Start :meth:`run_code`; its handle."""
        from capsule.host.code import CodeGrants, CodeLimits, code_request

        self._open()
        limits = limits if limits is not None else CodeLimits()
        grants = grants if grants is not None else CodeGrants()
        if not isinstance(limits, CodeLimits):
            raise InvalidRequest(f"limits must be a CodeLimits, not {type(limits).__name__}")
        if not isinstance(grants, CodeGrants):
            raise InvalidRequest(f"grants must be a CodeGrants, not {type(grants).__name__}")
        request = code_request(source, arguments(args, None)[0], limits)
        runner = await self._code_runner()
        return await self._launch(run_id, partial(self._execute_code, runner, request, grants))

    async def _code_runner(self) -> CodeRunner:
        """The warm sandbox run_code runs in, made on first use."""
        from capsule.host.code import CodeRunner
        from capsule.sandbox.runtime import RuntimeBuildError

        async with self._code_lock:
            if self._code is None:
                guests = self._guests
                assert guests is not None
                try:
                    # (On the thread core: see CodeRunner.)
                    guest = await anyio.to_thread.run_sync(guests.for_core, "threads")
                except RuntimeBuildError as exc:
                    raise RuntimeFailure(str(exc)) from None
                self._code = await anyio.to_thread.run_sync(CodeRunner, guest)
            return self._code

    # -- the journal -------------------------------------------------------

    async def runs(self) -> list[RunRecord]:
        """Every run in the journal, newest first."""
        from capsule.journal.reader import list_runs

        journal = self._need_journal("runs")
        if isinstance(journal, Path) and not journal.is_file():
            return []
        runs: list[RunRecord] = await _reading(journal, list_runs, journal)
        return runs

    async def find(self, run_id: str | None = None) -> RunRecord:
        """The journal's record of the run ``run_id`` names: the run of that
        id, else the one run whose id begins with it (None: the newest run).
        RunNotFound if there is none, or several."""
        from capsule.journal.reader import find_run

        journal = self._need_journal("find")
        if run_id is not None and not isinstance(run_id, str):
            raise InvalidRequest(f"run_id {run_id!r:.80} is invalid; expected a run id or None")
        try:
            record: RunRecord = await _reading(journal, find_run, journal, run_id)
        except JournalUnavailable as exc:
            message = str(exc)
            if message.startswith("no run ") or message.endswith(
                ("holds no runs", "give more of the run id")
            ):
                raise RunNotFound(message) from None
            raise
        return record

    async def inspect(self, run_id: str) -> RunDetails:
        """A run the journal holds, and its tasks."""
        from capsule.journal.reader import load_tasks

        journal = self._need_journal("inspect")
        run_id = checked_run_id(run_id)
        record = await self._record(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id!r} in the journal {journal}")
        tasks = await _reading(journal, load_tasks, journal, run_id)
        return RunDetails(record, tasks)

    def _need_journal(self, what: str) -> Journal:
        if self.journal is None:
            raise RunNotFound(
                f"{what} needs a journal, and this Runtime has none (journal=False); "
                f"make it with Runtime(journal=PATH) or Runtime()"
            )
        return self.journal

    async def _record(self, run_id: str) -> RunRecord | None:
        """The journal's record of ``run_id`` (None: none, or no journal)."""
        from capsule.journal.reader import find_run

        journal = self.journal
        if journal is None or (isinstance(journal, Path) and not journal.is_file()):
            return None
        try:
            record: RunRecord = await _reading(journal, find_run, journal, run_id, True)
        except JournalUnavailable as exc:
            if str(exc).startswith("no run "):
                return None
            raise
        return record

    # -- running -----------------------------------------------------------

    async def _launch(
        self, run_id: str | None, work: Callable[[RunHandle], RunResult]
    ) -> RunHandle:
        """A run's handle: that of the run ``run_id`` names if there is one, or
        of a new run doing ``work`` on a worker thread."""
        from capsule.supervisor.run import new_run_id

        self._open()
        if run_id is None:
            run_id = new_run_id()
        else:
            run_id = checked_run_id(run_id)
            existing = await self._existing(run_id)
            if existing is not None:
                return existing
        return self._begin(run_id, work)

    def _begin(self, run_id: str, work: Callable[[RunHandle], RunResult]) -> RunHandle:
        """The handle of a new run doing ``work``, registered and started at
        once (no await between: the Runtime may have closed during the last)."""
        task_group = self._open()
        handle = RunHandle(run_id, self._event_buffer, self._limiter)
        try:
            task_group.start_soon(self._drive, handle, work)
        except RuntimeError:  # (its task group is no longer active)
            raise RuntimeFailure(f"run {run_id} did not start: its Runtime is closing") from None
        self._live[run_id] = handle
        return handle

    async def _existing(self, run_id: str) -> RunHandle | None:
        live = self._live.get(run_id)
        if live is not None:
            return live
        record = await self._record(run_id)
        live = self._live.get(run_id)  # (started while the journal was read)
        if live is not None:
            return live
        if record is None:
            return None
        if record.shown_status == "running":
            raise InvalidRequest(
                f"run {run_id} is running in another process ({record.host_pid}) "
                f"on the journal {self.journal}; choose another run_id"
            )
        if record.submitted and record.shown_status in ("queued", "interrupted"):
            raise InvalidRequest(
                f"run {run_id} is submitted and waits for a worker (`capsule worker`) on the "
                f"journal {self.journal}; choose another run_id, or follow it with find()"
            )
        handle = RunHandle(run_id, self._event_buffer, self._limiter)
        try:
            handle._end(record_result(record), None)
        except RunError as exc:
            handle._end(None, exc)
        except (ValueError, TypeError) as exc:  # a damaged (or forged) journal
            handle._end(
                None,
                JournalUnavailable(
                    f"the journal {self.journal} holds a record of run {run_id} this "
                    f"Capsule cannot read ({type(exc).__name__}: {exc}); it may be damaged"
                ),
            )
        return handle

    async def _drive(self, handle: RunHandle, work: Callable[[RunHandle], RunResult]) -> None:
        """Run ``work`` on a worker thread to its end; if this task is
        cancelled (the Runtime closes), the run is stopped and waited for."""
        result: RunResult | None = None
        error: RunError | None = None
        async with anyio.create_task_group() as watch:

            async def stop_when_cancelled() -> None:
                try:
                    await anyio.sleep_forever()
                finally:
                    if result is None and error is None:
                        handle._stop(CANCELLED_BY_HOST)

            watch.start_soon(stop_when_cancelled)
            try:
                # (A worker thread is not abandoned: a cancel waits for it.)
                result = await anyio.to_thread.run_sync(work, handle, limiter=self._limiter)
            except RunError as exc:
                error = exc
            except Exception:
                error = RuntimeFailure("internal error", traceback.format_exc())
            finally:
                if result is None and error is None:
                    error = RuntimeFailure(
                        f"run {handle.run_id} did not start: its Runtime is closing"
                    )
                if self._live.get(handle.run_id) is handle:
                    del self._live[handle.run_id]  # (before any waiter wakes)
                handle._end(result, error)
                watch.cancel_scope.cancel()

    def _execute(
        self, request: RunRequest, event_types: frozenset[str], handle: RunHandle
    ) -> RunResult:
        """On a worker thread: the run, to its end."""
        from capsule.supervisor.program import run_program

        runner = partial(run_program, shared=self._shared)

        def run() -> RunResult:
            report = self._journaled(request, handle, handle._on_event, runner, event_types)
            return report_result(_ended(report, handle))

        return _interruptible(handle, run)

    def _journaled(
        self,
        request: RunRequest,
        handle: RunHandle,
        on_event: Callable[[Any], None],
        runner: Callable[..., RunReport],
        event_types: Collection[str] = HANDLE_EVENT_TYPES,
    ) -> RunReport:
        if self.journal is None:
            return runner(
                request,
                on_event,
                run_id=handle.run_id,
                on_run=handle._on_run,
                event_types=event_types,
            )
        from capsule.journal.schema import JournalError
        from capsule.journal.session import run_journaled

        try:
            return run_journaled(
                request,
                self.journal,
                on_event,
                on_run=handle._on_run,
                event_types=event_types,
                run_id=handle.run_id,
                runner=runner,
            )
        except JournalError as exc:
            raise JournalUnavailable(str(exc)).naming(exc) from None

    def _execute_resume(
        self,
        run_id: str,
        force: bool,
        overrides: RunOptions | None,
        event_types: frozenset[str],
        handle: RunHandle,
    ) -> RunResult:
        from capsule.journal.schema import JournalError
        from capsule.journal.session import resume_journaled
        from capsule.supervisor.program import run_program

        journal = self.journal
        assert journal is not None

        def resume() -> RunResult:
            try:
                report = resume_journaled(
                    journal,
                    run_id,
                    force,
                    handle._on_event,
                    event_types=event_types,
                    overrides=overrides,
                    on_run=handle._on_run,
                    runner=partial(run_program, shared=self._shared),
                    exact=True,
                )
            except JournalError as exc:
                raise NotResumable(str(exc)).naming(exc) from None
            return report_result(_ended(report, handle))

        return _interruptible(handle, resume)

    def _execute_code(
        self, runner: CodeRunner, request: RunRequest, grants: CodeGrants, handle: RunHandle
    ) -> RunResult:
        from capsule.host.code import OutputCapture

        # (code_request always sets it, in bytes: RunOptions' canonical form)
        limit = request.options.max_task_output
        assert isinstance(limit, int)
        captured = OutputCapture(handle._on_event, limit)
        report = self._journaled(
            request, handle, captured.on_event, partial(runner.run, grants=grants)
        )
        return report_result(_ended(report, handle), *captured.texts())


def _checked_request(program: Any, args: Any, kwargs: Any, entry: Any, options: Any) -> RunRequest:
    """What :meth:`Runtime.start` and :meth:`Runtime.submit` are asked to run,
    each part checked (InvalidRequest naming the one that is not right)."""
    path = program_path(program)
    call_args, call_kwargs = arguments(args, kwargs)
    if not isinstance(entry, str) or not entry.isidentifier():
        raise InvalidRequest(f"entry {entry!r:.80} is not a task name")
    return run_request(path, call_args, call_kwargs, entry, run_options(options))


def resume_options(options: Any) -> RunOptions:
    """The options a resume changes, checked: only those the replay does not
    depend on (limits on what the run may record)."""
    from capsule.supervisor.option_specs import RUN_OPTIONS

    checked = run_options(options)
    changeable = sorted(spec.name for spec in RUN_OPTIONS if spec.resume_help is not None)
    fixed = sorted(set(checked.given()) - set(changeable))
    if fixed:
        raise InvalidRequest(
            f"options {', '.join(fixed)} cannot change when a run resumes (its replay "
            f"depends on them); a resume may change {', '.join(changeable)}"
        )
    return checked


def handle_event_types(event_types: Collection[str] | None) -> frozenset[str]:
    """The event types a caller asked a handle to carry, checked."""
    if event_types is None:
        return HANDLE_EVENT_TYPES
    if isinstance(event_types, str) or not isinstance(event_types, Collection):
        raise InvalidRequest(
            f"event_types {event_types!r:.80} is invalid; expected a collection of event "
            f"types, e.g. {{'output', 'failed'}}"
        )
    types = frozenset(event_types)
    unknown = sorted(str(kind) for kind in types - EVENT_TYPES)
    if unknown:
        raise InvalidRequest(
            f"event_types holds {', '.join(repr(kind) for kind in unknown[:5]):.300}, not "
            f"event types; the event types are {', '.join(sorted(EVENT_TYPES))}"
        )
    return types


def _interruptible(handle: RunHandle, work: Callable[[], RunResult]) -> RunResult:
    """``work()``, on the run's worker thread, which ``handle.interrupt()``
    interrupts as Ctrl-C does a run on the main thread. An interrupt that stops
    the run before its tasks ran (the import or the build raise
    KeyboardInterrupt, once its journal says interrupted) is its result."""
    from capsule.interrupts import interrupted_by
    from capsule.supervisor.program import RunReport

    try:
        with interrupted_by(handle._interrupted):
            return work()
    except KeyboardInterrupt:
        if not handle._interrupted.requested:
            raise  # (not this run's: no signal lands on a worker thread)
    message = "cancelled: the run was interrupted before its tasks ran"
    _ended(RunReport(interrupted=True, runtime_error=message), handle)
    return RunResult(
        run_id=handle.run_id,
        status="interrupted",
        error=RunFailure(kind="cancelled", message=message, retryable=False),
    )


def _ended(report: RunReport, handle: RunHandle) -> RunReport:
    """The report, once its ``run_ended`` event (the last of the run, made from
    the final report: the journal's last write can still change the outcome)
    reached the handle."""
    handle._on_event(report.ended_event(handle.run_id))
    return report


async def _awaited(handle: RunHandle) -> RunResult:
    """The handle's result; if the caller is cancelled meanwhile, the run is
    stopped (resumable) and waited for before the cancellation goes on."""
    try:
        return await handle.result()
    except anyio.get_cancelled_exc_class():
        handle._stop(CANCELLED_BY_HOST)
        with anyio.CancelScope(shield=True):
            await handle._ended.wait()
        raise


async def _reading(
    journal: Journal, read: Callable[..., Coroutine[Any, Any, Any]], *args: Any
) -> Any:
    """``read(*args)``, a journal reader; JournalUnavailable if the journal
    cannot be read or holds a record this Capsule cannot make sense of."""
    from capsule.journal.schema import JournalError

    try:
        return await _on_asyncio(read, *args)
    except JournalError as exc:
        raise JournalUnavailable(str(exc)).naming(exc) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise JournalUnavailable(
            f"the journal {journal} holds a record this Capsule cannot read "
            f"({type(exc).__name__}: {exc}); it may be damaged"
        ) from None


async def _on_asyncio(read: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """``read(*args)``, a coroutine that needs asyncio (the journal's readers:
    aiosqlite): on the caller's loop if it is asyncio's; on trio, on an
    asyncio loop of its own in a worker thread, which this call waits for."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # (trio: anyio's other backend)
        return await anyio.to_thread.run_sync(lambda: asyncio.run(read(*args)))
    return await read(*args)


def _open_journal(journal: Journal) -> None:
    """Make the journal, or bring it to this Capsule's schema: one that cannot
    be used is refused as the Runtime opens, not at its first run."""
    from capsule.journal.database import open_connection
    from capsule.journal.schema import JournalError

    try:
        open_connection(journal, create=True).close()
    except JournalError as exc:
        raise JournalUnavailable(str(exc)).naming(exc) from None
