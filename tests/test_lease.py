"""Run ownership by lease: one process runs a run at a time, a dead owner is
told by its lease's expiry (or, where its process id means the same, by its
process being gone), never by a process id alone. On each journal backend
(SQLite, PostgreSQL): every test's commands journal to ``CAPSULE_JOURNAL``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import capsule_cli, kill_at_marker

SLEEPER = """
from capsule import sleep, task

@task(name="main", timeout="5m")
def main() -> str:
    print("MARK started", flush=True)
    sleep(2)
    return "done"
"""


def _program(tmp_path: Path, source: str = SLEEPER) -> Path:
    path = tmp_path / "flow.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(autouse=True)
def journal(any_journal: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's journal, on each backend, for every command it runs."""
    monkeypatch.setenv("CAPSULE_JOURNAL", any_journal)
    return any_journal


def _crashed_run(tmp_path: Path) -> None:
    printed, code = kill_at_marker(["run", str(_program(tmp_path))], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed


def test_of_many_claims_at_once_exactly_one_takes_the_run(tmp_path: Path, journal: str) -> None:
    """200 claimants of one crashed run, all at once (threads, each with its
    own connection and lease): one takes it, every other is refused."""
    import anyio

    from capsule.journal.lease import Lease
    from capsule.journal.location import journal_at
    from capsule.journal.reader import find_run
    from capsule.journal.schema import JournalError
    from capsule.journal.session import _claim, program_hash

    _crashed_run(tmp_path)
    location = journal_at(journal)
    record = anyio.run(find_run, location, None)
    assert record.shown_status == "crashed"
    digest = program_hash(Path(record.program))
    start = threading.Barrier(200)
    outcomes: list[str] = []

    def claim() -> None:
        start.wait()
        try:
            _claim(location, record, digest, Lease.new())
            outcomes.append("took it")
        except JournalError:
            outcomes.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("took it") == 1 and outcomes.count("refused") == 199


def test_two_resumes_at_once_run_the_run_once(tmp_path: Path) -> None:
    _crashed_run(tmp_path)
    command = [sys.executable, "-m", "capsule.cli", "resume", "--last", "--json"]
    resumes = [
        subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outcomes = [process.communicate(timeout=120) for process in resumes]
    codes = sorted(process.returncode for process in resumes)
    assert codes == [0, 2], outcomes
    refused = next(
        err for process, (_, err) in zip(resumes, outcomes, strict=True) if process.returncode
    )
    assert "still running" in refused or "resumed by another" in refused, refused


@pytest.mark.parametrize("any_journal", ["sqlite"], indirect=True)  # (its claim: as above)
def test_a_live_run_is_never_taken_even_with_force(tmp_path: Path) -> None:
    program = _program(tmp_path)
    running = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert running.stdout is not None
        assert running.stdout.readline().startswith("MARK")
        refused = capsule_cli("resume", "--last", "--force", cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert "still running" in refused.stderr and "lease is held by" in refused.stderr
        assert str(running.pid) in refused.stderr  # (the owner names its process)
    finally:
        running.communicate(timeout=60)
    assert running.returncode == 0


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_a_run_that_crashed_as_pid_1_of_a_pid_namespace_is_resumed(tmp_path: Path) -> None:
    """The run's process is PID 1 of its own PID namespace (as in a
    container): here, process 1 is alive, and its id says nothing of the
    run. Its lease tells: live while renewed, expired once the run is dead."""
    program = _program(tmp_path)
    env = {**os.environ, "CAPSULE_LEASE_SECONDS": "2"}
    inside = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-m",
            "capsule.cli",
            "run",
            str(program),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert inside.stdout is not None
    assert inside.stdout.readline().startswith("MARK")
    inside.kill()  # (unshare, and so, --kill-child, the run: SIGKILL)
    inside.wait(timeout=30)
    runs = json.loads(capsule_cli("runs", "--json", cwd=tmp_path, env=env).stdout)
    assert runs[0]["status"] == "running"  # (its lease has not expired yet)
    deadline = time.monotonic() + 30
    while (
        json.loads(capsule_cli("runs", "--json", cwd=tmp_path, env=env).stdout)[0]["status"]
        != "crashed"
    ):
        assert time.monotonic() < deadline, capsule_cli(
            "runs", "--json", cwd=tmp_path, env=env
        ).stdout
        time.sleep(0.5)
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == "done"


STALLED = """
from capsule import sleep, task

@task(name="main", timeout="5m")
def main() -> str:
    print("MARK started", flush=True)
    sleep(3)
    print("AFTER the sleep", flush=True)
    return "done"
"""


def _hibernated(journal: str) -> bool:
    """Whether the run's main was journaled as hibernated: asleep, with nothing
    more for its journal writer to commit but lease renewals."""
    from capsule.journal.database import open_connection
    from capsule.journal.location import journal_at

    connection = open_connection(journal_at(journal), create=False)
    try:
        row = connection.execute("SELECT count(*) FROM events WHERE type = 'hibernated'").fetchone()
    finally:
        connection.close()
    return bool(row[0])


def test_a_process_stalled_past_its_lease_writes_and_shows_nothing_more(
    tmp_path: Path, journal: str
) -> None:
    """A run whose process stalls (stopped, swapped out) past its lease is
    another's to run once taken: when the first goes on, it finds the lease
    gone at its next journaled step and stops there, and the journal keeps
    what the new owner wrote."""
    program = _program(tmp_path, STALLED)
    env = {**os.environ, "CAPSULE_LEASE_SECONDS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert first.stdout is not None
    assert first.stdout.readline().startswith("MARK")
    # Stopped while it sleeps, not in the middle of a commit: on SQLite, a
    # stopped process holds the journal's write lock for as long as it stays
    # stopped (PostgreSQL's case is test_postgres_journal's).
    deadline = time.monotonic() + 30
    while not _hibernated(journal):
        assert time.monotonic() < deadline, "the run never slept"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while True:
            listed = json.loads(capsule_cli("runs", "--json", cwd=tmp_path, env=env).stdout)
            if listed[0]["status"] == "crashed":
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.json()["result"] == "done"
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=60)
    assert first.returncode != 0
    assert "AFTER" not in out
    assert "no longer this process's to run" in err
    [run] = json.loads(capsule_cli("runs", "--json", cwd=tmp_path, env=env).stdout)
    assert run["status"] == "completed" and run["resumes"] == 1
