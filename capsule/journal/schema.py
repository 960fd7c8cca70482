"""The journal's SQLite schema, its version and migrations, and opening a
journal file safely: a file that is not a journal, or one written by a newer
Capsule, is refused and left untouched."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

from capsule.journal.location import Journal, journal_at
from capsule.supervisor.option_specs import WordedError, Wording

#: The schema this Capsule writes (``PRAGMA user_version``).
SCHEMA_VERSION = 12

#: The ``steps`` view since version 4: a step per row, from the batches.
_STEPS_VIEW = """CREATE VIEW steps (run_id, task_id, attempt, step, kind, request, ok, answer, at) AS
    SELECT batch.run_id, batch.task_id, batch.attempt,
           json_extract(one.value, '$[0]'), json_extract(one.value, '$[1]'),
           json_extract(one.value, '$[2]'), json_extract(one.value, '$[3]'),
           json_extract(one.value, '$[4]'),
           coalesce(json_extract(one.value, '$[5]'), batch.committed_at)
    FROM step_batches AS batch, json_each(batch.steps_json) AS one"""

#: Statements that bring a journal from version N-1 to N, by N.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            program TEXT NOT NULL,
            program_hash TEXT NOT NULL,
            args_json TEXT NOT NULL,
            settings_json TEXT NOT NULL,
            seed TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,
            result_json TEXT,
            error_json TEXT,
            resumes INTEGER NOT NULL DEFAULT 0,
            host_pid INTEGER,
            capsule_version TEXT NOT NULL
        )""",
        """CREATE TABLE tasks (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            name TEXT NOT NULL,
            parent_id TEXT,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            fuel INTEGER NOT NULL DEFAULT 0,
            duration_ms REAL NOT NULL DEFAULT 0,
            started_at REAL,
            ended_at REAL,
            final INTEGER NOT NULL DEFAULT 0,
            result_json TEXT,
            error_json TEXT,
            PRIMARY KEY (run_id, task_id)
        ) WITHOUT ROWID""",
        """CREATE TABLE attempts (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            children_before INTEGER NOT NULL,
            messages_before INTEGER NOT NULL,
            started_at REAL NOT NULL,
            PRIMARY KEY (run_id, task_id, attempt)
        ) WITHOUT ROWID""",
        """CREATE TABLE steps (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            step INTEGER NOT NULL,
            kind TEXT NOT NULL,
            request TEXT NOT NULL,
            ok INTEGER NOT NULL,
            answer TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (run_id, task_id, attempt, step)
        ) WITHOUT ROWID""",
        """CREATE TABLE messages (
            run_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sender_id TEXT NOT NULL,
            target_id TEXT NOT NULL,
            body_json TEXT NOT NULL,
            expects_reply INTEGER NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (run_id, message_id)
        ) WITHOUT ROWID""",
        """CREATE TABLE events (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            task_id TEXT NOT NULL,
            type TEXT NOT NULL,
            at REAL NOT NULL,
            data_json TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID""",
        "CREATE INDEX runs_by_start ON runs (started_at)",
    ],
    # Cancellation asked for by another process (`capsule tui` attached to a run).
    2: [
        """CREATE TABLE cancel_requests (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            requested_at REAL NOT NULL,
            handled_at REAL,
            PRIMARY KEY (run_id, task_id, requested_at)
        )""",
    ],
    # Steps kept as batches: each commit writes one row per task attempt with all
    # the steps it took since the last one (a busy actor takes thousands of steps
    # a second, and a row costs the writer as much as a hundred steps inside one).
    # The ``steps`` view shows them a step per row, as version 2 stored them.
    3: [
        """CREATE TABLE step_batches (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            first_step INTEGER NOT NULL,
            last_step INTEGER NOT NULL,
            steps_json TEXT NOT NULL,
            PRIMARY KEY (run_id, task_id, attempt, first_step)
        ) WITHOUT ROWID""",
        """INSERT INTO step_batches
            SELECT run_id, task_id, attempt, step, step,
                   json_array(json_array(step, kind, request, ok, answer, at))
            FROM steps""",
        "DROP TABLE steps",
        """CREATE VIEW steps (run_id, task_id, attempt, step, kind, request, ok, answer, at) AS
            SELECT batch.run_id, batch.task_id, batch.attempt,
                   json_extract(one.value, '$[0]'), json_extract(one.value, '$[1]'),
                   json_extract(one.value, '$[2]'), json_extract(one.value, '$[3]'),
                   json_extract(one.value, '$[4]'), json_extract(one.value, '$[5]')
            FROM step_batches AS batch, json_each(batch.steps_json) AS one""",
    ],
    # Steps lose their own time (a batch has the time it was committed) and a
    # request made of strings is kept as their JSON array, not as its text
    # (see steps.Request); the view shows both as version 3 did, near enough:
    # such a request as compact JSON text, a step's time as its batch's.
    4: [
        "ALTER TABLE step_batches ADD COLUMN committed_at REAL",
        "DROP VIEW steps",
        _STEPS_VIEW,
    ],
    # A receive's answer is the message as an array [id, sender, body,
    # expects_reply], no longer an object. Nothing stored changes (this
    # Capsule replays both); the version keeps an older one from replaying
    # arrays its guest cannot read.
    5: [],
    # The source files a run read (its own modules and the pure-Python packages
    # it imported), with their SHA-256: a resume refuses if any changed.
    6: [
        """CREATE TABLE program_files (
            run_id TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (run_id, path)
        ) WITHOUT ROWID""",
    ],
    # Events and step batches become rowid tables, keyed by a unique index: a
    # WITHOUT ROWID row over ~1,000 bytes keeps only ~500 in its page and the
    # rest in an overflow page of its own, so each line of output (an event
    # and, in a batch of one, a step) took ~4.5 KB per KB. A rowid table keeps
    # rows of up to ~4 KB in place.
    7: [
        "DROP VIEW steps",
        """CREATE TABLE events_by_rowid (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            task_id TEXT NOT NULL,
            type TEXT NOT NULL,
            at REAL NOT NULL,
            data_json TEXT NOT NULL
        )""",
        "INSERT INTO events_by_rowid SELECT run_id, seq, task_id, type, at, data_json FROM events",
        "DROP TABLE events",
        "ALTER TABLE events_by_rowid RENAME TO events",
        "CREATE UNIQUE INDEX events_in_order ON events (run_id, seq)",
        """CREATE TABLE step_batches_by_rowid (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            first_step INTEGER NOT NULL,
            last_step INTEGER NOT NULL,
            steps_json TEXT NOT NULL,
            committed_at REAL
        )""",
        """INSERT INTO step_batches_by_rowid SELECT run_id, task_id, attempt, first_step,
            last_step, steps_json, committed_at FROM step_batches""",
        "DROP TABLE step_batches",
        "ALTER TABLE step_batches_by_rowid RENAME TO step_batches",
        """CREATE UNIQUE INDEX step_batches_in_order
            ON step_batches (run_id, task_id, attempt, first_step)""",
        _STEPS_VIEW,
    ],
    # A receive's answer may be a batch of messages (an array of the version 5
    # arrays), and a `messages_returned` event says which an attempt put back.
    # Nothing stored changes; the version keeps an older Capsule from misreading
    # them on a resume.
    8: [],
    # A receive's answer is {"messages": [[id, sender, body, expects_reply]]},
    # each body the JSON text the sender wrote, as a string (it was spliced
    # in as a value). Nothing stored changes; the version keeps an older
    # Capsule from misreading them on a resume.
    9: [],
    # Run ownership by lease (see lease.py): who executes the run, and until
    # when unless renewed. A row without an owner is of an older Capsule,
    # which told a dead run by its process id.
    10: [
        "ALTER TABLE runs ADD COLUMN lease_owner TEXT",
        "ALTER TABLE runs ADD COLUMN lease_expires_at REAL",
    ],
    # The unredacted answers a replay needs, encrypted with CAPSULE_SECRET_KEY
    # (see secrets.py), committed with the step they belong to. A step whose
    # answer was kept apart (here, or in the run's file) is marked so in its
    # batch; the version keeps an older Capsule from replaying such a run
    # without them.
    11: [
        """CREATE TABLE secret_answers (
            run_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            step INTEGER NOT NULL,
            sealed BLOB NOT NULL,
            PRIMARY KEY (run_id, task_id, attempt, step)
        )""",
    ],
    # Submitted runs (`capsule submit`): their program's source files, as one
    # archive, for a worker on any machine to run; a run queued for one has
    # status "queued".
    12: [
        """CREATE TABLE run_sources (
            run_id TEXT PRIMARY KEY,
            program TEXT NOT NULL,
            archive BLOB NOT NULL,
            sha256 TEXT NOT NULL
        )""",
        "CREATE INDEX runs_by_status ON runs (status, started_at)",
    ],
}


