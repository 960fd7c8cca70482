"""The host API, for real: programs run in wasm through a Runtime inside a
running event loop (and through the SyncRuntime), journaled in SQLite."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsule.host import (
    CodeGrants,
    CodeLimits,
    DeliveryError,
    InvalidRequest,
    JournalUnavailable,
    NotResumable,
    OptionError,
    ProgramFailed,
    RunHandle,
    RunNotFound,
    RunOptions,
    Runtime,
    RuntimeFailure,
    SyncRuntime,
)
from capsule.supervisor.events import TaskCompleted, TaskWaiting

HELLO = """
from capsule import task

@task(name="main")
def main(name: str = "world", punctuation: str = "!") -> str:
    print("greeting", name)
    return f"hello {name}{punctuation}"
"""

#: Main is an actor: it answers asks, collects sends, and returns them on "stop".
ACTOR = """
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

SLEEPER = """
from capsule import sleep, task

@task(name="main")
def main(seconds: float) -> str:
    sleep(seconds)
    return "slept"
"""


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("programs")
    return {
        "hello": write(directory, "hello.py", HELLO),
        "actor": write(directory, "actor.py", ACTOR),
        "sleeper": write(directory, "sleeper.py", SLEEPER),
    }


def in_runtime(journal: Path | bool, body: Callable[[Runtime], Coroutine[Any, Any, Any]]) -> Any:
    """``body(rt)`` inside a running event loop, with a Runtime open."""

    async def main() -> Any:
        async with Runtime(journal=False if journal is False else journal) as rt:
            # (A guard against a hang, not a measure: each run here takes seconds.)
            with anyio.fail_after(300):
                return await body(rt)

    return anyio.run(main)


async def wait_for(handle: RunHandle, accept: Callable[[Any], bool]) -> Any:
    """The first event of the handle that ``accept`` takes."""
    async for event in handle.events():
        if accept(event):
            return event
    raise AssertionError("the run ended before the event came")


