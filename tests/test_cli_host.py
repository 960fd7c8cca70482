"""`capsule run` and `capsule resume` as clients of the host API, and what the
API gained for them: interrupting a run wherever it is (RunHandle.interrupt),
a KeyboardInterrupt reaching a thread blocked in a SyncRuntime call, the
events a handle carries, resuming with --force and new limits, finding a run
by a prefix of its id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsule.host import (
    InvalidRequest,
    JournalUnavailable,
    NotResumable,
    RunHandle,
    RunNotFound,
    RunOptions,
    Runtime,
)
from capsule.supervisor.events import EVENT_TYPES, event_json, parse_event
from tests.conftest import capsule_cli
from tests.test_host_api import SLEEPER, in_runtime, wait_for, write

#: A run with a child task that fails once and is retried, output from both,
#: and a warning-free result: the same events however it is watched.
FAMILY = """
import capsule
from capsule import task

@task(name="child", max_retries=1)
def child(n: int) -> int:
    print("child attempt", capsule.current().attempt)
    if capsule.current().attempt == 1:
        raise ValueError("the first attempt fails")
    return n * 2

@task(name="main")
def main() -> int:
    print("main starts")
    return child(21)
"""

#: Main waits for a message, and returns it.
RECEIVER = """
from capsule import receive, task

@task(name="main")
def main() -> str:
    return receive().body
"""

#: Prints a marker while the program is imported, then takes ten minutes.
IMPORTS_SLOWLY = """
import time
print("MARK importing", flush=True)
time.sleep(600)

from capsule import task

@task(name="main")
def main() -> str:
    return "ran"
"""


def shape(event: Any) -> tuple[Any, ...]:
    """What an event says, without when, or which run, it was."""
    data = json.loads(event_json(event))
    for varying in ("at", "run_id", "duration_ms", "program", "backoff_s", "peak_memory_bytes"):
        data.pop(varying, None)
    data.pop("envelope", None)
    return tuple(sorted((key, json.dumps(value)) for key, value in data.items()))


def _by_task(events: list[Any]) -> dict[str, list[Any]]:
    """Each task's events' shapes, in order (the run's own under "")."""
    tasks: dict[str, list[Any]] = {}
    for event in events:
        tasks.setdefault(getattr(event, "task_id", None) or "", []).append(shape(event))
    return tasks


def test_capsule_run_shows_the_event_stream_the_api_gives(tmp_path: Path) -> None:
    program = write(tmp_path, "family.py", FAMILY)
    done = capsule_cli(
        "run",
        str(program),
        "--events",
        "jsonl",
        "--retry-backoff",
        "0.01",
        "--journal",
        str(tmp_path / "cli.db"),
    )
    assert done.returncode == 0, done.stderr
    from_cli = [parse_event(line) for line in done.stdout.splitlines()]

    async def body(rt: Runtime) -> list[Any]:
        options = RunOptions(retry_backoff=0.01)
        handle = await rt.start(program, options=options, event_types=EVENT_TYPES)
        events = [event async for event in handle.events()]
        assert (await handle.result()).value == 42
        return events

    from_api = in_runtime(tmp_path / "api.db", body)
    # The same events, each task's in the same order (between tasks that run
    # at once, the order of their events is theirs: a child may print before
    # its parent's "waiting" is reported).
    assert _by_task(from_cli) == _by_task(from_api)
    assert from_cli[0].type == from_api[0].type == "run_started"
    assert [event.type for event in from_cli].count("retrying") == 1
    assert from_cli[-1].type == "run_ended" and from_cli[-1].envelope["result"] == 42


def test_interrupt_stops_a_run_while_its_program_is_imported(tmp_path: Path) -> None:
    program = write(tmp_path, "slow.py", IMPORTS_SLOWLY)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program, run_id="slow-1")
        await wait_for(handle, lambda event: "MARK" in getattr(event, "text", ""))
        handle.interrupt()
        result = await handle.result()
        assert result.status == "interrupted"
        assert result.error is not None and result.error.kind == "cancelled"
        assert "interrupted before its tasks ran" in result.error.message
        assert (await rt.find("slow-1")).status == "interrupted"  # resumable

    in_runtime(tmp_path / "journal.db", body)


def test_interrupt_cancels_every_task_as_ctrl_c_does(tmp_path: Path) -> None:
    program = write(tmp_path, "sleeper.py", SLEEPER)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program, 600)
        await wait_for(handle, lambda event: event.type == "started")
        handle.interrupt()
        result = await handle.result()
        assert result.status == "interrupted"
        assert result.error is not None
        assert result.error.message == "cancelled: the run was interrupted"

    in_runtime(False, body)


