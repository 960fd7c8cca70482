"""Attacks on the host API: code handed to ``run_code`` (written by a model or
an attacker), and the values an application passes on from its own users
(message bodies, timeouts, run ids, options). Each runs for real: wasm
instances, SQLite journals."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsule.host import (
    CodeLimits,
    DeliveryError,
    InvalidRequest,
    NotResumable,
    OptionError,
    RunOptions,
    Runtime,
    SyncRuntime,
)
from capsule.host.code import RUNNER_MODULE
from capsule.sandbox.guest_data import MAX_JSON_DEPTH
from capsule.supervisor.events import TaskWaiting

#: An actor that echoes what it is asked, and returns the sends it kept on "stop".
ECHO_ACTOR = """
from capsule import receive, task

@task(name="main")
def main() -> list:
    kept = []
    while True:
        message = receive()
        if message.expects_reply:
            message.reply({"echo": message.body})
        elif message.body == "stop":
            return kept
        else:
            kept.append(message.body)
"""


def in_runtime(journal: Path | bool, body: Callable[[Runtime], Coroutine[Any, Any, Any]]) -> Any:
    async def main() -> Any:
        async with Runtime(journal=False if journal is False else journal) as rt:
            return await body(rt)

    return anyio.run(main)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- run_code: the code's limits are the whole run's -------------------------


def test_run_code_cannot_start_tasks_that_would_get_limits_of_their_own() -> None:
    """Each task gets its own fuel and memory: code that could start copies of
    the runner's task (spawned, or called) would use a multiple of its limits
    (eight children held 8 x 200 MB under ram="256MB")."""
    spawn = f"""
import {RUNNER_MODULE} as runner
refused = []
for start in (runner.main.spawn, runner.main):
    try:
        start("x = bytearray(200 * 1024 * 1024)", [])
    except Exception as exc:
        refused.append([type(exc).__name__, str(exc)])
result = refused
"""

    async def body(rt: Runtime) -> None:
        done = await rt.run_code(spawn, limits=CodeLimits(ram="256MB"))
        assert done.ok, done.error
        assert [kind for kind, _ in done.value] == ["TaskError", "TaskError"]
        assert all("no task besides its entry task" in text for _, text in done.value)
        assert done.totals is not None and done.totals["tasks"] == 1

    in_runtime(False, body)


def test_a_resumed_run_code_still_cannot_start_tasks(tmp_path: Path) -> None:
    """A resume runs the runner as a program, from the journal's recorded
    options: the limit on tasks is one of them, not a trait of the warm sandbox."""
    wait_then_spawn = f"""
import capsule
import {RUNNER_MODULE} as runner
capsule.receive()
try:
    runner.main.spawn("result = 1", [])
    result = "started"
except Exception as exc:
    result = type(exc).__name__
"""

    async def body(rt: Runtime) -> None:
        handle = await rt.start_code(wait_then_spawn)
        async for event in handle.events():
            if isinstance(event, TaskWaiting):
                break
        await handle.cancel()
        assert (await handle.result()).status == "interrupted"
        resumed = await rt.start_resume(handle.run_id)
        await resumed.send("main", "go")
        done = await resumed.result()
        assert done.ok and done.value == "TaskError", done.error

    in_runtime(tmp_path / "journal.db", body)


def test_run_code_messages_to_itself_are_bounded_by_max_output_without_a_journal() -> None:
    """Without a journal nothing counts what a task records, and a task may
    send to its own mailbox: the messages it queues were bounded only by the
    run's 256 MB default (the host held 268 MB for code limited to 64 MB)."""
    flood = """
import capsule
sent = 0
try:
    for _ in range(100):
        capsule.send("main", "x" * 8000)
        sent += 1
except Exception as exc:
    result = [sent, type(exc).__name__, str(exc)]
"""

    async def body(rt: Runtime) -> None:
        done = await rt.run_code(flood, limits=CodeLimits(max_output="64KB"))
        assert done.ok, done.error
        sent, kind, message = done.value
        assert sent == 8 and kind == "MessageError"
        assert "max_queued_size" in message

    in_runtime(False, body)


