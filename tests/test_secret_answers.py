"""Resuming a run whose journal has secrets redacted, on another machine: the
unredacted answers its replay needs are kept apart (a file in the run's
CAPSULE_HOME), or, with CAPSULE_SECRET_KEY, in the journal encrypted. A resume
that lacks them fails before anything runs, never replays ``[redacted]`` into
live code. Each run is real (`capsule run`, kill -9, `capsule resume`), against
a real local server; "another machine" is another CAPSULE_HOME."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import textwrap
from pathlib import Path

import pytest

from capsule.sandbox.runtime import capsule_home
from tests.conftest import LocalServer, capsule_cli, kill_at_marker

TOKEN = "Tok3n-Wq8Zr3Lp6Ty1-secret-answer"

#: The first request sends a granted secret; its response (the server echoes
#: the request's headers) is journaled with it redacted. After the resume the
#: task sends what it saw back: the server must get the real credential.
FETCHER = """
import os
from capsule import sleep, task
from capsule.http import get

@task(name="main", timeout="5m", allowed_hosts=["127.0.0.1"], env=["API_TOKEN"])
def main(base: str) -> list:
    token = os.environ["API_TOKEN"]
    first = get(base + "/echo", headers={"Authorization": "Bearer " + token})
    print("MARK requested", flush=True)
    sleep(1)
    seen = first.json()["headers"]["authorization"]
    second = get(base + "/echo", headers={"Authorization": seen})
    received = second.json()["headers"]["authorization"]
    return [seen == "Bearer " + token, received == "Bearer " + token]
"""

#: The same in async code: the response is an operation's, journaled in the
#: step that reports it ended.
ASYNC_FETCHER = """
import asyncio
import os
from capsule import task
from capsule.http import get_async

@task(name="main", timeout="5m", allowed_hosts=["127.0.0.1"], env=["API_TOKEN"])
async def main(base: str) -> list:
    token = os.environ["API_TOKEN"]
    first = await get_async(base + "/echo", headers={"Authorization": "Bearer " + token})
    print("MARK requested", flush=True)
    await asyncio.sleep(1)
    seen = first.json()["headers"]["authorization"]
    second = await get_async(base + "/echo", headers={"Authorization": seen})
    received = second.json()["headers"]["authorization"]
    return [seen == "Bearer " + token, received == "Bearer " + token]
"""


def new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Two Capsule homes, as two machines have: the run's (set for the test's
    process, so that the killed run has it) and another. Each shares the built
    guest runtime (a machine builds its own; it is not what is tested)."""
    runtime = capsule_home() / "runtime"
    pair = []
    for name in ("home-a", "home-b"):
        home = tmp_path / name
        home.mkdir()
        (home / "runtime").symlink_to(runtime, target_is_directory=True)
        pair.append(home)
    monkeypatch.setenv("CAPSULE_HOME", str(pair[0]))
    monkeypatch.setenv("API_TOKEN", TOKEN)
    monkeypatch.delenv("CAPSULE_SECRET_KEY", raising=False)
    return pair[0], pair[1]


def _killed_run(tmp_path: Path, server: LocalServer, source: str = FETCHER) -> Path:
    """Run ``source`` until its first request was journaled, kill -9 it: the
    journal's path."""
    program = tmp_path / "fetcher.py"
    program.write_text(textwrap.dedent(source))
    kill_at_marker(["run", str(program), server.url], "MARK requested", tmp_path)
    return tmp_path / ".capsule" / "journal.db"


def _run_id(journal: Path) -> str:
    with sqlite3.connect(journal) as connection:
        (run_id,) = connection.execute("SELECT run_id FROM runs").fetchone()
    return str(run_id)


def _resume(tmp_path: Path, home: Path, **env: str) -> tuple[int, str, str]:
    done = capsule_cli(
        "resume", "--last", "--json", cwd=tmp_path, env={"CAPSULE_HOME": str(home), **env}
    )
    return done.returncode, done.stdout, done.stderr