def test_importing_capsule_loads_no_host_dependency() -> None:
    code = (
        "import sys, capsule\n"
        "heavy = [m for m in ('anyio', 'pydantic', 'wasmtime') if m in sys.modules]\n"
        "print(heavy)\n"
        "print(capsule.Runtime.__module__, 'anyio' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["[]", "capsule.host.runtime True"]


def test_a_program_may_import_everything_capsule_exports(tmp_path: Path) -> None:
    star = write(
        tmp_path,
        "star.py",
        """
        from capsule import *

        @task(name="main")
        def main() -> str:
            return "imported"
        """,
    )

    async def body(rt: Runtime) -> None:
        assert (await rt.run(star)).value == "imported"

    in_runtime(False, body)


def test_run_streams_events_in_order_and_keeps_the_loop_free(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    async def body(rt: Runtime) -> None:
        result = await rt.run(programs["hello"], "ada", kwargs={"punctuation": "?"})
        assert result.ok and result.value == "hello ada?"
        assert result.attempts == 1 and result.fuel_consumed and result.totals
        handle = await rt.start(programs["actor"])
        ticked = anyio.Event()

        async def tick() -> None:  # runs while the run runs: the loop is not blocked
            await anyio.lowlevel.checkpoint()
            ticked.set()

        async with anyio.create_task_group() as group:
            group.start_soon(tick)
            await wait_for(handle, lambda e: isinstance(e, TaskWaiting))
            await ticked.wait()
            assert not handle.done
            await handle.send("main", "stop")
        events = [event async for event in handle.events()]
        assert [e.type for e in events[:3]] == ["run_started", "pending", "started"]
        assert isinstance(events[-2], TaskCompleted) and events[-2].task_id == "main"
        assert events[-1].type == "run_ended" and events[-1].status == "completed"
        assert all(e.run_id == handle.run_id for e in events)
        assert (await handle.result()).value == []

    in_runtime(tmp_path / "journal.db", body)


def test_send_and_ask_reach_an_actor_and_errors_are_typed(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    async def body(rt: Runtime) -> None:
        handle = await rt.start(programs["actor"])
        assert await handle.ask("main", {"q": 1}, timeout=30) == {"echo": {"q": 1}}
        message_id = await handle.send("main", "kept")
        assert isinstance(message_id, str)
        with pytest.raises(DeliveryError) as missing:
            await handle.send("nobody", 1)
        assert missing.value.kind == "no_such_actor"
        with pytest.raises(InvalidRequest, match="not a JSON value"):
            await handle.send("main", {1, 2})
        with pytest.raises(InvalidRequest, match="timeout"):
            await handle.ask("main", 1, timeout=-1)
        await handle.send("main", "stop")
        assert (await handle.result()).value == ["kept"]
        with pytest.raises(DeliveryError) as ended:
            await handle.send("main", 1)
        assert ended.value.kind == "run_ended"

    in_runtime(False, body)


def test_cancelling_the_caller_interrupts_the_run_and_resume_finishes_it(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    async def body(rt: Runtime) -> None:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                await rt.run(programs["sleeper"], 0.5, run_id="nap-1")
                raise AssertionError("the run was not cancelled")

            group.start_soon(run)
            while rt.handle("nap-1") is None:
                await anyio.lowlevel.checkpoint()
            handle = rt.handle("nap-1")
            assert handle is not None
            await wait_for(handle, lambda e: isinstance(e, TaskWaiting))
            group.cancel_scope.cancel()
        # The awaiting side returned once the run had stopped: it is resumable.
        details = await rt.inspect("nap-1")
        assert details.run.status == "interrupted"
        assert [task.task_id for task in details.tasks] == ["main"]
        assert any(run.run_id == "nap-1" for run in await rt.runs())
        again = await rt.start(programs["sleeper"], 0.5, run_id="nap-1")  # not a new run
        assert (await again.result()).status == "interrupted"
        result = await rt.resume("nap-1")
        assert result.ok and result.value == "slept"
        with pytest.raises(NotResumable, match="already ended"):
            await rt.resume("nap-1")
        with pytest.raises(RunNotFound):
            await rt.resume("no-such-run")

    in_runtime(tmp_path / "journal.db", body)


def test_a_run_id_makes_a_start_idempotent(programs: dict[str, Path], tmp_path: Path) -> None:
    async def body(rt: Runtime) -> None:
        first = await rt.start(programs["actor"], run_id="order-17")
        again = await rt.start(programs["actor"], run_id="order-17")
        assert again is first
        await first.send("main", "stop")
        assert (await first.result()).ok
        ended = await rt.start(programs["hello"], run_id="order-17")  # ended: its result
        assert ended.done and (await ended.result()).value == []
        assert [run.run_id for run in await rt.runs()] == ["order-17"]
        with sqlite3.connect(rt.journal) as db:  # a damaged record is an error, not a crash
            db.execute("UPDATE runs SET result_json = '{' WHERE run_id = 'order-17'")
        damaged = await rt.start(programs["hello"], run_id="order-17")
        with pytest.raises(JournalUnavailable, match="damaged"):
            await damaged.result()

    in_runtime(tmp_path / "journal.db", body)


def test_two_runs_at_once_in_one_runtime(programs: dict[str, Path], tmp_path: Path) -> None:
    async def body(rt: Runtime) -> None:
        handles = [await rt.start(programs["actor"]) for _ in range(2)]
        for handle in handles:  # both are live at once, each waiting for its messages
            await wait_for(handle, lambda e: isinstance(e, TaskWaiting))
        for number, handle in enumerate(handles):
            await handle.send("main", number)
            await handle.send("main", "stop")
        assert [(await h.result()).value for h in handles] == [[0], [1]]

    in_runtime(False, body)


def test_cancel_one_task_or_the_whole_run(tmp_path: Path) -> None:
    program = write(
        tmp_path,
        "parent.py",
        """
        from capsule import TaskError, sleep, task

        @task(name="napper")
        def napper() -> str:
            sleep(60)
            return "woke"

        @task(name="main")
        def main() -> str:
            try:
                return napper.spawn().result()
            except TaskError as exc:
                return exc.kind
        """,
    )

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program)
        waiting = await wait_for(
            handle, lambda e: isinstance(e, TaskWaiting) and e.task_id != "main"
        )
        assert await handle.cancel(waiting.task_id)
        assert (await handle.result()).value == "cancelled"
        assert not await handle.cancel("main/404")
        whole = await rt.start(program)
        await wait_for(whole, lambda e: isinstance(e, TaskWaiting) and e.task_id != "main")
        await whole.cancel()
        result = await whole.result()
        assert result.status == "interrupted" and not result.ok
        with pytest.raises(ProgramFailed):
            result.raise_for_error()

    in_runtime(tmp_path / "journal.db", body)


def test_run_code_captures_output_and_enforces_limits_and_grants(tmp_path: Path) -> None:
    async def body(rt: Runtime) -> None:
        done = await rt.run_code("print('sum', sum(args))\nresult = {'total': sum(args)}", 1, 2)
        assert done.ok and done.value == {"total": 3} and done.stdout == "sum 3\n"
        spin = "while True:\n    pass\n"
        by_fuel = await rt.run_code(spin, limits=CodeLimits(fuel="LOW"))
        assert by_fuel.error is not None and by_fuel.error.kind == "fuel_exhausted"
        by_time = await rt.run_code(spin, limits=CodeLimits(fuel="HIGH", timeout="1s"))
        assert by_time.error is not None and by_time.error.kind == "timeout"
        hog = await rt.run_code("x = bytearray(300 * 1024 * 1024)", limits=CodeLimits(ram="64MB"))
        assert hog.error is not None and hog.error.kind == "memory_limit"
        fetch = "import capsule.http\nresult = capsule.http.get('http://127.0.0.1:9/').status\n"
        refused = await rt.run_code(fetch, grants=CodeGrants(hosts=["example.com"]))
        assert refused.error is not None and refused.error.message.startswith("HostNotAllowed")
        env = await rt.run_code(
            "import os\nresult = os.environ.get('TOKEN')", grants=CodeGrants(env={"TOKEN": "t"})
        )
        assert env.value == "t"
        values: list[Any] = []

        async def square(number: int) -> None:
            values.append((await rt.run_code("result = args[0] ** 2", number)).value)

        async with anyio.create_task_group() as group:  # at once, on the one warm sandbox
            for number in range(4):
                group.start_soon(square, number)
        assert sorted(values) == [0, 1, 4, 9]
        loud = await rt.run_code("print('x' * 5000)", limits=CodeLimits(max_output="1KB"))
        assert loud.error is not None and loud.error.kind == "output_limit"
        failed = await rt.run_code("raise ValueError('bad input')")
        assert failed.error is not None and failed.error.kind == "exception"
        assert "bad input" in failed.error.message

    in_runtime(tmp_path / "journal.db", body)


def test_bad_inputs_are_typed_errors_naming_the_value(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    async def body(rt: Runtime) -> None:
        with pytest.raises(InvalidRequest, match="does not exist"):
            await rt.run(tmp_path / "missing.py")
        with pytest.raises(OptionError, match=r"^max_fuel 'lots' is invalid; expected LOW"):
            RunOptions(max_fuel="lots")
        for bad in ("", "a/b", "x" * 65, "-lead", 7):
            with pytest.raises(InvalidRequest, match="run_id"):
                await rt.run(programs["hello"], run_id=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="JSON"):
            await rt.run(programs["hello"], float("nan"))
        with pytest.raises(InvalidRequest, match="options must be a RunOptions"):
            await rt.run(programs["hello"], options={"max_fuel": 1})  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match=r"no_such_task|no task|entry"):
            await rt.run(programs["hello"], entry="nothing_here")
        with pytest.raises(InvalidRequest, match=r"CodeLimits.fuel"):
            CodeLimits(fuel="plenty")
        with pytest.raises(InvalidRequest, match=r"CodeGrants.hosts"):
            CodeGrants(hosts=["http://"])
        with pytest.raises(InvalidRequest, match=r"CodeGrants.env"):
            CodeGrants(env={"1BAD": "x"})
        with pytest.raises(RunNotFound):
            await rt.inspect("never-ran")

    in_runtime(tmp_path / "journal.db", body)
    with pytest.raises(InvalidRequest, match="journal"):
        Runtime(journal=tmp_path)  # a directory
    not_a_journal = tmp_path / "notes.db"
    not_a_journal.write_text("just some notes, not SQLite\n" * 100)
    with pytest.raises(JournalUnavailable, match="not a readable Capsule journal"):
        in_runtime(not_a_journal, lambda rt: rt.runs())


def test_sync_runtime(programs: dict[str, Path], tmp_path: Path) -> None:
    with SyncRuntime(journal=tmp_path / "journal.db") as rt:
        assert rt.run(programs["hello"], "sync").value == "hello sync!"
        handle = rt.start(programs["actor"], run_id="sync-actor")
        live = rt.handle("sync-actor")
        assert live is not None and live.run_id == "sync-actor" and not live.done
        assert handle.ask("main", [1], timeout=30) == {"echo": [1]}
        handle.send("main", "stop")
        types = [event.type for event in handle.events()]
        assert types[:2] == ["run_started", "pending"] and types[-2:] == ["completed", "run_ended"]
        assert handle.result().value == []
        assert rt.run_code("result = args", "x").value == ["x"]
        coded = rt.start_code("result = 2", run_id="sync-code")
        assert coded.result().value == 2
        types = [event.type for event in coded.events()]
        assert types[0] == "run_started" and types[-1] == "run_ended", types
        assert rt.handle("sync-code") is None  # ended: no longer live
        assert {run.run_id for run in rt.runs()} >= {"sync-actor"}
        assert rt.inspect("sync-actor").run.status == "completed"
    journal_runs = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "capsule.cli",
                "runs",
                "--json",
                "--journal",
                str(tmp_path / "journal.db"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert len(journal_runs) == 4


def test_events_are_bounded_for_a_slow_consumer(
    programs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from capsule.host import handle as handle_module

    async def main() -> None:
        async with Runtime(journal=False) as rt:
            # Held output is bounded too: printed text past it pushes out the oldest.
            monkeypatch.setattr(handle_module, "MAX_HELD_TEXT_CHARS", 3000)
            printing = await rt.start_code("for line in range(4):\n    print(str(line) * 1000)")
            await printing.result()
            texts = [e.text async for e in printing.events() if e.type == "output"]
            assert texts == ["2" * 1000 + "\n", "3" * 1000 + "\n"]
            assert printing.events_dropped >= 2
            # And so is the text of errors (a guest makes them as long as it likes).
            failing = tmp_path / "failing.py"
            failing.write_text(
                "from capsule import task\n"
                "@task(name='main', max_retries=3, retry_on=ValueError)\n"
                "def main():\n"
                "    raise ValueError('e' * 2000)\n"
            )
            errors = await rt.start(failing, options=RunOptions(retry_backoff=0))
            await errors.result()
            held = [e async for e in errors.events()]
            assert (
                sum(
                    len(getattr(e, "error", None).message)
                    for e in held
                    if getattr(e, "error", None)
                )
                <= 3000
            )
            assert errors.events_dropped >= 2
            monkeypatch.undo()

        async with Runtime(journal=False, event_buffer=2) as rt:
            handle = await rt.start(programs["hello"])
            await handle.result()  # the consumer reads only now: it fell behind
            events = [event async for event in handle.events()]
            assert len(events) == 2 and handle.events_dropped >= 2
            assert isinstance(events[0], TaskCompleted) and events[0].task_id == "main"
            assert events[1].type == "run_ended"
            loud = await rt.run_code("print('x' * 5000)", limits=CodeLimits(max_output="1KB"))
            assert loud.stdout == "x" * 1024 + "\n[output cut at 1,024 characters]\n"

    anyio.run(main)


def test_leaving_the_runtime_interrupts_its_runs_resumably(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    journal = tmp_path / "journal.db"

    async def main() -> None:
        async with Runtime(journal=journal) as rt:
            handles = [await rt.start(programs["actor"]) for _ in range(2)]
            for handle in handles:
                await wait_for(handle, lambda e: isinstance(e, TaskWaiting))
            assert handles[0]._run is not None and handles[1]._run is not None
            # Two runs at once, on one engine and compiled runtime.
            assert handles[0]._run.sandbox.engine is handles[1]._run.sandbox.engine
        assert all(handle.done for handle in handles)
        async with Runtime(journal=journal) as rt:
            statuses = {run.run_id: run.status for run in await rt.runs()}
            assert statuses == {handle.run_id: "interrupted" for handle in handles}
            results = [(await handle.result()).status for handle in handles]
            assert results == ["interrupted", "interrupted"]

    anyio.run(main)


def test_runs_on_each_core_share_that_cores_engine(programs: dict[str, Path]) -> None:
    """The async core's engine has async support: runs on the thread core
    share an engine of their own, and the two cores' runs run side by side."""
    from capsule.sandbox.async_sandbox import AsyncSandbox

    async def main() -> None:
        async with Runtime(journal=False) as rt:
            cores = ["threads", "async", "threads", "async"]
            handles = [
                await rt.start(programs["actor"], options=RunOptions(core=core)) for core in cores
            ]
            for handle in handles:
                await wait_for(handle, lambda e: isinstance(e, TaskWaiting))
            runs = [handle._run for handle in handles]
            assert all(run is not None for run in runs)
            sandboxes = [run.sandbox for run in runs if run is not None]
            assert [isinstance(sandbox, AsyncSandbox) for sandbox in sandboxes] == [
                False,
                True,
                False,
                True,
            ]
            assert sandboxes[0].engine is sandboxes[2].engine
            assert sandboxes[1].engine is sandboxes[3].engine
            assert sandboxes[0].engine is not sandboxes[1].engine
            for handle in handles:
                await handle.send("main", "stop")
            assert [(await handle.result()).value for handle in handles] == [[], [], [], []]

    anyio.run(main)


def test_a_resume_started_as_its_runtime_closes_leaves_no_handle_behind(
    programs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is read before a resume starts: a Runtime that closed
    meanwhile refuses it, and holds no handle that would never end."""
    journal = tmp_path / "journal.db"

    async def interrupt_one() -> None:
        async with Runtime(journal=journal) as rt:
            handle = await rt.start(programs["actor"], run_id="late-1")
            await wait_for(handle, lambda e: isinstance(e, TaskWaiting))
            await handle.cancel()

    anyio.run(interrupt_one)
    reading, closed = anyio.Event(), anyio.Event()
    read = Runtime._record

    async def slow_read(self: Runtime, run_id: str) -> Any:
        reading.set()
        await closed.wait()
        return await read(self, run_id)

    monkeypatch.setattr(Runtime, "_record", slow_read)

    async def main() -> None:
        refused: list[BaseException] = []

        async def resume(rt: Runtime) -> None:
            try:
                await rt.start_resume("late-1")
            except Exception as exc:
                refused.append(exc)

        async with anyio.create_task_group() as group:
            async with Runtime(journal=journal) as rt:
                group.start_soon(resume, rt)
                await reading.wait()
            closed.set()  # (the Runtime closed while the resume read the journal)
        assert len(refused) == 1 and "Runtime" in str(refused[0]), refused
        assert rt.handle("late-1") is None

    anyio.run(main)


def test_errors_name_the_host_apis_parameters_not_the_clis_flags(
    programs: dict[str, Path], tmp_path: Path
) -> None:
    """What fixes an error is said as an application gives it: a journal file
    is Runtime(journal=...), not `--journal PATH` (the CLI words the same
    errors with its flags)."""
    not_a_journal = tmp_path / "notes.db"
    not_a_journal.write_text("just some notes, not SQLite\n" * 100)
    with pytest.raises(JournalUnavailable) as unreadable:
        in_runtime(not_a_journal, lambda rt: rt.runs())
    assert "Move it away, or pass Runtime(journal=PATH)" in str(unreadable.value)

    program = tmp_path / "changes.py"
    program.write_text(SLEEPER)

    async def interrupted_then_changed(rt: Runtime) -> None:
        handle = await rt.start(program, 60, run_id="changes")
        await wait_for(handle, lambda event: isinstance(event, TaskWaiting))
        await handle.cancel()
        program.write_text(SLEEPER + "\n# changed\n")
        await rt.resume("changes")

    with pytest.raises(NotResumable) as changed:
        in_runtime(tmp_path / "journal.db", interrupted_then_changed)
    assert "resume anyway with resume(..., force=True)" in str(changed.value)

    async def ended_then_resumed(rt: Runtime) -> None:
        await rt.run(programs["hello"], run_id="ended")
        await rt.resume("ended")

    with pytest.raises(NotResumable) as ended:
        in_runtime(tmp_path / "journal.db", ended_then_resumed)
    assert "Runtime.inspect('ended') shows how it ended" in str(ended.value)
    for error in (unreadable.value, changed.value, ended.value):
        assert "--journal" not in str(error) and "`capsule inspect" not in str(error)


def test_a_host_failure_read_back_from_the_journal_is_still_the_hosts(
    programs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run the host failed (a bug: nothing ran) was read back from the
    journal as the caller's InvalidRequest, its traceback lost."""
    from capsule.sandbox.engine import live_instances
    from capsule.supervisor.run import Run

    def broken(run: Run, *_: Any) -> Any:
        raise LookupError("a bug in the host")

    monkeypatch.setattr(Run, "run_main", broken)

    async def body(rt: Runtime) -> tuple[RuntimeFailure, RuntimeFailure]:
        with pytest.raises(RuntimeFailure) as live:
            await rt.run(programs["hello"], run_id="host-bug")
        again = await rt.start(programs["hello"], run_id="host-bug")  # (read back)
        with pytest.raises(RuntimeFailure) as read_back:
            await again.result()
        return live.value, read_back.value

    live, read_back = in_runtime(tmp_path / "journal.db", body)
    assert live_instances() == 0
    assert str(read_back) == str(live)
    assert (
        read_back.traceback is not None and "LookupError: a bug in the host" in read_back.traceback
    )


SILENT = """
from capsule import receive, task

@task(name="main")
def main() -> str:
    while True:
        message = receive()
        if message.expects_reply:
            print("asked, and never replying", flush=True)
        elif message.body == "stop":
            return "stopped"
"""


def _asks_waiting() -> int:
    """Threads of this process blocked in a wait of an ask from outside (for
    its reply, or to be told it has a reply)."""
    import threading

    import capsule.actors.external

    where = capsule.actors.external.__file__
    count = 0
    for frame in sys._current_frames().values():
        inner = None
        while frame is not None and frame.f_code.co_filename != where:
            inner, frame = frame, frame.f_back  # type: ignore[assignment]
        if frame is not None and inner is not None:
            count += inner.f_code is threading.Event.wait.__code__
    return count


def test_a_cancelled_ask_stops_waiting_for_its_reply(tmp_path: Path) -> None:
    program = write(tmp_path, "silent.py", SILENT)

    async def body(rt: Runtime) -> None:
        handle = await rt.start(program)
        async with anyio.create_task_group() as group:

            async def ask() -> None:
                await handle.ask("main", "anyone?", timeout=600)
                raise AssertionError("the silent actor replied")

            group.start_soon(ask)
            await wait_for(handle, lambda e: "never replying" in getattr(e, "text", ""))
            # (The actor may print before the asking thread is back in its wait.)
            with anyio.fail_after(60):
                while _asks_waiting() != 1:
                    await anyio.sleep(0.001)
            group.cancel_scope.cancel()
        # Its thread let go of the ask as the cancellation ended; the run goes on.
        assert _asks_waiting() == 0
        await handle.send("main", "stop")
        assert (await handle.result()).value == "stopped"

    in_runtime(False, body)
