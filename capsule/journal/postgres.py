"""The journal on PostgreSQL (psycopg 3): its schema, version and migrations,
and opening it. The tables are SQLite's, in a schema of their own
(``capsule``), so that a database shared with other applications keeps
them apart; a database whose journal was written by a newer Capsule is
refused and left untouched."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from capsule.journal.location import PostgresJournal, url_secrets
from capsule.supervisor.option_specs import Wording

#: (As capsule.journal.database names Capsule's sessions.)
APPLICATION_NAME = "capsule"

if TYPE_CHECKING:
    import psycopg

#: The schema (namespace) the journal's tables are in.
SCHEMA = "capsule"

#: The journal's version on PostgreSQL (its own numbering: its first version
#: has the shape of SQLite's version 12).
SCHEMA_VERSION = 1

#: Every migration takes this advisory lock (in its transaction): of
#: Capsules starting at once on a new database, one makes the schema.
_MIGRATION_LOCK = 0x6361_7073_756C_65  # "capsule"

#: Statements that bring the journal from version N-1 to N, by N.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
        f"""CREATE TABLE {SCHEMA}.schema_version (
            version INTEGER NOT NULL
        )""",
        f"INSERT INTO {SCHEMA}.schema_version VALUES (0)",
        f"""CREATE TABLE {SCHEMA}.runs (
            run_id TEXT PRIMARY KEY,
            program TEXT NOT NULL,
            program_hash TEXT NOT NULL,
            args_json TEXT NOT NULL,
            settings_json TEXT NOT NULL,
            seed TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            ended_at DOUBLE PRECISION,
            result_json TEXT,
            error_json TEXT,
            resumes INTEGER NOT NULL DEFAULT 0,
            host_pid BIGINT,
            capsule_version TEXT NOT NULL,
            lease_owner TEXT,
            lease_expires_at DOUBLE PRECISION,
            -- The owner's database session (process id and start), which a
            -- claim of an expired lease ends: a process stopped in the middle
            -- of a commit holds the run's row for as long as it stays stopped.
            lease_session_pid INTEGER,
            lease_session_start TEXT,
            -- The order runs were written in (SQLite's rowid): of two
            -- started in the same instant, the later is listed first.
            listed BIGINT GENERATED ALWAYS AS IDENTITY
        )""",
        f"CREATE INDEX runs_by_start ON {SCHEMA}.runs (started_at)",
        f"""CREATE TABLE {SCHEMA}.tasks (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            name TEXT NOT NULL,
            parent_id TEXT,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            fuel BIGINT NOT NULL DEFAULT 0,
            duration_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
            started_at DOUBLE PRECISION,
            ended_at DOUBLE PRECISION,
            final INTEGER NOT NULL DEFAULT 0,
            result_json TEXT,
            error_json TEXT,
            PRIMARY KEY (run_id, task_id)
        )""",
        f"""CREATE TABLE {SCHEMA}.attempts (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            children_before INTEGER NOT NULL,
            messages_before INTEGER NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, task_id, attempt)
        )""",
        f"""CREATE TABLE {SCHEMA}.step_batches (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            first_step INTEGER NOT NULL,
            last_step INTEGER NOT NULL,
            steps_json TEXT NOT NULL,
            committed_at DOUBLE PRECISION,
            PRIMARY KEY (run_id, task_id, attempt, first_step)
        )""",
        f"""CREATE TABLE {SCHEMA}.messages (
            run_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sender_id TEXT NOT NULL,
            target_id TEXT NOT NULL,
            body_json TEXT NOT NULL,
            expects_reply INTEGER NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, message_id)
        )""",
        f"""CREATE TABLE {SCHEMA}.events (
            run_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            task_id TEXT NOT NULL,
            type TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            data_json TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        )""",
        f"""CREATE TABLE {SCHEMA}.cancel_requests (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            requested_at DOUBLE PRECISION NOT NULL,
            handled_at DOUBLE PRECISION,
            PRIMARY KEY (run_id, task_id, requested_at)
        )""",
        f"""CREATE TABLE {SCHEMA}.program_files (
            run_id TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (run_id, path)
        )""",
        # Unredacted answers sealed under CAPSULE_SECRET_KEY (see secrets.py).
        f"""CREATE TABLE {SCHEMA}.secret_answers (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            step INTEGER NOT NULL,
            sealed BYTEA NOT NULL,
            PRIMARY KEY (run_id, task_id, attempt, step)
        )""",
        # Submitted runs' source files (see SQLite's version 12).
        f"""CREATE TABLE {SCHEMA}.run_sources (
            run_id TEXT PRIMARY KEY,
            program TEXT NOT NULL,
            archive BYTEA NOT NULL,
            sha256 TEXT NOT NULL
        )""",
        f"CREATE INDEX runs_by_status ON {SCHEMA}.runs (status, started_at)",
        # A step per row, as SQLite's view shows them (for people's queries).
        f"""CREATE VIEW {SCHEMA}.steps (run_id, task_id, attempt, step, kind, request, ok,
                answer, at) AS
            SELECT batch.run_id, batch.task_id, batch.attempt, (one.value ->> 0)::bigint,
                   one.value ->> 1, one.value -> 2, (one.value ->> 3)::bigint,
                   one.value ->> 4, batch.committed_at
            FROM {SCHEMA}.step_batches AS batch,
                 json_array_elements(batch.steps_json::json) AS one""",
    ],
}


class PostgresUnavailable(Exception):
    """psycopg is not installed."""


def driver() -> ModuleType:
    """The psycopg module (imported on first use: a run on SQLite never loads it)."""
    try:
        import psycopg
    except ImportError:
        raise PostgresUnavailable() from None
    return psycopg


def describe_error(journal: PostgresJournal, exc: BaseException) -> Wording:
    """What went wrong with a PostgreSQL journal, in words that suggest the fix."""
    text = " ".join(str(exc).split())
    # (libpq's messages may quote the URL, or the part of it it could not read.)
    for secret in sorted([journal.url, *url_secrets(journal.url)], key=len, reverse=True):
        text = text.replace(secret, "***")
    text = text[:500]
    kind = type(exc).__name__
    if isinstance(exc, PostgresUnavailable):
        return lambda _: (
            f"the journal {journal} is a PostgreSQL database, and psycopg is not installed: "
            f"pip install 'capsule[postgres]' (or psycopg[binary])"
        )
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None and (
        "password authentication failed" in text
        or "no password supplied" in text
        or ("role" in text and "does not exist" in text)
    ):
        sqlstate = "28P01"  # (a failed connection carries no state: its message tells)
    elif sqlstate is None and "database" in text and "does not exist" in text:
        sqlstate = "3D000"
    if sqlstate is None and kind in ("OperationalError", "ConnectionTimeout"):
        return lambda name: (
            f"cannot reach the journal's PostgreSQL server {journal} ({text}); "
            f"is it running, and is {name('journal')} right?"
        )
    if sqlstate in ("28000", "28P01"):
        return lambda _: (
            f"the journal's PostgreSQL server {journal} refused the login ({text}); give the "
            f"password in PGPASSWORD or ~/.pgpass, not in the URL"
        )
    if sqlstate == "3D000":
        return lambda _: f"the journal's database does not exist: {journal} ({text}); create it"
    if sqlstate == "42501":
        return lambda _: (
            f"the journal {journal} cannot be used: its user lacks a privilege ({text}); "
            f"it needs to create and write the schema {SCHEMA!r}"
        )
    if sqlstate is not None and sqlstate.startswith(("08", "57P")):
        return lambda _: (
            f"the journal's PostgreSQL server {journal} went away ({text}); the run can be "
            f"resumed once it is back"
        )
    if sqlstate == "55P03":
        return lambda _: (
            f"a run's row in the journal {journal} stayed locked by another process (its owner "
            f"in the middle of a commit, or stopped in one); try again"
        )
    if sqlstate == "25P03":
        return lambda _: (
            f"this process stalled inside a transaction on the journal {journal} longer than "
            f"its lease, and the server ended it; another process may run the run now"
        )
    if sqlstate == "53100":
        return lambda _: f"the journal {journal} cannot be written: the server's disk is full"
    return lambda _: f"the journal {journal} cannot be used: {kind}: {text}"


def connect(journal: PostgresJournal, create: bool) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection to the journal (autocommit: each transaction is begun and
    committed explicitly), its tables made or migrated if ``create``. Raises
    the driver's errors, and JournalError for a journal this Capsule cannot
    use (too new, missing)."""

    connection: psycopg.Connection[tuple[Any, ...]] = driver().connect(
        journal.url, autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME
    )
    try:
        connection.execute(f"SET search_path TO {SCHEMA}")
        version = _version(connection)
        if version is not None or not create:
            _check_version(journal, version)
        if create and (version or 0) < SCHEMA_VERSION:
            _migrate(connection)
    except BaseException:
        connection.close()
        raise
    return connection