def test_run_code_leaves_nothing_for_the_next_call() -> None:
    """Patched builtins, a poisoned sys.modules, attributes set on the runner
    module: each call runs on a fresh instance of the warm sandbox."""
    poison = f"""
import builtins, sys, json
import {RUNNER_MODULE} as runner
builtins.len = lambda value: 42
sys.modules["json"] = None
runner.LEFT_BEHIND = True
result = len([])
"""
    look = f"""
import sys
import threading
import {RUNNER_MODULE} as runner
result = [len([1]), sys.modules.get("json") is None, hasattr(runner, "LEFT_BEHIND")]
"""

    async def body(rt: Runtime) -> None:
        assert (await rt.run_code(poison)).value == 42
        assert (await rt.run_code(look)).value == [1, False, False]

    in_runtime(False, body)


def test_run_code_base_exceptions_and_bad_results_are_failures_not_crashes(
    tmp_path: Path,
) -> None:
    """SystemExit, KeyboardInterrupt and BaseException subclasses raised by the
    code, results that are not JSON (an object, NaN, nested past the host's
    limit, a lone surrogate): each a failed result, and the Runtime goes on."""
    cases = {
        "raise SystemExit(3)": ("exception", "SystemExit"),
        "raise KeyboardInterrupt": ("exception", "KeyboardInterrupt"),
        "class Escape(BaseException): pass\nraise Escape('out')": ("exception", "Escape"),
        "result = object()": ("exception", "not JSON-serializable"),
        "result = float('nan')": ("exception", "not JSON-serializable"),
        "result = chr(0xD800)": ("exception", "lone surrogate"),
        f"x = []\nfor _ in range({MAX_JSON_DEPTH + 50}): x = [x]\nresult = x": (
            "protocol",
            "deeper",
        ),
    }

    async def body(rt: Runtime) -> None:
        for source, (kind, words) in cases.items():
            done = await rt.run_code(source)
            assert done.status == "failed" and done.error is not None, source
            assert done.error.kind == kind and words in done.error.message, (source, done.error)
        assert (await rt.run_code("result = 'still serving'")).value == "still serving"

    in_runtime(tmp_path / "journal.db", body)


# -- values an application passes on from its users ---------------------------


def test_message_bodies_a_task_could_not_hand_back_are_refused_when_sent(
    tmp_path: Path,
) -> None:
    """A body nested deeper than the host takes from a guest was delivered, and
    the actor's echo of it failed the whole run (kind protocol); a lone
    surrogate raised UnicodeEncodeError. Both are InvalidRequest now, and the
    run goes on."""
    program = tmp_path / "echo.py"
    program.write_text(ECHO_ACTOR)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program)
        for bad in (nested(MAX_JSON_DEPTH + 10), "\ud800", {"key": ["\udfff"]}):
            with pytest.raises(InvalidRequest, match="the message"):
                await handle.send("main", bad)
            with pytest.raises(InvalidRequest, match="the message"):
                await handle.ask("main", bad, timeout=30)
        deepest = nested(MAX_JSON_DEPTH - 1)  # (the echo adds a level)
        assert await handle.ask("main", deepest, timeout=30) == {"echo": deepest}
        await handle.send("main", "stop")
        done = await handle.result()
        assert done.ok, done.error

    in_runtime(tmp_path / "journal.db", body)


def test_arguments_a_task_could_not_hand_back_are_refused_at_the_call(tmp_path: Path) -> None:
    program = tmp_path / "echo.py"
    program.write_text(
        "from capsule import task\n\n@task(name='main')\ndef main(x):\n    return x\n"
    )

    async def body(rt: Runtime) -> None:
        for bad in (nested(MAX_JSON_DEPTH + 10), "\ud800"):
            with pytest.raises(InvalidRequest, match="the arguments"):
                await rt.run(program, bad)
            with pytest.raises(InvalidRequest, match="the arguments"):
                await rt.run_code("result = 1", bad)
        with pytest.raises(InvalidRequest, match="the arguments"):
            await rt.run(program, kwargs={"\ud800": 1})
        assert (await rt.run(program, {"ok": ["ü"]})).value == {"ok": ["ü"]}

    in_runtime(False, body)


@pytest.mark.parametrize("timeout", [10**400, -(10**400), float("nan"), float("inf"), True, 0])
def test_ask_timeouts_out_of_range_are_invalid_requests(tmp_path: Path, timeout: Any) -> None:
    """An int past a float's range raised OverflowError from math.isfinite."""
    program = tmp_path / "echo.py"
    program.write_text(ECHO_ACTOR)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program)
        with pytest.raises(InvalidRequest, match="timeout"):
            await handle.ask("main", 1, timeout=timeout)
        await handle.cancel()

    in_runtime(False, body)