def _journal_bytes(journal: Path) -> bytes:
    """The journal as it is on disk, its write-ahead log too (a killed run's
    last commits may be there only)."""
    wal = journal.with_name(journal.name + "-wal")
    return journal.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_a_resume_without_the_secrets_it_replays_fails_before_anything_runs(
    tmp_path: Path, http_server: LocalServer, homes: tuple[Path, Path]
) -> None:
    here, elsewhere = homes
    journal = _killed_run(tmp_path, http_server)
    run_id = _run_id(journal)
    assert http_server.hits == {"/echo": 1}
    assert (here / "secrets" / f"{run_id}.jsonl").is_file()

    code, stdout, stderr = _resume(tmp_path, elsewhere)
    assert code == 2, (stdout, stderr)
    message = stderr + stdout
    assert f"run {run_id}" in message
    assert "1 journaled answer" in message and "task main" in message
    assert str(elsewhere / "secrets" / f"{run_id}.jsonl") in message
    assert "CAPSULE_HOME" in message and "CAPSULE_SECRET_KEY" in message
    assert "Traceback" not in message
    assert http_server.hits == {"/echo": 1}  # nothing was sent
    # Nothing changed either: where it ran, it resumes, and the task saw the
    # real value in its replayed response.
    code, stdout, stderr = _resume(tmp_path, here)
    assert code == 0, stderr
    assert json.loads(stdout)["result"] == [True, True]
    assert http_server.hits == {"/echo": 2}
    assert not (here / "secrets" / f"{run_id}.jsonl").exists()  # the run is over


