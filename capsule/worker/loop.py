"""A worker's loop: claim a run whenever a slot is free, run it on the
worker's Runtime, and on a stop (SIGTERM) take no more, let those running
finish within a grace period, then hand the rest back (interrupted, their
leases released at once, for another worker to resume).

Nothing a run does, and nothing the journal holds, stops the worker: a run
that cannot start is handed back (this machine lacks its secrets: another
may have them), marked as an error (its record or sources are damaged), or
left to its lease (the database failed); a database that goes away is
waited for."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc

from capsule.host.errors import NotResumable, RunError
from capsule.host.handle import RunHandle
from capsule.host.runtime import Runtime
from capsule.journal.database import JournalConnection, open_connection
from capsule.journal.lease import Lease
from capsule.journal.location import Journal
from capsule.journal.reader import MissingSecrets
from capsule.journal.schema import JournalError
from capsule.journal.session import DamagedRun
from capsule.journal.submissions import (
    Claim,
    claim_next,
    release,
    unpack_sources,
    work_left,
)
from capsule.sandbox.runtime import capsule_home
from capsule.terminal import visible

T = TypeVar("T")

#: How often an idle worker looks for work.
DEFAULT_POLL_SECONDS = 0.5
#: How long runs may take to finish once a worker is asked to stop.
DEFAULT_GRACE_SECONDS = 30.0


def default_workdir() -> Path:
    return capsule_home() / "worker"


@dataclass
class WorkerSettings:
    journal: Journal
    #: Runs at once.
    concurrency: int = 1
    grace: float = DEFAULT_GRACE_SECONDS
    poll: float = DEFAULT_POLL_SECONDS
    #: Stop once no submitted run is left to end, here or on any worker (a
    #: batch; a test).
    until_idle: bool = False
    #: Where claimed runs' sources are unpacked: a directory per worker
    #: process in it, a directory per run in that.
    workdir: Path = field(default_factory=default_workdir)


@dataclass(eq=False)
class _Running:
    claim: Claim
    handle: RunHandle
    directory: Path
    started: float


class Worker:
    """Claims and runs submitted runs until :meth:`stop`. ``say`` is handed a
    line for each run taken and ended (journal text in it made visible)."""

    def __init__(self, settings: WorkerSettings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self._say_line = say
        self._stopping = anyio.Event()
        self._slot_free = anyio.Event()
        self._hurry = anyio.Event()
        #: By run id: one claim of a run at a time here (a claim of a run this
        #: worker runs still, whose lease expired while the database was away,
        #: is never taken: see _claim).
        self._running: dict[str, _Running] = {}
        #: Runs this worker handed back because it cannot run them (secrets it
        #: lacks): not taken again by it.
        self._skipped: set[str] = set()
        self._connection: JournalConnection | None = None
        #: One use of the connection at a time (a claim is a transaction).
        self._connection_lock = anyio.Lock()
        #: The last problem said, so that a database that stays away is said once.
        self._last_problem: str | None = None
        self._directory = settings.workdir / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.completed = 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Take no more runs; those running finish within the grace period."""
        self._stopping.set()

    def hurry(self) -> None:
        """Hand the runs still going back now, without waiting for the grace
        period to end."""
        self._hurry.set()
        self._slot_free.set()

    def open(self) -> None:
        """Open the journal (JournalError if it cannot be: said before any
        work), and remove what dead workers on this machine left behind."""
        self._connection = open_connection(self.settings.journal, create=True)
        _remove_dead_workers_directories(self.settings.workdir)

    async def run(self) -> None:
        """Take work until stopped (or idle, with ``until_idle``). Call
        :meth:`open` first."""
        assert self._connection is not None
        try:
            async with Runtime(journal=self.settings.journal) as runtime:
                async with anyio.create_task_group() as group:
                    await self._take_work(runtime, group)
                    await self._wind_down()
        finally:
            await anyio.to_thread.run_sync(self._connection.close)
            shutil.rmtree(self._directory, ignore_errors=True)

    def _say(self, line: str) -> None:
        self._say_line(visible(line, one_line=True))

    async def _take_work(self, runtime: Runtime, group: anyio.abc.TaskGroup) -> None:
        settings = self.settings
        while not self._stopping.is_set():
            if len(self._running) < settings.concurrency:
                claim = await self._on_connection(self._claim)
                if claim is not None:
                    started = await self._start(runtime, claim)
                    if started is not None:
                        group.start_soon(self._watch, started)
                    continue
                if (
                    settings.until_idle
                    and not self._running
                    and not await self._on_connection(self._work_left)
                ):
                    return
            self._slot_free = anyio.Event()
            with anyio.move_on_after(settings.poll):
                # (A run that ends frees a slot; a stop ends the wait too.)
                async with anyio.create_task_group() as waits:
                    waits.start_soon(_cancel_when, self._slot_free, waits)
                    waits.start_soon(_cancel_when, self._stopping, waits)

    async def _on_connection(self, use: Callable[..., T], *args: Any) -> T:
        """``use(*args)`` on a worker thread, the connection its alone."""
        async with self._connection_lock:
            return await anyio.to_thread.run_sync(use, *args)

    def _problem(self, line: str) -> None:
        """Say a problem, once while it lasts."""
        if line != self._last_problem:
            self._last_problem = line
            self._say(line)

    def _claim(self) -> Claim | None:
        assert self._connection is not None
        connection = self._connection
        try:
            # (Not a run this worker runs still, nor one it cannot run.)
            claim = claim_next(connection, Lease.new(), skip=[*self._running, *self._skipped])
        except connection.errors as exc:
            self._problem(f"cannot take work: {connection.describe(exc)(str)}")
            self._reconnect()
            return None
        if self._last_problem is not None:
            self._last_problem = None
            self._say("the journal answers again; taking work")
        return claim

    def _work_left(self) -> bool:
        assert self._connection is not None
        try:
            return work_left(self._connection, skip=self._skipped)
        except self._connection.errors:
            return True  # (asked again at the next turn)

    def _reconnect(self) -> None:
        assert self._connection is not None
        self._connection.close()
        try:
            self._connection = open_connection(self.settings.journal, create=False)
        except JournalError as exc:
            self._problem(f"cannot take work: {exc}")

    def _release(self, claim: Claim, status: str, error: str | None) -> None:
        assert self._connection is not None
        release(self._connection, claim, status, error)

    def _unpack(self, claim: Claim, directory: Path) -> Path | str:
        """The run's program, unpacked; or why it cannot run (the run is
        then released: as an error, or back to the queue if the database
        failed meanwhile)."""
        assert self._connection is not None
        connection = self._connection
        try:
            return unpack_sources(connection, claim.run_id, directory)
        except JournalError as exc:
            release(connection, claim, "error", str(exc))
            return f"run {claim.run_id} cannot run: {exc}"
        except connection.errors as exc:
            release(connection, claim, "interrupted", None)
            self._reconnect()
            return f"run {claim.run_id} handed back: {connection.describe(exc)(str)}"

    async def _start(self, runtime: Runtime, claim: Claim) -> _Running | None:
        directory = self._directory / f"{claim.run_id}-{secrets.token_hex(4)}"
        program = await self._on_connection(self._unpack, claim, directory)
        if isinstance(program, str):
            self._say(program)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        handle = runtime._start_claimed(claim, program)
        how = "resuming" if claim.resumed else "running"
        self._say(f"{how} run {claim.run_id} ({program.name})")
        running = _Running(claim, handle, directory, time.monotonic())
        self._running[claim.run_id] = running
        return running

    async def _watch(self, running: _Running) -> None:
        claim = running.claim
        try:
            result = await running.handle.result()
        except NotResumable as exc:
            named = exc.named
            if isinstance(named, MissingSecrets):
                # Another machine may have them: handed back, for a worker
                # that can; this one does not take it again.
                self._skipped.add(claim.run_id)
                await self._on_connection(self._release, claim, "interrupted", None)
                self._say(f"run {claim.run_id} handed back: {exc}")
            elif isinstance(named, DamagedRun):
                await self._on_connection(self._release, claim, "error", str(exc))
                self._say(f"run {claim.run_id} cannot run: {exc}")
            else:  # (the database failed as it started: taken again later)
                await self._on_connection(self._release, claim, "interrupted", None)
                self._say(f"run {claim.run_id} handed back: {exc}")
        except RunError as exc:
            # (Its journal failed: it is resumed once its lease expires.)
            self._say(f"run {claim.run_id} stopped: {exc}")
        else:
            took = time.monotonic() - running.started
            detail = "" if result.error is None else f": {result.error.message}"
            self._say(f"run {claim.run_id} {result.status} in {took:.2f}s{detail}")
            if result.status in ("completed", "failed"):
                self.completed += 1
        finally:
            if self._running.get(claim.run_id) is running:
                del self._running[claim.run_id]
            shutil.rmtree(running.directory, ignore_errors=True)
            self._slot_free.set()

    async def _wind_down(self) -> None:
        """Let the runs still going finish within the grace period; then hand
        them back (interrupted: resumable at once by another worker)."""
        if not self._running:
            return
        if self._stopping.is_set():
            self._say(
                f"stopping: waiting up to {self.settings.grace:g}s for "
                f"{len(self._running)} run(s) to finish"
            )
        with anyio.move_on_after(self.settings.grace if self._stopping.is_set() else float("inf")):
            while self._running and not self._hurry.is_set():
                self._slot_free = anyio.Event()
                await self._slot_free.wait()
        for running in list(self._running.values()):
            self._say(f"handing back run {running.claim.run_id}")
            await running.handle.cancel()


async def _cancel_when(event: anyio.Event, group: anyio.abc.TaskGroup) -> None:
    await event.wait()
    group.cancel_scope.cancel()


def _remove_dead_workers_directories(workdir: Path) -> None:
    """Remove the directories of worker processes of this machine that are
    gone (killed before they could): named ``PID-TOKEN``."""
    try:
        entries = list(workdir.iterdir())
    except OSError:
        return
    for entry in entries:
        pid, _, _ = entry.name.partition("-")
        if not pid.isdigit() or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue
