"""The journal writer cannot be killed by what it is handed: a value the
database cannot store (a lone surrogate, a NUL in PostgreSQL's text, an
integer past 64 bits) that slipped past the boundary's checks is stored
escaped, the run's other records with it; on either backend."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from capsule.journal.database import open_connection
from capsule.journal.location import journal_at
from capsule.journal.reader import find_run, load_tasks
from capsule.journal.writer import JournalWriter, start_run_row
from capsule.supervisor.events import ErrorDetail, TaskFailed, TaskOutput
from capsule.supervisor.tree import TaskResult


def test_unstorable_values_are_escaped_and_every_record_is_kept(
    tmp_path: Path, any_journal: str
) -> None:
    journal = journal_at(any_journal)
    with JournalWriter(journal, "run1") as writer:
        start_run_row(writer, tmp_path / "p.py", "digest", [], {}, {}, "00")
        writer.on_event(
            TaskOutput(
                run_id="run1", task_id="main", task="main", stream="stdout", text="a\ud800\x00"
            )
        )
        error = ErrorDetail(kind="exception", message="bad \udfff text", task="main")
        writer.on_event(
            TaskFailed(
                run_id="run1",
                task_id="main",
                task="main",
                attempt=1,
                error=error,
                duration_ms=1.0,
                fuel_consumed=2**70,
            )
        )
        writer.step("main", 1, 1, "output", ("stdout", "x\ud800"), True, "\udfff")
        writer.execute(
            "INSERT INTO program_files (run_id, path, sha256) VALUES (?, ?, ?)",
            ("run1", "/odd\udc80path\x00.py", "d"),
        )
        writer.task_ended(TaskResult("main", "main", 1, 2**70, 0.1, error=error), parent_id=None)
        writer.sync()
        assert writer.failure is None
    db = open_connection(journal, create=False)
    try:
        (count,) = db.execute("SELECT count(*) FROM events WHERE run_id = 'run1'").fetchone()
        (path,) = db.execute("SELECT path FROM program_files").fetchone()
        (steps,) = db.execute("SELECT steps_json FROM step_batches").fetchone()
        (fuel,) = db.execute("SELECT fuel FROM tasks").fetchone()
    finally:
        db.close()
    assert count == 2
    assert path == "/odd\\udc80path\\x00.py"
    assert int(fuel) >= 2**63 - 1  # (as text on SQLite, the largest it holds on PostgreSQL)
    assert json.loads(steps)[0][4] == "\udfff"  # (JSON text escapes it; stored as text)
    run = anyio.run(find_run, journal, "run1")
    (task,) = anyio.run(load_tasks, journal, run.run_id)
    assert task.status == "failed" and "bad" in task.error["message"]
