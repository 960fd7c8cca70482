"""Where the TUI's events come from: a run in this process (``capsule run
--tui``), or a journal (``capsule tui``: a finished run, or one another process
is still writing, followed as it grows)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from capsule.journal.database import ReadConnection
from capsule.journal.location import Journal
from capsule.journal.reader import RunRecord, find_run, open_journal, run_status
from capsule.tui.results import JournaledResults


class Source(Protocol):
    """What the app reads from; ``fetch`` is called a few times a second."""

    @property
    def can_cancel(self) -> bool:
        """Whether tasks can be cancelled from the TUI now (a run still going)."""
        ...

    run_id: str
    program: str
    #: Whether the run lives in this process (quitting the TUI stops it).
    owns_run: bool

    async def fetch(self) -> list[dict[str, Any]]:
        """Events since the last call, oldest first."""
        ...

    def live(self) -> list[Any]:
        """Live readings of running attempts (fuel, mailbox depth), if any."""
        ...

    def outcome(self) -> tuple[str, int | None] | None:
        """(status, exit code) once the run has ended, else None."""
        ...

    async def full_result(self, task_id: str) -> str | None:
        """A completed task's whole result (events carry its first PREVIEW_CHARS),
        once the journal has committed it; None until then, or if it cannot be
        had. Asked again before the journal's next commit, it reads nothing."""
        ...

    def cancel(self, task_id: str) -> str:
        """Cancel a task; what happened, for the user."""
        ...

    def stop(self) -> None:
        """Stop the whole run (when the user quits while it runs)."""
        ...

    async def close(self) -> None: ...


class RunControls(Protocol):
    """How the TUI reaches into a run in this process: a host API run handle
    (SyncRunHandle) has these."""

    def live_tasks(self) -> Sequence[Any]:
        """The attempts running now (task_id, fuel_used, fuel_budget, mailbox_depth)."""
        ...

    def cancel(self, task_id: str) -> bool:
        """Cancel a running task; False if none of that id runs."""
        ...

    def interrupt(self) -> None:
        """Stop the whole run (resumable), without waiting."""
        ...


class LiveSource:
    """A run in this process: its events, fed here by whoever watches the run,
    and the run's controls (:meth:`attach`: a host API handle; or
    :meth:`on_run`: a supervisor's run, for code that runs one directly). The
    feeding thread only appends to a deque; the app converts and applies the
    events on its own loop."""

    owns_run = True

    def __init__(self, program: str, journal: Journal | None = None) -> None:
        self.run_id = ""
        self.program = program
        #: The journal the run writes, if it is journaled (whole results are there).
        self.journal = journal
        self._results = None if journal is None else JournaledResults(journal)
        self._events: deque[Any] = deque()
        #: Where events go instead, once the app is gone (see hand_over).
        self._forward: Callable[[Any], None] | None = None
        self._lock = threading.Lock()
        self._controls: RunControls | None = None
        self._ended = threading.Event()
        self._outcome: tuple[str, int | None] | None = None
        self._stop_requested = False

    # -- fed by the run ----------------------------------------------------------

    @property
    def can_cancel(self) -> bool:
        return not self._ended.is_set()

    def on_event(self, event: Any) -> None:
        with self._lock:
            if self._forward is None:
                self._events.append(event)
                return
            self._forward(event)

    def hand_over(self, subscriber: Callable[[Any], None]) -> None:
        """The app failed and the run goes on without it: ``subscriber`` gets the
        events the app had not taken, then each new one, in order."""
        with self._lock:
            while self._events:
                subscriber(self._events.popleft())
            self._forward = subscriber

    def attach(self, controls: RunControls) -> None:
        """The run's controls: from now on the TUI reads and stops the run through
        them (a stop asked before now stops it at once)."""
        with self._lock:
            self._controls = controls
            stop = self._stop_requested
        if stop:
            controls.interrupt()

    def on_run(self, run: Any) -> None:
        """A supervisor's ``Run`` started (``run_program``'s ``on_run``)."""
        self.run_id = run.run_id
        with self._lock:
            self._controls = _SupervisorRun(run)
            stop = self._stop_requested
        if stop:  # the user quit while the program was loading
            run.stop("cancelled: the TUI was closed before the run started")

    def ended(self, status: str, exit_code: int | None) -> None:
        self._outcome = (status, exit_code)
        self._ended.set()

    # -- read by the app ---------------------------------------------------------

    async def fetch(self) -> list[dict[str, Any]]:
        events = []
        while self._events:
            events.append(self._events.popleft().model_dump())
        return events

    def live(self) -> list[Any]:
        controls = self._controls
        return [] if controls is None or self._ended.is_set() else list(controls.live_tasks())

    def outcome(self) -> tuple[str, int | None] | None:
        return self._outcome

    async def full_result(self, task_id: str) -> str | None:
        if self._results is None or not self.run_id:
            return None
        return await self._results.result(self.run_id, task_id)

    def cancel(self, task_id: str) -> str:
        controls = self._controls
        if controls is None or self._ended.is_set():
            return "the run has ended; nothing to cancel"
        if controls.cancel(task_id):
            return f"cancelling {task_id}"
        return f"{task_id} is not running"

    def stop(self) -> None:
        with self._lock:
            controls = self._controls
            self._stop_requested = controls is None
        if controls is not None and not self._ended.is_set():
            controls.interrupt()

    async def close(self) -> None:
        if self._results is not None:
            await self._results.close()


