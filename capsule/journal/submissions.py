"""Submitted runs: a run queued in the journal with its program's source
files (``capsule submit``), for a worker on any machine to claim and run;
and the claim itself, one statement under the database's own locking.

A submitted run's sources travel as one zip archive in ``run_sources``:
the program's directory, its source files only (no hidden directories,
``node_modules``, virtual environments, caches, ``.env``), bounded in count
and size. A worker unpacks it into a directory of its own, trusting nothing
in it: every name is checked (relative, no ``..``, no links), every size
bounded as it is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import time
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from capsule.journal.database import JournalConnection
from capsule.journal.lease import Lease
from capsule.journal.run_ids import RUN_ID_PATTERN
from capsule.journal.schema import JournalError

#: What a submitted program's archive may hold at most.
MAX_FILES = 2000
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_SOURCE_BYTES = 32 * 1024 * 1024
#: ...and its size in the journal (compressed).
MAX_ARCHIVE_BYTES = 16 * 1024 * 1024

#: The files a program's archive holds, by suffix (its modules, and the
#: data and settings files next to them).
SOURCE_SUFFIXES = frozenset(
    {
        ".py",
        ".pyi",
        ".ts",
        ".mts",
        ".cts",
        ".tsx",
        ".js",
        ".mjs",
        ".cjs",
        ".json",
        ".toml",
        ".txt",
        ".md",
        ".csv",
        ".yaml",
        ".yml",
    }
)
#: Directories never packed: dependencies, environments, caches, the journal.
SKIPPED_DIRECTORIES = frozenset({"node_modules", "__pycache__", "venv", "env"})
#: Files never packed for what their names say they hold (credentials: the
#: journal is shared), matched on the lowercased name.
SECRET_NAMES = re.compile(r"(secret|credential|service[-_]account|private[-_]key|password)")

#: The status of a submitted run no worker has taken yet.
QUEUED = "queued"


@dataclass(frozen=True)
class Sources:
    """A program's source files, packed."""

    #: The program file, relative to the archive's root (its directory).
    program: str
    archive: bytes
    sha256: str
    files: int


class SubmissionError(JournalError):
    """A program that cannot be submitted (too large, unreadable)."""


def pack_program(program: Path) -> Sources:
    """The source files of ``program``'s directory, as an archive. Follows no
    link; refuses a directory past the bounds, or a file it cannot name."""
    root = program.parent
    buffer = io.BytesIO()
    files = 0
    total = 0
    names: set[str] = set()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(_source_files(root)):
            relative = path.relative_to(root).as_posix()
            try:
                relative.encode()
            except UnicodeEncodeError:  # (a name that is not UTF-8: no archive holds it)
                raise SubmissionError(
                    f"{visible_path(path)} has a name that is not UTF-8; rename it, or move "
                    f"it out of the program's directory"
                ) from None
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                if info.st_size > MAX_FILE_BYTES:
                    raise SubmissionError(
                        f"{path} is {info.st_size:,} bytes; a submitted program's files are "
                        f"at most {MAX_FILE_BYTES:,} bytes each (move data out of the "
                        f"program's directory, or fetch it from the task)"
                    )
                data = _read_no_follow(path)
            except OSError as exc:
                raise SubmissionError(f"cannot read {path} to submit it: {exc}") from None
            files += 1
            total += len(data)
            if files > MAX_FILES or total > MAX_SOURCE_BYTES:
                raise SubmissionError(
                    f"the program's directory {root} holds more source than a submission "
                    f"takes ({MAX_FILES:,} files, {MAX_SOURCE_BYTES:,} bytes); submit a "
                    f"program from a directory of its own"
                )
            names.add(relative)
            entry = zipfile.ZipInfo(relative, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, data)
    if program.name not in names:
        raise SubmissionError(
            f"the program {program} is not among the files a submission takes (a hidden "
            f"file, or a name that says it holds secrets?); rename it"
        )
    packed = buffer.getvalue()
    if len(packed) > MAX_ARCHIVE_BYTES:
        raise SubmissionError(
            f"the program's sources take {len(packed):,} bytes packed; a submission "
            f"takes at most {MAX_ARCHIVE_BYTES:,}"
        )
    return Sources(program.name, packed, hashlib.sha256(packed).hexdigest(), files)


