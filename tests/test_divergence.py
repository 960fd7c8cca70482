"""A run whose resume diverged from its journal: it ends `diverged`, not
failed, keeps what its journal held before, and resumes once its code agrees
with the journal again (restored, or fixed and forced)."""

from __future__ import annotations

import json
import signal
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsule.host import NotResumable, Runtime
from capsule.supervisor.events import TaskWaiting
from tests.conftest import capsule_cli, kill_at_marker

#: main spawns a worker, which calls a child, prints, and goes on (sleeping)
#: until 4 s after main began: a run killed meanwhile, resumed later, replays
#: the loop's journaled steps and goes on at once.
PROGRAM = """
import time

from capsule import sleep, task


@task(name="child")
def child(n: int) -> int:
    print(f"MARK child {n}")
    return n * 10


@task(name="worker", timeout="5m")
def worker(until: float) -> int:
    first = child(1)
    print(f"MARK waiting {first}")
    while time.time() < until:
        sleep(0.1)
    return first + child(2)


@task(name="main", timeout="5m")
def main() -> dict:
    started = time.time()
    print(f"MARK main {started!r}")
    total = worker.spawn(started + 4).result()
    return {"started": started, "total": total}
"""


def _markers(text: str) -> list[str]:
    return [line.split("] ", 1)[-1] for line in text.splitlines() if "MARK" in line]


def _task_rows(journal: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(journal) as connection:
        rows = connection.execute("SELECT task_id, status, final FROM tasks").fetchall()
    return {task_id: (status, final) for task_id, status, final in rows}


def test_a_diverged_run_resumes_once_its_code_is_restored(tmp_path: Path, core: str) -> None:
    """A forced resume whose replay diverges ends `diverged`, refuses to run
    the same code again, and, restored, goes on where the journal was: what it
    had done is not done again."""
    from capsule.journal.secrets import secrets_file

    program = tmp_path / "flow.py"
    original = textwrap.dedent(PROGRAM)
    program.write_text(original)
    printed, code = kill_at_marker(
        ["run", str(program), "--core", core], "MARK waiting", tmp_path, 0.1
    )
    assert code == -signal.SIGKILL, printed
    first_run = _markers(printed)
    assert first_run[0].startswith("MARK main ") and first_run[1:] == [
        "MARK child 1",
        "MARK waiting 10",
    ], printed
    started = float(first_run[0].split()[2])
    journal = tmp_path / ".capsule" / "journal.db"
    with sqlite3.connect(journal) as connection:
        (run_id,) = connection.execute("SELECT run_id FROM runs").fetchone()
    # What a replay needs and the journal does not hold (see secrets.py): a
    # diverged run is not over, so it must stay.
    secrets = secrets_file(run_id)
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text(json.dumps({"task_id": "x", "attempt": 1, "step": 1, "answer": "s"}) + "\n")
    try:
        # The worker now calls its child with another argument: its replay
        # makes a different host call than its journal holds.
        program.write_text(original.replace("first = child(1)", "first = child(7)"))
        forced = capsule_cli("resume", "--last", "--force", cwd=tmp_path)
        assert forced.returncode == 1, forced.stderr
        assert _markers(forced.stdout) == []  # nothing ran again, nor printed
        assert f"run {run_id} diverged" in forced.stderr, forced.stderr
        assert "task 'worker' (main/1) diverged from the journal at step 1" in forced.stderr
        assert f"`capsule resume {run_id}`" in forced.stderr
        assert secrets.is_file()
        # The tasks in flight are still in flight (the worker diverged, not
        # failed): their next resume runs them.
        rows = _task_rows(journal)
        assert rows["main"][1] == 0 and rows["main/1"] == ("diverged", 0), rows
        assert rows["main/1/1"] == ("completed", 1), rows

        listed = capsule_cli("runs", "--json", cwd=tmp_path)
        assert [run["status"] for run in listed.json()] == ["diverged"], listed.stdout
        shown = capsule_cli("inspect", "--last", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"run {run_id}: diverged"), shown.stdout
        assert "error: divergence: task 'worker' (main/1) diverged" in shown.stdout
        assert f"`capsule resume {run_id}`" in shown.stdout
        assert "main/1 worker  [diverged]" in shown.stdout
        details = capsule_cli("inspect", "--last", "--json", cwd=tmp_path).json()
        assert details["status"] == "diverged" and details["error"]["kind"] == "divergence"

        # Unchanged since it diverged: it would diverge again.
        unchanged = capsule_cli("resume", "--last", cwd=tmp_path)
        assert unchanged.returncode == 2, unchanged.stderr
        assert (
            f"unchanged since run {run_id} diverged at step 1 of task 'worker' (main/1)"
            in unchanged.stderr
        ), unchanged.stderr
        assert "--force" in unchanged.stderr

        # Changed again, but not back to the code it ran with: a fix needs
        # --force, as any changed code does; the original needs none.
        program.write_text(original + "\n# fixed\n")
        fixed = capsule_cli("resume", "--last", cwd=tmp_path)
        assert fixed.returncode == 2, fixed.stderr
        assert "changed since run" in fixed.stderr and "--force" in fixed.stderr
        assert "restored to the code it ran with" in fixed.stderr, fixed.stderr

        program.write_text(original)
        resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.json()["result"] == {"started": started, "total": 30}
        # What the journal held ran once: only the second child runs now.
        assert _markers(resumed.stderr) == ["MARK child 2"], resumed.stderr
        done = capsule_cli("runs", "--json", cwd=tmp_path).json()
        assert [(run["status"], run["resumes"]) for run in done] == [("completed", 2)]
    finally:
        secrets.unlink(missing_ok=True)


#: main reads the clock, prints, and sleeps until 2 s after it began.
SLEEPS = """
import time

from capsule import sleep, task


@task(name="main")
def main() -> float:
    started = time.time()
    print("start")
    while time.time() < started + 2:
        sleep(0.1)
    return started
"""


def test_the_host_api_says_diverged_and_resumes_a_fixed_run(tmp_path: Path) -> None:
    """Runtime.resume returns a diverged run as such (also read back from the
    journal), refuses its unchanged code, and resumes it fixed, with force."""
    program = tmp_path / "sleeps.py"
    original = textwrap.dedent(SLEEPS)
    program.write_text(original)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program, run_id="drifts")
        await _waiting(handle)
        await handle.cancel()
        program.write_text(original.replace('print("start")', 'print("begin")'))
        diverged = await rt.resume("drifts", force=True)
        assert diverged.status == "diverged" and not diverged.ok
        assert diverged.error is not None and diverged.error.kind == "divergence"
        assert "resum" in diverged.error.message
        assert (await rt.find("drifts")).status == "diverged"
        # Read back from the journal, as a start of its run id returns it.
        again = await rt.start(program, run_id="drifts")
        assert (await again.result()).status == "diverged"
        with pytest.raises(NotResumable) as unchanged:
            await rt.resume("drifts")
        assert "unchanged since run drifts diverged at step" in str(unchanged.value)
        assert "resume(..., force=True)" in str(unchanged.value)
        # Fixed forward (it prints as it did, and says more): with force.
        program.write_text(original + "\n# fixed\n")
        done = await rt.resume("drifts", force=True)
        assert done.status == "completed", done.error
        assert (await rt.find("drifts")).status == "completed"

    async def main() -> None:
        async with Runtime(journal=tmp_path / "journal.db") as rt:
            with anyio.fail_after(120):
                await body(rt)

    anyio.run(main)


async def _waiting(handle: Any) -> None:
    async for event in handle.events():
        if isinstance(event, TaskWaiting):
            return
    raise AssertionError("the run ended before it waited")
