"""The host API on trio, anyio's other backend: a Runtime opened in a trio
application runs, starts, streams, cancels, resumes and reads back runs as on
asyncio. The run's threads reach the caller's loop through trio's token; the
journal's readers (aiosqlite: asyncio only) run on a loop of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from capsule.host import Runtime
from tests.test_host_api import ACTOR, HELLO, SLEEPER, write

pytest.importorskip("trio")


def on_trio(journal: Path, body: Any) -> Any:
    async def main() -> Any:
        async with Runtime(journal=journal) as rt:
            # (A guard against a hang, not a measure.)
            with anyio.fail_after(300):
                return await body(rt)

    return anyio.run(main, backend="trio")


def test_run_start_events_result_and_cancel_under_trio(tmp_path: Path) -> None:
    hello = write(tmp_path, "hello.py", HELLO)
    sleeper = write(tmp_path, "sleeper.py", SLEEPER)

    async def body(rt: Runtime) -> tuple[Any, ...]:
        ran = await rt.run(hello, "trio")
        named = await rt.run(hello, run_id="named")  # (looks the id up in the journal)
        again = await rt.run(hello, run_id="named")  # (read back: not run again)

        quick = await rt.start(sleeper, 0)
        types = [event.type async for event in quick.events()]
        slept = await quick.result()

        slow = await rt.start(sleeper, 3600, run_id="slow")
        async for event in slow.events():
            if event.type == "started":
                break
        cancelled = await slow.cancel()
        stopped = await slow.result()
        return ran, named, again, types, slept, cancelled, stopped

    ran, named, again, types, slept, cancelled, stopped = on_trio(tmp_path / "j.db", body)
    assert ran.value == "hello trio!"
    assert named.value == again.value == "hello world!" and again.run_id == "named"
    assert types[0] == "run_started" and types[-1] == "run_ended" and "completed" in types
    assert slept.value == "slept"
    assert cancelled is True and stopped.status == "interrupted"


def test_resume_messages_journal_reads_and_a_cancelled_caller_under_trio(
    tmp_path: Path,
) -> None:
    actor = write(tmp_path, "actor.py", ACTOR)
    sleeper = write(tmp_path, "sleeper.py", SLEEPER)

    async def body(rt: Runtime) -> tuple[Any, ...]:
        handle = await rt.start(actor, run_id="actor")
        reply = await handle.ask("main", "ping")
        await handle.send("main", "kept")
        handle.interrupt()
        interrupted = await handle.result()
        resumed = await rt.start_resume("actor")
        await resumed.send("main", "stop")
        finished = await resumed.result()

        # A caller cancelled while it awaits a run: the run is stopped first.
        async with anyio.create_task_group() as group:

            async def cancel_once_started() -> None:
                while (abandoned := rt.handle("abandoned")) is None:
                    await anyio.lowlevel.checkpoint()  # (its caller's turn)
                async for event in abandoned.events():
                    if event.type == "started":
                        group.cancel_scope.cancel()

            group.start_soon(cancel_once_started)
            await rt.run(sleeper, 3600, run_id="abandoned")
        runs = {run.run_id: run.status for run in await rt.runs()}
        details = await rt.inspect("actor")
        return reply, interrupted, finished, group.cancel_scope.cancelled_caught, runs, details

    reply, interrupted, finished, caught, runs, details = on_trio(tmp_path / "j.db", body)
    assert reply == {"echo": "ping"}
    assert interrupted.status == "interrupted"
    assert finished.value == ["kept"]
    assert caught
    assert runs == {"actor": "completed", "abandoned": "interrupted"}
    assert details.run.run_id == "actor" and details.tasks[0].status == "completed"
