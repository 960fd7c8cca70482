"""Journaled runs and resumes: the run's row, its records while it runs, and
the checks that make a resume safe (same program, not still running, not over)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsule.journal.database import open_connection
from capsule.journal.lease import Lease, lease_seconds, owner_gone
from capsule.journal.location import Journal
from capsule.journal.schema import INTERNAL_ERROR, JournalError
from capsule.journal.secrets import secret_key
from capsule.journal.writer import JOURNALED_EVENT_TYPES, JournalWriter, start_run_row
from capsule.supervisor.events import EventStream
from capsule.supervisor.option_specs import Naming
from capsule.supervisor.options import OptionError, RunOptions
from capsule.supervisor.program import RunReport, RunRequest, run_program
from capsule.supervisor.run import Run, new_run_id
from capsule.supervisor.steps import JournalFailure

if TYPE_CHECKING:
    from capsule.journal.reader import RunRecord
    from capsule.journal.submissions import Claim
    from capsule.supervisor.steps import History

#: The key of a run's recorded settings that names its entry task (the
#: others are its options, as RunOptions.given() has them).
_ENTRY = "entry"


def program_hash(path: Path) -> str:
    # (Streamed: a journal may name any file, as large as it likes.)
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


#: Runs a program the way :func:`capsule.supervisor.program.run_program` does
#: (the host API runs its code runner through one of its own).
ProgramRunner = Callable[..., RunReport]


def run_journaled(
    request: RunRequest,
    journal: Journal,
    on_event: Callable[[Any], None],
    on_run: Callable[[Run], None] | None = None,
    event_types: Collection[str] | None = None,
    run_id: str | None = None,
    runner: ProgramRunner = run_program,
) -> RunReport:
    """Run the program with every event, step and outcome in ``journal``, as
    ``run_id`` (default: a fresh id; one the journal holds already is refused).
    Raises JournalError if the journal cannot be opened (nothing ran)."""
    key = secret_key()  # (a malformed one stops the run before it starts)
    path = request.path.resolve()
    try:
        digest = program_hash(path)
    except OSError:
        return runner(request, on_event)  # reports the missing program
    run_id = run_id or new_run_id()
    seed = os.urandom(16)
    with JournalWriter(journal, run_id, Lease.new(), key) as writer:
        settings = {_ENTRY: request.entry, **request.options.given()}
        _write(
            writer,
            lambda: start_run_row(
                writer, path, digest, request.args, request.kwargs, settings, seed.hex()
            ),
        )
        with _interrupted_as_such(writer):
            report = runner(
                request,
                on_event,
                run_id=run_id,
                steps=writer,
                seed=seed,
                on_run=_watched(writer, on_run),
                event_types=event_types,
                events=_journaled_events(writer),
            )
        _finish(writer, report)
    return report


class DamagedRun(JournalError):
    """A run's record cannot be read (damaged or forged): it cannot run anywhere."""


def submit_journaled(request: RunRequest, journal: Journal, run_id: str) -> None:
    """Queue ``request`` in ``journal`` as ``run_id``, with its program's
    directory's source files, for a worker to run (see submissions.py).
    JournalError if it cannot be (a journal that cannot be written, sources
    past the bounds, a run id the journal holds already)."""
    from capsule.journal.submissions import pack_program, submit

    path = request.path.resolve()
    try:
        digest = program_hash(path)
    except OSError as exc:
        raise JournalError(f"cannot read the program {path}: {exc}") from None
    sources = pack_program(path)
    settings = {_ENTRY: request.entry, **request.options.given()}
    connection = open_connection(journal, create=True)
    try:
        exists = connection.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if exists is not None:
            raise JournalError(f"the journal {journal} holds a run {run_id} already")
        submit(connection, run_id, sources, request.args, request.kwargs, settings, digest)
    except connection.errors as exc:
        raise JournalError(connection.describe(exc)) from None
    finally:
        connection.close()


