"""What a Runtime's runs on the async core share: one loop thread per
Runtime, each run a task group on it that leaves nothing behind as it ends or
is cancelled, and one warm sandbox's poll threads and linker, each run's
modules still its own; both stopped as the Runtime closes. (The host API's
behaviour is tested in test_host_api.py.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import textwrap
import threading
from pathlib import Path

import anyio
import pytest

from capsule.host import RunHandle, RunOptions, Runtime
from capsule.sandbox.async_sandbox import AsyncSandbox
from capsule.supervisor.events import TaskWaiting
from capsule.supervisor.loop_thread import LoopThread

#: A bound against hanging, not a figure a test asserts.
PATIENCE_S = 60.0

ASYNC = RunOptions(core="async")

#: Main waits for messages, and returns once told to stop.
ACTOR = """
from capsule import receive, task

@task(name="main")
def main() -> str:
    while receive().body != "stop":
        pass
    return "stopped"
"""

#: Main's child waits for a message too: a run of two tasks on the loop.
PARENT = """
from capsule import receive, task

@task(name="child")
def child() -> str:
    return str(receive().body)

@task(name="main")
def main() -> str:
    return child.spawn().result()
"""

HELLO = """
from capsule import task

@task(name="main")
def main() -> int:
    return 1
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("programs")
    paths = {}
    for name, source in (("actor", ACTOR), ("parent", PARENT), ("hello", HELLO)):
        paths[name] = directory / f"{name}.py"
        paths[name].write_text(textwrap.dedent(source))
    return paths


def capsule_threads() -> set[threading.Thread]:
    """The threads Capsule runs (anyio's idle worker threads are anyio's)."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("capsule-")}


def runs_loop(rt: Runtime) -> LoopThread:
    shared = rt._shared
    assert shared is not None
    return shared.loop()


def tasks_on(loop: LoopThread) -> set[str]:
    """The names of the tasks on ``loop`` now (read on its thread)."""
    names: concurrent.futures.Future[set[str]] = concurrent.futures.Future()
    loop.loop().call_soon_threadsafe(
        lambda: names.set_result({task.get_name() for task in asyncio.all_tasks()})
    )
    return names.result(PATIENCE_S)


async def waiting(handle: RunHandle, task_id: str = "main") -> None:
    async for event in handle.events():
        if isinstance(event, TaskWaiting) and event.task_id == task_id:
            return
    raise AssertionError(f"run {handle.run_id} ended before {task_id} waited")


def test_runs_at_once_share_one_loop_and_leave_nothing_on_it(programs: dict[str, Path]) -> None:
    async def main() -> None:
        async with Runtime(journal=False) as rt:
            with anyio.fail_after(PATIENCE_S):
                assert (await rt.run(programs["hello"], options=ASYNC)).value == 1
                loop = runs_loop(rt)
                before = await anyio.to_thread.run_sync(tasks_on, loop)
                loops_before = {t for t in capsule_threads() if t.name == "capsule-runs"}
                ended = await rt.start(programs["actor"], options=ASYNC)
                cancelled = await rt.start(programs["parent"], options=ASYNC)
                await waiting(ended)
                await waiting(cancelled, "main/1")
                # Both on the Runtime's loop (no thread of their own), each
                # a task group on it, with its tasks in it.
                assert {t for t in capsule_threads() if t.name == "capsule-runs"} == loops_before
                runs = [ended._run, cancelled._run]
                assert all(run is not None and run._loop._host is loop for run in runs)
                # And on its one warm sandbox's poll threads.
                sandboxes = [run.sandbox for run in runs if run is not None]
                assert all(isinstance(sandbox, AsyncSandbox) for sandbox in sandboxes)
                warm = {sandbox._warm for sandbox in sandboxes if isinstance(sandbox, AsyncSandbox)}
                assert len(warm) == 1 and None not in warm
                assert len({sandbox._poller for sandbox in sandboxes}) == 1  # type: ignore[attr-defined]
                during = await anyio.to_thread.run_sync(tasks_on, loop)
                for handle in (ended, cancelled):
                    assert f"capsule-loop {handle.run_id}" in during
                assert "capsule-task main/1" in during
                await ended.send("main", "stop")
                assert (await ended.result()).value == "stopped"
                await cancelled.cancel()
                assert (await cancelled.result()).status == "interrupted"
                assert await anyio.to_thread.run_sync(tasks_on, loop) == before

    anyio.run(main)


def test_leaving_the_runtime_stops_its_loop_and_poll_threads(programs: dict[str, Path]) -> None:
    before = capsule_threads()

    async def main() -> None:
        async with Runtime(journal=False) as rt:
            with anyio.fail_after(PATIENCE_S):
                handle = await rt.start(programs["actor"], options=ASYNC)
                await waiting(handle)
                started = {thread.name for thread in capsule_threads() - before}
                for kind in ("capsule-runs", "capsule-poll"):
                    assert any(name.startswith(kind) for name in started), started

    anyio.run(main)
    assert capsule_threads() == before


def test_runs_on_the_warm_sandbox_import_their_own_modules(tmp_path: Path) -> None:
    """Two programs of one name, each beside a module of one name: each run
    imports its own, also as its task runs (its linker is shared)."""
    programs = []
    for name in ("first", "second"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "helper.py").write_text(f"VALUE = {name!r}\n")
        (directory / "prog.py").write_text(
            textwrap.dedent(
                """
                from capsule import task

                @task(name="main")
                def main() -> str:
                    import helper
                    return helper.VALUE
                """
            )
        )
        programs.append(directory / "prog.py")

    async def main() -> list[object]:
        async with Runtime(journal=False) as rt:
            with anyio.fail_after(PATIENCE_S):
                return [(await rt.run(program, options=ASYNC)).value for program in programs * 2]

    assert anyio.run(main) == ["first", "second", "first", "second"]
