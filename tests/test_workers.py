"""Workers: `capsule submit` queues a run with its sources, `capsule worker`
processes (real ones, on a real journal: SQLite, or a PostgreSQL server)
claim and run them, each run once; a worker killed mid-run is replaced by
another once its lease expires, with no journaled step run twice; SIGTERM
hands runs back after the grace period; forged sources harm nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import capsule_cli

JOB = """
from capsule import sleep, task

@task(name="square")
def square(n: int) -> int:
    return n * n

@task(name="main")
def main(n: str) -> int:
    sleep(0.05)
    return sum(square.map(range(int(n))))
"""

#: A run that takes a while: a child call a step, each journaled.
STEPS = """
from capsule import sleep, task

@task(name="step")
def step(i: int) -> int:
    return i * 10

@task(name="main", timeout="5m")
def main(count: int = 40) -> int:
    total = 0
    for i in range(count):
        total += step(i)
        sleep(0.1)
    return total
"""


def _program(tmp_path: Path, source: str, name: str = "job.py") -> Path:
    directory = tmp_path / "project"
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def _submit(program: Path, *args: str, env: dict[str, str], cwd: Path) -> str:
    """``capsule submit PROGRAM ARGS``: the run id it printed."""
    done = capsule_cli("submit", str(program), *args, "--json", env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    run_id: str = done.json()["run_id"]
    return run_id


def _worker(env: dict[str, str], *flags: str, cwd: Path) -> subprocess.Popen[str]:
    if "--workdir" not in flags:  # (not the machine's CAPSULE_HOME/worker)
        flags = (*flags, "--workdir", str(cwd / "worker"))
    return subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "worker", *flags],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rows(journal: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    from capsule.journal.database import open_connection
    from capsule.journal.location import journal_at

    connection = open_connection(journal_at(journal), create=False)
    try:
        return [tuple(row) for row in connection.execute(sql, params).fetchall()]
    finally:
        connection.close()


def _status(journal: str, run_id: str) -> str:
    [(status,)] = _rows(journal, "SELECT status FROM runs WHERE run_id = ?", run_id)
    return str(status)


def _wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_workers_run_every_submitted_run_exactly_once(tmp_path: Path, any_journal: str) -> None:
    program = _program(tmp_path, JOB)
    env = {**os.environ, "CAPSULE_JOURNAL": any_journal}
    submitted = {}
    for n in range(2, 8):
        done = capsule_cli("submit", str(program), str(n), "--json", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        submitted[done.json()["run_id"]] = sum(i * i for i in range(n))
    listed = json.loads(capsule_cli("runs", "--json", env=env, cwd=tmp_path).stdout)
    assert {run["status"] for run in listed} == {"queued"}
    workers = [_worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path) for _ in range(2)]
    outputs = [worker.communicate(timeout=240) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    taken = [
        line.split()[4]
        for out, _ in outputs
        for line in out.splitlines()
        if line.startswith("capsule worker: running run ")
    ]
    assert sorted(taken) == sorted(submitted), outputs  # each run taken once, by one
    for run_id, expected in submitted.items():
        inspected = capsule_cli("inspect", run_id, "--json", env=env, cwd=tmp_path)
        assert inspected.returncode == 0, inspected.stderr
        details = inspected.json()
        assert details["status"] == "completed"
        main = next(task for task in details["tasks"] if task["name"] == "main")
        assert main["result"] == expected and main["attempts"] == 1
    started = _rows(
        any_journal,
        "SELECT run_id, task_id, count(*) FROM events WHERE type = 'started' "
        "GROUP BY run_id, task_id HAVING count(*) > 1",
    )
    assert started == []  # no task of any run started twice


def test_a_worker_killed_mid_run_is_replaced_with_no_journaled_step_run_twice(
    tmp_path: Path, postgres_journal: str
) -> None:
    program = _program(tmp_path, STEPS)
    env = {**os.environ, "CAPSULE_JOURNAL": postgres_journal, "CAPSULE_LEASE_SECONDS": "1"}
    run_id = _submit(program, env=env, cwd=tmp_path)
    first = _worker(env, "--poll", "0.1", cwd=tmp_path)
    try:

        def steps_done() -> int:
            return int(
                _rows(
                    postgres_journal,
                    "SELECT count(*) FROM tasks WHERE run_id = ? AND name = 'step' AND final = 1",
                    run_id,
                )[0][0]
            )

        _wait_for(lambda: steps_done() >= 5, "five steps")
    finally:
        first.kill()  # (kill -9: no hand-back, its lease just stops being renewed)
        first.communicate()
    ended_before = {
        task_id
        for (task_id,) in _rows(
            postgres_journal,
            "SELECT task_id FROM tasks WHERE run_id = ? AND final = 1",
            run_id,
        )
    }
    assert _status(postgres_journal, run_id) == "running"  # (its lease is still live)
    second = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err
    assert f"resuming run {run_id}" in out, out
    assert _status(postgres_journal, run_id) == "completed"
    [(result,)] = _rows(postgres_journal, "SELECT result_json FROM runs WHERE run_id = ?", run_id)
    assert json.loads(result) == sum(i * 10 for i in range(40))
    starts = dict(
        _rows(
            postgres_journal,
            "SELECT task_id, count(*) FROM events WHERE run_id = ? AND type = 'started' "
            "GROUP BY task_id",
            run_id,
        )
    )
    assert all(starts[task_id] == 1 for task_id in ended_before), starts
    assert starts["main"] == 2  # (in flight at the kill: replayed, then on live)


def test_sigterm_hands_runs_back_after_the_grace_period_and_another_worker_resumes_them(
    tmp_path: Path, postgres_journal: str
) -> None:
    program = _program(tmp_path, STEPS)
    env = {**os.environ, "CAPSULE_JOURNAL": postgres_journal}
    run_id = _submit(program, env=env, cwd=tmp_path)
    first = _worker(env, "--poll", "0.1", "--grace", "0.5", cwd=tmp_path)
    assert first.stdout is not None
    for line in first.stdout:
        if line.startswith(f"capsule worker: running run {run_id}"):
            break
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert f"handing back run {run_id}" in out
    assert _status(postgres_journal, run_id) == "interrupted"
    [(owner,)] = _rows(postgres_journal, "SELECT lease_owner FROM runs WHERE run_id = ?", run_id)
    assert owner is None  # (given up: another worker takes it at once)
    second = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err
    assert f"resuming run {run_id}" in out
    assert _status(postgres_journal, run_id) == "completed"


def test_sigterm_lets_a_run_finish_within_the_grace_period(
    tmp_path: Path, postgres_journal: str
) -> None:
    program = _program(tmp_path, STEPS)
    env = {**os.environ, "CAPSULE_JOURNAL": postgres_journal}
    run_id = capsule_cli(
        "submit", str(program), "--args-json", "[5]", "--json", env=env, cwd=tmp_path
    ).json()["run_id"]
    other = _submit(program, env=env, cwd=tmp_path)
    worker = _worker(env, "--poll", "0.1", "--grace", "60", cwd=tmp_path)
    assert worker.stdout is not None
    for line in worker.stdout:
        if line.startswith(f"capsule worker: running run {run_id}"):
            break
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert _status(postgres_journal, run_id) == "completed"
    assert _status(postgres_journal, other) == "queued"  # (not taken once stopping)
    assert "handing back" not in out


def test_the_host_api_submits_a_run_and_a_resume_of_it_is_left_to_workers(
    tmp_path: Path, postgres_journal: str
) -> None:
    from capsule import InvalidRequest, Runtime

    program = _program(tmp_path, JOB)

    async def submit() -> str:
        async with Runtime(journal=postgres_journal, prepare=False) as runtime:
            run_id = await runtime.submit(program, "4", run_id="from-the-api")
            assert (await runtime.find(run_id)).status == "queued"
            with pytest.raises(InvalidRequest, match="waits for a worker"):
                await runtime.run(program, "4", run_id=run_id)
            return run_id

    run_id = anyio.run(submit)
    env = {**os.environ, "CAPSULE_JOURNAL": postgres_journal}
    refused = capsule_cli("resume", run_id, env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "was submitted" in refused.stderr, refused.stderr
    again = capsule_cli("submit", str(program), "--run-id", run_id, env=env, cwd=tmp_path)
    assert again.returncode == 2 and "holds a run from-the-api already" in again.stderr
    worker = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    _, err = worker.communicate(timeout=240)
    assert worker.returncode == 0, err
    assert _status(postgres_journal, run_id) == "completed"


def test_sources_are_the_programs_directory_without_secrets_dependencies_or_links(
    tmp_path: Path,
) -> None:
    from capsule.journal.submissions import pack_program

    program = _program(tmp_path, JOB)
    project = program.parent
    (project / "helpers.py").write_text("X = 1\n")
    (project / "pkg").mkdir()
    (project / "pkg" / "__init__.py").write_text("")
    (project / "data.json").write_text("{}")
    (project / ".env").write_text("API_KEY=secret\n")
    (project / ".git").mkdir()
    (project / ".git" / "config.toml").write_text("")
    (project / "node_modules" / "dep").mkdir(parents=True)
    (project / "node_modules" / "dep" / "index.js").write_text("")
    (project / "venv").mkdir()
    (project / ".venv").mkdir()
    (project / "env2").mkdir()
    (project / "env2" / "pyvenv.cfg").write_text("")
    (project / "env2" / "site.py").write_text("")
    (project / "passwd.txt").symlink_to("/etc/passwd")
    (project / "linked").symlink_to(tmp_path, target_is_directory=True)
    sources = pack_program(program)
    with zipfile.ZipFile(io.BytesIO(sources.archive)) as archive:
        names = set(archive.namelist())
    assert names == {"job.py", "helpers.py", "pkg/__init__.py", "data.json"}
    assert sources.program == "job.py" and sources.files == 4


@pytest.mark.parametrize(
    "name",
    ["../escaped.py", "/tmp/absolute.py", "a/../../escaped.py", "..\\escaped.py", ".."],
)
def test_forged_sources_are_refused_and_nothing_is_written_outside(
    tmp_path: Path, name: str
) -> None:
    from capsule.journal.database import open_connection
    from capsule.journal.lease import Lease
    from capsule.journal.schema import JournalError
    from capsule.journal.submissions import claim_next, unpack_sources

    journal = tmp_path / "journal.db"
    program = _program(tmp_path, JOB)
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    run_id = _submit(program, "3", env=env, cwd=tmp_path)
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("job.py", "")
        archive.writestr(zipfile.ZipInfo(name), "import os")
    data = forged.getvalue()
    import hashlib

    connection = open_connection(journal, create=False)
    try:
        connection.execute(
            "UPDATE run_sources SET archive = ?, sha256 = ? WHERE run_id = ?",
            (data, hashlib.sha256(data).hexdigest(), run_id),
        )
        claim = claim_next(connection, Lease.new())
        assert claim is not None and claim.run_id == run_id
        into = tmp_path / "work" / "run"
        with pytest.raises(JournalError, match=r"cannot be unpacked|leaves|not a file"):
            unpack_sources(connection, run_id, into)
    finally:
        connection.close()
    assert not (tmp_path / "work" / "escaped.py").exists()
    assert not (tmp_path / "escaped.py").exists()
    assert not Path("/tmp/absolute.py").exists()


def test_a_worker_marks_a_run_with_forged_sources_as_an_error(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    program = _program(tmp_path, JOB)
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    run_id = _submit(program, "3", env=env, cwd=tmp_path)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("job.py", b"\0" * (64 * 1024 * 1024))  # 64 MB of zeros: ~64 KB packed
    data = bomb.getvalue()
    import hashlib
    import sqlite3

    with sqlite3.connect(journal) as connection:
        connection.execute(
            "UPDATE run_sources SET archive = ?, sha256 = ? WHERE run_id = ?",
            (data, hashlib.sha256(data).hexdigest(), run_id),
        )
    work = tmp_path / "work"
    worker = _worker(env, "--until-idle", "--poll", "0.1", "--workdir", str(work), cwd=tmp_path)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert f"run {run_id} cannot run" in out and "larger than a source file" in out, out
    listed = json.loads(capsule_cli("runs", "--json", env=env, cwd=tmp_path).stdout)
    assert [(run["run_id"], run["status"]) for run in listed] == [(run_id, "error")]
    assert not any(work.iterdir())  # (its directories removed)


def test_workers_claiming_at_once_take_each_run_exactly_once(
    tmp_path: Path, any_journal: str
) -> None:
    """40 claimants (threads, each with its own connection) race for 30
    queued runs: each run is taken by exactly one, and all are taken."""
    import threading

    from capsule.journal.database import open_connection
    from capsule.journal.lease import Lease
    from capsule.journal.location import journal_at
    from capsule.journal.submissions import claim_next, pack_program, submit

    journal = journal_at(any_journal)
    sources = pack_program(_program(tmp_path, JOB))
    connection = open_connection(journal, create=True)
    try:
        for n in range(30):
            submit(connection, f"run{n:02d}", sources, [str(n)], {}, {"entry": "main"}, "x")
    finally:
        connection.close()
    start = threading.Barrier(40)
    taken: list[str] = []

    def claimant() -> None:
        own = open_connection(journal, create=False)
        try:
            start.wait()
            while (claim := claim_next(own, Lease.new())) is not None:
                taken.append(claim.run_id)
        finally:
            own.close()

    threads = [threading.Thread(target=claimant) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == [f"run{n:02d}" for n in range(30)]


def test_a_worker_ends_the_session_of_an_owner_stopped_in_the_middle_of_a_commit(
    tmp_path: Path, postgres_journal: str
) -> None:
    """A run whose owner stopped holding its row (see test_postgres_journal's
    _stalled_owner) is skipped by every claim's SKIP LOCKED unless that
    session is ended: the worker ends it, and takes the run."""
    from tests.test_postgres_journal import _stalled_owner

    program = _program(tmp_path, JOB)
    env = {**os.environ, "CAPSULE_JOURNAL": postgres_journal}
    run_id = _submit(program, "4", env=env, cwd=tmp_path)
    stalled = _stalled_owner(postgres_journal, run_id)
    worker = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    try:
        out, err = worker.communicate(timeout=120)
    finally:
        stalled.close()
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert f"resuming run {run_id}" in out, out
    assert _status(postgres_journal, run_id) == "completed"


def _forged_archive(members: dict[str, bytes], compress_type: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compress_type) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _encrypted_member() -> bytes:
    data = bytearray(_forged_archive({"job.py": b"x"}, zipfile.ZIP_STORED))
    # Set the "encrypted" flag (bit 0) of the entry in both headers.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature) + offset
        data[at] |= 1
    return bytes(data)


def _unknown_compression() -> bytes:
    data = bytearray(_forged_archive({"job.py": b"x"}, zipfile.ZIP_STORED))
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.find(signature) + offset
        data[at : at + 2] = (99).to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize(
    ("program", "archive", "why"),
    [
        ("../job.py", lambda: _forged_archive({"job.py": b""}), "leaves the directory"),
        ("", lambda: _forged_archive({"job.py": b""}), "not a file"),
        ("job.py", _encrypted_member, "cannot be unpacked"),
        ("job.py", _unknown_compression, "cannot be unpacked"),
        ("job.py", lambda: b"PK\x05\x06" + b"\0" * 6 + b"\xff\xff" + b"\0" * 10, "entries"),
        ("job.py", lambda: b"not a zip at all", "not a zip"),
    ],
)
def test_forged_sources_of_every_kind_are_a_clear_error(
    tmp_path: Path, program: str, archive: Any, why: str
) -> None:
    import hashlib

    from capsule.journal.database import open_connection
    from capsule.journal.schema import JournalError
    from capsule.journal.submissions import unpack_sources

    journal = tmp_path / "journal.db"
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    source = _program(tmp_path, JOB)
    run_id = _submit(source, "3", env=env, cwd=tmp_path)
    data = archive()
    connection = open_connection(journal, create=False)
    try:
        connection.execute(
            "UPDATE run_sources SET program = ?, archive = ?, sha256 = ? WHERE run_id = ?",
            (program, data, hashlib.sha256(data).hexdigest(), run_id),
        )
        with pytest.raises(JournalError, match=why):
            unpack_sources(connection, run_id, tmp_path / "work" / "run")
    finally:
        connection.close()


def test_a_forged_run_id_is_never_a_path_and_its_run_an_error(tmp_path: Path) -> None:
    """A run id from the journal names the worker's directory, the run's
    socket and secrets: one that is not a run id (``../``, ``/``) is marked
    an error, and nothing is made or touched outside."""
    journal = tmp_path / "journal.db"
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    source = _program(tmp_path, JOB)
    run_id = _submit(source, "3", env=env, cwd=tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    (victim / "x.sock").write_text("important")
    forged = str(victim / "x")
    import sqlite3

    with sqlite3.connect(journal) as connection:
        connection.execute("UPDATE runs SET run_id = ? WHERE run_id = ?", (forged, run_id))
        connection.execute("UPDATE run_sources SET run_id = ? WHERE run_id = ?", (forged, run_id))
    worker = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert "running run" not in out, out
    assert (victim / "x.sock").read_text() == "important"
    assert victim.stat().st_mode & 0o777 == 0o755
    assert list(victim.iterdir()) == [victim / "x.sock"]
    listed = json.loads(capsule_cli("runs", "--json", env=env, cwd=tmp_path).stdout)
    assert [run["status"] for run in listed] == ["damaged"]


def test_a_run_whose_record_is_damaged_is_an_error_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.db"
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    source = _program(tmp_path, JOB)
    damaged = _submit(source, "3", env=env, cwd=tmp_path)
    fine = _submit(source, "3", env=env, cwd=tmp_path)
    import sqlite3

    with sqlite3.connect(journal) as connection:
        connection.execute("UPDATE runs SET args_json = '\"garbage\"' WHERE run_id = ?", (damaged,))
    worker = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert f"run {damaged} cannot run" in out, out
    assert _status(str(journal), damaged) == "error"
    assert _status(str(journal), fine) == "completed"


def test_a_worker_that_cannot_open_its_journal_says_so_without_its_password(
    tmp_path: Path,
) -> None:
    for journal, expected in (
        ("postgresql://someone:hunter2secret@127.0.0.1:1/journal", "cannot reach"),
        ("postgresq:/someone@127.0.0.1/journal", "looks like a URL"),
    ):
        done = capsule_cli("worker", "--journal", journal, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert "hunter2secret" not in done.stderr + done.stdout
    # (A key that is no key would fail every run that journals a secret.)
    done = capsule_cli(
        "worker",
        "--journal",
        str(tmp_path / "journal.db"),
        cwd=tmp_path,
        env={"CAPSULE_SECRET_KEY": "not-a-key"},
        timeout=60,
    )
    assert done.returncode == 2 and "CAPSULE_SECRET_KEY" in done.stderr, done.stderr


def test_a_worker_ends_no_session_but_a_capsule_owners(
    tmp_path: Path, postgres_journal: str
) -> None:
    """A forged row naming another application's session (here, a plain
    psycopg connection of the same user and database) is not a stalled
    owner's: the worker leaves that session alone."""
    import psycopg

    program = _program(tmp_path, JOB)
    env = {**os.environ, "CAPSULE_JOURNAL": postgres_journal}
    run_id = _submit(program, "3", env=env, cwd=tmp_path)
    with psycopg.connect(postgres_journal, autocommit=True) as victim:
        pid, started = victim.execute(
            "SELECT pid, extract(epoch from backend_start)::text FROM pg_stat_activity "
            "WHERE pid = pg_backend_pid()"
        ).fetchone()
        victim.execute(
            "UPDATE capsule.runs SET status = 'running', lease_owner = 'x 1 - y', "
            "lease_expires_at = 1, lease_session_pid = %s, lease_session_start = %s "
            "WHERE run_id = %s",
            (pid, started, run_id),
        )
        worker = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        assert victim.execute("SELECT 1").fetchone() == (1,)  # (still connected)
    assert _status(postgres_journal, run_id) == "completed"