def check_resumable(record: RunRecord, files: dict[str, str], force: bool) -> Path:
    """The program to resume ``record`` with, or JournalError saying why not.
    ``files``: the source files the run read, with their SHA-256."""
    status = record.shown_status
    if status in ("completed", "failed", "error"):
        raise JournalError(
            lambda name: (
                f"run {record.run_id} already ended ({status}); there is nothing to "
                f"resume. {_inspect(name, record.run_id)} shows how it ended"
            )
        )
    if status == "running":
        raise JournalError(
            lambda name: (
                f"run {record.run_id} is still running ({_holder(record)}); a run has "
                f"one owner at a time, and a crashed one's lease expires within "
                f"{lease_seconds():g} s of its last renewal. "
                f"{_inspect(name, record.run_id)} shows how far it got"
            )
        )
    if record.submitted:
        raise JournalError(
            f"run {record.run_id} was submitted: a worker (`capsule worker`, with this "
            f"journal) resumes it from its sources, with no one to ask"
        )
    program = Path(record.program)
    if not program.is_file():
        raise JournalError(f"run {record.run_id}'s program {program} no longer exists")
    if force:
        return program
    changed = [] if program_hash(program) == record.program_hash else [str(program)]
    changed += _changed(files)
    changed = list(dict.fromkeys(changed))  # the program is among the files too
    if status == "diverged":
        _check_diverged(record, changed)
    elif changed:
        shown = _shown(changed)
        raise JournalError(
            lambda name: (
                f"{shown} changed since run {record.run_id} ran; a resume replays "
                f"the journal into the program as it is now, and would diverge or do different "
                f"work. Restore them, or resume anyway with {name('force')}"
            )
        )
    return program


def _changed(files: dict[str, str]) -> list[str]:
    """Those of ``files`` (path: SHA-256) whose content is not that now."""
    return [path for path, digest in files.items() if _file_hash(Path(path)) != digest]


def _shown(paths: list[str]) -> str:
    """Paths named in an error: the first five, and how many more."""
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _check_diverged(record: RunRecord, changed: list[str]) -> None:
    """A run whose replay diverged resumes once its code changed since: back
    to the code it ran with (what its journal was written by), or else (with
    --force) fixed. Unchanged, it would diverge again: JournalError."""
    run_id, where = record.run_id, _diverged_at(record.error)
    original = _original_files(record.error)
    if not changed:
        same = original is not None and not _changed(original)
        raise JournalError(
            lambda name: (
                (
                    f"run {run_id} diverged{where} with the very code it ran with, "
                    f"unchanged since: resumed again, it would diverge again. Resume it "
                    f"anyway with {name('force')}"
                )
                if same
                else (
                    f"the program is unchanged since run {run_id} diverged{where}: resumed "
                    f"as it is, it would diverge again. Fix it so that its replay makes the "
                    f"host calls the journal holds, or restore the code the run ran with, "
                    f"then resume it; {name('force')} tries anyway"
                )
            )
        )
    if original is not None and not _changed(original):
        return  # restored to the code it ran with
    shown = _shown(changed)
    raise JournalError(
        lambda name: (
            f"{shown} changed since run {run_id} diverged{where}, and not back to the "
            f"code it ran with: restored to the code it ran with, it resumes as it is; "
            f"to resume it with fixed code, give {name('force')} (it diverges again where "
            f"its replay makes other host calls than its journal holds)"
        )
    )


#: Keys of a diverged run's error (journaled with it, see _finish): where its
#: replay diverged, and the files (path: SHA-256) its journal was written by.
_DIVERGED_AT, _ORIGINAL_FILES = "diverged_at", "original_files"


def _diverged_at(error: Any) -> str:
    """Where a diverged run's replay diverged, as its error records it: " at
    step N of task 'T' (ID), attempt A" ("" if it does not say)."""
    at = error.get(_DIVERGED_AT) if isinstance(error, dict) else None
    if not isinstance(at, dict):
        return ""
    task, task_id, step, attempt = (at.get(key) for key in ("task", "task_id", "step", "attempt"))
    if not (isinstance(task, str) and isinstance(task_id, str)):
        return ""
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (step, attempt)):
        return ""
    return f" at step {step} of task {task[:100]!r} ({task_id[:200]}), attempt {attempt}"


