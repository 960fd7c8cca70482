"""Reading journals (aiosqlite, or psycopg on PostgreSQL): the list of runs,
one run's task tree, and the history a resumed run replays. Safe while another
process writes the journal (SQLite's WAL and PostgreSQL's MVCC readers never
block the writer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from capsule.journal.database import ReadConnection, open_reader
from capsule.journal.lease import expired as lease_expired
from capsule.journal.lease import owner_gone
from capsule.journal.location import Journal
from capsule.journal.run_ids import RUN_ID_PATTERN
from capsule.journal.schema import JournalError
from capsule.journal.secrets import (
    SECRET_KEY_ENV,
    STEP_KEPT_APART,
    Sealer,
    StepKey,
    load_secret_answers,
    secrets_file,
)
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.steps import (
    AttemptHistory,
    History,
    PendingMessage,
    Step,
    TaskHistory,
    received_messages,
    request_text,
)
from capsule.supervisor.tree import TaskResult


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    program: str
    program_hash: str
    args: list[Any]
    kwargs: dict[str, Any]
    settings: dict[str, Any]
    seed: str
    status: str
    started_at: float
    ended_at: float | None
    result_json: str | None
    error: dict[str, Any] | None
    resumes: int
    host_pid: int | None
    #: Who holds the run's lease, and until when (see lease.py); None for a
    #: run of a Capsule older than leases.
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    #: The journal's clock when the record was read (leases are timed by
    #: it); None: this machine's.
    clock: float | None = None
    #: Queued with its sources for workers (``capsule submit``): workers run
    #: and resume it, from those sources.
    submitted: bool = False

    @property
    def shown_status(self) -> str:
        """The status, with a run whose owner is gone marked as crashed: its
        lease expired (a row from before leases: its process is gone)."""
        if self.status != "running":
            return self.status
        if self.lease_owner is not None:
            gone = lease_expired(self.lease_expires_at, self.clock) or owner_gone(self.lease_owner)
            return "crashed" if gone else "running"
        return "running" if _alive(self.host_pid) else "crashed"

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "program": self.program,
            "status": self.shown_status,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "resumes": self.resumes,
        }


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    name: str
    parent_id: str | None
    status: str
    attempt: int
    max_attempts: int
    fuel: int
    duration_ms: float
    final: bool
    result_json: str | None
    error: dict[str, Any] | None
    #: Times its supervisor restarted it (its attempts go on counting across
    #: restarts; max_attempts bounds those after each).
    restarts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "name": self.name,
            "parent_id": self.parent_id,
            "status": self.status,
            "attempts": self.attempt,
            "max_attempts": self.max_attempts,
            "restarts": self.restarts,
            "duration_ms": round(self.duration_ms, 3),
            "fuel_consumed": self.fuel,
            "result": None if self.result_json is None else json.loads(self.result_json),
            "error": self.error,
        }


#: Past the largest process id a kernel hands out (os.kill overflows past it).
_PID_LIMIT = 2**31


def _alive(pid: int | None) -> bool:
    # (A journal's pid may be anything: 0 and -1 would signal whole process
    # groups, which always "exist".)
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < _PID_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: A read connection to an existing journal this Capsule understands.
open_journal = open_reader


_RUN_COLUMNS = (
    "run_id, program, program_hash, args_json, settings_json, seed, status, started_at, "
    "ended_at, result_json, error_json, resumes, host_pid, lease_owner, lease_expires_at"
)
#: The same, from a journal older than leases (read as it is: readers never
#: migrate a journal).
_RUN_COLUMNS_BEFORE_LEASES = _RUN_COLUMNS.replace("lease_owner, lease_expires_at", "NULL, NULL")
#: The schema versions that added leases and submitted runs (schema.MIGRATIONS).
_LEASES_SINCE = 10
_SUBMISSIONS_SINCE = 12


def _run_columns(db: ReadConnection) -> str:
    """The columns of a run's record as this journal's schema has them, the
    journal's clock, and whether the run was submitted."""
    columns = _RUN_COLUMNS if db.version >= _LEASES_SINCE else _RUN_COLUMNS_BEFORE_LEASES
    submitted = (
        "EXISTS (SELECT 1 FROM run_sources WHERE run_sources.run_id = runs.run_id)"
        if db.version >= _SUBMISSIONS_SINCE
        else "0"
    )
    return f"{columns}, {db.dialect.now}, {submitted}"