def test_sources_leave_out_what_says_it_holds_secrets_and_refuse_what_they_cannot_name(
    tmp_path: Path,
) -> None:
    from capsule.journal.schema import JournalError
    from capsule.journal.submissions import pack_program

    program = _program(tmp_path, JOB)
    project = program.parent
    for name in ("secrets.toml", "service-account.json", "db_password.txt", "credentials.json"):
        (project / name).write_text("{}")
    (project / "tokenizer.py").write_text("")
    with zipfile.ZipFile(io.BytesIO(pack_program(program).archive)) as archive:
        assert set(archive.namelist()) == {"job.py", "tokenizer.py"}
    hidden = project / ".hidden.py"
    hidden.write_text(textwrap.dedent(JOB))
    with pytest.raises(JournalError, match="not among the files"):
        pack_program(hidden)
    (project / os.fsdecode(b"bad\xff.py")).write_text("")
    with pytest.raises(JournalError, match="not UTF-8"):
        pack_program(program)


def test_send_to_a_run_on_another_machine_says_so(tmp_path: Path) -> None:
    import sqlite3

    journal = tmp_path / "journal.db"
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    program = _program(tmp_path, JOB)
    done = capsule_cli("run", str(program), "2", "--json", env=env, cwd=tmp_path)
    run_id = done.json()["execution"]["run_id"]
    with sqlite3.connect(journal) as connection:  # (as a worker elsewhere holds it)
        connection.execute(
            "UPDATE runs SET status = 'running', lease_owner = 'elsewhere 7 - 1a2b', "
            "lease_expires_at = 1e12 WHERE run_id = ?",
            (run_id,),
        )
    sent = capsule_cli("send", run_id, "main", "1", env=env, cwd=tmp_path)
    assert sent.returncode == 5, sent.stderr
    assert "running on another machine" in sent.stderr and "elsewhere 7" in sent.stderr


def test_the_sync_host_api_submits_too(tmp_path: Path) -> None:
    from capsule import SyncRuntime

    journal = tmp_path / "journal.db"
    program = _program(tmp_path, JOB)
    with SyncRuntime(journal=journal, prepare=False) as runtime:
        run_id = runtime.submit(program, "5")
        assert runtime.find(run_id).status == "queued"
    env = {**os.environ, "CAPSULE_JOURNAL": str(journal)}
    worker = _worker(env, "--until-idle", "--poll", "0.1", cwd=tmp_path)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert _status(str(journal), run_id) == "completed"
