"""The journal writer: one thread that owns the SQLite connection and commits
what the run's threads hand it, in order, in batches (group commit).

Task threads only queue records, in one order for the whole run: an answer is
queued before the guest sees it, a child's outcome before its parent sees it,
so whatever anyone did because of a record is queued after that record. Batches
are committed in that order, so a crash (kill -9) loses only a suffix: never a
record that a kept one depends on. A record whose effect leaves the process at
once (printed output) is durable: its caller waits for the commit of the batch
that holds it, which commits everything queued before it; records queued
meanwhile by other threads share that commit (group commit).

Why a thread with :mod:`sqlite3` and not aiosqlite here: the run executes on
threads, and a commit through aiosqlite from them costs about 0.5 ms (event
loop and worker-thread hops) against 25 us directly, on the path of every host
call. The async readers (inspection, the TUI) use aiosqlite.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

from capsule.journal.database import SQLITE, Dialect, open_connection
from capsule.journal.lease import Lease
from capsule.journal.location import Journal
from capsule.journal.schema import JournalError
from capsule.journal.secrets import STEP_KEPT_APART, Sealer, SecretAnswers
from capsule.logs import logger
from capsule.supervisor.events import MESSAGE_EVENT_TYPES, TASK_EVENT_TYPES
from capsule.supervisor.option_specs import Wording, parameter_of
from capsule.supervisor.steps import JournalFailure, PendingMessage, Request
from capsule.supervisor.tree import TaskResult

_log = logger("journal")

#: How long the writer lets a batch gather when no caller waits for its commit:
#: a commit costs ~0.5 - 1 ms of writer CPU (WAL frames for every page touched),
#: so a busy run commits 20 times a second, not per record (per row, batches of
#: 100 cost 13 us of writer CPU, of 400 6 us, of 1,000 5.8 us). A crash loses at
#: most this much of the suffix; output is committed before it is shown.
LINGER_SECONDS = 0.05
#: ...and at most this long while something waits to be shown once committed
#: (output): long enough to gather a burst of lines, short enough to look live.
SHOW_LINGER_SECONDS = 0.01
#: How often a running run looks for cancellations asked by another process.
CANCEL_POLL_SECONDS = 0.25
#: A batch this large is committed without waiting longer.
MAX_BATCH = 5000

#: A record computed on the writer thread (events are numbered there, task
#: states folded): it gives a statement and its parameters, or None when it
#: only changed a task's state (written per batch).
Record = Callable[[], tuple[str, tuple[Any, ...]] | None]

#: The events journaled. Not the message events: every message is in the step
#: that sent it (a send, or an ask and the messages table) and the receive step
#: that took it.
JOURNALED_EVENT_TYPES = TASK_EVENT_TYPES - MESSAGE_EVENT_TYPES

_STATUS_BY_EVENT = {
    "pending": "pending",
    "started": "running",
    "waiting": "waiting",
    "resumed": "running",
    "retrying": "retrying",
    "restarting": "restarting",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


class LeaseLost(Exception):
    """Another process holds the run's lease now: this one must write (and
    do) nothing more for it."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def wording(self, _: Any) -> str:
        return (
            f"run {self.run_id} is no longer this process's to run: its lease expired "
            f"while this process was stalled, and another process took it"
        )