#: The kind of the error a run that never ran records when the host failed
#: (with the host's traceback), not what it was asked (kind "error").
INTERNAL_ERROR = "internal"


class JournalError(WordedError):
    """The journal cannot be used (corrupt, too new, unknown run, not writable).
    Nothing in it was changed. Its message names the settings that fix it as
    the host API takes them; ``worded(flag_of)``, as the CLI's flags."""


def default_journal(program: Path | None = None) -> Journal:
    """``CAPSULE_JOURNAL`` (a file, or a ``postgresql://`` URL), else
    ``.capsule/journal.db`` beside the program (or in the current directory,
    for commands that take no program)."""
    configured = os.environ.get("CAPSULE_JOURNAL")
    if configured:
        return journal_at(configured)
    base = program.resolve().parent if program is not None else Path.cwd()
    return base / ".capsule" / "journal.db"


def describe_error(path: Path, exc: BaseException) -> Wording:
    """What went wrong with the journal file, in words that suggest the fix
    (for a Naming of the settings: see JournalError)."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if path.is_dir():
        return lambda name: (
            f"the journal {path} is a directory; pass the journal's file ({name('journal')})"
        )
    if "readonly" in text or code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return lambda name: (
            f"the journal {path} cannot be written: it is read-only or not ours to write "
            f"({text}); pass {name('journal')}, or {name('no_journal')}"
        )
    if "disk is full" in text or code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return lambda _: f"the journal {path} cannot be written: the disk is full ({text})"
    if "not a database" in text or "malformed" in text:
        return lambda name: (
            f"{path} is not a readable Capsule journal ({text}); it was left untouched. "
            f"Move it away, or pass {name('journal')}"
        )
    if "disk I/O" in text or isinstance(exc, OSError):
        return lambda _: (
            f"the journal {path} cannot be written: {text} (a full disk, or a failing one?)"
        )
    return lambda _: f"the journal {path} cannot be used: {text}"


def missing_journal(path: Path) -> JournalError:
    """The error for a journal that is not there. `capsule run` journals beside
    the program, so a program run from another directory has its journal in a
    subdirectory of this one: those nearby are named. (Where each journals by
    default is a setting: the message names the caller's.)"""
    nearby: list[Path] = []
    cwd = Path.cwd()
    if path.parent.parent.resolve() == cwd.resolve():
        try:
            nearby = sorted(found for found in cwd.glob("*/.capsule/journal.db") if found.is_file())
        except OSError:
            pass  # an unreadable directory: no hint
    if not nearby:
        return JournalError(
            lambda name: (
                f"no journal at {path}; {name('default_journal')} "
                f"(pass {name('journal')}, or set CAPSULE_JOURNAL)"
            )
        )
    shown = [str(found.relative_to(cwd)) for found in nearby[:3]]
    more = f" (and {len(nearby) - 3} more)" if len(nearby) > 3 else ""
    return JournalError(
        lambda name: (
            f"no journal at {path}; {name('default_journal')}, and there is one at "
            f"{', '.join(shown)}{more}: pass "
            f"{name('journal').replace('PATH', shown[0])}, or set CAPSULE_JOURNAL"
        )
    )


#: How long a journal's connection waits for another's lock.
BUSY_TIMEOUT_S = 5.0


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switch the journal to WAL. A switch racing another connection's (runs
    starting together on a journal that does not exist yet) is answered
    SQLITE_BUSY at once, without the busy handler: so it is tried again, for
    up to BUSY_TIMEOUT_S."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.001
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def connect(path: Path, create: bool) -> sqlite3.Connection:
    """Open a journal for writing (``create``: make it if missing, migrate an
    older schema) and check that it is one this Capsule understands."""
    if not create and not path.is_file():
        raise missing_journal(path)
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise JournalError(describe_error(path, exc)) from None
    try:
        # First: every statement below may meet another connection's lock (a
        # run starting at the same time: switching to WAL takes an exclusive one).
        connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        # (One statement, one snapshot: read apart, another connection's
        # migration could commit between the two.)
        version, tables = connection.execute(
            "SELECT (SELECT user_version FROM pragma_user_version), "
            "(SELECT count(*) FROM sqlite_master)"
        ).fetchone()
        if version > SCHEMA_VERSION:
            raise JournalError(
                lambda name: (
                    f"the journal {path} has schema version {version}, written by a "
                    f"newer Capsule; this one reads versions up to {SCHEMA_VERSION}. Upgrade "
                    f"Capsule, or pass {name('journal')} for a new journal"
                )
            )
        if version == 0 and tables > 0:
            raise JournalError(
                lambda name: (
                    f"{path} is an SQLite database but not a Capsule journal; it was "
                    f"left untouched. Pass {name('journal')} for a journal file"
                )
            )
        _use_wal(connection)
        # WAL with NORMAL: a commit survives the process being killed; an OS crash
        # or power cut may lose the last commits, never the file's consistency.
        connection.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            connection.execute("BEGIN IMMEDIATE")
            # Another connection (a run starting at the same time) may have
            # migrated it while this one waited for the lock.
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number]:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            connection.execute("COMMIT")
    except JournalError:
        connection.close()
        raise
    except sqlite3.Error as exc:
        connection.close()
        raise JournalError(describe_error(path, exc)) from None
    return connection