def _run_record(row: Any) -> RunRecord:
    if not isinstance(row[0], str) or not RUN_ID_PATTERN.fullmatch(row[0]):
        raise ValueError(f"the run id {row[0]!r:.80} is not one (it would name files)")
    args, kwargs = json.loads(row[3])
    return RunRecord(
        run_id=row[0],
        program=row[1],
        program_hash=row[2],
        args=args,
        kwargs=kwargs,
        settings=json.loads(row[4]),
        seed=row[5],
        status=row[6],
        started_at=row[7],
        ended_at=row[8],
        result_json=row[9],
        error=None if row[10] is None else json.loads(row[10]),
        resumes=row[11],
        host_pid=row[12],
        lease_owner=row[13] if isinstance(row[13], str) else None,
        lease_expires_at=row[14] if isinstance(row[14], int | float) else None,
        clock=row[15] if len(row) > 15 and isinstance(row[15], float) else None,
        submitted=len(row) > 16 and bool(row[16]),
    )


async def run_status(db: ReadConnection, run_id: str) -> str | None:
    """A run's status as shown (RunRecord.shown_status), read afresh; None
    if there is no such run or its row cannot be read."""
    row = await db.fetchone(f"SELECT {_run_columns(db)} FROM runs WHERE run_id = ?", (run_id,))
    return None if row is None else _listed(row).shown_status


async def list_runs(journal: Journal) -> list[RunRecord]:
    """Every run in the journal, newest first."""
    async with open_journal(journal) as db:
        rows = await db.fetchall(
            f"SELECT {_run_columns(db)} FROM runs ORDER BY {db.dialect.newest_first}"
        )
        return [_listed(row) for row in rows]


#: The status of a run whose journal row cannot be read.
DAMAGED = "damaged"


def _listed(row: Any) -> RunRecord:
    """A run as listed: a row that is damaged (or forged) is listed as such,
    with what can be read of it, and does not end the listing."""
    try:
        record = _run_record(row)
        numbers = (record.started_at, record.ended_at or 0, record.resumes)
        if not (
            isinstance(record.run_id, str)
            and isinstance(record.program, str)
            and isinstance(record.status, str)
            and isinstance(record.args, list)
            and isinstance(record.kwargs, dict)
            and all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        ):
            raise TypeError("a column holds a value of the wrong type")
        return record
    except (ValueError, TypeError, RecursionError) as exc:
        started = row[7] if isinstance(row[7], int | float) else 0.0
        return RunRecord(
            run_id=str(row[0]),
            program=str(row[1]),
            program_hash="",
            args=[],
            kwargs={},
            settings={},
            seed="",
            status=DAMAGED,
            started_at=started,
            ended_at=None,
            result_json=None,
            error={"kind": DAMAGED, "message": f"{type(exc).__name__}: {exc}"[:300]},
            resumes=0,
            host_pid=None,
        )


async def find_run(journal: Journal, run_id: str | None, exact: bool = False) -> RunRecord:
    """The run with this id (or a unique prefix of it, unless ``exact``); None:
    the newest run."""
    async with open_journal(journal) as db:
        columns = _run_columns(db)
        if exact:
            rows = await db.fetchall(f"SELECT {columns} FROM runs WHERE run_id = ?", (run_id,))
        elif run_id is None:
            rows = await db.fetchall(
                f"SELECT {columns} FROM runs ORDER BY {db.dialect.newest_first} LIMIT 1"
            )
        else:
            # The run of that whole id, else those it begins (compared as text:
            # LIKE would take "_" and "%" in an id for wildcards).
            rows = await db.fetchall(
                f"SELECT {columns} FROM runs WHERE run_id = ? OR "
                "(substr(run_id, 1, length(?)) = ? AND NOT EXISTS "
                "(SELECT 1 FROM runs WHERE run_id = ?)) LIMIT 2",
                (run_id,) * 4,
            )
    if not rows:
        raise JournalError(
            (lambda name: f"no run {run_id!r} in the journal {journal}; {name('runs')} lists them")
            if run_id is not None
            else f"the journal {journal} holds no runs"
        )
    if len(rows) > 1:
        raise JournalError(f"{run_id!r} matches several runs; give more of the run id")
    return _run_record(rows[0])


