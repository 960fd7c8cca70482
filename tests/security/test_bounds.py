"""What a task makes the host record is bounded: per attempt (kind
``output_limit``) and per run (the run stops, resumable with a larger limit).
The journal of a run that tries to fill the disk stays near its limits."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import capsule_cli

MB = 1024**2


def journal_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in (directory / ".capsule").glob("journal.db*"))


def write(directory: Path, source: str, name: str = "flood.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.parametrize(
    ("flood", "what"),
    [
        ('print("x" * 1000)', "printing"),
        ("os.urandom(64 * 1024)", "drawing random bytes"),
        ('send(target, "y" * 4000)', "sending messages"),
        ("time.time()", "reading the clock"),
    ],
)
def test_an_attempt_that_floods_the_journal_fails_with_output_limit(
    tmp_path: Path, flood: str, what: str
) -> None:
    program = write(
        tmp_path,
        f"""
        import os
        import time
        from capsule import receive, send, task

        @task(name="sink", restart="temporary")
        def sink():
            while True:
                receive()

        @task(name="main", compute="HIGH", timeout="120s", max_retries=3)
        def main():
            target = sink.spawn().id
            while True:
                {flood}
        """,
    )
    done = capsule_cli("run", str(program), "--json", "--max-task-output", "2MB", cwd=tmp_path)
    assert done.returncode == 1, (what, done.stderr[-2000:])
    envelope = json.loads(done.stdout)
    assert envelope["error"]["kind"] == "output_limit", envelope["error"]
    assert "--max-task-output" in envelope["error"]["message"]
    assert envelope["execution"]["attempts"] == 1  # not retried: it would flood again
    assert journal_bytes(tmp_path) < 6 * MB, what


def test_the_policy_in_capsule_toml_caps_the_flag(tmp_path: Path) -> None:
    (tmp_path / "capsule.toml").write_text('[policy]\nmax_task_output = "1MB"\n')
    program = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", compute="HIGH", timeout="60s")
        def main():
            for _ in range(3000):
                print("z" * 1000)
            return "printed 3 MB"
        """,
    )
    done = capsule_cli("run", str(program), "--json", "--max-task-output", "100MB", cwd=tmp_path)
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "output_limit" and "limit is 1.0 MB" in error["message"], error


def test_a_run_over_its_journal_limit_stops_and_resumes_with_a_larger_one(
    tmp_path: Path,
) -> None:
    """Children that each stay under the per-attempt limit still add up: past
    the run's limit the run stops (exit 2, a journal error), its journal
    consistent; `capsule resume --max-run-journal` finishes it."""
    program = write(
        tmp_path,
        """
        from capsule import task

        @task(name="chatty", compute="HIGH")
        def chatty(i):
            print(str(i) * 500_000)
            return i

        @task(name="main", compute="HIGH", timeout="120s")
        def main():
            return sum(chatty(i % 10) for i in range(12))
        """,
    )
    done = capsule_cli("run", str(program), "--max-run-journal", "3MB", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--max-run-journal" in done.stderr and "capsule resume" in done.stderr
    assert journal_bytes(tmp_path) < 8 * MB
    runs = json.loads(capsule_cli("runs", "--json", cwd=tmp_path).stdout)
    run_id = runs[0]["run_id"]
    resumed = capsule_cli("resume", run_id, "--max-run-journal", "100MB", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["result"] == sum(i % 10 for i in range(12))


def test_the_limits_are_checked_on_the_command_line(tmp_path: Path) -> None:
    program = write(tmp_path, "from capsule import task\n")
    for flag in ("--max-task-output", "--max-run-journal"):
        done = capsule_cli("run", str(program), flag, "lots", cwd=tmp_path)
        assert done.returncode == 2
        assert f"{flag} 'lots' is invalid" in done.stderr