def test_a_thread_blocked_in_a_sync_call_gets_ctrl_c_at_once(tmp_path: Path) -> None:
    """The SyncRuntime's loop runs on its own thread: the caller waits in a
    portal call, where SIGINT must still raise KeyboardInterrupt (long before
    the ten-minute run would end)."""
    program = write(tmp_path, "sleeper.py", SLEEPER)
    script = write(
        tmp_path,
        "blocked.py",
        f"""
        from capsule.host import SyncRuntime

        with SyncRuntime(journal=False) as rt:
            handle = rt.start({str(program)!r}, 600)
            for event in handle.events():
                if event.type == "started":
                    break
            try:
                print("WAITING", flush=True)
                handle.result()
                print("NOT INTERRUPTED", flush=True)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
                handle.interrupt()
                print(handle.result().status, flush=True)
        """,
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "WAITING\n"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.splitlines() == ["INTERRUPTED", "interrupted"]


def test_a_handle_carries_the_event_types_asked_for(tmp_path: Path) -> None:
    program = write(tmp_path, "family.py", FAMILY)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program, event_types={"output"})
        types = [event.type async for event in handle.events()]
        assert types == ["output", "output", "output", "run_ended"]
        for wrong in ({"output", "nope"}, "output"):
            with pytest.raises(InvalidRequest, match="event_types"):
                await rt.start(program, event_types=wrong)  # type: ignore[arg-type]

    in_runtime(False, body)


def test_resume_takes_force_and_new_limits_and_find_takes_a_prefix(tmp_path: Path) -> None:
    program = write(tmp_path, "receiver.py", RECEIVER)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program, run_id="receiver-1")
        await wait_for(handle, lambda event: event.type == "started")
        handle.interrupt()
        assert (await handle.result()).status == "interrupted"
        assert (await rt.find("receiver")).run_id == "receiver-1"
        assert (await rt.find()).run_id == "receiver-1"  # the newest
        with pytest.raises(RunNotFound, match="no run 'other'"):
            await rt.find("other")

        program.write_text(program.read_text() + "# changed\n")
        refused = await rt.start_resume("receiver-1")
        with pytest.raises(NotResumable, match=r"resume anyway with resume\(\.\.\., force=True\)"):
            await refused.result()
        with pytest.raises(InvalidRequest, match="max_fuel cannot change"):
            await rt.start_resume("receiver-1", options=RunOptions(max_fuel=10**9))

        resumed = await rt.start_resume(
            "receiver-1", force=True, options=RunOptions(max_run_journal="64MB")
        )
        await wait_for(resumed, lambda event: event.type == "started")
        await resumed.send("main", "resumed")
        assert (await resumed.result()).value == "resumed"

    in_runtime(tmp_path / "journal.db", body)


def test_a_program_that_raises_on_import_is_an_invalid_request_with_its_traceback(
    tmp_path: Path,
) -> None:
    program = write(tmp_path, "broken.py", "raise RuntimeError('broken')\n")

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program)
        with pytest.raises(InvalidRequest, match="RuntimeError: broken") as raised:
            await handle.result()
        assert raised.value.traceback is not None
        assert "raise RuntimeError('broken')" in raised.value.traceback

    in_runtime(False, body)


#: Main waits on a child that sleeps for ten minutes, and says how the child
#: ended (its error names who cancelled it).
PARENT_OF_A_NAPPER = """
from capsule import TaskError, sleep, task

@task(name="napper", max_retries=0)
def napper() -> str:
    sleep(600)
    return "woke"

@task(name="main", max_retries=0)
def main() -> str:
    try:
        return napper.spawn().result()
    except TaskError as exc:
        return f"napper {exc.kind}: {exc.message}"
"""


def both_waiting(seen: set[str], event: Any) -> bool:
    """Whether main and its child are both waiting (``seen``: so far)."""
    if event.type == "waiting":
        seen.add(event.task_id)
    return seen >= {"main", "main/1"}


def check_live_tasks(readings: list[Any]) -> None:
    """Main (one message waiting in its mailbox) and its child, running."""
    from capsule.host import LiveTask

    by_id = {reading.task_id: reading for reading in readings}
    assert set(by_id) == {"main", "main/1"}, readings
    assert all(isinstance(reading, LiveTask) for reading in readings)
    main, napper = by_id["main"], by_id["main/1"]
    assert (main.task, main.attempt, main.mailbox_depth) == ("main", 1, 1)
    assert (napper.task, napper.attempt, napper.mailbox_depth) == ("napper", 1, 0)
    # (Fuel is read at epoch ticks: main's loop may have ended before one came.)
    assert all(0 <= reading.fuel_used <= reading.fuel_budget for reading in readings)
    assert main.fuel_budget > 0