async def load_tasks(journal: Journal, run_id: str) -> list[TaskRecord]:
    async with open_journal(journal) as db:
        rows = await db.fetchall(
            "SELECT task_id, name, parent_id, status, attempt, max_attempts, fuel, "
            "duration_ms, final, result_json, error_json FROM tasks WHERE run_id = ? "
            "ORDER BY coalesce(started_at, ended_at), length(task_id), task_id",
            (run_id,),
        )
        counted = await db.fetchall(
            "SELECT task_id, count(*) FROM events WHERE run_id = ? AND type = 'restarting' "
            "GROUP BY task_id",
            (run_id,),
        )
        restarts = {task_id: count for task_id, count in counted}
        return [
            TaskRecord(
                task_id=row[0],
                name=row[1],
                parent_id=row[2],
                status=row[3],
                attempt=row[4],
                max_attempts=row[5],
                fuel=row[6],
                duration_ms=row[7],
                final=bool(row[8]),
                result_json=row[9],
                error=None if row[10] is None else json.loads(row[10]),
                restarts=restarts.get(row[0], 0),
            )
            for row in rows
        ]


async def load_program_files(journal: Journal, run_id: str) -> dict[str, str]:
    """The source files ``run_id`` read, with their SHA-256 (schema 6 on; a run
    journaled before that has none recorded)."""
    async with open_journal(journal) as db:
        rows = await db.fetchall(
            "SELECT path, sha256 FROM program_files WHERE run_id = ? ORDER BY path", (run_id,)
        )
        return {row[0]: row[1] for row in rows}


async def load_history(journal: Journal, run_id: str, secret_key: bytes | None = None) -> History:
    """What a resume of ``run_id`` replays: ended tasks' outcomes, the steps of
    the attempts in flight (with the unredacted answers kept apart, decrypted
    with ``secret_key`` if they are in the journal), and the messages still
    owed. JournalError if the replay needs answers this resume lacks."""
    history = History()
    #: The replayed steps whose unredacted answer was kept apart.
    kept_apart: set[StepKey] = set()
    async with open_journal(journal) as db:
        for (
            task_id,
            name,
            final,
            attempts,
            fuel,
            duration_ms,
            result,
            error,
        ) in await db.fetchall(
            "SELECT task_id, name, final, attempt, fuel, duration_ms, result_json, error_json "
            "FROM tasks WHERE run_id = ?",
            (run_id,),
        ):
            task = history.tasks[task_id] = TaskHistory(name=name)
            if final:
                task.final = TaskResult(
                    task_id=task_id,
                    task=name,
                    attempts=attempts,
                    fuel_consumed=fuel,
                    duration_s=duration_ms / 1000,
                    result_json=result,
                    error=None if error is None else ErrorDetail.model_validate_json(error),
                )
        ends = db.rows(
            "SELECT task_id, type, data_json FROM events WHERE run_id = ? "
            "AND type IN ('retrying', 'completed', 'restarting', 'messages_returned') "
            "ORDER BY seq",
            (run_id,),
        )
        #: What each attempt put back as it ended, by (task, attempt): its last
        #: word (an attempt stopped by Ctrl-C puts back, and again, from what its
        #: replay took, when it ends after the resume).
        returns: dict[tuple[str, int], list[str]] = {}
        async for task_id, kind, data in ends:
            fields = json.loads(data)
            attempt = int(fields.get("attempt", 0))
            if kind == "messages_returned":
                returns[task_id, attempt] = fields.get("message_ids", [])
                continue
            ended = history.tasks.get(task_id)
            if ended is None:
                continue
            if kind == "restarting":
                # Retries are counted afresh after each restart.
                ended.restarts += 1
                ended.failures = 0
                continue
            ended.ended_attempts.add(attempt)
            if kind == "retrying":
                ended.failures += 1
        for task_id, attempt, children_before, messages_before in await db.fetchall(
            "SELECT task_id, attempt, children_before, messages_before FROM attempts "
            "WHERE run_id = ?",
            (run_id,),
        ):
            task = history.tasks.setdefault(task_id, TaskHistory(name="?"))
            task.attempts[attempt] = AttemptHistory([], children_before, messages_before)
        #: By message id: the last attempt of its target that took it from its
        #: mailbox, and the last that put it back unreceived. Only an attempt
        #: that ended puts back for good (one the crash or a stop interrupted is
        #: replayed, and takes the same messages from its journaled batch): it
        #: failed or returned, or a later one started (a sibling's failure
        #: restarted it), or the task is over.
        received_in: dict[str, int] = {}
        returned_in: dict[str, int] = {}
        for (task_id, attempt), message_ids in returns.items():
            owner = history.tasks.get(task_id)
            if owner is not None and (
                owner.final is not None
                or attempt in owner.ended_attempts
                or attempt < max(owner.attempts, default=0)
            ):
                for message_id in message_ids:
                    returned_in[message_id] = max(returned_in.get(message_id, 0), attempt)
        # Only the last attempt of a task in flight is ever replayed.
        replayable = {
            task_id: max(task.attempts)
            for task_id, task in history.tasks.items()
            if task.final is None and task.attempts
        }
        sent: list[PendingMessage] = []
        async for task_id, attempt, batch in db.rows(
            "SELECT task_id, attempt, steps_json FROM step_batches "
            "WHERE run_id = ? ORDER BY task_id, attempt, first_step",
            (run_id,),
        ):
            history.recorded += len(batch)
            replayed = (
                history.tasks[task_id].attempts[attempt].steps
                if attempt == replayable.get(task_id)
                else None
            )
            # [step, kind, request, ok, answer] (version 3 added the time; from
            # version 11, a step whose unredacted answer was kept apart adds
            # null and STEP_KEPT_APART); a request is text, or (from version 4)
            # the array of its strings.
            for number, kind, request, ok, answer, *more in json.loads(batch):
                strings = request if isinstance(request, list) else None
                if kind == "receive" and ok:
                    for message_id, *_ in received_messages(answer):
                        received_in[message_id] = max(received_in.get(message_id, 0), attempt)
                elif kind == "send" and ok:
                    delivered = json.loads(answer)
                    body = (strings or json.loads(request))[1]
                    sent.append(
                        PendingMessage(delivered["id"], task_id, delivered["to"], body, False)
                    )
                elif kind == "reply" and ok:
                    message_id, body = strings or json.loads(request)
                    history.replies[message_id] = body
                elif kind == "monotonic":
                    history.monotonic_ns = max(history.monotonic_ns, int(answer))
                # A gap would end what can be replayed.
                if replayed is not None and number == len(replayed) + 1:
                    replayed.append(Step(kind, request_text(request), bool(ok), answer))
                    if more[1:2] == [STEP_KEPT_APART]:
                        kept_apart.add((task_id, attempt, number))
        for message_id, sender, target_id, body, expects_reply in await db.fetchall(
            "SELECT message_id, sender_id, target_id, body_json, expects_reply "
            "FROM messages WHERE run_id = ?",
            (run_id,),
        ):
            sent.append(PendingMessage(message_id, sender, target_id, body, bool(expects_reply)))
        sealed = await _sealed_answers(db, run_id) if kept_apart else {}
        received = {
            message_id
            for message_id, attempt in received_in.items()
            if attempt > returned_in.get(message_id, 0)
        }
        history.received = received
        # Owed to their targets in the order each sender sent them (a sender
        # numbers its messages, sends and asks alike; between senders, a
        # mailbox promises no order).
        for message in sorted(sent, key=_sending_order):
            history.sent.add(message.id)
            if message.expects_reply:
                history.asked[message.id] = message.target_id
            if message.id not in received:
                history.undelivered.setdefault(message.target_id, []).append(message)
    for task_id in history.tasks:
        parent, _, number = task_id.rpartition("/")
        if parent in history.tasks and number.isdigit():
            owner = history.tasks[parent]
            owner.children_used = max(owner.children_used, int(number))
    for message_id in history.sent:
        sender, _, number = message_id.rpartition("#")
        if sender in history.tasks and number.isdigit():
            owner = history.tasks[sender]
            owner.messages_used = max(owner.messages_used, int(number))
    _unredact(history, run_id, kept_apart, sealed, secret_key)
    return history


