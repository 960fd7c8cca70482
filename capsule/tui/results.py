"""Whole results of a run's completed tasks, as its journal has committed them.

Events carry the first PREVIEW_CHARS of a task's result, the journal the whole
of it; but a task's completed event can reach the TUI before the journal
writer has committed its result. A result asked for and not there yet is read
again only after a commit: SQLite's ``PRAGMA data_version`` on the reader's
own connection changes whenever another connection (the run's journal writer,
in this process or another) has committed, and reading it costs no read of
the database. So while the writer is idle nothing is read, and the result
shows after the commit that holds it, however long that takes. (PostgreSQL
has no such counter: a result not there yet is read again at most every
RECHECK_SECONDS.)
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from capsule.journal.location import Journal

#: How soon a result that was not in a PostgreSQL journal is read again.
RECHECK_SECONDS = 0.25


class JournaledResults:
    """Reads whole results from one journal, on one read-only connection (opened
    at the first read: a live run's journal may not exist before)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._connection: Any = None
        #: (run_id, task_id, data_version) of the last result not there yet: the
        #: same one is not read again before the journal's next commit (on
        #: PostgreSQL, the time it was read, not again before RECHECK_SECONDS).
        self._missed: tuple[str, str, float] | None = None
        #: Reads run on worker threads; one at a time, and not under close().
        self._lock = threading.Lock()
        self._closed = False

    async def result(self, run_id: str, task_id: str) -> str | None:
        """The task's whole result, if the journal has committed it (None: not
        yet, or it has none: it did not complete, or the run is not journaled)."""
        return await asyncio.to_thread(self._read, run_id, task_id)

    def _read(self, run_id: str, task_id: str) -> str | None:
        with self._lock:
            if self._closed:
                return None
            connection = self._connection
            if connection is None:
                connection = self._connection = self._connect()
            if isinstance(self.journal, Path):
                version = float(connection.execute("PRAGMA data_version").fetchone()[0])
                if self._missed == (run_id, task_id, version):
                    return None  # nothing committed since it was not there
            else:
                version = time.monotonic()
                missed = self._missed
                if missed is not None and missed[:2] == (run_id, task_id):
                    if version - missed[2] < RECHECK_SECONDS:
                        return None
            row = connection.execute(
                "SELECT result_json FROM tasks WHERE run_id = ? AND task_id = ?",
                (run_id, task_id),
            ).fetchone()
            result = None if row is None else row[0]
            # (A commit after data_version was read changes it again: read anew then.)
            self._missed = None if result is not None else (run_id, task_id, version)
            return None if result is None else str(result)

    def _connect(self) -> Any:
        if isinstance(self.journal, Path):
            uri = f"{self.journal.resolve().as_uri()}?mode=ro"  # (never creates one)
            return sqlite3.connect(uri, uri=True, timeout=5, check_same_thread=False)
        from capsule.journal.database import open_connection

        return open_connection(self.journal, create=False)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None