def test_live_tasks_reads_the_running_attempts_async_and_sync(tmp_path: Path) -> None:
    from capsule.host import SyncRuntime

    program = write(tmp_path, "parent.py", PARENT_OF_A_NAPPER)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program)
        seen: set[str] = set()
        await wait_for(handle, lambda event: both_waiting(seen, event))
        await handle.send("main", "for later")  # (main waits on its child, not on this)
        check_live_tasks(handle.live_tasks())
        await handle.cancel()
        assert (await handle.result()).status == "interrupted"
        assert handle.live_tasks() == []  # ended: nothing runs

    in_runtime(False, body)

    with SyncRuntime(journal=False) as rt:
        handle = rt.start(program)
        seen: set[str] = set()
        for event in handle.events():
            if both_waiting(seen, event):
                break
        handle.send("main", "for later")
        check_live_tasks(handle.live_tasks())
        handle.cancel()
        assert handle.result().status == "interrupted"
        assert handle.live_tasks() == []


#: `capsule run --tui` with the app swapped for one that drives the TUI's
#: source as the app does, without a terminal: it reads the live tasks once
#: main and its child wait, cancels the child, and quits once the run ended.
#: The handle's calls are counted on the way.
TUI_THROUGH_THE_HANDLE = """
import sys
import threading

import capsule.cli
from capsule.host.handle import RunHandle
from capsule.tui import app
from capsule.tui.sources import LiveSource

calls = []
live_tasks, cancel = RunHandle.live_tasks, RunHandle.cancel

def counted_live_tasks(self):
    calls.append("live_tasks")
    return live_tasks(self)

async def counted_cancel(self, task_id=None):
    calls.append("cancel")
    return await cancel(self, task_id)

RunHandle.live_tasks, RunHandle.cancel = counted_live_tasks, counted_cancel

waiting, ended = set(), threading.Event()
both_waiting = threading.Event()
on_event, on_end = LiveSource.on_event, LiveSource.ended

def seen(self, event):
    if event.type == "waiting":
        waiting.add(event.task_id)
        if waiting >= {"main", "main/1"}:
            both_waiting.set()
    on_event(self, event)

def end(self, status, exit_code):
    on_end(self, status, exit_code)
    ended.set()

LiveSource.on_event, LiveSource.ended = seen, end

class HeadlessApp:
    failure = None

    def __init__(self, source):
        self.source = source

    def run(self):
        assert both_waiting.wait(300), "main and its child never both waited"
        readings = sorted(
            (type(r).__module__, r.task_id, r.task) for r in self.source.live()
        )
        print("READINGS", readings, file=sys.stderr, flush=True)
        print("CANCEL", self.source.cancel("main/1"), file=sys.stderr, flush=True)
        assert ended.wait(300), "the run never ended"
        return 0

app.CapsuleApp = HeadlessApp
capsule.cli._in_terminal = lambda what: True
try:
    capsule.cli.main(sys.argv[1:])
finally:
    print("CALLS", sorted(set(calls)), file=sys.stderr, flush=True)
"""


def test_capsule_run_tui_reads_and_cancels_tasks_through_the_run_handle(
    tmp_path: Path,
) -> None:
    program = write(tmp_path, "parent.py", PARENT_OF_A_NAPPER)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TUI_THROUGH_THE_HANDLE,
            "run",
            "--tui",
            str(program),
            "--no-journal",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    readings = [
        ("capsule.host.live", "main", "main"),
        ("capsule.host.live", "main/1", "napper"),
    ]
    assert f"READINGS {readings}" in done.stderr
    assert "CANCEL cancelling main/1" in done.stderr
    assert "CALLS ['cancel', 'live_tasks']" in done.stderr
    # The child's error says the host application cancelled it (its handle did).
    assert "napper cancelled: cancelled by the host application" in done.stdout


#: Records a step per sleep: more than a few KB of journal in all.
RECORDS_STEPS = """
import capsule
from capsule import task

@task(name="main")
def main():
    for _ in range(200):
        capsule.sleep(0)
    return "done"
"""