#: The schema version that added secret_answers (schema.MIGRATIONS).
_SEALED_SINCE = 11


async def _sealed_answers(db: ReadConnection, run_id: str) -> dict[StepKey, object]:
    """The run's encrypted answers in the journal, by step (none in a journal
    older than them)."""
    if db.version < _SEALED_SINCE:
        return {}
    rows = await db.fetchall(
        "SELECT task_id, attempt, step, sealed FROM secret_answers WHERE run_id = ?", (run_id,)
    )
    return {(task_id, attempt, step): bytes(sealed) for task_id, attempt, step, sealed in rows}


def _unredact(
    history: History,
    run_id: str,
    kept_apart: set[StepKey],
    sealed: dict[StepKey, object],
    secret_key: bytes | None,
) -> None:
    """Give the replayed steps the answers the guest saw, not their redacted
    record: from the run's file, else decrypted from the journal (only for a
    step marked as kept apart: a row is never taken for another step's).
    JournalError if a marked step has none here. (A step journaled before the
    marks says nothing: it replays what the file has, else as journaled.)"""
    path = secrets_file(run_id)
    try:
        kept = load_secret_answers(run_id)
        unreadable = None
    except OSError as exc:
        kept, unreadable = {}, exc
    sealer = None if secret_key is None or not sealed else Sealer(secret_key, run_id)
    #: Answers marked as kept apart that are not here, by why.
    absent: list[StepKey] = []
    locked: list[StepKey] = []
    unopened: list[StepKey] = []
    for task_id, task in history.tasks.items():
        for attempt, past in task.attempts.items():
            for index, step in enumerate(past.steps):
                key = (task_id, attempt, index + 1)
                answer = kept.get(key)
                if answer is None and key in kept_apart:
                    if key not in sealed:
                        absent.append(key)
                        continue
                    if sealer is None:
                        locked.append(key)
                        continue
                    answer = sealer.open(*key, sealed[key])
                    if answer is None:
                        unopened.append(key)
                        continue
                if answer is not None:
                    past.steps[index] = Step(step.kind, step.request, step.ok, answer)
    problems = []
    if locked:
        problems.append(
            f"{_answers(locked)} kept in the journal encrypted, and {SECRET_KEY_ENV} is "
            f"not set: set it to the key the run ran with"
        )
    if unopened:
        problems.append(
            f"{_answers(unopened)} kept in the journal encrypted, which {SECRET_KEY_ENV} "
            f"does not decrypt: {SECRET_KEY_ENV} is not the key the run ran with (or "
            f"those rows were altered); set it to that key"
        )
    if absent:
        where = (
            f"cannot be read ({unreadable})"
            if unreadable is not None
            else "does not hold them"
            if path.is_file()
            else "does not exist here"
        )
        problems.append(
            f"{_answers(absent)} kept apart in {path}, which {where}. Resume the run "
            f"where it ran (on that machine, with the same CAPSULE_HOME), or copy that "
            f"file here; a run started with {SECRET_KEY_ENV} set keeps them in the "
            f"journal, encrypted, and resumes anywhere with the same key"
        )
    if problems:
        raise MissingSecrets(
            f"run {run_id} cannot be resumed here: its replay needs the unredacted "
            f"form of journaled answers whose secrets (credentials, cookies, granted "
            f"env values) the journal holds as [redacted], and it lacks "
            + "; and ".join(problems)
            + ". Nothing was run"
        )


class MissingSecrets(JournalError):
    """A replay needs unredacted answers this process lacks (another machine
    may have them)."""


def _answers(keys: list[StepKey]) -> str:
    """``keys`` in words: how many answers, of which tasks."""
    tasks = sorted({task_id for task_id, _, _ in keys})
    shown = ", ".join(tasks[:5]) + (f" and {len(tasks) - 5} more" if len(tasks) > 5 else "")
    return (
        f"{len(keys)} journaled answer{'s' if len(keys) != 1 else ''} "
        f"(of task{'s' if len(tasks) != 1 else ''} {shown})"
    )


def _sending_order(message: PendingMessage) -> tuple[int, str]:
    """Where a message comes in its sender's numbering ("sender#N")."""
    sender, _, number = message.id.rpartition("#")
    return int(number) if number.isdigit() else 0, sender