class _SupervisorRun:
    """A supervisor's ``Run`` as the TUI's RunControls."""

    def __init__(self, run: Any) -> None:
        self._run = run

    def live_tasks(self) -> Sequence[Any]:
        return self._run.snapshot()  # type: ignore[no-any-return]

    def cancel(self, task_id: str) -> bool:
        return bool(self._run.cancel_task(task_id, "cancelled from the TUI"))

    def interrupt(self) -> None:
        self._run.stop("cancelled: the TUI was closed while the run went on")


class JournalSource:
    """A journaled run, read as it grows (another process may be writing it).
    While it runs, a cancellation is written to the journal, where the running
    process picks it up within a quarter of a second."""

    owns_run = False

    def __init__(self, journal: Journal, record: RunRecord) -> None:
        self.journal = journal
        self.record = record
        self.run_id = record.run_id
        self.program = record.program
        self._seq = 0
        self._outcome: tuple[str, int | None] | None = None
        self._db: ReadConnection | None = None
        self._context: Any = None
        self._closed = False
        self._lock = asyncio.Lock()
        self._results = JournaledResults(journal)

    @classmethod
    async def open(cls, journal: Journal, run_id: str | None) -> JournalSource:
        return cls(journal, await find_run(journal, run_id))

    async def fetch(self) -> list[dict[str, Any]]:
        # One read at a time: two first reads would each open the journal, and
        # the connection whose context was dropped is closed under the other.
        async with self._lock:
            return await self._fetch()

    async def _fetch(self) -> list[dict[str, Any]]:
        if self._closed:
            return []
        if self._db is None:
            self._context = open_journal(self.journal)
            self._db = await self._context.__aenter__()
        db = self._db
        rows = await db.fetchall(
            "SELECT seq, task_id, type, at, data_json FROM events WHERE run_id = ? AND seq > ? "
            "ORDER BY seq LIMIT 20000",
            (self.run_id, self._seq),
        )
        events = []
        for seq, task_id, kind, at, data in rows:
            self._seq = seq
            events.append({**json.loads(data), "type": kind, "task_id": task_id, "at": at})
        if not events and self._outcome is None:
            status = await run_status(db, self.run_id)
            if status is not None and status not in ("running", "queued"):
                self._outcome = (status, None)
        return events

    def live(self) -> list[Any]:
        return []

    def outcome(self) -> tuple[str, int | None] | None:
        return self._outcome

    @property
    def can_cancel(self) -> bool:
        return self._outcome is None

    async def full_result(self, task_id: str) -> str | None:
        return await self._results.result(self.run_id, task_id)

    def cancel(self, task_id: str) -> str:
        if self._outcome is not None:
            return "the run has ended; nothing to cancel"
        from capsule.journal.database import database_errors, open_connection
        from capsule.journal.schema import JournalError

        try:
            connection = open_connection(self.journal, create=False)
            try:
                connection.execute(
                    "INSERT INTO cancel_requests (run_id, task_id, requested_at) VALUES (?, ?, ?)",
                    (self.run_id, task_id, time.time()),
                )
            finally:
                connection.close()
        except Exception as exc:
            if not isinstance(exc, (JournalError, *database_errors(self.journal))):
                raise
            return f"cannot ask the run to cancel {task_id}: {exc}"
        return f"asked the run (process {self.record.host_pid}) to cancel {task_id}"

    def stop(self) -> None:
        return None

    async def close(self) -> None:
        await self._results.close()
        async with self._lock:  # not under a read that is still going
            self._closed = True
            if self._context is not None:
                await self._context.__aexit__(None, None, None)
                self._context = self._db = None
