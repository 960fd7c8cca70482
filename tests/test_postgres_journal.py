"""The journal on PostgreSQL: the same runs, resumes and readers as on SQLite,
against a real server (a throwaway cluster: see postgres_cluster.py), and
the ways a database can fail a run (unreachable, refusing, stopped mid-run,
newer) each ending in a clear error, never a traceback or a lost run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import capsule_cli, kill_at_marker
from tests.test_journal import FLOW, _markers, _write


@pytest.fixture
def journal(postgres_journal: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new PostgreSQL journal, for every command the test runs."""
    monkeypatch.setenv("CAPSULE_JOURNAL", postgres_journal)
    return postgres_journal


def _rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SET search_path TO capsule")
        return list(connection.execute(sql, params).fetchall())


def _starts(url: str) -> dict[str, int]:
    """How many times each task started, by task id."""
    return dict(
        _rows(url, "SELECT task_id, count(*) FROM events WHERE type = 'started' GROUP BY task_id")
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    done = capsule_cli("run", str(_write(tmp_path, FLOW)), "--json", "--no-journal", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout)["result"])


@pytest.mark.parametrize(
    ("marker", "delay", "core"),
    [("MARK step 2", 0.0, "threads"), ("MARK counted 40", 0.02, "async")],
)
def test_kill_9_then_resume_on_postgresql_runs_journaled_steps_once(
    tmp_path: Path,
    journal: str,
    uninterrupted: dict[str, Any],
    marker: str,
    delay: float,
    core: str,
) -> None:
    program = _write(tmp_path, FLOW)
    printed, code = kill_at_marker(["run", str(program), "--core", core], marker, tmp_path, delay)
    assert code == -signal.SIGKILL, printed
    ended_before = {
        task_id for (task_id,) in _rows(journal, "SELECT task_id FROM tasks WHERE final = 1")
    }
    starts_before = _starts(journal)
    [run] = json.loads(capsule_cli("runs", "--json", cwd=tmp_path).stdout)
    assert run["status"] == "crashed"  # (its owner is known gone: same machine and namespace)

    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    result = resumed.json()["result"]
    for key in ("chain", "squares", "total", "doubled"):
        assert result[key] == uninterrupted[key]
    main_marker = next(m for m in _markers(printed) if m.startswith("MARK main"))
    assert main_marker == f"MARK main {result['stamp']!r} {result['draw']!r} {result['id']}"
    markers = _markers(printed) + _markers(resumed.stderr)
    assert len(markers) == len(set(markers)), sorted(m for m in markers if markers.count(m) > 1)
    # A task whose end was journaled did not start again.
    starts_after = _starts(journal)
    assert all(starts_after[task_id] == starts_before[task_id] for task_id in ended_before)
    inspected = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    details = inspected.json()
    assert details["status"] == "completed" and details["resumes"] == 1
    again = capsule_cli("resume", "--last", cwd=tmp_path)
    assert again.returncode == 2 and "already ended (completed)" in again.stderr


def test_the_host_api_runs_lists_inspects_and_resumes_on_postgresql(
    tmp_path: Path, journal: str
) -> None:
    from capsule import Runtime
    from capsule.supervisor.events import TaskWaiting

    program = _write(
        tmp_path,
        """
        from capsule import sleep, task

        @task(name="twice")
        def twice(n: int) -> int:
            return n * 2

        @task(name="main")
        def main(n: int, nap: float = 0) -> int:
            doubled = twice(n)
            sleep(nap)
            return doubled + 1
        """,
    )

    async def use() -> None:
        async with Runtime(journal=journal) as runtime:
            result = await runtime.run(program, 20)
            assert result.ok and result.value == 41
            [listed] = await runtime.runs()
            assert listed.run_id == result.run_id and listed.shown_status == "completed"
            details = await runtime.inspect(result.run_id)
            assert {task.name for task in details.tasks} == {"main", "twice"}
            assert (await runtime.find(result.run_id[:6])).run_id == result.run_id
            # Cancelled while it sleeps, resumed: its child is not run again.
            handle = await runtime.start(program, 5, 1.5, run_id="napping")
            async for event in handle.events():
                if isinstance(event, TaskWaiting):
                    break
            await handle.cancel()
            assert (await runtime.find("napping")).shown_status == "interrupted"
            resumed = await runtime.resume("napping")
            assert resumed.ok and resumed.value == 11
        [(child_starts,)] = _rows(
            journal,
            "SELECT count(*) FROM events JOIN tasks USING (run_id, task_id) "
            "WHERE run_id = 'napping' AND name = 'twice' AND type = 'started'",
        )
        assert child_starts == 1

    anyio.run(use)