def _source_files(root: Path) -> list[Path]:
    found = []
    for directory, subdirectories, names in os.walk(root, followlinks=False):
        subdirectories[:] = [
            name
            for name in subdirectories
            if not name.startswith(".")
            and name not in SKIPPED_DIRECTORIES
            and not (Path(directory) / name / "pyvenv.cfg").exists()
        ]
        for name in names:
            path = Path(directory) / name
            if (
                name.startswith(".")
                or path.suffix not in SOURCE_SUFFIXES
                or SECRET_NAMES.search(name.lower())
            ):
                continue
            found.append(path)
    return found


def visible_path(path: Path) -> str:
    return repr(str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _read_no_follow(path: Path) -> bytes:
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as file:
        return file.read(MAX_FILE_BYTES + 1)


def submit(
    connection: JournalConnection,
    run_id: str,
    sources: Sources,
    args: list[Any],
    kwargs: dict[str, Any],
    settings: dict[str, Any],
    program_hash: str,
) -> None:
    """Queue ``run_id`` with its sources, in one transaction (a worker never
    sees one without the other)."""
    from capsule import __version__

    with connection.transaction():
        connection.execute(
            "INSERT INTO runs (run_id, program, program_hash, args_json, settings_json, seed, "
            "status, started_at, capsule_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                sources.program,
                program_hash,
                json.dumps([args, kwargs]),
                json.dumps(settings),
                os.urandom(16).hex(),
                QUEUED,
                time.time(),
                __version__,
            ),
        )
        connection.execute(
            "INSERT INTO run_sources (run_id, program, archive, sha256) VALUES (?, ?, ?, ?)",
            (run_id, sources.program, sources.archive, sources.sha256),
        )


@dataclass(frozen=True)
class Claim:
    """A submitted run this worker took: its lease, and whether it ran
    before (a resume) or waits for its first start."""

    run_id: str
    lease: Lease
    resumed: bool


#: The runs a worker may take: submitted ones (with sources) that are queued,
#: were handed back (interrupted), or whose owner's lease expired.
_CLAIMABLE = (
    "EXISTS (SELECT 1 FROM run_sources WHERE run_sources.run_id = runs.run_id) AND "
    "(status = 'queued' OR status = 'interrupted' OR "
    "(status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < {now})))"
)


def claim_next(
    connection: JournalConnection, lease: Lease, skip: Collection[str] = ()
) -> Claim | None:
    """Take the oldest claimable run for ``lease``'s owner, in one transaction
    (on PostgreSQL, ``FOR UPDATE SKIP LOCKED``: workers claiming at once each
    take a different run, none waits for another; on SQLite, the write lock
    orders them), but none of ``skip``. None if there is none."""
    dialect = connection.dialect
    now = dialect.now
    connection.end_expired_sessions()
    skipped = list(skip)[:1000]
    unless = f" AND run_id NOT IN ({', '.join('?' * len(skipped))})" if skipped else ""
    with connection.transaction():
        while True:
            row = connection.execute(
                f"SELECT run_id, status FROM runs WHERE {_CLAIMABLE.format(now=now)}{unless} "
                f"ORDER BY started_at, run_id LIMIT 1{dialect.skip_locked}",
                skipped,
            ).fetchone()
            if row is None:
                return None
            run_id, status = row
            if isinstance(run_id, str) and RUN_ID_PATTERN.fullmatch(run_id):
                break
            # A forged (or damaged) id, which would name files: never run.
            connection.execute(
                "UPDATE runs SET status = 'error', ended_at = ?, error_json = ? WHERE run_id = ?",
                (time.time(), _ERROR_JSON_BAD_ID, run_id),
            )
        connection.execute(
            "UPDATE runs SET status = 'running', host_pid = ?, ended_at = NULL, "
            f"lease_owner = ?, lease_expires_at = {now} + ?, "
            "resumes = resumes + ?, started_at = CASE WHEN status = 'queued' "
            f"THEN {now} ELSE started_at END WHERE run_id = ?",
            (os.getpid(), lease.owner, lease.seconds, 0 if status == QUEUED else 1, run_id),
        )
    return Claim(str(run_id), lease, resumed=status != QUEUED)


def work_left(connection: JournalConnection, skip: Collection[str] = ()) -> bool:
    """Whether any submitted run but ``skip`` has yet to end: queued, handed
    back, or running (on any worker: if that one dies, its run is left to do)."""
    skipped = list(skip)[:1000]
    unless = f" AND run_id NOT IN ({', '.join('?' * len(skipped))})" if skipped else ""
    row = connection.execute(
        "SELECT 1 FROM runs WHERE status IN ('queued', 'interrupted', 'running') AND "
        f"EXISTS (SELECT 1 FROM run_sources WHERE run_sources.run_id = runs.run_id){unless} "
        "LIMIT 1",
        skipped,
    ).fetchone()
    return row is not None


