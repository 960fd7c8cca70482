"""Attacks on the host that it does not withstand yet, each a real ``capsule``
subprocess. Marked xfail (strict) until fixed: a fix makes its test pass, and
then the mark goes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import capsule_cli, kill_at_marker

MB = 1024**2


def write(directory: Path, source: str, name: str = "prog.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def journal_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in (directory / ".capsule").glob("journal.db*"))


def peak_rss_of_run(*args: str, cwd: Path) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run `capsule ARGS` under a small wrapper process that reports the peak
    resident memory of the `capsule` process alone (bytes)."""
    wrapper = textwrap.dedent(
        """
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "capsule.cli", *sys.argv[1:]])
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)
        sys.exit(done.returncode)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return int(done.stderr.strip().splitlines()[-1]), done


# -- what a run records ------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="a task's result (and its failures' texts) are journaled in its row and "
    "events but counted against neither --max-task-output nor --max-run-journal",
)
def test_results_nobody_waits_for_count_against_the_journal_limits(tmp_path: Path) -> None:
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
        cwd=tmp_path,
    )
    assert journal_bytes(tmp_path) < 60 * MB


# -- the program's import ------------------------------------------------------

#: Module-level code that sleeps on the host while an instance imports the
#: program for a task (not while the program is first loaded, so the run starts).
SLEEPS_WHEN_PREPARED = """
import sys, time
_describe = True
_frame = sys._getframe()
while _frame is not None:
    _program = _frame.f_locals.get("program")
    if _program is not None and hasattr(_program, "describe"):
        _describe = _program.describe
    _frame = _frame.f_back
if not _describe:
    time.sleep(29.9)
    time.sleep(30)
"""


def test_a_sleep_while_importing_the_program_does_not_outlast_a_deadline(
    tmp_path: Path,
) -> None:
    program = write(
        tmp_path,
        SLEEPS_WHEN_PREPARED
        + textwrap.dedent(
            """
            from capsule import task

            @task(name="child")
            def child():
                return 1

            @task(name="main", timeout="2s", max_retries=0)
            def main():
                return child()
            """
        ),
    )
    # The run's main has a 2 s deadline; the import of its child's instance
    # sleeps a minute. A wedge shows as the subprocess's timeout.
    done = capsule_cli("run", str(program), "--json", cwd=tmp_path, timeout=40)
    assert json.loads(done.stdout)["error"]["kind"] == "timeout"


def test_sigterm_stops_a_run_whose_instances_sleep_while_importing(tmp_path: Path) -> None:
    program = write(
        tmp_path,
        SLEEPS_WHEN_PREPARED
        + textwrap.dedent(
            """
            from capsule import task

            @task(name="child")
            def child():
                return 1

            @task(name="main", timeout="5m")
            def main():
                print("MARK calling", flush=True)
                return child()
            """
        ),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("MARK"):
            break
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("SIGTERM did not stop the run") from None
    assert process.returncode == 130, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_program_is_first_imported(
    tmp_path: Path, sig: signal.Signals
) -> None:
    program = write(
        tmp_path,
        """
        import time
        print("MARK importing", flush=True)
        time.sleep(20)

        from capsule import task

        @task(name="main")
        def main():
            return "ran"
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("MARK"):
            break
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert "ran" not in stdout


# -- host memory -----------------------------------------------------------------


@pytest.mark.parametrize("call", ["wait", "http", "call"])
def test_json_a_task_hands_the_host_cannot_blow_up_in_its_memory(tmp_path: Path, call: str) -> None:
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
        "run", str(program), call, "--max-total-ram", "256MB", cwd=tmp_path
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    # The guest's own text is 40 MB; the runtime and the host ~200 MB.
    assert peak < 600 * MB, f"the host peaked at {peak / MB:,.0f} MB"


def test_waiting_on_one_child_many_times_cannot_blow_up_the_answer(tmp_path: Path) -> None:
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
    done = capsule_cli("run", str(program), "--json", "--max-task-output", "2MB", cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    envelope = json.loads(done.stdout)
    assert envelope["error"]["kind"] == "protocol", envelope
    assert "more than once" in envelope["error"]["message"]
    assert journal_bytes(tmp_path) < 20 * MB


def test_after_a_resume_only_the_task_asked_can_answer_an_ask(tmp_path: Path) -> None:
    """Asks in flight when a run stopped may be answered, after the resume,
    before the asker asks again (its replayer may be faster): such early
    replies were taken from any task, a replayed reply step that had been
    refused included. A task that guessed the ask's id (ids are
    deterministic) answered in place of the task asked."""
    write(
        tmp_path,
        """
        from capsule import ask, receive, task
        from componentize_py_types import Err
        from wit_world.imports import messaging

        @task(name="oracle", restart="temporary")
        def oracle():
            receive()
            print("MARK oracle has the question", flush=True)
            receive()  # never answers

        @task(name="evil", restart="temporary")
        def evil():
            for number in range(1, 4):  # refused now; replayed after the resume
                try:
                    messaging.reply(f"main#{number}", '"forged"')
                except Err:
                    pass
            receive()

        @task(name="main", compute="HIGH", timeout="60s", max_retries=0)
        def main():
            evil.spawn()
            target = oracle.spawn()
            total = 0
            for number in range(1_000_000):  # evil's replay comes first
                total += number
            try:
                return ask(target, "question", timeout=2)
            except Exception as error:
                return f"no reply: {type(error).__name__}"
        """,
    )
    printed, code = kill_at_marker(["run", "prog.py"], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed
    done = capsule_cli("resume", "--last", cwd=tmp_path)
    assert "forged" not in done.stdout, done.stdout
    assert done.stdout.startswith("no reply"), (done.stdout, done.stderr[-2000:])


def test_a_task_cannot_register_under_another_tasks_id(tmp_path: Path) -> None:
    """Targets are looked up as registered names first, then as task ids: a
    child registered under the id of another task got every message sent to
    that task, and answered its asks."""
    program = write(
        tmp_path,
        """
        import capsule
        from capsule import ask, receive, send, task

        @task(name="critic", restart="temporary")
        def critic():
            while True:
                receive().reply("genuine review")

        @task(name="impostor", restart="temporary")
        def impostor():
            while True:
                message = receive()
                if message.expects_reply:
                    message.reply("forged review")

        @task(name="evil", restart="temporary")
        def evil(victim_id, parent_id):
            try:
                impostor.spawn(name=victim_id)
                outcome = "registered"
            except capsule.TaskError as error:
                outcome = f"refused: {error.message}"
            send(parent_id, outcome)
            receive()

        @task(name="main", timeout="30s", max_retries=0)
        def main():
            critic_handle = critic.spawn()
            evil.spawn(critic_handle.id, capsule.current().id)
            outcome = receive().body
            return [outcome, ask(critic_handle, "please review", timeout=10)]
        """,
    )
    done = capsule_cli("run", str(program), "--json", cwd=tmp_path)
    outcome, review = json.loads(done.stdout)["result"]
    assert review == "genuine review"
    assert outcome.startswith("refused") and "task id" in outcome, outcome


@pytest.mark.xfail(
    strict=True,
    reason="output is shown on the journal's writer thread: while stdout is a pipe "
    "nobody reads, the writer blocks in the write, and the run neither journals "
    "nor ends (SIGTERM, Ctrl-C) until the reader reads",
)
def test_sigterm_stops_a_run_whose_stdout_nobody_reads(tmp_path: Path) -> None:
    program = write(
        tmp_path,
        """
        import sys
        from capsule import receive, task

        @task(name="main", compute="HIGH", timeout="5m")
        def main():
            print("MARK flooding", file=sys.stderr, flush=True)
            print("x" * (1024 * 1024), flush=True)  # more than a pipe holds
            receive()
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program)],
        stdout=subprocess.PIPE,  # never read until the end
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith(b"MARK"):
            break
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("SIGTERM did not stop the run while stdout was blocked") from None
    process.communicate()
    assert process.returncode == 130


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", "10**400"),
        ("restart_window", "10**400"),
        ("ram", '"9" * 400 + "GB"'),
        ("timeout", '"9" * 400 + "h"'),
    ],
)
def test_task_options_too_large_for_a_float_are_config_errors(
    tmp_path: Path, option: str, value: str
) -> None:
    """The program declares its tasks' options (its module-level code may
    write any JSON there): a number no float holds crashed the host with a
    traceback (OverflowError) and left the run as crashed in the journal."""
    program = write(
        tmp_path,
        f"""
        from capsule import task
        from capsule.sdk import task as sdk_task

        @task(name="main")
        def main():
            return "ran"

        for declared in sdk_task.registry.values():
            declared.options["{option}"] = {value}
        """,
    )
    done = capsule_cli("run", str(program), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and option in done.stderr, done.stderr[-2000:]
    runs = capsule_cli("runs", "--json", cwd=tmp_path)
    assert [run["status"] for run in json.loads(runs.stdout)] == ["error"]


def test_instances_importing_the_program_count_against_the_memory_budget(
    tmp_path: Path,
) -> None:
    program = write(
        tmp_path,
        SLEEPS_WHEN_PREPARED.replace(
            "    time.sleep(29.9)\n    time.sleep(30)\n",
            "    _hoard = bytearray(200 * 1024 * 1024)\n"
            "    for _at in range(0, len(_hoard), 4096):\n"
            "        _hoard[_at] = 1\n",
        )
        + textwrap.dedent(
            """
            from capsule import gather, task

            @task(name="child", ram="16MB", restart="temporary", max_retries=0)
            def child(number):
                return number

            @task(name="main", timeout="120s", max_retries=0)
            def main():
                children = [child.spawn(number) for number in range(40)]
                return len(gather(*children, return_exceptions=True))
            """
        ),
    )
    peak, done = peak_rss_of_run("run", str(program), "--max-total-ram", "512MB", cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert peak < 1024 * MB, f"the host peaked at {peak / MB:,.0f} MB"