# -- limits and options: values given as they are, in ASCII ------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fuel", True),
        ("ram", False),
        ("ram", b"64MB"),
        ("timeout", "\u0663"),  # ARABIC-INDIC DIGIT THREE
        ("max_output", "\uff11MB"),  # FULLWIDTH DIGIT ONE
        ("fuel", "\uff2d\uff25\uff24\uff29\uff35\uff2d"),  # FULLWIDTH "MEDIUM"
    ],
)
def test_code_limits_take_no_bools_bytes_or_other_scripts_digits(field: str, value: Any) -> None:
    """pydantic took True as fuel 1 and b"64MB" as "64MB", and int() reads
    digits of any script."""
    with pytest.raises(InvalidRequest, match=f"CodeLimits.{field}"):
        CodeLimits(**{field: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_live_tasks", "\uff11\uff12"),
        ("cpu_slots", "\u0663"),
        ("max_message_size", "\u0661MB"),
        ("retry_backoff", "\u0663"),
        ("hibernate_after", "\u0663s"),
    ],
)
def test_run_options_take_no_other_scripts_digits(option: str, value: str) -> None:
    with pytest.raises(OptionError, match=option) as raised:
        RunOptions(**{option: value})
    assert raised.value.option == option
    with pytest.raises(OptionError, match=option):
        RunOptions.from_mapping({option: value})


def test_a_journal_recording_other_scripts_digits_is_not_resumed_with_them(
    tmp_path: Path,
) -> None:
    """A journal's recorded settings are read back through the same checks."""
    import sqlite3

    program = tmp_path / "echo.py"
    program.write_text(ECHO_ACTOR)
    journal = tmp_path / "journal.db"

    async def start(rt: Runtime) -> str:
        handle = await rt.start(program)
        await handle.cancel()
        return handle.run_id

    run_id = in_runtime(journal, start)
    with sqlite3.connect(journal) as db:
        db.execute(
            "UPDATE runs SET settings_json = ? WHERE run_id = ?",
            (json.dumps({"entry": "main", "max_live_tasks": "\uff19" * 9}), run_id),
        )

    async def resume(rt: Runtime) -> None:
        from capsule.host import NotResumable

        with pytest.raises(NotResumable, match="max_live_tasks"):
            await rt.resume(run_id)

    in_runtime(journal, resume)


# -- runs and journals ---------------------------------------------------------

#: An actor counting the messages it gets until "stop".
COUNTER = """
from capsule import receive, task

@task(name="main")
def main() -> int:
    count = 0
    while receive().body != "stop":
        count += 1
    return count
"""


def test_two_runtimes_resuming_one_run_at_once_run_it_once(tmp_path: Path) -> None:
    """Both read the run as interrupted and both marked it running: the run
    executed twice at once, on one journal. Now the second resume is refused."""
    program = tmp_path / "counter.py"
    program.write_text(COUNTER)
    journal = tmp_path / "journal.db"

    async def main() -> None:
        async with Runtime(journal=journal) as first, Runtime(journal=journal) as second:
            handle = await first.start(program)
            async for event in handle.events():
                if isinstance(event, TaskWaiting):
                    break
            await handle.cancel()
            resumed: list[Any] = []

            async def resume(rt: Runtime) -> None:
                resumed.append(await rt.start_resume(handle.run_id))

            async with anyio.create_task_group() as group:
                group.start_soon(resume, first)
                group.start_soon(resume, second)
            for each in resumed:  # (the refused one has ended: it takes none)
                with contextlib.suppress(DeliveryError):
                    await each.send("main", "stop")
            outcomes: list[str] = []
            for each in resumed:
                try:
                    outcomes.append((await each.result()).status)
                except NotResumable as exc:
                    # (Refused as it marked the run running, or, when it read
                    # the run after the other did, as it checked its status.)
                    refusal = str(exc)
                    assert "was resumed by another" in refusal or "still running" in refusal
                    outcomes.append("refused")
            assert sorted(outcomes) == ["completed", "refused"]

    anyio.run(main)