async def connect_async(journal: PostgresJournal) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """A connection to read an existing journal (autocommit); JournalError if
    the database holds none, or one too new."""

    connection: psycopg.AsyncConnection[tuple[Any, ...]] = await driver().AsyncConnection.connect(
        journal.url, autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME
    )
    try:
        await connection.execute(f"SET search_path TO {SCHEMA}")
        cursor = await connection.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.schema_version",)
        )
        row = await cursor.fetchone()
        version = None
        if row and row[0]:
            cursor = await connection.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version")
            row = await cursor.fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
        _check_version(journal, version or None)
    except BaseException:
        await connection.close()
        raise
    return connection


def _check_version(journal: PostgresJournal, version: int | None) -> None:
    """JournalError if the database holds no journal (``version`` None), or
    one a newer Capsule wrote."""
    from capsule.journal.schema import JournalError

    if version is None:
        raise JournalError(
            lambda name: (
                f"the database {journal} holds no Capsule journal (no schema {SCHEMA!r}); "
                f"`capsule run` makes it, or pass {name('journal')}"
            )
        )
    if version > SCHEMA_VERSION:
        raise JournalError(
            lambda name: (
                f"the journal {journal} has schema version {version}, written by a newer "
                f"Capsule; this one reads versions up to {SCHEMA_VERSION} (PostgreSQL). "
                f"Upgrade Capsule, or pass {name('journal')} for another journal"
            )
        )


def _version(connection: psycopg.Connection[tuple[Any, ...]]) -> int | None:
    """The journal's schema version; None if the database holds none."""
    row = connection.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.schema_version",)
    ).fetchone()
    if not row or not row[0]:
        return None
    row = connection.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _migrate(connection: psycopg.Connection[tuple[Any, ...]]) -> None:
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        # Another Capsule may have migrated it while this one waited for the lock.
        version = _version(connection) or 0
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number]:
                connection.execute(statement.encode())
        connection.execute(f"UPDATE {SCHEMA}.schema_version SET version = %s", (SCHEMA_VERSION,))