def test_an_unreachable_server_is_a_clear_error_naming_it_without_its_password(
    tmp_path: Path,
) -> None:
    program = _write(tmp_path, "from capsule import task\n@task\ndef main():\n    return 1\n")
    url = "postgresql://someone:hunter2secret@127.0.0.1:1/journal"
    for args in (["run", str(program), "--journal", url], ["runs", "--journal", url]):
        failed = capsule_cli(*args, cwd=tmp_path)
        assert failed.returncode == 2, failed.stderr
        assert "Traceback" not in failed.stderr
        assert "hunter2secret" not in failed.stderr + failed.stdout
        assert "cannot reach the journal's PostgreSQL server" in failed.stderr
        assert "someone:***@127.0.0.1:1/journal" in failed.stderr


def test_a_database_without_a_journal_and_one_too_new_are_refused(
    tmp_path: Path, postgres_journal: str
) -> None:
    listed = capsule_cli("runs", "--journal", postgres_journal, cwd=tmp_path)
    assert listed.returncode == 2
    assert "holds no Capsule journal" in listed.stderr, listed.stderr
    program = _write(tmp_path, "from capsule import task\n@task\ndef main():\n    return 1\n")
    made = capsule_cli("run", str(program), "--journal", postgres_journal, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    _rows(postgres_journal, "UPDATE schema_version SET version = 99 RETURNING version")
    for args in (["run", str(program)], ["runs"], ["resume", "--last"]):
        refused = capsule_cli(*args, "--journal", postgres_journal, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert "newer Capsule" in refused.stderr and "Traceback" not in refused.stderr


def test_guest_strings_postgresql_cannot_store_are_kept_escaped(
    tmp_path: Path, journal: str
) -> None:
    """A NUL (which PostgreSQL's text refuses) and lone surrogates in what a
    task prints, returns, names and fails with: the run is journaled and
    readable, its strings as JSON escapes them."""
    program = _write(
        tmp_path,
        r"""
        from capsule import TaskError, task

        @task(name="odd")
        def odd() -> str:
            print("nul \x00 here", "surrogate \ud800 here")
            return "r\x00 end"

        @task(name="bad")
        def bad() -> None:
            raise ValueError("nul \x00 and \udfff in an error")

        @task(name="main")
        def main() -> list:
            try:
                bad()
            except TaskError as error:
                caught = error.message
            return [odd(), caught]
        """,
    )
    done = capsule_cli("run", str(program), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    returned, caught = done.json()["result"]
    assert returned == "r\x00 end" and "nul \x00 and" in caught
    inspected = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    details = inspected.json()
    assert details["status"] == "completed"
    assert {task["name"]: task["status"] for task in details["tasks"]} == {
        "main": "completed",
        "odd": "completed",
        "bad": "failed",
    }


def test_postgresql_stopped_mid_run_fails_it_clearly_and_it_resumes_once_back(
    tmp_path: Path,
) -> None:
    """The database goes away while a run writes to it: the run stops with an
    error naming the server (exit 2, no traceback); once the server is back,
    `capsule resume` finishes the run, each journaled step once."""
    from tests.postgres_cluster import throwaway_cluster

    with throwaway_cluster() as cluster:
        url = cluster.new_database()
        program = _write(
            tmp_path,
            """
            from capsule import sleep, task

            @task(name="main", timeout="5m")
            def main() -> int:
                total = 0
                for i in range(40):
                    print(f"MARK tick {i}", flush=True)
                    total += i
                    sleep(0.1)
                return total
            """,
        )
        env = {**os.environ, "CAPSULE_JOURNAL": url, "CAPSULE_LEASE_SECONDS": "2"}
        running = subprocess.Popen(
            [sys.executable, "-m", "capsule.cli", "run", str(program)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert running.stdout is not None
        for line in running.stdout:
            if line.startswith("MARK tick 3"):
                break
        cluster.stop("fast")
        try:
            out, err = running.communicate(timeout=60)
        finally:
            cluster.start()
        assert running.returncode == 2, err
        assert "Traceback" not in err
        assert "PostgreSQL server" in err and "resumed once it is back" in err, err
        deadline = time.monotonic() + 30
        while True:
            [run] = json.loads(capsule_cli("runs", "--json", env=env, cwd=tmp_path).stdout)
            if run["status"] == "crashed":
                break
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
        resumed = capsule_cli("resume", "--last", "--json", env=env, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.json()["result"] == sum(range(40))
        shown = _markers(out) + _markers(resumed.stderr)
        assert len(shown) == len(set(shown))


def _stalled_owner(url: str, run_id: str) -> Any:
    """A connection standing for an owner stopped in the middle of a commit:
    its lease on ``run_id`` expired, its session recorded with the lease, and
    the run's row locked in a transaction it never ends. (A process stopped
    while psycopg sends a batch holds the row so: no server timeout applies.)"""
    import psycopg

    stalled = psycopg.connect(url, autocommit=True, application_name="capsule")
    stalled.execute("SET search_path TO capsule")
    pid, started = stalled.execute(
        "SELECT pid, extract(epoch from backend_start)::text FROM pg_stat_activity "
        "WHERE pid = pg_backend_pid()"
    ).fetchone()
    stalled.execute(
        "UPDATE runs SET status = 'running', lease_owner = 'stalled-host 1 - 000000', "
        "lease_expires_at = extract(epoch from clock_timestamp()) - 1, "
        "lease_session_pid = %s, lease_session_start = %s WHERE run_id = %s",
        (pid, started, run_id),
    )
    stalled.execute("BEGIN")
    stalled.execute("SELECT 1 FROM runs WHERE run_id = %s FOR UPDATE", (run_id,))
    return stalled


def test_a_resume_ends_the_session_of_an_owner_stopped_in_the_middle_of_a_commit(
    tmp_path: Path, journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    monkeypatch.setenv("CAPSULE_LEASE_SECONDS", "1")
    program = _write(
        tmp_path,
        """
        from capsule import sleep, task

        @task(name="main", timeout="5m")
        def main() -> str:
            print("MARK started", flush=True)
            sleep(30)
            return "done"
        """,
    )
    printed, code = kill_at_marker(["run", str(program)], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed
    [(run_id,)] = _rows(journal, "SELECT run_id FROM runs")
    stalled = _stalled_owner(journal, run_id)
    try:
        resumed = subprocess.Popen(
            [sys.executable, "-m", "capsule.cli", "resume", "--last"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while _rows(journal, "SELECT resumes FROM runs")[0][0] != 1:
            assert resumed.poll() is None, resumed.communicate()
            assert time.monotonic() < deadline, "the resume never took the run"
            time.sleep(0.05)
        with pytest.raises(psycopg.OperationalError):
            stalled.execute("SELECT 1")  # (its session was ended)
    finally:
        stalled.close()
        if resumed.poll() is None:
            resumed.kill()
        resumed.communicate()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://capsule:pa?ss2@db:5432/x", "postgresql://capsule:***@db:5432/x"),
        ("postgresql://capsule:pa#ss3@db/x", "postgresql://capsule:***@db/x"),
        ("postgresql://capsule:pa/ss1@db/x", "postgresql://capsule:***@db/x"),
        ("postgresql://capsule:p@ss@db/x", "postgresql://capsule:***@db/x"),
        ("postgresql://db/x?sslmode=require&%70assword=secret2", "postgresql://db/x?***"),
        ("postgresql://capsule@db/x", "postgresql://capsule@db/x"),
    ],
)
def test_a_journal_url_is_shown_without_its_password(url: str, shown: str) -> None:
    from capsule.journal.location import PostgresJournal

    assert str(PostgresJournal(url)) == shown


def test_a_driver_message_quoting_the_url_is_shown_without_its_password(tmp_path: Path) -> None:
    """libpq quotes what it cannot read of a URL, password and all."""
    program = _write(tmp_path, "from capsule import task\n@task\ndef main():\n    return 1\n")
    for url in (
        "postgresql://capsule:p%zzsecretword@127.0.0.1:1/x",
        "postgresql://capsule:secretword@[::1/x",
    ):
        failed = capsule_cli("run", str(program), "--journal", url, cwd=tmp_path)
        assert failed.returncode == 2, failed.stderr
        assert "secretword" not in failed.stderr and "Traceback" not in failed.stderr