def test_a_run_over_its_journal_limit_names_the_fix_as_its_caller_makes_it(
    tmp_path: Path,
) -> None:
    """The host API's error names the run option and resume's call; the
    command's, the flag and `capsule resume`, which resumes it."""
    program = write(tmp_path, "steps.py", RECORDS_STEPS)
    journal = tmp_path / "journal.db"

    async def body(rt: Runtime) -> str:
        with pytest.raises(JournalUnavailable) as stopped:
            await rt.run(program, run_id="api-run", options=RunOptions(max_run_journal="4KB"))
        return str(stopped.value)

    message = in_runtime(journal, body)
    assert (
        "bytes in its journal; its limit is 4KB (max_run_journal, or max_run_journal in" in message
    )
    assert message.endswith(
        "resumed with a larger one: "
        "Runtime.resume('api-run', options=RunOptions(max_run_journal=SIZE))"
    )
    assert "`capsule" not in message and "--" not in message

    done = capsule_cli(
        "run", str(program), "--journal", str(journal), "--max-run-journal", "4KB", cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    runs = capsule_cli("runs", "--json", "--journal", str(journal)).json()
    (run_id,) = [run["run_id"] for run in runs if run["run_id"] != "api-run"]
    assert "(--max-run-journal, or max_run_journal in" in done.stderr
    assert f"larger one: `capsule resume {run_id} --max-run-journal SIZE`" in done.stderr
    assert "RunOptions" not in done.stderr
    resumed = capsule_cli(
        "resume", run_id, "--journal", str(journal), "--max-run-journal", "1MB", "--json"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == "done"


def test_a_missing_journal_says_where_its_caller_keeps_one(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"

    async def body(rt: Runtime) -> str:
        with pytest.raises(JournalUnavailable) as refused:
            await rt.find()
        return str(refused.value)

    async def main() -> str:
        # (A Runtime that prepares makes its journal as it opens.)
        async with Runtime(missing, prepare=False) as rt:
            return await body(rt)

    message = anyio.run(main)
    assert message == (
        f"no journal at {missing}; a Runtime keeps it as .capsule/journal.db in the "
        f"current directory (pass Runtime(journal=PATH), or set CAPSULE_JOURNAL)"
    )
    done = capsule_cli("runs", "--journal", str(missing), cwd=tmp_path)
    assert done.returncode == 2
    assert (
        f"no journal at {missing}; `capsule run` keeps it as .capsule/journal.db beside "
        f"the program (pass --journal PATH, or set CAPSULE_JOURNAL)"
    ) in done.stderr


def _sleeper_on_the_async_core(
    tmp_path: Path,
) -> tuple[Callable[[Runtime], Awaitable[RunHandle]], Callable[[Any], None], threading.Event]:
    """How a command starts a long sleeper on the async core, its event
    callback, and what that sets once main sleeps."""
    program = write(tmp_path, "sleeper.py", SLEEPER)
    sleeping = threading.Event()

    async def start(rt: Runtime) -> RunHandle:
        options = RunOptions(core="async")
        return await rt.start(program, 600, options=options, event_types=EVENT_TYPES)

    def on_event(event: Any) -> None:
        if event.type == "waiting" and event.task_id == "main":
            sleeping.set()

    return start, on_event, sleeping


def test_capsule_run_on_the_async_core_runs_it_on_the_commands_one_loop(
    tmp_path: Path,
) -> None:
    """The command's loop thread is also its run's on the async core: no
    second loop thread starts for the runs of its Runtime, and the run on it
    is still interrupted (resumable) as Ctrl-C interrupts it."""
    from capsule.cli import _HostedRun, _Outcome, _run_through_host

    start, on_event, sleeping = _sleeper_on_the_async_core(tmp_path)
    during: list[set[str]] = []

    def attend(run: _HostedRun) -> _Outcome:
        # (bounded only so that the test fails, not hangs, if it never sleeps)
        if sleeping.wait(timeout=300):
            during.append({thread.name for thread in threading.enumerate()})
        run.interrupt()
        return run.wait()

    outcome = _run_through_host(tmp_path / "journal.db", start, on_event, attend)
    assert during, "main never slept"
    assert "capsule-loop" in during[0] and "capsule-runs" not in during[0], during[0]
    assert outcome.interrupted and outcome.ended is not None
    assert not any(thread.name == "capsule-loop" for thread in threading.enumerate())

    async def status(rt: Runtime) -> str:
        assert outcome.run_id is not None
        return (await rt.find(outcome.run_id)).status

    assert in_runtime(tmp_path / "journal.db", status) == "interrupted"  # resumable


def test_ctrl_c_outside_the_commands_wait_stops_the_async_run_on_its_loop(
    tmp_path: Path,
) -> None:
    """A KeyboardInterrupt out of the command's side while its run on the
    async core goes on (one that lands between waits): the run is stopped as
    the Runtime closes, on the loop it runs on, which stops only then; it
    ends as interrupted, and stays resumable."""
    from capsule.cli import _HostedRun, _run_through_host

    start, on_event, sleeping = _sleeper_on_the_async_core(tmp_path)
    raised: list[BaseException] = []

    def attend(run: _HostedRun) -> None:
        assert sleeping.wait(timeout=300), "main never slept"
        raise KeyboardInterrupt

    def command() -> None:
        try:
            _run_through_host(tmp_path / "journal.db", start, on_event, attend)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=command)
    thread.start()
    # (bounded only so that the test fails, not hangs, if the command never returns)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the command never returned"
    assert [type(exc) for exc in raised] == [KeyboardInterrupt]

    async def statuses(rt: Runtime) -> list[str]:
        return [run.status for run in await rt.runs()]

    assert in_runtime(tmp_path / "journal.db", statuses) == ["interrupted"]  # resumable