def _original_files(error: Any) -> dict[str, str] | None:
    """The files a diverged run's journal was written by, as its error
    records them (None if it does not)."""
    files = error.get(_ORIGINAL_FILES) if isinstance(error, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    if not all(isinstance(p, str) and isinstance(d, str) for p, d in files.items()):
        return None
    return files


def _holder(record: RunRecord) -> str:
    """Who runs ``record``, in words."""
    if record.lease_owner is None:
        return f"process {record.host_pid}"
    left = (record.lease_expires_at or 0) - (record.clock or time.time())
    return f"its lease is held by {record.lease_owner:.120}, for {max(left, 0):.1f} s more unless renewed"


def _inspect(name: Naming, run_id: str) -> str:
    """How to inspect ``run_id``, for a Naming of the settings."""
    return name("inspect").replace("RUN_ID", run_id)


def _file_hash(path: Path) -> str | None:
    try:
        return program_hash(path)
    except OSError:
        return None  # gone, or unreadable: changed


def resume_journaled(
    journal: Journal,
    run_id: str | None,
    force: bool,
    on_event: Callable[[Any], None],
    event_types: Collection[str] | None = None,
    overrides: RunOptions | None = None,
    on_run: Callable[[Run], None] | None = None,
    runner: ProgramRunner = run_program,
    exact: bool = False,
) -> RunReport:
    """Resume a run that stopped before it ended (crash, kill, Ctrl-C): ``main``
    runs again, tasks that ended return their journaled outcome, tasks in flight
    replay their journaled host calls and go on live. ``overrides``: the
    options to change from the run's (a larger journal limit, say); ``exact``:
    ``run_id`` is the whole id, not a prefix. Raises
    JournalError if the run cannot be resumed."""
    # The async readers (an event loop, aiosqlite) only when resuming.
    import anyio

    from capsule.journal.reader import find_run, load_history, load_program_files

    key = secret_key()
    # A resume writes to the journal: bring it to this Capsule's schema (a
    # migration, if it is older) before reading what to replay from it.
    open_connection(journal, create=False).close()

    async def read_run() -> tuple[RunRecord, dict[str, str]]:
        record = await find_run(journal, run_id, exact)
        return record, await load_program_files(journal, record.run_id)

    try:
        record, files = anyio.run(read_run)
        program = check_resumable(record, files, force)
        # (JournalError if the replay needs secrets this resume lacks: before
        # anything runs, or the run is claimed.)
        history = anyio.run(load_history, journal, record.run_id, key)
        seed = bytes.fromhex(record.seed)
        entry, recorded = _recorded_settings(journal, record)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        # A damaged (or forged) journal is input like any other.
        raise JournalError(
            f"the journal {journal} holds a record this Capsule cannot read "
            f"({type(exc).__name__}: {exc}); it may be damaged"
        ) from None
    try:
        options = recorded if overrides is None else recorded.replaced(overrides)
    except OptionError as exc:  # (overrides that do not go with the run's options)
        return RunReport(usage_error=str(exc), option_error=exc)
    request = RunRequest(
        path=program, args=record.args, kwargs=record.kwargs, entry=entry, options=options
    )
    # The code the journal was written by (this resume records the files as
    # they are now): if its replay diverges, restoring them resumes the run.
    original = (_original_files(record.error) if record.shown_status == "diverged" else None) or {
        **files,
        record.program: record.program_hash,
    }
    lease = Lease.new()
    _claim(journal, record, program_hash(program), lease)
    with JournalWriter(journal, record.run_id, lease, key) as writer:
        _write(writer, writer.record_session)
        _write(writer, lambda: _refresh_program_files(writer, record.run_id, files))
        return _replayed(
            writer, request, history, seed, on_event, on_run, runner, event_types, original
        )


def _replayed(
    writer: JournalWriter,
    request: RunRequest,
    history: History,
    seed: bytes,
    on_event: Callable[[Any], None],
    on_run: Callable[[Run], None] | None,
    runner: ProgramRunner,
    event_types: Collection[str] | None,
    original: dict[str, str] | None = None,
) -> RunReport:
    """Run ``request`` as the run ``writer`` journals, replaying ``history``."""
    with _interrupted_as_such(writer):
        report = runner(
            request,
            on_event,
            run_id=writer.run_id,
            steps=writer,
            history=history,
            seed=seed,
            on_run=_watched(writer, on_run),
            event_types=event_types,
            events=_journaled_events(writer),
        )
    _finish(writer, report, original)
    return report


def run_claimed(
    journal: Journal,
    claim: Claim,
    program: Path,
    on_event: Callable[[Any], None],
    event_types: Collection[str] | None = None,
    on_run: Callable[[Run], None] | None = None,
    runner: ProgramRunner = run_program,
) -> RunReport:
    """Run a submitted run a worker claimed (see submissions.claim_next), from
    its sources unpacked at ``program``: its first start, or a resume of one
    whose owner died or handed it back (its code is its sources: nothing to
    check). Raises JournalError if it cannot be read, or its replay needs
    secrets this process lacks; the claim is the caller's to release then."""
    import anyio

    from capsule.journal.reader import find_run, load_history

    key = secret_key()
    try:
        record = anyio.run(find_run, journal, claim.run_id, True)
        history = anyio.run(load_history, journal, record.run_id, key)
        seed = bytes.fromhex(record.seed)
        try:
            entry, options = _recorded_settings(journal, record)
        except JournalError as exc:
            raise DamagedRun(exc.wording) from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise DamagedRun(
            f"the journal {journal} holds a record of run {claim.run_id} this Capsule "
            f"cannot read ({type(exc).__name__}: {exc!s:.300}); it may be damaged"
        ) from None
    request = RunRequest(
        path=program, args=record.args, kwargs=record.kwargs, entry=entry, options=options
    )
    with JournalWriter(journal, record.run_id, claim.lease, key) as writer:
        _write(writer, writer.record_session)
        return _replayed(writer, request, history, seed, on_event, on_run, runner, event_types)


def _claim(journal: Journal, record: RunRecord, digest: str, lease: Lease) -> None:
    """Take the run's lease for this process, if the run is still as
    ``record`` read it and no live lease holds it (one statement: of two
    resumes at once, in two Runtimes, processes or machines, one runs it and
    the other gets a JournalError, never both)."""
    connection = open_connection(journal, create=False)
    now = connection.dialect.now  # (the database's clock: one for every machine)
    try:
        # (The owner may be stopped in the middle of a commit, holding the
        # run's row: its server ends that transaction within a lease.)
        connection.bound_waits(for_locks=2 * lease.seconds + 1, in_transaction=lease.seconds)
        if isinstance(record.lease_owner, str):
            connection.end_expired_session(record.run_id, record.lease_owner)
        claimed = connection.execute(
            "UPDATE runs SET status = 'running', resumes = resumes + 1, host_pid = ?, "
            f"program_hash = ?, ended_at = NULL, lease_owner = ?, lease_expires_at = {now} + ? "
            "WHERE run_id = ? AND status = ? AND resumes = ? "
            "AND (status != 'running' OR lease_owner IS NULL OR lease_expires_at IS NULL "
            f"OR lease_expires_at < {now} OR lease_owner = ?)",
            (
                os.getpid(),
                digest,
                lease.owner,
                lease.seconds,
                record.run_id,
                record.status,
                record.resumes,
                # (A live lease whose owner is known gone, see owner_gone.)
                record.lease_owner if owner_gone(record.lease_owner) else None,
            ),
        ).rowcount
    except connection.errors as exc:
        raise JournalError(connection.describe(exc)) from None
    finally:
        connection.close()
    if claimed != 1:
        raise JournalError(
            lambda name: (
                f"run {record.run_id} was resumed by another process or Runtime "
                f"while this one prepared to; {_inspect(name, record.run_id)} shows how far it got"
            )
        )


def _recorded_settings(journal: Journal, record: RunRecord) -> tuple[Any, RunOptions]:
    """The entry task and the options a run was started with, as its journal
    records them (a journal written before RunOptions records them the same
    way, with None for each option left to its default). JournalError if the
    record is not settings this Capsule can use."""
    settings = record.settings
    if not isinstance(settings, dict):
        raise JournalError(
            f"the journal {journal} records the settings of run {record.run_id} as "
            f"{type(settings).__name__}, not a table of settings; it may be damaged"
        )
    given = {name: value for name, value in settings.items() if value is not None}
    entry = given.pop(_ENTRY, "main")
    try:
        return entry, RunOptions.from_mapping(given)
    except OptionError as exc:
        raise JournalError(
            f"the journal {journal} records settings of run {record.run_id} this Capsule "
            f"cannot use ({exc}); it may be damaged"
        ) from None


def _refresh_program_files(writer: JournalWriter, run_id: str, files: dict[str, str]) -> None:
    """The run's files as they are now (after --force, what the next resume
    checks). Those this resume reads again are recorded as it reads them, but
    a module only an ended task imported would keep its old hash."""
    for path in files:
        digest = _file_hash(Path(path))
        if digest is not None:
            writer.program_file(path, digest)
        else:
            writer.execute(
                "DELETE FROM program_files WHERE run_id = ? AND path = ?",
                (run_id, path),
                durable=False,
            )


def _watched(writer: JournalWriter, on_run: Callable[[Run], None] | None) -> Callable[[Run], None]:
    """Once the run starts: cancellations another process writes to the journal
    (`capsule tui` attached to this run) reach it."""

    def started(run: Run) -> None:
        def cancel(task_id: str) -> None:
            run.cancel_task(task_id, "cancelled from `capsule tui`")

        writer.watch_cancel_requests(cancel)
        if on_run is not None:
            on_run(run)

    return started


def _write(writer: JournalWriter, action: Callable[[], None]) -> None:
    try:
        action()
    except JournalFailure as exc:
        raise JournalError(exc.wording) from None


def _journaled_events(writer: JournalWriter) -> EventStream:
    """A run's event stream whose journaled events reach ``writer`` (before any
    subscriber the run adds)."""

    def journal(event: Any) -> None:
        try:
            writer.on_event(event)
        except JournalFailure:
            pass  # the run stops at its next journaled step, which reports it

    events = EventStream()
    events.subscribe(journal, JOURNALED_EVENT_TYPES)
    return events


@contextmanager
def _interrupted_as_such(writer: JournalWriter) -> Iterator[None]:
    """A KeyboardInterrupt (Ctrl-C, SIGTERM) that stops the run before its
    tasks run (while the program is imported) or after (while it is torn
    down) leaves it ``interrupted``, not running: resumable, and not taken
    for a crash. (One that stops its tasks is reported, and finished, as usual.)"""
    try:
        yield
    except KeyboardInterrupt:
        if writer.failure is None:
            try:
                writer.execute(
                    "UPDATE runs SET status = 'interrupted', ended_at = ?, "
                    "lease_owner = NULL, lease_expires_at = NULL WHERE run_id = ?",
                    (time.time(), writer.run_id),
                )
            except JournalFailure:
                pass  # it shows as crashed, which is resumable too
        raise


def _finish(
    writer: JournalWriter, report: RunReport, original: dict[str, str] | None = None
) -> None:
    """Record how the run ended. An interrupted or diverged run stays
    resumable (``original``: the files, path: SHA-256, the journal of a
    resumed run was written by); one whose journal failed cannot be updated
    (it shows as crashed, and is resumable)."""
    if report.journal_error is not None or writer.failure is not None:
        return
    result = report.result
    status = report.status
    if status in ("completed", "failed"):
        writer.discard_secrets()  # the run is over: nothing will replay it
    error: dict[str, Any] | None = None
    if result is not None and result.error is not None:
        error = result.error.model_dump()
        divergence = report.divergence
        if status == "diverged" and divergence is not None:
            # What the next resume checks: that the code changed since, and
            # whether back to the code the run ran with (see check_resumable).
            error[_DIVERGED_AT] = {
                "task": divergence.task,
                "task_id": divergence.task_id,
                "attempt": divergence.attempt,
                "step": divergence.step,
            }
            if original:
                error[_ORIGINAL_FILES] = original
    elif result is None:
        # Nothing ran: because of what was asked (kind "error"), or because the
        # host failed (kind "internal", with the host's traceback).
        error = {
            "kind": "error" if report.usage_error is not None else INTERNAL_ERROR,
            "message": report.usage_error or report.runtime_error,
            "traceback": report.traceback,
        }
    try:
        # (The lease is given up with the run: a resume of an interrupted
        # run need not wait for it to expire.)
        writer.execute(
            "UPDATE runs SET status = ?, ended_at = ?, result_json = ?, error_json = ?, "
            "lease_owner = NULL, lease_expires_at = NULL WHERE run_id = ?",
            (
                status,
                time.time(),
                None if result is None else result.result_json,
                None if error is None else json.dumps(error),
                writer.run_id,
            ),
        )
    except JournalFailure as exc:
        report.journal_error, report.journal_failure = str(exc), exc
