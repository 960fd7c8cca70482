"""One way to talk to either journal database: SQLite (a file, the embedded
default) or PostgreSQL (shared by many machines).

The journal's statements are written once, in the SQL both understand
(``INSERT ... ON CONFLICT``, ``?`` placeholders); a :class:`Dialect` holds
the little that differs (placeholders, the database's clock, row locks,
the runs' insertion order). :class:`JournalConnection` is the writers'
(synchronous, autocommit, explicit transactions); :func:`open_reader`
gives the readers' (async: aiosqlite, psycopg's AsyncConnection).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule.journal.location import Journal, PostgresJournal
from capsule.supervisor.option_specs import Wording


@dataclass(frozen=True)
class Dialect:
    name: str
    #: The database's clock, in seconds since the epoch (leases are timed by
    #: it: on PostgreSQL, one clock for every machine).
    now: str
    #: What locks the rows a writing transaction reads until it ends.
    for_update: str
    #: ...and skips those another transaction holds (claims of queued work).
    skip_locked: str
    #: The order of runs, newest first (of two started in the same instant,
    #: the one written later).
    newest_first: str

    def sql(self, statement: str) -> str:
        """``statement`` (``?`` placeholders) as this database takes it."""
        return _pyformat(statement) if self.name == "postgresql" else statement


SQLITE = Dialect(
    name="sqlite",
    now="((julianday('now') - 2440587.5) * 86400.0)",
    for_update="",
    skip_locked="",
    newest_first="started_at DESC, rowid DESC",
)
POSTGRES = Dialect(
    name="postgresql",
    now="extract(epoch from clock_timestamp())::float8",
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    newest_first="started_at DESC, listed DESC",
)


#: The name Capsule's PostgreSQL sessions go by (pg_stat_activity's
#: application_name): a claim ends no other's.
APPLICATION_NAME = "capsule"
#: When a session started, as its process records it (see session()).
_SESSION_START = "extract(epoch from activity.backend_start)::text"


@functools.lru_cache(maxsize=512)
def _pyformat(statement: str) -> str:
    # (The journal's statements hold no "?" nor "%" but as placeholders.)
    return statement.replace("%", "%%").replace("?", "%s")


def dialect_of(journal: Journal) -> Dialect:
    return POSTGRES if isinstance(journal, PostgresJournal) else SQLITE


class JournalConnection:
    """A connection to a journal for writing, in autocommit mode: each
    transaction is begun (:meth:`begin`) and committed explicitly."""

    def __init__(self, journal: Journal, raw: Any, dialect: Dialect) -> None:
        self.journal = journal
        self.raw = raw
        self.dialect = dialect
        #: The errors the database's driver raises.
        self.errors: tuple[type[BaseException], ...] = _errors(dialect)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; its cursor (``fetchone``, ``fetchall``, ``rowcount``)."""
        return self.raw.execute(self.dialect.sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.dialect is SQLITE:
            self.raw.executemany(sql, rows)
        else:
            # (psycopg pipelines them: one round trip for all.)
            with self.raw.cursor() as cursor:
                cursor.executemany(self.dialect.sql(sql), rows)

    def begin(self, writing: bool = True) -> None:
        """Begin a transaction; ``writing``: one that writes, which takes
        SQLite's write lock at once (so that what it reads first stays so)."""
        if self.dialect is SQLITE:
            self.raw.execute("BEGIN IMMEDIATE" if writing else "BEGIN")
        else:
            self.raw.execute("BEGIN")

    def commit(self) -> None:
        self.raw.execute("COMMIT")

    def rollback(self) -> None:
        """End the transaction, if any, discarding it (never raises: the
        connection may be gone, which is why it is rolled back)."""
        try:
            self.raw.execute("ROLLBACK")
        except Exception:
            pass

    @contextmanager
    def transaction(self, writing: bool = True) -> Iterator[JournalConnection]:
        self.begin(writing)
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def bound_waits(self, for_locks: float, in_transaction: float) -> None:
        """On PostgreSQL: wait at most ``for_locks`` seconds for another's row
        lock, and have the server end this session if it stays idle inside a
        transaction longer than ``in_transaction`` (a process stopped in the
        middle of a commit must not hold the run's row, and so every claim
        of it, for as long as it stays stopped). SQLite's waits are bounded
        by its busy timeout, and a stopped process's lock is its file's."""
        if self.dialect is SQLITE:
            return
        for setting, seconds in (
            ("lock_timeout", for_locks),
            ("idle_in_transaction_session_timeout", in_transaction),
        ):
            self.raw.execute(
                "SELECT set_config(%s, %s, false)", (setting, str(max(1, int(seconds * 1000))))
            )

    def session(self) -> tuple[int, str] | None:
        """This connection's session on a PostgreSQL server (its process id,
        and when it started, in seconds since the epoch as text: the two name
        it, as a process id alone would once the server gave it to another;
        whatever the time zone of either side); None on SQLite."""
        if self.dialect is SQLITE:
            return None
        row = self.raw.execute(
            f"SELECT pid, {_SESSION_START} FROM pg_stat_activity AS activity "
            "WHERE pid = pg_backend_pid()"
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def end_expired_session(self, run_id: str, owner: str) -> None:
        """On PostgreSQL: end the database session of ``owner``, whose lease on
        ``run_id`` expired (by the database's clock), if it is still there: a
        process stopped in the middle of a commit holds the run's row, and so
        every claim of it, for as long as it stays stopped; past its lease, it
        has no right to it. Only a Capsule's session, of this database and
        user (a forged row names no one else's)."""
        self._end_sessions("runs.run_id = ? AND runs.lease_owner = ?", (run_id, owner))

    def end_expired_sessions(self) -> None:
        """On PostgreSQL: end the sessions of the owners of submitted runs whose
        leases expired (see end_expired_session), before a worker looks for
        work: a row such a session holds is skipped by every claim."""
        self._end_sessions(
            "runs.status = 'running' AND EXISTS (SELECT 1 FROM run_sources "
            "WHERE run_sources.run_id = runs.run_id)",
            (),
        )

    def _end_sessions(self, which: str, params: Sequence[Any]) -> None:
        if self.dialect is SQLITE:
            return
        self.execute(
            "SELECT pg_terminate_backend(activity.pid) FROM runs "
            "JOIN pg_stat_activity AS activity ON activity.pid = runs.lease_session_pid "
            f"AND {_SESSION_START} = runs.lease_session_start "
            "AND activity.datname = current_database() AND activity.usename = current_user "
            f"AND activity.application_name = '{APPLICATION_NAME}' "
            f"WHERE {which} AND runs.lease_expires_at < {self.dialect.now}",
            params,
        )

    def describe(self, exc: BaseException) -> Wording:
        """What went wrong, in words that suggest the fix."""
        return describe_error(self.journal, exc)

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:
            pass


def describe_error(journal: Journal, exc: BaseException) -> Wording:
    if isinstance(journal, PostgresJournal):
        from capsule.journal import postgres

        return postgres.describe_error(journal, exc)
    from capsule.journal import schema

    return schema.describe_error(journal, exc)


def _errors(dialect: Dialect) -> tuple[type[BaseException], ...]:
    if dialect is SQLITE:
        return (sqlite3.Error, OSError)
    from capsule.journal.postgres import driver

    return (driver().Error, OSError)


def database_errors(journal: Journal) -> tuple[type[BaseException], ...]:
    """What the driver of ``journal``'s database raises (and the OS)."""
    return _errors(dialect_of(journal))


def open_connection(journal: Journal, create: bool) -> JournalConnection:
    """A connection to write ``journal`` (``create``: make it if missing,
    migrate an older schema). Raises JournalError if it cannot be used."""
    from capsule.journal.schema import JournalError

    if isinstance(journal, PostgresJournal):
        from capsule.journal import postgres

        try:
            raw = postgres.connect(journal, create)
        except JournalError:
            raise
        except Exception as exc:  # the driver's, or no driver
            raise JournalError(postgres.describe_error(journal, exc)) from None
        return JournalConnection(journal, raw, POSTGRES)
    from capsule.journal import schema

    return JournalConnection(journal, schema.connect(journal, create), SQLITE)


class ReadConnection:
    """A connection to read a journal (async)."""

    def __init__(self, journal: Journal, raw: Any, dialect: Dialect, version: int) -> None:
        self.journal = journal
        self.raw = raw
        self.dialect = dialect
        #: The schema version of the journal (SQLite's numbering, on either).
        self.version = version

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cursor = await self.raw.execute(self.dialect.sql(sql), params)
        return list(await cursor.fetchall())

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = await self.raw.execute(self.dialect.sql(sql), params)
        return await cursor.fetchone()

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> AsyncIterator[Any]:
        """The rows of a query, as they come (not all held at once)."""
        if self.dialect is SQLITE:
            cursor = await self.raw.execute(sql, params)
            async for row in cursor:
                yield row
        else:
            async with self.raw.cursor() as cursor:
                async for row in cursor.stream(self.dialect.sql(sql), params):
                    yield row


#: What SQLite's schema version is PostgreSQL's first (see postgres.py).
_SQLITE_VERSION_OF_POSTGRES = 12


@asynccontextmanager
async def open_reader(journal: Journal) -> AsyncIterator[ReadConnection]:
    """A read connection to an existing journal this Capsule understands;
    JournalError if there is none or it cannot be read. (One generator, not
    one per database nested in another: an event loop that ends with it
    open closes it whole.)"""
    from capsule.journal.schema import JournalError

    if isinstance(journal, PostgresJournal):
        from capsule.journal import postgres

        try:
            raw = await postgres.connect_async(journal)
        except JournalError:
            raise
        except Exception as exc:
            raise JournalError(postgres.describe_error(journal, exc)) from None
        dialect, version, errors = POSTGRES, _SQLITE_VERSION_OF_POSTGRES, _errors(POSTGRES)
    else:
        raw, version = await _open_sqlite(journal)
        dialect, errors = SQLITE, (sqlite3.Error,)
    try:
        yield ReadConnection(journal, raw, dialect, version)
    except errors as exc:
        raise JournalError(describe_error(journal, exc)) from None
    finally:
        await raw.close()


async def _open_sqlite(path: Path) -> tuple[Any, int]:
    """An aiosqlite connection to the journal file, and its schema version."""
    import aiosqlite

    from capsule.journal.schema import (
        SCHEMA_VERSION,
        JournalError,
        missing_journal,
    )
    from capsule.journal.schema import describe_error as describe_sqlite

    if not path.is_file():
        raise missing_journal(path)
    try:
        connection = await aiosqlite.connect(path)
    except sqlite3.Error as exc:
        raise JournalError(describe_sqlite(path, exc)) from None
    try:
        cursor = await connection.execute("PRAGMA user_version")
        row = await cursor.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"the journal {path} has schema version {version}, written by a newer "
                f"Capsule; this one reads versions up to {SCHEMA_VERSION}"
            )
        if version == 0:
            raise JournalError(f"{path} is not a Capsule journal (no schema version)")
    except sqlite3.Error as exc:
        await connection.close()
        raise JournalError(describe_sqlite(path, exc)) from None
    except BaseException:
        await connection.close()
        raise
    return connection, int(version)
