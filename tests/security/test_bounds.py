"""What a task makes the host record is bounded: per attempt (kind
``output_limit``) and per run (the run stops, resumable with a larger limit).
The journal of a run that tries to fill the disk stays near its limits. What
the host holds of a task's JSON is bounded on either core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import capsule_cli
from tests.security.support import (
    MB,
    core_flags,
    journal_bytes,
    peak_rss_of_run,
    write,
)


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
    tmp_path: Path, core: str, flood: str, what: str
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
    done = capsule_cli(
        "run", str(program), "--json", "--max-task-output", "2MB", *core_flags(core), cwd=tmp_path
    )
    assert done.returncode == 1, (what, done.stderr[-2000:])
    envelope = json.loads(done.stdout)
    assert envelope["error"]["kind"] == "output_limit", envelope["error"]
    assert "the run option max_task_output" in envelope["error"]["message"]
    assert envelope["execution"]["attempts"] == 1  # not retried: it would flood again
    assert journal_bytes(tmp_path) < 6 * MB, what


def test_the_policy_in_capsule_toml_caps_the_flag(tmp_path: Path, core: str) -> None:
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
    done = capsule_cli(
        "run", str(program), "--json", "--max-task-output", "100MB", *core_flags(core), cwd=tmp_path
    )
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "output_limit" and "limit is 1.0 MB" in error["message"], error


def test_a_run_over_its_journal_limit_stops_and_resumes_with_a_larger_one(
    tmp_path: Path, core: str
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
    done = capsule_cli(
        "run", str(program), "--max-run-journal", "3MB", "--core", core, cwd=tmp_path
    )
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


def test_results_nobody_waits_for_count_against_the_journal_limits(
    tmp_path: Path, core: str
) -> None:
    """Children that each return tens of MB, never waited on: their results go
    to the journal (the tasks table) outside every count, so a run writes
    hundreds of MB under --max-run-journal 20MB."""
    program = write(
        tmp_path,
        """
        from capsule import MessageError, send, sleep, task

        @task(name="big", restart="temporary", ram="512MB", compute="HIGH", max_retries=0)
        def big(i):
            return "x" * (30 * 1024 * 1024)

        @task(name="main", compute="HIGH", timeout="120s", max_retries=0)
        def main():
            handles = [big.spawn(i) for i in range(6)]
            for handle in handles:  # until each has ended (its mailbox is gone)
                while True:
                    try:
                        send(handle.id, 0)
                    except MessageError:
                        break
                    sleep(0.05)
            return "done"
        """,
    )
    capsule_cli(
        "run",
        str(program),
        "--max-run-journal",
        "20MB",
        "--max-task-output",
        "2MB",
        *core_flags(core),
        cwd=tmp_path,
    )
    assert journal_bytes(tmp_path) < 60 * MB


@pytest.mark.parametrize("call", ["wait", "http", "call"])
def test_json_a_task_hands_the_host_cannot_blow_up_in_its_memory(
    tmp_path: Path, core: str, call: str
) -> None:
    """Parsed, a JSON value takes up to ~25 times its text in the host's memory
    (a list object per few characters): a value of more items than the host
    takes is refused before it is parsed, and arguments are passed on as the
    caller wrote them, never held parsed."""
    program = write(
        tmp_path,
        """
        import json
        from capsule import task
        from componentize_py_types import Err
        from wit_world.imports import http, tasks

        @task(name="child", ram="16MB", max_retries=0)
        def child(*args):
            return 1

        @task(name="main", compute="HIGH", ram="512MB", timeout="120s", max_retries=0)
        def main(call):
            items = '"a"' + ',"a"' * (10_000_000 - 1)
            try:
                if call == "wait":
                    tasks.wait("[" + items + "]", 0)
                elif call == "http":
                    http.request('{"method": "GET", "url": "http://x", "junk": [' + items + ']}')
                else:
                    tasks.call("child", '{"args": [' + items + '], "kwargs": {}}')
            except Err:
                pass
            return "survived"
        """,
    )
    peak, done = peak_rss_of_run(
        "run", str(program), call, "--max-total-ram", "256MB", *core_flags(core), cwd=tmp_path
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    # The guest's own text is 40 MB; the runtime and the host ~200 MB.
    assert peak < 600 * MB, f"the host peaked at {peak / MB:,.0f} MB"


def test_waiting_on_one_child_many_times_cannot_blow_up_the_answer(
    tmp_path: Path, core: str
) -> None:
    """The answer of a wait holds each id's outcome: a few KB of ids naming the
    same child (with a 4 MB result) 200 times made an 800 MB answer, built in
    the host's memory and journaled whole, past --max-task-output. Naming a
    child twice is refused (the SDK never does)."""
    program = write(
        tmp_path,
        """
        import json
        from capsule import task
        from componentize_py_types import Err
        from wit_world.imports import tasks

        @task(name="child", compute="HIGH")
        def child():
            return "x" * (4 * 1024 * 1024)

        @task(name="main", compute="HIGH", ram="2GB", timeout="120s", max_retries=0)
        def main():
            handle = child.spawn()
            return len(tasks.wait(json.dumps([handle.id] * 200), None))
        """,
    )
    done = capsule_cli(
        "run", str(program), "--json", "--max-task-output", "2MB", *core_flags(core), cwd=tmp_path
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    envelope = json.loads(done.stdout)
    assert envelope["error"]["kind"] == "protocol", envelope
    assert "more than once" in envelope["error"]["message"]
    assert journal_bytes(tmp_path) < 20 * MB