def test_the_host_api_refuses_such_a_resume_with_its_journal_error(
    tmp_path: Path,
    http_server: LocalServer,
    homes: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import anyio

    from capsule.host import NotResumable, Runtime

    _, elsewhere = homes
    journal = _killed_run(tmp_path, http_server)
    run_id = _run_id(journal)
    monkeypatch.setenv("CAPSULE_HOME", str(elsewhere))

    async def resume() -> None:
        async with Runtime(journal) as rt:
            await rt.resume(run_id)

    with pytest.raises(NotResumable) as refused:
        anyio.run(resume)
    assert f"run {run_id} cannot be resumed here" in str(refused.value)
    assert str(elsewhere / "secrets" / f"{run_id}.jsonl") in str(refused.value)
    monkeypatch.setenv("CAPSULE_SECRET_KEY", "not a key")
    with pytest.raises(NotResumable, match="CAPSULE_SECRET_KEY is not base64"):
        anyio.run(resume)
    assert http_server.hits == {"/echo": 1}


@pytest.mark.parametrize("source", [FETCHER, ASYNC_FETCHER], ids=["blocking", "async"])
def test_with_a_secret_key_the_run_resumes_anywhere_and_the_journal_holds_no_secret(
    tmp_path: Path,
    http_server: LocalServer,
    homes: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    here, elsewhere = homes
    monkeypatch.setenv("CAPSULE_SECRET_KEY", new_key())
    journal = _killed_run(tmp_path, http_server, source)
    run_id = _run_id(journal)
    assert not (here / "secrets").exists()  # no plaintext file, not even its directory
    assert TOKEN.encode() not in _journal_bytes(journal)
    with sqlite3.connect(journal) as connection:
        rows = connection.execute(
            "SELECT task_id, attempt, step FROM secret_answers WHERE run_id = ?", (run_id,)
        ).fetchall()
        # The step says its answer was kept apart; the steps view reads it as before.
        marked = connection.execute("SELECT steps_json FROM step_batches").fetchall()
        times = dict(connection.execute("SELECT step, at FROM steps").fetchall())
    steps = [step for (batch,) in marked for step in json.loads(batch)]
    kept = [step for step in steps if step[5:]]
    assert [step[5:] for step in kept] == [[None, "secret"]]
    assert rows == [("main", 1, kept[0][0])]
    assert isinstance(times[kept[0][0]], float)

    code, stdout, stderr = _resume(tmp_path, elsewhere)
    assert code == 0, stderr
    assert json.loads(stdout)["result"] == [True, True]
    assert http_server.hits == {"/echo": 2}  # the first was replayed, not sent again
    assert not (elsewhere / "secrets").exists()
    assert TOKEN.encode() not in _journal_bytes(journal)
    assert TOKEN not in stdout + stderr
    inspected = capsule_cli("inspect", run_id, "--json", cwd=tmp_path)
    assert inspected.returncode == 0 and TOKEN not in inspected.stdout + inspected.stderr
    with sqlite3.connect(journal) as connection:
        # The run is over: its secrets go, as the file does.
        assert connection.execute("SELECT count(*) FROM secret_answers").fetchone() == (0,)


def test_a_resume_without_the_key_or_with_another_is_refused_and_says_which(
    tmp_path: Path,
    http_server: LocalServer,
    homes: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, elsewhere = homes
    key = new_key()
    monkeypatch.setenv("CAPSULE_SECRET_KEY", key)
    journal = _killed_run(tmp_path, http_server)
    run_id = _run_id(journal)
    monkeypatch.delenv("CAPSULE_SECRET_KEY")

    code, stdout, stderr = _resume(tmp_path, elsewhere)
    assert code == 2, (stdout, stderr)
    assert f"run {run_id}" in stderr and "encrypted" in stderr
    assert "CAPSULE_SECRET_KEY is not set" in stderr and "task main" in stderr

    code, stdout, stderr = _resume(tmp_path, elsewhere, CAPSULE_SECRET_KEY=new_key())
    assert code == 2, (stdout, stderr)
    assert f"run {run_id}" in stderr
    assert "CAPSULE_SECRET_KEY is not the key" in stderr and "task main" in stderr
    assert "Traceback" not in stderr
    assert http_server.hits == {"/echo": 1}  # nothing was sent

    code, stdout, stderr = _resume(tmp_path, elsewhere, CAPSULE_SECRET_KEY=key)
    assert code == 0, stderr
    assert json.loads(stdout)["result"] == [True, True]


@pytest.mark.parametrize(
    "key",
    [
        "not a key!",
        base64.b64encode(b"sixteen bytes!!!").decode(),  # AES-128's size: not this key's
        "c2hvcnQ",  # base64, but short
    ],
)
def test_a_malformed_key_stops_the_command_at_once(
    tmp_path: Path, http_server: LocalServer, homes: tuple[Path, Path], key: str
) -> None:
    program = tmp_path / "fetcher.py"
    program.write_text(textwrap.dedent(FETCHER))
    for args in (["run", str(program), http_server.url], ["resume", "--last"]):
        done = capsule_cli(*args, cwd=tmp_path, env={"CAPSULE_SECRET_KEY": key})
        assert done.returncode == 2, done
        assert "CAPSULE_SECRET_KEY" in done.stderr and "openssl rand -base64 32" in done.stderr
        assert key not in done.stderr  # a key is never shown, even a wrong one
        assert "Traceback" not in done.stderr
    assert http_server.hits == {}


def test_a_run_whose_replay_holds_no_secret_resumes_anywhere(
    tmp_path: Path, http_server: LocalServer, homes: tuple[Path, Path]
) -> None:
    """Only what is replayed needs its secrets: a child's journaled outcome
    replays no step of the child, and a request without secrets needs none."""
    here, elsewhere = homes
    source = """
    import os
    from capsule import sleep, task
    from capsule.http import get

    @task(allowed_hosts=["127.0.0.1"], env=["API_TOKEN"])
    def fetch(base: str) -> bool:
        token = os.environ["API_TOKEN"]
        seen = get(base + "/echo", headers={"Authorization": "Bearer " + token}).json()
        return seen["headers"]["authorization"] == "Bearer " + token

    @task(name="main", timeout="5m", allowed_hosts=["127.0.0.1"])
    def main(base: str) -> list:
        plain = get(base + "/status/200").status_code
        saw = fetch(base)
        print("MARK requested", flush=True)
        sleep(1)
        return [plain, saw]
    """
    journal = _killed_run(tmp_path, http_server, source)
    assert (here / "secrets" / f"{_run_id(journal)}.jsonl").is_file()  # the child's
    code, stdout, stderr = _resume(tmp_path, elsewhere)
    assert code == 0, stderr
    assert json.loads(stdout)["result"] == [200, True]
    assert http_server.hits == {"/status/200": 1, "/echo": 1}


def _as_journaled_before_markers(journal: Path) -> None:
    """Rewrite ``journal`` as a Capsule before schema 11 wrote it: steps
    without the marker of a secret kept apart, no secret_answers table."""
    with sqlite3.connect(journal) as connection:
        batches = connection.execute("SELECT rowid, steps_json FROM step_batches").fetchall()
        for rowid, steps_json in batches:
            steps = [step[:5] for step in json.loads(steps_json)]
            connection.execute(
                "UPDATE step_batches SET steps_json = ? WHERE rowid = ?",
                (json.dumps(steps), rowid),
            )
        connection.execute("DROP TABLE IF EXISTS secret_answers")
        connection.execute("DROP TABLE IF EXISTS run_sources")  # (version 12)
        connection.execute("DROP INDEX IF EXISTS runs_by_status")
        connection.execute("PRAGMA user_version = 10")


def test_a_journal_from_before_the_markers_resumes_as_it_did(
    tmp_path: Path, http_server: LocalServer, homes: tuple[Path, Path]
) -> None:
    """Such a journal does not say which steps had secrets: with the file its
    replay has them; without it, it replays the redacted form."""
    here, elsewhere = homes
    journal = _killed_run(tmp_path, http_server)
    _as_journaled_before_markers(journal)
    copy = tmp_path / "copy.db"
    with sqlite3.connect(journal) as source, sqlite3.connect(copy) as target:
        source.backup(target)

    code, stdout, stderr = _resume(tmp_path, elsewhere)
    assert code == 0, stderr
    assert json.loads(stdout)["result"] == [False, False]  # "Bearer [redacted]", as before

    done = capsule_cli(
        "resume",
        "--last",
        "--json",
        "--journal",
        str(copy),
        cwd=tmp_path,
        env={"CAPSULE_HOME": str(here)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == [True, True]


def test_a_sealed_answer_opens_only_for_its_own_run_task_attempt_and_step() -> None:
    """Rows moved between steps or runs, altered, or forged do not decrypt."""
    from capsule.journal.secrets import Sealer

    key = base64.urlsafe_b64decode(new_key())
    sealed = Sealer(key, "run1").seal("main", 1, 3, "Bearer " + TOKEN)
    assert TOKEN.encode() not in sealed
    assert Sealer(key, "run1").open("main", 1, 3, sealed) == "Bearer " + TOKEN
    for run_id, task_id, attempt, step in [
        ("run2", "main", 1, 3),
        ("run1", "main/1", 1, 3),
        ("run1", "main", 2, 3),
        ("run1", "main", 1, 4),
    ]:
        assert Sealer(key, run_id).open(task_id, attempt, step, sealed) is None
    other = base64.urlsafe_b64decode(new_key())
    assert Sealer(other, "run1").open("main", 1, 3, sealed) is None
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for forged in (b"", b"\x01", sealed[:20], altered, b"\x02" + sealed[1:], "text", 5, None):
        assert Sealer(key, "run1").open("main", 1, 3, forged) is None
    # A surrogate the host's text may hold comes back as it was.
    odd = Sealer(key, "run1").seal("main", 1, 1, "a\ud800b")
    assert Sealer(key, "run1").open("main", 1, 1, odd) == "a\ud800b"