class JournalWriter:
    """Records one run. Implements the supervisor's StepLog; subscribe
    :meth:`on_event` to the run's JOURNALED_EVENT_TYPES. Use as a context manager."""

    def __init__(
        self,
        journal: Journal,
        run_id: str,
        lease: Lease | None = None,
        secret_key: bytes | None = None,
    ) -> None:
        self.journal = journal
        self.run_id = run_id
        #: The run's lease this process holds, renewed while the writer runs
        #: (None: nothing to renew, a reader's writer or a test's).
        self.lease = lease
        self._connection = open_connection(journal, create=True)
        #: This writer's database session (PostgreSQL's), recorded as the lease's.
        self._session: tuple[int, str] | None = None
        if lease is not None:
            try:
                self._connection.bound_waits(lease.seconds, lease.seconds)
                session = self._connection.session()
            except self._connection.errors as exc:
                self._connection.close()
                raise JournalError(self._connection.describe(exc)) from None
            self._session = session
        #: Unredacted answers, kept apart from the journal's text (see
        #: secrets.py): in the journal encrypted with ``secret_key`` (the
        #: user's CAPSULE_SECRET_KEY), else in the run's file.
        self.secrets = SecretAnswers(run_id)
        self._sealer = None if secret_key is None else Sealer(secret_key, run_id)
        #: Called (on the writer thread) with the task id of each cancellation
        #: another process asked for; None: nobody listens (see watch_cancel_requests).
        self._on_cancel_request: Callable[[str], None] | None = None
        row = self._connection.execute(
            "SELECT max(seq) FROM events WHERE run_id = ?", (run_id,)
        ).fetchone()
        self._event_seq = row[0] or 0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._committed_cv = threading.Condition(self._lock)
        #: The batch being gathered: rows by statement (most records: a row
        #: costs one append on the caller's thread), and records to compute.
        self._rows: dict[str, list[tuple[Any, ...]]] = {}
        self._records: list[Record] = []
        #: What to run once the batch being gathered is committed (see after_commit).
        self._after_commit: list[Callable[[], None]] = []
        #: Steps in the order they were taken, run-wide: ((task id, attempt),
        #: (step, kind, request, ok, answer)). Appended without the lock (a
        #: list's append is atomic; with two threads journaling at once, the
        #: lock doubled a step's cost) and never replaced: the writer takes a
        #: prefix (see _take_steps). Each commit writes one row per task attempt.
        self._step_queue: list[tuple[Any, ...]] = []
        #: The writer waits with nothing queued: the next step must wake it
        #: (a step is queued without the lock; see _wait_for_work).
        self._sleeping = False
        self._queued = 0
        self._committed = 0
        #: Why the journal cannot be written, once it cannot (as JournalFailure words it).
        self._failure: Wording | None = None
        self._closing = False
        #: Callers waiting for a commit: the writer commits at once for them.
        self._durable_waiting = 0
        #: Continuations waiting for a commit (see when_committed) in the batch
        #: being gathered: it is committed at once for them too.
        self._continuations_waiting = 0
        #: Each task's row as the writer knows it, and those the batch changed.
        self._tasks: dict[str, _TaskState] = {}
        self._dirty: dict[str, None] = {}
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> JournalWriter:
        self._thread = threading.Thread(target=self._write_loop, name="capsule-journal")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write everything queued, stop the writer thread, close the file."""
        with self._lock:
            self._closing = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._connection.close()

    @property
    def dialect(self) -> Dialect:
        """The SQL dialect of the journal's database."""
        return self._connection.dialect

    @property
    def failure(self) -> str | None:
        return None if self._failure is None else self._failure(parameter_of)

    # -- queueing --------------------------------------------------------------

    def _put(self, sql: str, params: tuple[Any, ...], durable: bool = False) -> None:
        """Queue one statement's row (statements are grouped per batch)."""
        with self._lock:
            rows = self._rows.get(sql)
            if rows is None:
                rows = self._rows[sql] = []
            self._append(rows, params, durable)

    def _put_record(self, record: Record) -> None:
        """Queue a record computed on the writer thread."""
        with self._lock:
            self._append(self._records, record, durable=False)

    def _append(self, queue: list[Any], item: Any, durable: bool) -> None:
        # Holding the lock.
        if self._failure is not None:
            raise JournalFailure(self._failure)
        queue.append(item)
        self._queued += 1
        if durable:
            self._wait_for_commit()
        elif self._queued - self._committed in (1, MAX_BATCH):
            self._work.notify()  # later ones join the batch it gathers

    def _wait_for_commit(self) -> None:
        # Holding the lock: wait until everything queued so far is committed.
        mine = self._queued
        self._durable_waiting += 1
        self._work.notify()
        try:
            while self._committed < mine and self._failure is None:
                self._committed_cv.wait()
        finally:
            self._durable_waiting -= 1
        if self._failure is not None:
            raise JournalFailure(self._failure)

    def record_session(self) -> None:
        """Record this writer's database session as the lease's (PostgreSQL:
        see JournalConnection.end_expired_session), once the run's row is
        there. Nothing to record on SQLite, or without a lease."""
        if self.lease is not None and self._session is not None:
            self.execute(
                "UPDATE runs SET lease_session_pid = ?, lease_session_start = ? "
                "WHERE run_id = ? AND lease_owner = ?",
                (*self._session, self.run_id, self.lease.owner),
                durable=False,
            )

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the writer's thread once everything queued so far
        is committed (an action must not raise, nor wait for a commit)."""
        with self._lock:
            self._append(self._after_commit, action, durable=False)

    def when_committed(self, then: Callable[[JournalFailure | None], None]) -> None:
        """Call ``then(None)`` on the writer's thread once everything queued so
        far is committed, or ``then(failure)`` once the journal failed first (a
        durable step of a task that holds no thread waits so: see
        JournaledSteps.step_later). ``then`` must not raise, nor wait for a
        commit."""
        with self._lock:
            self._append(self._after_commit, _Committed(then), durable=False)
            self._continuations_waiting += 1
            self._work.notify()  # (committed at once, as for a caller waiting)

    def sync(self) -> None:
        """Wait until everything queued so far is committed, and the actions
        waiting for that have run."""
        with self._lock:
            if self._queued != self._committed:
                self._wait_for_commit()

    def execute(self, sql: str, params: tuple[Any, ...], durable: bool = True) -> None:
        """Queue one statement of the caller's (the run's own row, for instance)."""
        self._put(sql, params, durable)

    def _write_loop(self) -> None:
        next_poll = time.monotonic()
        next_renewal = time.monotonic() + (self.lease.renew_every if self.lease else math.inf)
        while True:
            if self._on_cancel_request is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + CANCEL_POLL_SECONDS
                self._poll_cancel_requests()
            if self.lease is not None and time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + self.lease.renew_every
                self._renew_lease(self.lease)
            with self._lock:
                polling = next_poll if self._on_cancel_request is not None else math.inf
                self._wait_for_work(min(polling, next_renewal))
                if self._idle():
                    if self._closing:
                        return
                    continue
                if (
                    not self._durable_waiting
                    and not self._continuations_waiting
                    and not self._closing
                    and self._queued - self._committed + len(self._step_queue) < MAX_BATCH
                ):
                    # Nobody waits for this batch: let it gather for a moment, so
                    # a busy run commits some 20 times a second, not per record.
                    self._work.wait(SHOW_LINGER_SECONDS if self._after_commit else LINGER_SECONDS)
                rows, self._rows = self._rows, {}
                records, self._records = self._records, []
                actions, self._after_commit = self._after_commit, []
                self._continuations_waiting = 0
                # Taken last, holding the lock: every step taken before a record
                # or an action of this batch is in it (and none taken after them).
                steps = self._take_steps()
                upto = self._queued
            try:
                self._commit(rows, records, steps)
            except Exception as exc:  # whatever it is, no caller may wait forever
                self._connection.rollback()
                lost = isinstance(exc, LeaseLost) or self._lease_lost()
                with self._lock:
                    if lost:
                        self._failure = LeaseLost(self.run_id).wording
                    elif isinstance(exc, self._connection.errors):
                        self._failure = self._connection.describe(exc)
                    else:
                        self._failure = _failed_with(exc)
                    self._rows.clear()
                    self._records.clear()
                    dropped = actions + self._after_commit
                    self._after_commit.clear()
                    self._take_steps()
                    self._committed_cv.notify_all()
                    failure = JournalFailure(self._failure)
                # (Outside the lock: a continuation told may stop the run,
                # which writes to the journal, and fails there at once.)
                for action in dropped:
                    if isinstance(action, _Committed):
                        _run_action(functools.partial(action.then, failure))
                return
            # Before the commit is announced: whoever waits for it (sync) finds
            # the actions done.
            for action in actions:
                _run_action(action)
            with self._lock:
                self._committed = upto
                self._committed_cv.notify_all()

    def _wait_for_work(self, next_poll: float) -> None:
        # (next_poll: when to look up from waiting, to poll cancel requests or
        # renew the lease; math.inf: never.)
        # Holding the lock. Says it sleeps before it looks at the step queue
        # once more: a step queued after that look sees the flag and wakes it
        # (the GIL orders the two threads' reads and writes).
        while not self._closing:
            self._sleeping = True
            if not self._idle():
                break
            if next_poll == math.inf:
                if self._on_cancel_request is not None:
                    break  # (asked to watch meanwhile: the loop starts polling)
                self._work.wait()  # nothing to look for meanwhile
            else:
                left = next_poll - time.monotonic()
                if left <= 0:
                    break  # time to look for cancel requests, or to renew the lease
                self._work.wait(left)
        self._sleeping = False

    def watch_cancel_requests(self, handler: Callable[[str], None]) -> None:
        """Look for cancellations another process asks for (``capsule tui``)
        every CANCEL_POLL_SECONDS, handing each task id to ``handler``."""
        with self._lock:
            self._on_cancel_request = handler
            self._work.notify()  # a sleeping writer starts looking

    def _idle(self) -> bool:
        return self._queued == self._committed and not self._step_queue

    def _take_steps(self) -> list[tuple[Any, ...]]:
        """The steps queued so far. A copy, then a deletion of that many: each
        one C call, so that a step appended meanwhile stays, in its place."""
        steps = self._step_queue[:]
        del self._step_queue[: len(steps)]
        return steps

    def _lease_lost(self) -> bool:
        """Whether another process holds the run's lease now, as a fresh
        connection reads it (on PostgreSQL, the server ends the session of a
        process that stalled in the middle of a commit: why the commit
        failed is that the run is another's now, not the server). False if
        it cannot tell."""
        if self.lease is None or self._connection.dialect is SQLITE:
            return False
        try:
            connection = open_connection(self.journal, create=False)
        except JournalError:
            return False
        try:
            row = connection.execute(
                "SELECT lease_owner FROM runs WHERE run_id = ?", (self.run_id,)
            ).fetchone()
        except connection.errors:
            return False
        finally:
            connection.close()
        return row is not None and row[0] != self.lease.owner

    def _renew_lease(self, lease: Lease) -> None:
        """Extend this process's lease on the run; if another holds it now
        (this process stalled past its expiry, and a resume took the run),
        the journal fails: the run stops at its next journaled step, and
        does nothing more that the other would do again."""
        connection = self._connection
        try:
            renewed = connection.execute(
                f"UPDATE runs SET lease_expires_at = {connection.dialect.now} + ? "
                "WHERE run_id = ? AND lease_owner = ?",
                (lease.seconds, self.run_id, lease.owner),
            ).rowcount
        except connection.errors:
            return  # a busy journal: renewed at the next turn, well before it expires
        if renewed == 0:
            with self._lock:
                if self._failure is None:
                    self._failure = LeaseLost(self.run_id).wording
                self._committed_cv.notify_all()

    def _poll_cancel_requests(self) -> None:
        """Cancellations another process asked for (``capsule tui``): handed to
        ``_on_cancel_request`` and marked handled."""
        assert self._on_cancel_request is not None
        try:
            rows = self._connection.execute(
                "SELECT task_id, requested_at FROM cancel_requests "
                "WHERE run_id = ? AND handled_at IS NULL",
                (self.run_id,),
            ).fetchall()
            for task_id, requested_at in rows:
                self._on_cancel_request(task_id)
                self._connection.execute(
                    "UPDATE cancel_requests SET handled_at = ? WHERE run_id = ? AND "
                    "task_id = ? AND requested_at = ?",
                    (time.time(), self.run_id, task_id, requested_at),
                )
        except self._connection.errors:
            pass  # a busy journal: asked again at the next poll

    def _commit(
        self,
        statements: dict[str, list[tuple[Any, ...]]],
        records: list[Record],
        steps: list[tuple[Any, ...]],
    ) -> None:
        """Write one batch in one transaction, each statement as multi-row
        INSERTs: sqlite3 gives up the GIL around every step of a statement (every
        row, with executemany) and must win it back from the task threads, so a
        batch costs a handful of steps, not one per record. (Order within the
        transaction does not matter: it is all or nothing, and every table but
        ``tasks`` only gains rows, whose state is folded here first.)"""
        if steps:
            committed_at = time.time()
            # Grouped by attempt in C (a stable sort keeps each attempt's order):
            # a Python loop over the steps was half the writer's time per step.
            steps.sort(key=_ATTEMPT)
            rows = []
            for (task_id, attempt), group in groupby(steps, _ATTEMPT):
                taken = list(map(_STEP, group))
                first, last = taken[0][0], taken[-1][0]
                rows.append(
                    (self.run_id, task_id, attempt, first, last, json.dumps(taken), committed_at)
                )
            statements[_STEP_BATCH_INSERT] = rows
        self._dirty.clear()
        for record in records:
            row = record()
            if row is not None:
                statements.setdefault(row[0], []).append(row[1])
        if self._dirty:
            statements[_TASK_UPSERT] = [
                self._tasks[task_id].row(self.run_id, task_id) for task_id in self._dirty
            ]
        try:
            self._execute(statements)
        except self._unstorable:
            # A value the database cannot take (a lone surrogate, a NUL in
            # PostgreSQL's text, an integer past 64 bits): nothing a guest hands
            # over should be one (the host checks it first), but the content of
            # a record must never stop the journal. The batch again, every such
            # value made storable.
            self._connection.rollback()
            storable = functools.partial(_storable, self._connection.dialect)
            self._execute(
                {
                    sql: [tuple(map(storable, row)) for row in rows]
                    for sql, rows in statements.items()
                }
            )

    @functools.cached_property
    def _unstorable(self) -> tuple[type[BaseException], ...]:
        """What the driver raises for a value it cannot store."""
        if self._connection.dialect is SQLITE:
            return (ValueError, OverflowError)
        from capsule.journal.postgres import driver

        return (ValueError, OverflowError, driver().DataError)

    def _execute(self, statements: dict[str, list[tuple[Any, ...]]]) -> None:
        connection = self._connection
        if self.lease is None:
            connection.begin(writing=False)
        else:
            # Fenced: written only while this process holds the run's lease,
            # checked in the transaction that writes (which takes SQLite's
            # write lock first, PostgreSQL's lock of the run's row: no claim
            # comes between the check and the writes).
            connection.begin(writing=True)
            row = connection.execute(
                f"SELECT lease_owner FROM runs WHERE run_id = ?{connection.dialect.for_update}",
                (self.run_id,),
            ).fetchone()
            if row is not None and row[0] != self.lease.owner:
                raise LeaseLost(self.run_id)
        for sql, rows in statements.items():
            if not sql.startswith("INSERT") or connection.dialect is not SQLITE:
                # (The run's own row: rare. On PostgreSQL, every statement:
                # psycopg sends the rows in one pipeline, and a row that
                # conflicts with one before it in the batch is applied in turn.)
                connection.executemany(sql, rows)
                continue
            done = 0
            while done < len(rows):
                count = _chunk(len(rows) - done)
                chunk = rows[done : done + count]
                connection.execute(_multi_row(sql, count), list(chain.from_iterable(chunk)))
                done += count
        connection.commit()

    # -- the run's records -----------------------------------------------------

    def on_event(self, event: Any) -> None:
        """Journal a lifecycle event (and the task's state it implies): one of
        JOURNALED_EVENT_TYPES, which is what it is subscribed to."""
        run_id = self.run_id

        def record() -> tuple[str, tuple[Any, ...]]:
            # Numbered and serialised here, on the writer thread, in queue order.
            self._event_seq += 1
            data = model_json(event, exclude={"run_id", "task_id", "type", "at"})
            status = _STATUS_BY_EVENT.get(event.type)
            if status is not None:
                self._task_event(event, status)
            return (
                "INSERT INTO events (run_id, seq, task_id, type, at, data_json) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, seq) DO UPDATE SET "
                "task_id = excluded.task_id, type = excluded.type, at = excluded.at, "
                "data_json = excluded.data_json",
                (run_id, self._event_seq, event.task_id, event.type, event.at, data),
            )

        self._put_record(record)

    def _task_event(self, event: Any, status: str) -> None:
        # On the writer thread: the task's row is written once per batch.
        state = self._tasks.get(event.task_id)
        if state is None:
            state = self._tasks[event.task_id] = _TaskState(name=event.task)
        if state.final:
            return
        if event.type == "failed" and event.error.kind == "divergence":
            status = "diverged"  # not over: the run's next resume runs it again
        state.status = status
        if event.type == "pending":
            state.parent_id = event.parent_id
            state.max_attempts = event.max_attempts
        elif event.type == "started":
            state.attempt = event.attempt
            state.max_attempts = event.max_attempts
            if state.started_at is None:
                state.started_at = event.at
        self._dirty[event.task_id] = None

    def attempt_started(
        self, task_id: str, name: str, attempt: int, children_before: int, messages_before: int
    ) -> None:
        self.execute(
            "INSERT INTO attempts (run_id, task_id, attempt, children_before, "
            "messages_before, started_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, task_id, attempt) DO UPDATE SET "
            "children_before = excluded.children_before, "
            "messages_before = excluded.messages_before, started_at = excluded.started_at",
            (self.run_id, task_id, attempt, children_before, messages_before, time.time()),
            durable=False,
        )

    def step(
        self,
        task_id: str,
        attempt: int,
        number: int,
        kind: str,
        request: Request,
        ok: bool,
        answer: str,
        durable: bool = False,
        unredacted: str | None = None,
    ) -> None:
        if unredacted is None:
            step: tuple[Any, ...] = ((task_id, attempt), (number, kind, request, ok, answer))
        else:
            # Kept before the step is queued: a journaled step always has it
            # (a sealed one is queued first, so it is in the step's commit or
            # an earlier one).
            if self._sealer is not None:
                sealed = self._sealer.seal(task_id, attempt, number, unredacted)
                self._put(_SECRET_INSERT, (self.run_id, task_id, attempt, number, sealed))
            else:
                try:
                    self.secrets.add(task_id, attempt, number, unredacted)
                except OSError as exc:
                    from capsule.journal.schema import describe_error

                    raise JournalFailure(describe_error(self.secrets.path, exc)) from None
            # Marked, so that a resume knows its replay needs it.
            kept = (number, kind, request, ok, answer, None, STEP_KEPT_APART)
            step = ((task_id, attempt), kept)
        if durable:
            with self._lock:  # counted, so that it can wait for its commit
                self._append(self._step_queue, step, durable)
            return
        if self._failure is not None:
            raise JournalFailure(self._failure)
        self._step_queue.append(step)
        if self._sleeping:  # read after the append (see _wait_for_work)
            with self._lock:
                if self._sleeping:
                    self._sleeping = False
                    self._work.notify()

    def discard_secrets(self) -> None:
        """The run is over, and nothing will replay it: its unredacted answers
        go (the file at once; the journal's rows with the run's last commit,
        after any queued before: a batch runs its statements in the order
        each first came, and no step comes after this)."""
        self.secrets.discard()
        self.execute("DELETE FROM secret_answers WHERE run_id = ?", (self.run_id,), durable=False)

    def ask_sent(self, message: PendingMessage) -> None:
        self.execute(
            "INSERT INTO messages (run_id, message_id, sender_id, target_id, "
            "body_json, expects_reply, at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                self.run_id,
                message.id,
                message.sender,
                message.target_id,
                message.body_json,
                int(message.expects_reply),
                time.time(),
            ),
            durable=False,
        )

    def program_file(self, path: str, digest: str) -> None:
        # Called from the guest's import (through the module finder): a failed
        # journal is not its to report; the run stops at its next step.
        try:
            self._put(
                "INSERT INTO program_files (run_id, path, sha256) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id, path) DO UPDATE SET sha256 = excluded.sha256",
                (self.run_id, path, digest),
            )
        except JournalFailure:
            pass

    def task_ended(self, result: TaskResult, parent_id: str | None) -> None:
        def record() -> None:
            state = self._tasks.get(result.task_id)
            if state is None:
                state = self._tasks[result.task_id] = _TaskState(name=result.task)
            error = result.error
            state.status = (
                "completed"
                if error is None
                else "cancelled"
                if error.kind == "cancelled"
                else "failed"
            )
            state.parent_id = parent_id
            state.attempt = result.attempts
            state.max_attempts = max(state.max_attempts, result.attempts)
            state.fuel = result.fuel_consumed
            state.duration_ms = result.duration_s * 1000
            state.ended_at = time.time()
            state.final = True
            state.result_json = result.result_json
            state.error_json = None if error is None else model_json(error)
            self._dirty[result.task_id] = None

        self._put_record(record)


def model_json(model: Any, exclude: set[str] | None = None) -> str:
    """A pydantic model as JSON, whatever its strings hold: one with a lone
    surrogate (which UTF-8 cannot encode) is written with it escaped."""
    try:
        text: str = model.model_dump_json(exclude=exclude)
    except ValueError:
        text = json.dumps(model.model_dump(mode="json", exclude=exclude))
    return text


def _storable(dialect: Dialect, value: Any) -> Any:
    """``value`` as the database can store it: lone surrogates and NULs
    escaped; integers past 64 bits as text in SQLite, and as the nearest
    one PostgreSQL's typed columns hold."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return str(value) if dialect is SQLITE else max(-(2**63), min(value, 2**63 - 1))
    return value


#: A queued step's attempt and what is journaled of it.
_ATTEMPT, _STEP = itemgetter(0), itemgetter(1)

#: The steps an attempt took since the last commit, as one row: a JSON array
#: of ``[step, kind, request, ok, answer]`` arrays (a request given as strings
#: is an array of them; a step whose unredacted answer was kept apart has null
#: and secrets.STEP_KEPT_APART after them), and when they were committed.
#: (Steps carry no time of their own: formatting a float per step was a third
#: of the encoding's cost.)
_STEP_BATCH_INSERT = (
    "INSERT INTO step_batches (run_id, task_id, attempt, first_step, last_step, "
    "steps_json, committed_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, task_id, attempt, first_step) DO UPDATE SET "
    "last_step = excluded.last_step, steps_json = excluded.steps_json, "
    "committed_at = excluded.committed_at"
)

#: An unredacted answer, encrypted (see secrets.Sealer).
_SECRET_INSERT = (
    "INSERT INTO secret_answers (run_id, task_id, attempt, step, sealed) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, task_id, attempt, step) DO UPDATE SET "
    "sealed = excluded.sealed"
)


#: Most rows in one INSERT (a power of two: a handful of distinct statements;
#: 256 rows of 14 values stay below SQLite's 32,766 parameters).
_MAX_ROWS = 256


class _Committed:
    """A continuation waiting for a commit (see JournalWriter.when_committed),
    among the after-commit actions."""

    def __init__(self, then: Callable[[JournalFailure | None], None]) -> None:
        self.then = then

    def __call__(self) -> None:
        self.then(None)


def _failed_with(exc: Exception) -> Wording:
    return lambda _: f"the journal writer failed: {exc!r}"


def _run_action(action: Callable[[], None]) -> None:
    """An after-commit action. It must not raise (the run's own handle their
    failures); if one does, the writer still goes on."""
    try:
        action()
    except Exception:  # pragma: no cover - a bug in an action
        _log.exception("an action after a journal commit failed; the writer goes on")


def _chunk(left: int) -> int:
    """Rows for the next INSERT: the largest power of two that fits."""
    return min(_MAX_ROWS, 1 << (left.bit_length() - 1))


def _closing(text: str) -> int:
    """Where the parenthesis ``text`` opens with closes."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses: {text}")


@functools.lru_cache(maxsize=256)
def _multi_row(sql: str, rows: int) -> str:
    """``INSERT ... VALUES (?, ...) [tail]`` for ``rows`` rows at once."""
    head, values = sql.split(" VALUES ", 1)
    end = _closing(values) + 1
    group, tail = values[:end], values[end:]
    return f"{head} VALUES {', '.join([group] * rows)}{tail}"


#: Writes a task's row from the writer's state; an ended task's row stays as
#: it ended (a resumed run only adds to it).
_TASK_UPSERT = (
    "INSERT INTO tasks (run_id, task_id, name, parent_id, status, attempt, max_attempts, "
    "fuel, duration_ms, started_at, ended_at, final, result_json, error_json) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, task_id) DO UPDATE SET status = excluded.status, "
    "parent_id = coalesce(excluded.parent_id, tasks.parent_id), attempt = excluded.attempt, "
    "max_attempts = excluded.max_attempts, fuel = excluded.fuel, "
    "duration_ms = excluded.duration_ms, "
    "started_at = coalesce(tasks.started_at, excluded.started_at), "
    "ended_at = excluded.ended_at, final = excluded.final, "
    "result_json = excluded.result_json, error_json = excluded.error_json "
    "WHERE tasks.final = 0"
)


@dataclass
class _TaskState:
    name: str
    parent_id: str | None = None
    status: str = "pending"
    attempt: int = 0
    max_attempts: int = 1
    fuel: int = 0
    duration_ms: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    final: bool = False
    result_json: str | None = None
    error_json: str | None = None

    def row(self, run_id: str, task_id: str) -> tuple[Any, ...]:
        return (
            run_id,
            task_id,
            self.name,
            self.parent_id,
            self.status,
            self.attempt,
            self.max_attempts,
            self.fuel,
            self.duration_ms,
            self.started_at,
            self.ended_at,
            int(self.final),
            self.result_json,
            self.error_json,
        )


def start_run_row(
    writer: JournalWriter,
    program: Path,
    program_hash: str,
    args: list[Any],
    kwargs: dict[str, Any],
    settings: dict[str, Any],
    seed: str,
) -> None:
    from capsule import __version__

    lease = writer.lease
    # (The lease is timed by the database's clock: on PostgreSQL, the one
    # every machine's claims compare it with.)
    writer.execute(
        "INSERT INTO runs (run_id, program, program_hash, args_json, settings_json, seed, "
        "status, started_at, host_pid, capsule_version, lease_owner, lease_expires_at) "
        f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {writer.dialect.now} + ?)",
        (
            writer.run_id,
            str(program),
            program_hash,
            json.dumps([args, kwargs]),
            json.dumps(settings),
            seed,
            "running",
            time.time(),
            os.getpid(),
            __version__,
            None if lease is None else lease.owner,
            None if lease is None else lease.seconds,
        ),
    )
    writer.record_session()
