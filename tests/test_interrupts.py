"""A run stopped by Ctrl-C or SIGTERM ends `interrupted` and resumable, wherever
the stop lands: in a retry's backoff, while the program is first imported,
with its output going to pipes whose reader left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import capsule_cli

#: Fails its first attempt (the marker on stderr, in --verbose, says when its
#: retry waits), returns on the next.
FAILS_ONCE = """
import capsule
from capsule import task

@task(name="main", max_retries=2)
def main():
    attempt = capsule.current().attempt
    if attempt == 1:
        raise RuntimeError("the first attempt fails")
    return f"attempt {attempt}"
"""

#: Prints a marker while the program is imported, then takes long.
IMPORTS_SLOWLY = """
import time
print("MARK importing", flush=True)
time.sleep(60)

from capsule import task

@task(name="main")
def main():
    return "ran"
"""


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(source))
    return path


def inspect(tmp_path: Path) -> dict[str, Any]:
    done = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = done.json()
    return record


def stop_at(
    args: list[str],
    cwd: Path,
    sig: signal.Signals,
    marker: str,
    on: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start `capsule ARGS` with stdout and stderr pipes, in a process group
    of its own; send ``sig`` to the group (as Ctrl-C at a terminal does) once a
    line of ``on`` (stdout or stderr) holds ``marker``, then close both pipes
    unread (the reader of `| head -1` has gone): the process, still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    stream = process.stdout if on == "stdout" else process.stderr
    assert stream is not None
    for line in stream:
        if marker in line:
            break
    else:
        raise AssertionError(f"{marker!r} never appeared on {on}")
    os.killpg(process.pid, sig)
    for pipe in (process.stdout, process.stderr):
        assert pipe is not None
        pipe.close()
    return process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_a_retry_backoff_leaves_the_task_retrying(
    tmp_path: Path, sig: signal.Signals
) -> None:
    program = write(tmp_path, FAILS_ONCE)
    process = stop_at(
        ["run", str(program), "--verbose", "--retry-backoff", "600"],
        tmp_path,
        sig,
        "capsule: retrying main",
        on="stderr",
    )
    assert process.wait(timeout=120) == 130
    record = inspect(tmp_path)
    assert record["status"] == "interrupted"
    (main,) = record["tasks"]
    # Not failed: its retry is the resume's to make.
    assert (main["status"], main["attempts"], main["error"]) == ("retrying", 1, None)

    done = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    envelope = done.json()
    assert envelope["result"] == "attempt 2"
    assert envelope["execution"]["attempts"] == 2
    assert inspect(tmp_path)["tasks"][0]["status"] == "completed"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_while_the_program_is_imported_leaves_the_run_interrupted(
    tmp_path: Path, sig: signal.Signals
) -> None:
    program = write(tmp_path, IMPORTS_SLOWLY)
    process = stop_at(["run", str(program)], tmp_path, sig, "MARK", on="stdout")
    assert process.wait(timeout=120) == 130
    record = inspect(tmp_path)
    assert record["status"] == "interrupted"  # not "crashed": the process stopped it

    # Resumable: the import runs again (and is stopped again here, quicker).
    process = stop_at(["resume", "--last"], tmp_path, sig, "MARK", on="stdout")
    assert process.wait(timeout=120) == 130
    assert inspect(tmp_path)["status"] == "interrupted"
    assert inspect(tmp_path)["resumes"] == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_with_the_output_pipes_closed_leaves_the_run_resumable(
    tmp_path: Path, sig: signal.Signals
) -> None:
    program = write(
        tmp_path,
        """
        import capsule
        from capsule import task

        @task(name="main")
        def main():
            for n in range(100_000):
                print("MARK", n, flush=True)
                capsule.sleep(0.01)
            return "done"
        """,
    )
    process = stop_at(["run", str(program)], tmp_path, sig, "MARK", on="stdout")
    assert process.wait(timeout=120) == 130
    assert inspect(tmp_path)["status"] == "interrupted"
    process = stop_at(["resume", "--last"], tmp_path, sig, "MARK", on="stdout")
    assert process.wait(timeout=120) == 130
    record = inspect(tmp_path)
    assert (record["status"], record["resumes"]) == ("interrupted", 1)
    assert json.dumps(record)  # (readable as a whole)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_runtime_is_built_leaves_the_run_interrupted(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The first run builds the guest runtime (a subprocess), saying so on
    stderr: the signal reaches the whole process group, and stderr's reader
    is gone by the time the build's failure would be said."""
    program = write(tmp_path, FAILS_ONCE)
    home = {"CAPSULE_HOME": str(tmp_path / "empty-cache")}
    process = stop_at(
        ["run", str(program)], tmp_path, sig, "capsule: componentize-py", on="stderr", env=home
    )
    assert process.wait(timeout=120) == 130
    runs = capsule_cli("runs", "--json", cwd=tmp_path)
    assert [run["status"] for run in runs.json()] == ["interrupted"]  # resumable


def test_a_signal_another_thread_received_interrupts_the_run_the_command_waits_for() -> None:
    """A process-directed signal may be taken by any thread (one starting a
    subprocess, say): its handler then runs on the main thread only once that
    thread looks up from its wait, so the command's wait for the run must."""
    from capsule.cli import _HostedRun

    main = threading.main_thread().ident
    assert main == threading.get_ident()
    outcome: Future[Any] = Future()
    interrupted = threading.Event()
    run = _HostedRun(outcome, [], interrupted, None)
    pause = threading.Event()  # (never set: a wait that yields)
    seen: list[bool] = []  # whether the run was interrupted before it ended

    def waiting_for_the_run() -> bool:
        frame = sys._current_frames()[main]
        if frame.f_code is not threading.Condition.wait.__code__:
            return False
        while frame is not None and frame.f_code is not _HostedRun.wait.__code__:
            frame = frame.f_back
        return frame is not None

    def signalled_here_then_ended() -> None:
        # Once the main thread waits (polled: nothing tells when a thread blocks).
        while not waiting_for_the_run():
            pause.wait(0.001)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        # (bounded only so that the test fails, not hangs, if it is never seen)
        seen.append(interrupted.wait(timeout=30))
        outcome.set_result("the run's outcome")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    other = threading.Thread(target=signalled_here_then_ended)
    try:
        other.start()
        assert run.wait() == "the run's outcome"
    finally:
        other.join()
        signal.signal(signal.SIGINT, previous)
    assert seen == [True]