_ERROR_JSON_BAD_ID = json.dumps(
    {"kind": "error", "message": "the run's id in the journal is not a run id; it was not run"}
)


def release(connection: JournalConnection, claim: Claim, status: str, error: str | None) -> None:
    """Give a claimed run back: ``interrupted`` (another worker may take it
    at once), or ``error`` with why (it cannot run anywhere). Only while
    this worker holds its lease; a journal that fails meanwhile leaves it to
    the lease's expiry."""
    error_json = None if error is None else json.dumps({"kind": "error", "message": error})
    try:
        connection.execute(
            "UPDATE runs SET status = ?, error_json = coalesce(?, error_json), "
            "ended_at = CASE WHEN ? = 'error' THEN ? ELSE ended_at END, "
            "lease_owner = NULL, lease_expires_at = NULL WHERE run_id = ? AND lease_owner = ?",
            (status, error_json, status, time.time(), claim.run_id, claim.lease.owner),
        )
    except connection.errors:
        pass


def unpack_sources(connection: JournalConnection, run_id: str, into: Path) -> Path:
    """Write ``run_id``'s sources into the new directory ``into``; the path of
    its program. JournalError if they are not there, or not an archive this
    Capsule wrote (its size, entry count, each name and size are checked
    before they are used: the journal is input). Raises the driver's errors."""
    row = connection.execute(
        "SELECT program, archive, sha256 FROM run_sources WHERE run_id = ? "
        "AND length(archive) <= ?",
        (run_id, MAX_ARCHIVE_BYTES),
    ).fetchone()
    if row is None:
        raise JournalError(
            f"run {run_id}'s sources are not in the journal, or larger than a submission "
            f"takes ({MAX_ARCHIVE_BYTES:,} bytes)"
        )
    try:
        program, archive, digest = str(row[0]), bytes(row[1]), str(row[2])
        if hashlib.sha256(archive).hexdigest() != digest:
            raise ValueError("their digest does not match")
        _check_entry_count(archive)
        into.mkdir(parents=True, mode=0o700)
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            total = 0
            for member in opened.infolist():
                target = into / _safe_name(member.filename)
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with opened.open(member) as source:
                    data = source.read(MAX_FILE_BYTES + 1)
                if len(data) > MAX_FILE_BYTES:
                    raise ValueError(f"{member.filename!r:.200} is larger than a source file")
                total += len(data)
                if total > MAX_SOURCE_BYTES:
                    raise ValueError("more source than a submission holds")
                descriptor = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                )
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
        path = into / _safe_name(program)
    except Exception as exc:  # (whatever a forged archive makes zipfile raise)
        raise JournalError(
            f"run {run_id}'s sources in the journal cannot be unpacked "
            f"({type(exc).__name__}: {exc!s:.300}); they may be damaged"
        ) from None
    if not path.is_file():
        raise JournalError(f"run {run_id}'s sources lack its program {program!r:.200}")
    return path


#: The end of a zip archive's central directory, and the offset of its count
#: of entries in it (see the zip format's EOCD record).
_END_OF_DIRECTORY = b"PK\x05\x06"
_ENTRIES_AT = 10


def _check_entry_count(archive: bytes) -> None:
    """ValueError if ``archive`` declares more entries than a submission holds,
    read before zipfile reads them all (each costs memory)."""
    end = archive.rfind(_END_OF_DIRECTORY)
    if end < 0 or end + _ENTRIES_AT + 2 > len(archive):
        raise ValueError("it is not a zip archive")
    (entries,) = struct.unpack_from("<H", archive, end + _ENTRIES_AT)
    if entries > MAX_FILES:  # (0xFFFF: a zip64 count, which Capsule never writes)
        raise ValueError(f"it declares {entries:,} entries")


def _safe_name(name: str) -> str:
    """``name`` (an archive member's: input) as a relative path inside the
    directory it is unpacked into; ValueError if it is not one."""
    if not name or "\x00" in name or "\\" in name or len(name) > 1024:
        raise ValueError(f"the name {name!r:.200} is not a file's")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or not parts or any(part in ("..", ".", "") for part in parts):
        raise ValueError(f"the name {name!r:.200} leaves the directory")
    return str(PurePosixPath(*parts))