def test_a_run_id_given_on_the_command_line_is_text_not_a_pattern(tmp_path: Path) -> None:
    """`capsule inspect ID` looks a run up by its id or a prefix of it: "job-1"
    was ambiguous forever beside "job-10", and "_" and "%" in what was given
    matched any character (a_b found axb-1)."""
    from capsule.journal.reader import find_run
    from capsule.journal.schema import JournalError

    program = tmp_path / "hello.py"
    program.write_text(
        "from capsule import task\n\n@task(name='main')\ndef main():\n    return 1\n"
    )
    journal = tmp_path / "journal.db"

    async def runs(rt: Runtime) -> None:
        for run_id in ("job-1", "job-10", "axb-1"):
            assert (await rt.run(program, run_id=run_id)).ok

    in_runtime(journal, runs)
    assert anyio.run(find_run, journal, "job-1").run_id == "job-1"
    assert anyio.run(find_run, journal, "job-10").run_id == "job-10"
    assert anyio.run(find_run, journal, "ax").run_id == "axb-1"
    for pattern in ("a_b", "%", "job%"):
        with pytest.raises(JournalError, match="no run"):
            anyio.run(find_run, journal, pattern)
    with pytest.raises(JournalError, match="several runs"):
        anyio.run(find_run, journal, "job")
    done = subprocess.run(
        [sys.executable, "-m", "capsule.cli", "inspect", "job-1", "--journal", str(journal)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "job-1" in done.stdout, done.stderr


def test_forged_run_rows_are_listed_as_damaged_and_do_not_crash_lookups(tmp_path: Path) -> None:
    """One row whose arguments are not a pair made `runs` fail for every run;
    a host_pid past what os.kill takes raised OverflowError from a lookup by id."""
    import sqlite3

    program = tmp_path / "hello.py"
    program.write_text(
        "from capsule import task\n\n@task(name='main')\ndef main():\n    return 1\n"
    )
    journal = tmp_path / "journal.db"

    async def runs(rt: Runtime) -> None:
        for run_id in ("good", "bad-args", "bad-time", "bad-pid"):
            assert (await rt.run(program, run_id=run_id)).ok

    in_runtime(journal, runs)
    with sqlite3.connect(journal) as db:
        for column, value, run_id in (
            ("args_json", '{"a": 1}', "bad-args"),
            ("started_at", "yesterday", "bad-time"),
            ("host_pid", 2**62, "bad-pid"),
            ("status", "running", "bad-pid"),
        ):
            db.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", (value, run_id))

    async def look(rt: Runtime) -> None:
        listed = {record.run_id: record.shown_status for record in await rt.runs()}
        assert listed == {
            "good": "completed",
            "bad-args": "damaged",
            "bad-time": "damaged",
            "bad-pid": "crashed",
        }
        handle = await rt.start(program, run_id="bad-pid")  # (the journal's run)
        assert (await handle.result()).status == "crashed"

    in_runtime(journal, look)
    done = subprocess.run(
        [sys.executable, "-m", "capsule.cli", "runs", "--journal", str(journal)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "damaged" in done.stdout, done.stderr


def test_the_sync_face_from_many_threads_and_after_it_closed(tmp_path: Path) -> None:
    """Threads share one SyncRuntime; once it closed, a handle's result is still
    there (it raised anyio's "This portal is not running"), and what needs the
    run says its SyncRuntime is closed."""
    program = tmp_path / "counter.py"
    program.write_text(COUNTER)
    values: list[Any] = []
    with SyncRuntime(journal=False) as rt:

        def work(number: int) -> None:
            values.append(rt.run_code("result = args[0] * 2", number).value)
            handle = rt.start(program)
            handle.send("main", number)
            handle.send("main", "stop")
            values.append(handle.result().value)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        left = rt.start(program)
    assert sorted(values) == [0, 1, 1, 1, 1, 1, 1, 2, 4, 6, 8, 10]
    assert left.done and left.result().status == "interrupted"
    with pytest.raises(RuntimeError, match="SyncRuntime is closed"):
        left.send("main", "stop")


@pytest.mark.parametrize("size", [10**19, 0, -1, True, 1.5, "100"])
def test_an_event_buffer_out_of_range_is_refused_as_the_runtime_is_made(size: Any) -> None:
    """10**19 was taken, and overflowed the handle's deque as the first run started."""
    with pytest.raises(InvalidRequest, match="event_buffer"):
        Runtime(journal=False, event_buffer=size)
