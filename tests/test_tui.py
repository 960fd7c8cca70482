"""The TUI, headless with Textual's Pilot, against real runs: a live run with a
retried and a failing task, the keys, cancelling a live task, attaching to a
run another process is writing, and SVG snapshots of the main screens. Guest
text of every kind (markup, escapes, surrogates, huge) through every widget;
a failure of the TUI, which must not stop the run nor exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textual.widgets import Static

from capsule.journal.reader import find_run
from capsule.supervisor.events import PREVIEW_CHARS
from capsule.supervisor.program import RunRequest, run_program
from capsule.tui.app import CapsuleApp, ConfirmScreen, HelpScreen, short_number
from capsule.tui.sources import JournalSource, LiveSource
from tests.conftest import capsule_cli

WORKFLOW = """
from capsule import current, sleep, task

@task(max_retries=2)
def flaky(n: int) -> int:
    print(f"flaky attempt {current().attempt}")
    if current().attempt < 2:
        raise ValueError("not yet")
    return n * 2

@task(max_retries=0)
def broken() -> None:
    raise RuntimeError("this one always fails")

@task
def napper(seconds: float) -> str:
    sleep(seconds)
    return "rested"

@task(name="main", max_retries=0)
def main(nap: float = 0.0) -> dict:
    outcome = {"flaky": flaky(21)}
    try:
        broken()
    except Exception as exc:
        outcome["broken"] = exc.kind
    if nap:
        outcome["napper"] = napper.spawn(nap).result()
    return outcome
"""


def _program(tmp_path: Path, source: str = WORKFLOW, name: str = "flow.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


class LiveRun:
    """A run on a thread, fed to a LiveSource, as `capsule run --tui` does."""

    def __init__(self, program: Path, *args: Any, journal: Path | None = None) -> None:
        self.source = LiveSource(str(program), journal)
        self.reports: list[Any] = []

        def run() -> None:
            from capsule.journal.session import run_journaled

            request = RunRequest(path=program, args=list(args))
            if journal is None:
                report = run_program(request, self.source.on_event, on_run=self.source.on_run)
            else:
                report = run_journaled(
                    request, journal, self.source.on_event, on_run=self.source.on_run
                )
            self.reports.append(report)
            ok = report.result is not None and report.result.ok
            self.source.ended(
                "interrupted" if report.interrupted else "completed" if ok else "failed",
                0 if ok else 1,
            )

        self.thread = threading.Thread(target=run, name="test-run")
        self.thread.start()

    def join(self) -> Any:
        self.source.stop()
        self.thread.join()
        return self.reports[0]


async def _until(pilot: Any, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the TUI"
        await pilot.pause(0.1)


def _labels(app: CapsuleApp) -> dict[str, str]:
    """Each task's line in the tree, as drawn."""
    return {task_id: str(app._label_of(task_id)) for task_id in app._tree_nodes}


def test_a_live_run_with_a_retried_and_a_failing_task(tmp_path: Path) -> None:
    live = LiveRun(_program(tmp_path))

    async def drive() -> None:
        app = CapsuleApp(live.source)
        async with app.run_test(size=(100, 32)) as pilot:
            await _until(pilot, lambda: app.model.ended_at is not None)
            await pilot.pause(0.3)
            labels = _labels(app)
            assert labels["main"].startswith("✓ main")
            assert "completed  2/3" in labels["main/1"]  # flaky: retried once
            assert labels["main/2"].startswith("✗ broken") and "failed     1/1" in labels["main/2"]
            summary = str(app._summary.render())
            assert "ended: completed" in summary and "✗ failed 1" in summary

            # The detail pane of the failing task: its error and guest traceback.
            app._tree_widget.move_cursor(app._tree_nodes["main/2"])
            await pilot.pause(0.1)
            detail = str(app._detail.render())
            assert "this one always fails" in detail and "traceback" in detail
            assert "raise RuntimeError" in detail
            app._tree_widget.move_cursor(app._tree_nodes["main/1"])
            await pilot.pause(0.1)
            detail = str(app._detail.render())
            assert "flaky attempt 1" in detail and "flaky attempt 2" in detail  # output
            assert "flaky(21)" in detail  # the call
            assert "42" in detail and "retrying" in detail  # result, timeline

            # f cycles the state filter: running, waiting, failed -> only broken (and main).
            for _ in range(3):
                await pilot.press("f")
            await pilot.pause(0.1)
            assert set(app._tree_nodes) == {"main", "main/2"}
            assert "filter: failed" in str(app._summary.render())
            for _ in range(3):
                await pilot.press("f")  # back to all
            await pilot.pause(0.1)
            assert set(app._tree_nodes) == {"main", "main/1", "main/2"}

            # / searches by name.
            await pilot.press("slash", *"flaky", "enter")
            await pilot.pause(0.1)
            assert set(app._tree_nodes) == {"main", "main/1"}
            await pilot.press("slash", "escape")
            await pilot.pause(0.1)
            assert len(app._tree_nodes) == 3

            await pilot.press("l")
            assert app.follow is True
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("c")  # the selected task has ended: nothing to confirm
            assert not isinstance(app.screen, ConfirmScreen)
            await pilot.press("q")
        assert app.return_value == 0 and app.failure is None

    asyncio.run(drive())
    report = live.join()
    assert report.result.value() == {"flaky": 42, "broken": "exception"}


def test_cancel_a_live_task_after_confirming(tmp_path: Path) -> None:
    live = LiveRun(_program(tmp_path), 30.0)

    async def drive() -> None:
        app = CapsuleApp(live.source)
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(
                pilot,
                lambda: (
                    app.model.tasks.get("main/3") is not None
                    and app.model.tasks["main/3"].state == "waiting"
                ),
            )
            await pilot.pause(0.3)
            app._tree_widget.move_cursor(app._tree_nodes["main/3"])
            await pilot.pause(0.1)
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await _until(pilot, lambda: app.model.ended_at is not None, timeout=20)
            await pilot.pause(0.3)
            assert app.model.tasks["main/3"].state == "cancelled"
            assert app.model.tasks["main"].state == "failed"  # its result() raised
            await pilot.press("q")
        # The run failed (its exit code); the TUI did not (its return code).
        assert app.return_value == 1 and app.return_code == 0 and app.failure is None

    asyncio.run(drive())
    report = live.join()
    assert report.result.error.kind == "exception"


def test_quitting_a_live_run_stops_it_and_it_can_be_resumed(tmp_path: Path) -> None:
    program = _program(tmp_path)
    source = LiveSource(str(program))
    reports: list[Any] = []

    def run() -> None:
        from capsule.journal.session import run_journaled

        report = run_journaled(
            RunRequest(path=program, args=[60.0]),
            tmp_path / "journal.db",
            source.on_event,
            on_run=source.on_run,
        )
        reports.append(report)
        source.ended("interrupted", 130)

    thread = threading.Thread(target=run)
    thread.start()

    async def drive() -> None:
        app = CapsuleApp(source)
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: "main/3" in app.model.tasks)
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")

    asyncio.run(drive())
    thread.join(timeout=30)
    assert reports and reports[0].interrupted
    runs = json.loads(
        capsule_cli("runs", "--json", "--journal", str(tmp_path / "journal.db")).stdout
    )
    assert runs[0]["status"] == "interrupted"


ATTACHED = """
from capsule import sleep, task

@task
def step(n: int) -> int:
    print(f"step {n}")
    sleep(0.3)
    return n

@task(name="main")
def main() -> int:
    return sum(step(n) for n in range(6))
"""


def test_attach_to_a_run_another_process_is_writing(tmp_path: Path) -> None:
    program = _program(tmp_path, ATTACHED, "slow.py")
    journal = tmp_path / "journal.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program), "--journal", str(journal)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not journal.exists() or not _has_run(journal):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        record = asyncio.run(find_run(journal, None))

        async def drive() -> list[int]:
            app = CapsuleApp(JournalSource(journal, record))
            seen: list[int] = []
            async with app.run_test(size=(80, 24)) as pilot:
                await _until(pilot, lambda: "main/1" in app.model.tasks)
                while app.model.ended_at is None:  # follows the growing journal
                    seen.append(sum(v.state == "completed" for v in app.model.tasks.values()))
                    await pilot.pause(0.2)
                await pilot.pause(0.3)
                assert app.model.status == "completed"
                assert all(view.state == "completed" for view in app.model.tasks.values())
                assert len(app.model.tasks) == 7
                await pilot.press("c")  # not this process's run: refused, nothing asked
                assert not isinstance(app.screen, ConfirmScreen)
                await pilot.press("q")
            return seen

        seen = asyncio.run(drive())
        assert seen == sorted(seen) and seen[0] < 6  # it saw the run progress live
    finally:
        process.wait(timeout=60)
    assert process.returncode == 0


def _has_run(journal: Path) -> bool:
    try:
        with sqlite3.connect(journal) as connection:
            return bool(connection.execute("SELECT count(*) FROM runs").fetchone()[0])
    except sqlite3.Error:
        return False


# -- snapshots -------------------------------------------------------------------

FIXED_NOW = 1_800_000_100.0
FIXED_FUEL = {"main": 640_000, "flaky": 380_000, "broken": 1_500_000}


@pytest.fixture(scope="module")
def finished_journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A journal of a real run of WORKFLOW, with its varying parts (ids, times,
    paths) fixed, so that screens render the same every time."""
    tmp_path = tmp_path_factory.mktemp("snapshot")
    program = _program(tmp_path)
    journal = tmp_path / "journal.db"
    done = capsule_cli("run", str(program), "--journal", str(journal))
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(journal) as connection:
        for table in ("runs", "tasks", "attempts", "step_batches", "messages", "events"):
            connection.execute(f"UPDATE {table} SET run_id = 'snapshotrun1'")
        connection.execute(
            "UPDATE runs SET program = '/project/flow.py', started_at = 1800000000.0, "
            "ended_at = 1800000001.5"
        )
        # A wait is reported once it lasted a few milliseconds (the async
        # core's caller of a direct call waits; on task threads the callee
        # runs inline): whether one is reported varies from run to run.
        connection.execute("DELETE FROM events WHERE type IN ('waiting', 'resumed')")
        connection.execute(
            "UPDATE events SET at = 1800000000.0 + 0.01 * "
            "(SELECT COUNT(*) FROM events AS earlier WHERE earlier.seq <= events.seq)"
        )
        # Fuel counts the guest runtime's instructions too: fixed, so that a
        # change of the runtime does not change the screens.
        for name, fuel in FIXED_FUEL.items():
            connection.execute("UPDATE tasks SET fuel = ? WHERE name = ?", (fuel, name))
        rows = connection.execute("SELECT seq, type, data_json FROM events").fetchall()
        for seq, kind, data in rows:
            fields = json.loads(data)
            for key in ("duration_ms", "backoff_s"):
                if key in fields:
                    fields[key] = 10.0
            if "fuel_consumed" in fields:
                # A task's fixed fuel is all it burned: none in attempts it retried.
                fields["fuel_consumed"] = 0 if kind == "retrying" else FIXED_FUEL[fields["task"]]
            if fields.get("peak_memory_bytes"):  # (varies with the runtime, as fuel)
                fields["peak_memory_bytes"] = 23_000_000
            error = fields.get("error")
            if isinstance(error, dict) and error.get("traceback"):
                error["traceback"] = error["traceback"].replace(str(tmp_path), "/project")
            connection.execute(
                "UPDATE events SET data_json = ? WHERE seq = ?", (json.dumps(fields), seq)
            )
    yield journal


def _browsing_app(journal: Path) -> CapsuleApp:
    record = asyncio.run(find_run(journal, None))
    return CapsuleApp(JournalSource(journal, record), clock=lambda: FIXED_NOW)


def test_snapshot_of_a_finished_run(finished_journal: Path, snap_compare: Any) -> None:
    app = _browsing_app(finished_journal)

    async def settle(pilot: Any) -> None:
        await _until(pilot, lambda: app.model.ended_at is not None)
        await pilot.pause(0.3)
        await pilot.press("down", "down")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


def test_snapshot_of_the_help_screen(finished_journal: Path, snap_compare: Any) -> None:
    app = _browsing_app(finished_journal)

    async def settle(pilot: Any) -> None:
        await _until(pilot, lambda: app.model.ended_at is not None)
        await pilot.press("question_mark")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


def test_snapshot_of_the_failed_filter_wide(finished_journal: Path, snap_compare: Any) -> None:
    app = _browsing_app(finished_journal)

    async def settle(pilot: Any) -> None:
        await _until(pilot, lambda: app.model.ended_at is not None)
        await pilot.pause(0.3)
        await pilot.press("f", "f", "f", "down")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(120, 36), run_before=settle)


def _run_in_terminal(
    args: list[str], keys_after: float, keys: bytes, python: bool = False
) -> tuple[int, str]:
    """Run `capsule` (``python``: Python with ``args``) in a pseudo-terminal, type
    ``keys`` after ``keys_after`` s."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, *args] if python else [sys.executable, "-m", "capsule.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"},
        close_fds=True,
    )
    os.close(slave)
    output = b""
    sent = False
    started = time.monotonic()
    try:
        while process.poll() is None:
            assert time.monotonic() - started < 120, output[-2000:]
            if not sent and time.monotonic() - started > keys_after:
                os.write(master, keys)
                sent = True
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:
                    break
    finally:
        process.wait(timeout=30)
        os.close(master)
    return process.returncode, output.decode("utf-8", "replace")


@pytest.mark.parametrize(("source", "code"), [("ok", 0), ("fails", 1)])
def test_capsule_run_tui_in_a_real_terminal_exits_with_the_runs_code(
    tmp_path: Path, source: str, code: int
) -> None:
    body = "return 'all good'" if source == "ok" else "raise ValueError('bad input')"
    program = _program(
        tmp_path,
        f"from capsule import task\n@task(name='main', max_retries=0)\ndef main():\n    {body}\n",
        "term.py",
    )
    returncode, output = _run_in_terminal(
        ["run", "--tui", str(program), "--no-journal"], keys_after=6.0, keys=b"q"
    )
    assert returncode == code, output[-3000:]
    assert ("all good" if code == 0 else "bad input") in output  # printed after the TUI


def test_without_a_run_id_the_tui_lists_the_runs_to_pick_from(finished_journal: Path) -> None:
    from capsule.journal.reader import list_runs
    from capsule.tui.app import RunPicker

    runs = asyncio.run(list_runs(finished_journal))
    by_id = {run.run_id: run for run in runs}

    async def drive() -> None:
        app = CapsuleApp(
            picker=(runs, lambda run_id: JournalSource(finished_journal, by_id[run_id]))
        )
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert isinstance(app.screen, RunPicker)
            await pilot.press("enter")
            await _until(pilot, lambda: app.model.ended_at is not None)
            assert app.model.run_id == "snapshotrun1"
            assert {"main", "main/1", "main/2"} <= set(app.model.tasks)
            await pilot.press("q")

    asyncio.run(drive())


def test_quitting_while_the_program_loads_stops_the_run_as_soon_as_it_starts() -> None:
    stops: list[str] = []

    class Run:
        run_id = "r1"

        def stop(self, reason: str) -> None:
            stops.append(reason)

    source = LiveSource("prog.py")
    source.stop()  # the user quit before the run existed
    source.on_run(Run())
    assert stops and "before the run started" in stops[0]


SLEEPER = """
from capsule import sleep, task

@task(max_retries=0)
def sleeper() -> str:
    sleep(60)
    return "woke"

@task(name="main", max_retries=0)
def main() -> str:
    try:
        return sleeper.spawn().result()
    except Exception as exc:
        return f"sleeper {exc.kind}"
"""


def test_cancel_from_a_tui_attached_to_another_process(tmp_path: Path) -> None:
    program = _program(tmp_path, SLEEPER, "sleepy.py")
    journal = tmp_path / "journal.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program), "--journal", str(journal)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not journal.exists() or not _has_run(journal):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        record = asyncio.run(find_run(journal, None))

        async def drive() -> None:
            app = CapsuleApp(JournalSource(journal, record))
            async with app.run_test(size=(80, 24)) as pilot:
                await _until(
                    pilot,
                    lambda: (
                        "main/1" in app.model.tasks and app.model.tasks["main/1"].state == "waiting"
                    ),
                )
                await pilot.pause(0.3)
                app._tree_widget.move_cursor(app._tree_nodes["main/1"])
                await pilot.pause(0.1)
                await pilot.press("c")
                assert isinstance(app.screen, ConfirmScreen)
                await pilot.press("y")
                await _until(pilot, lambda: app.model.ended_at is not None, timeout=30)
                await pilot.pause(0.3)
                assert app.model.tasks["main/1"].state == "cancelled"
                await pilot.press("q")  # a viewer: quitting does not touch the run

        asyncio.run(drive())
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert out.strip() == "sleeper cancelled"


def test_a_hibernated_task_shows_what_it_gave_back() -> None:
    """The hibernated event, in the TUI's model (its detail and timeline) and in
    `capsule run -v`, until the task runs again."""
    from capsule.cli import _lifecycle_line
    from capsule.supervisor.events import TaskHibernated
    from capsule.tui.model import RunModel

    model = RunModel("r1", "prog.py")
    ids = {"task_id": "main/1", "task": "keeper", "at": 1.0}
    model.apply({**ids, "type": "pending", "parent_id": "main", "max_attempts": 1})
    model.apply({**ids, "type": "started", "attempt": 1, "max_attempts": 1})
    model.apply({**ids, "type": "waiting", "on": "receive"})
    model.apply({**ids, "type": "hibernated", "released_bytes": 9 * 2**20})
    view = model.tasks["main/1"]
    assert view.state == "waiting" and view.hibernated_bytes == 9 * 2**20
    assert view.timeline[-1][1] == "hibernated: gave back 9.0 MB only read"
    model.apply({**ids, "type": "resumed"})
    assert view.state == "running" and view.hibernated_bytes is None

    assert _lifecycle_line(
        TaskHibernated(run_id="r1", task_id="main/1", task="keeper", released_bytes=9 * 2**20)
    ) == ("hibernated main/1 (keeper): gave back 9.0 MB of memory it had only read")


# -- guest text is plain text, everywhere ------------------------------------------

MARKUP_LIKE = """
from capsule import task

@task(name="main", max_retries=0)
def main() -> dict:
    print("loading [1/3")
    print("[/b] [bold red]not bold[/] \\\\")
    return {"items": [{"name": f"item {i}", "tags": ["a", "b"]} for i in range(40)]}
"""


def _detail_text(app: CapsuleApp) -> str:
    return str(app._detail.render())


def test_output_and_results_that_look_like_markup_are_shown_as_they_are(tmp_path: Path) -> None:
    """An unbalanced `[` in the output and a long result with lists crashed the
    TUI (MarkupError) as the task was selected; with follow on, as the run ended."""
    live = LiveRun(_program(tmp_path, MARKUP_LIKE, "markup.py"), journal=tmp_path / "j.db")

    async def drive() -> None:
        app = CapsuleApp(live.source)
        async with app.run_test(size=(100, 32)) as pilot:
            await pilot.press("l")  # follow: the newest activity is selected
            await _until(pilot, lambda: app.model.ended_at is not None)
            await pilot.pause(0.3)
            app._tree_widget.move_cursor(app._tree_nodes["main"])
            await pilot.pause(0.1)
            detail = _detail_text(app)
            assert "loading [1/3" in detail
            assert "[/b] [bold red]not bold[/] \\" in detail
            await _until(pilot, lambda: '"name": "item 39"' in _detail_text(app))  # whole
            await pilot.press("q")
        assert app.failure is None and app.return_code == 0

    asyncio.run(drive())
    live.join()


class _Events:
    """A source that hands the app a fixed list of events (and can cancel)."""

    owns_run = False
    can_cancel = True

    def __init__(self, events: list[dict[str, Any]], program: str = "prog.py") -> None:
        self.run_id = "r1"
        self.program = program
        self._events = events
        self.cancelled: list[str] = []

    async def fetch(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def live(self) -> list[Any]:
        return []

    def outcome(self) -> tuple[str, int | None] | None:
        return None

    def cancel(self, task_id: str) -> str:
        self.cancelled.append(task_id)
        return f"cancelling {task_id}"

    def stop(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _hostile_run(texts: list[str]) -> list[dict[str, Any]]:
    """A run whose every guest-supplied string is one of ``texts``: task and
    registered names, arguments, output, results, error kinds, messages and
    tracebacks. Per text, a task retried then completed, and one that failed;
    last, one waiting."""
    at = 1_800_000_000.0

    def event(task_id: str, kind: str, name: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "task_id": task_id, "task": name, "at": at, **fields}

    first = texts[0]
    events = [
        event("main", "pending", first, parent_id=None, max_attempts=1, call=first),
        event("main", "started", first, attempt=1, max_attempts=1),
        event("main", "output", first, stream="stdout", text=first),
    ]
    for number, text in enumerate(texts):
        done, failed = f"main/{2 * number + 1}", f"main/{2 * number + 2}"
        error = {"kind": text, "message": text, "task": text, "traceback": text}
        pending = {"parent_id": "main", "call": text, "actor_name": text}
        events += [
            event(done, "pending", text, max_attempts=2, **pending),
            event(done, "started", text, attempt=1, max_attempts=2),
            event(done, "output", text, stream="stderr", text=text),
            event(done, "retrying", text, attempt=1, error=error, backoff_s=0.1),
            event(done, "started", text, attempt=2, max_attempts=2),
            event(done, "output", text, stream="stdout", text=text),
            event(done, "completed", text, attempt=2, duration_ms=1, fuel_consumed=5, result=text),
            event(failed, "pending", text, max_attempts=1, **pending),
            event(failed, "started", text, attempt=1, max_attempts=1),
            event(failed, "failed", text, attempt=1, error=error, duration_ms=1, fuel_consumed=5),
        ]
    waiting = f"main/{2 * len(texts) + 1}"
    return [
        *events,
        event(waiting, "pending", texts[-1], parent_id="main", max_attempts=1, call=first),
        event(waiting, "started", texts[-1], attempt=1, max_attempts=1),
        event(waiting, "waiting", texts[-1], on="receive"),
    ]


#: Strings that have broken terminal UIs: markup, escapes, controls, bidi,
#: lone surrogates, and sizes no one would print.
NASTY = [
    "loading [1/3",
    "[/]",
    "[/b]",
    "[bold red]x[/bold red]",
    "[link=file:///etc/passwd]x[/link]",
    "[@click=app.quit]quit[/]",
    "[$accent]x",
    "\\",
    "x\\[",
    "\x1b[2J\x1b]52;c;SGVsbG8=\x07",
    "\r\b\x00\x7f\x9b",
    "\u202eevil\u2066",
    "\ud800\udfff",
    "",
    " ",
    "\n\n\n",
    "[" * 20_000,
    "x" * 300_000,
    "line\n" * 5_000,
]


#: What must never reach the terminal from a guest: C0 and C1 controls but tab and
#: line feed, DEL, bidirectional overrides, lone surrogates.
_ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _assert_inert(shown: str) -> None:
    assert not _ACTIVE.search(shown), ascii(shown[:300])


def _drive_every_widget(texts: list[str]) -> None:
    """Show each of ``texts`` in every place the TUI shows guest text: the tree,
    the detail pane of each task, the header, a search for it, the cancel
    dialog and its notification."""
    source = _Events(_hostile_run(texts), program=texts[0])
    count = 2 * len(texts) + 2

    async def drive() -> None:
        app = CapsuleApp(source, clock=lambda: FIXED_NOW)
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: len(app._tree_nodes) == count, timeout=30)
            for task_id in list(app._tree_nodes):
                app._tree_widget.move_cursor(app._tree_nodes[task_id])
                await pilot.pause()
                assert task_id in _detail_text(app)
                _assert_inert(_detail_text(app))
                _assert_inert(str(app._label_of(task_id)))
            _assert_inert(str(app._summary.render()))
            await pilot.press("c")  # the last task waits: a dialog quoting its name
            assert isinstance(app.screen, ConfirmScreen)
            _assert_inert(str(app.screen.query_one("#confirm", Static).render()))
            await pilot.press("y")
            await pilot.pause()
            assert source.cancelled == [f"main/{count - 1}"]
            for text in texts:
                app.search = text[:1000]
                app._rebuild_now()
                await pilot.pause()
            await pilot.press("slash", *"[b]", "enter", "f", "l", "question_mark", "escape")
            await pilot.pause()
            await pilot.press("q")
        assert app.failure is None

    asyncio.run(drive())


def test_nasty_guest_strings_in_every_widget() -> None:
    _drive_every_widget(NASTY)


@given(
    st.lists(
        st.text(
            alphabet=st.one_of(
                st.characters(codec=None, categories=None),  # surrogates and controls too
                st.sampled_from("[]/\\=@#$:;\"' \n\x1b"),
            ),
            max_size=200,
        ),
        min_size=1,
        max_size=6,
    )
)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_guest_strings_in_every_widget(texts: list[str]) -> None:
    _drive_every_widget(texts)


# -- a failure of the TUI never stops the run, and never exits 0 ----------------------

#: Runs `capsule` with the TUI made to fail as it first draws its header (an
#: injected fault: no guest input is known to make it fail).
FAILING_TUI = """
import sys
from capsule.tui.app import CapsuleApp
from capsule.cli import main

def fail(self, now):
    raise RuntimeError("injected failure of the TUI")

CapsuleApp._show_summary = fail
main(sys.argv[1:])
"""

STEADY = """
from capsule import sleep, task

@task
def step(n: int) -> int:
    sleep(0.2)
    print(f"step {n} done")
    return n

@task(name="main", max_retries=0)
def main(fail: str = "no") -> int:
    total = sum(step(n) for n in range(4))
    if fail == "yes":
        raise ValueError("bad input")
    return total
"""


@pytest.mark.parametrize(("fail", "code"), [("no", 9), ("yes", 1)])
def test_the_run_goes_on_when_the_tui_fails(tmp_path: Path, fail: str, code: int) -> None:
    program = _program(tmp_path, STEADY, "steady.py")
    journal = tmp_path / "journal.db"
    returncode, output = _run_in_terminal(
        ["-c", FAILING_TUI, "run", "--tui", str(program), fail, "--journal", str(journal)],
        keys_after=1e9,
        keys=b"",
        python=True,
    )
    assert returncode == code, output[-3000:]
    assert "the terminal UI failed (RuntimeError: injected failure of the TUI)" in output
    assert "step 3 done" in output  # the run went on, shown as `capsule run` shows it
    if fail == "no":
        assert re.search(r"^6\r?$", output, re.M), output[-3000:]  # main's result
    else:
        assert "bad input" in output
    runs = json.loads(capsule_cli("runs", "--json", "--journal", str(journal)).stdout)
    assert runs[0]["status"] == ("completed" if fail == "no" else "failed")


def test_capsule_tui_exits_non_zero_when_the_tui_fails(finished_journal: Path) -> None:
    returncode, output = _run_in_terminal(
        ["-c", FAILING_TUI, "tui", "snapshotrun1", "--journal", str(finished_journal)],
        keys_after=1e9,
        keys=b"",
        python=True,
    )
    assert returncode == 9, output[-3000:]
    assert "the terminal UI failed (RuntimeError: injected failure of the TUI)" in output


def _failing_app() -> CapsuleApp:
    """An app that fails as it first draws its header (an injected fault)."""

    class Failing(CapsuleApp):
        def _show_summary(self, now: float) -> None:
            raise RuntimeError("injected failure of the TUI")

    return Failing(_Events([]))  # type: ignore[arg-type]


@pytest.mark.parametrize("supported", [True, False], ids=["checked-textual", "other-textual"])
def test_a_failure_of_the_tui_is_not_a_quit_on_any_textual_version(
    monkeypatch: pytest.MonkeyPatch, supported: bool
) -> None:
    """On the Textual version textual_compat was checked against, the failure is
    the exception itself (its private record); on any other, Textual's public
    return code still tells it from a quit, whose return value is the run's
    exit code (1 here, as for a failed run)."""
    from capsule.tui import textual_compat

    monkeypatch.setattr(textual_compat, "SUPPORTED", supported)
    failing = _failing_app()
    assert failing.run(headless=True, size=(80, 24)) is None
    failure = failing.failure
    if supported:
        assert isinstance(failure, RuntimeError)
        assert str(failure) == "injected failure of the TUI"
    else:
        assert isinstance(failure, textual_compat.TuiFailed)
        assert "exited with return code 1" in str(failure)
        assert "pip install 'textual>=8,<9'" in str(failure)

    quitting = CapsuleApp(_Events([]))  # type: ignore[arg-type]

    async def quit_at_once(pilot: Any) -> None:
        quitting.model.exit_code = 1  # (the run failed: its exit code)
        await pilot.press("q")

    assert quitting.run(headless=True, size=(80, 24), auto_pilot=quit_at_once) == 1
    assert quitting.failure is None and quitting.return_code == 0


def test_the_private_name_read_is_there_on_the_checked_textual() -> None:
    """Caught here, not by a user, if a Textual release drops it."""
    from textual.app import App

    from capsule.tui import textual_compat

    assert textual_compat.SUPPORTED, (
        f"textual {textual_compat.VERSION} is not the one textual_compat was checked "
        f"against: check App._exception there, then SUPPORTED_MAJOR"
    )
    assert App()._exception is None  # (the attribute textual_compat reads)


# -- whole results, once the journal has committed them -----------------------------

BIG_RESULT = """
from capsule import task

@task(name="main", max_retries=0)
def main() -> list:
    return [{"name": f"item {i}"} for i in range(60)]
"""


class _Dumped(dict[str, Any]):
    """A journaled event as a run's thread hands it to a LiveSource."""

    def model_dump(self) -> dict[str, Any]:
        return dict(self)


@pytest.mark.parametrize("kind", ["live", "journal"])
def test_a_result_committed_after_its_completed_event_shows_whole_once_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The completed event (a preview) comes before the journal commits the
    whole result: the journal is held at that point (its task row completed,
    without a result), the task selected, then the result committed. Nothing
    is read again until that commit; after it, the whole result shows."""
    program = _program(tmp_path, BIG_RESULT, "big.py")
    journal = tmp_path / "journal.db"
    done = capsule_cli("run", str(program), "--journal", str(journal))
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(journal) as connection:
        run_id, whole = connection.execute(
            "SELECT run_id, result_json FROM tasks WHERE task_id = 'main'"
        ).fetchone()
        connection.execute("UPDATE tasks SET result_json = NULL WHERE task_id = 'main'")
    assert len(whole) > PREVIEW_CHARS

    reads: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_trace_callback(reads.append)
        return connection

    monkeypatch.setattr(sqlite3, "connect", traced)
    record = asyncio.run(find_run(journal, run_id))
    source: Any
    if kind == "journal":
        source = JournalSource(journal, record)
    else:
        source = LiveSource(str(program), journal)
        source.run_id = run_id
        events = asyncio.run(JournalSource(journal, record).fetch())
        for event in events:
            source.on_event(_Dumped(event))
    fetches = 0
    fetch = source.fetch

    async def counted() -> list[dict[str, Any]]:
        nonlocal fetches
        fetches += 1
        return await fetch()  # type: ignore[no-any-return]

    source.fetch = counted

    def result_reads() -> int:
        return sum("SELECT result_json" in statement for statement in reads)

    async def drive() -> None:
        app = CapsuleApp(source)
        async with app.run_test(size=(100, 32)) as pilot:
            await _until(pilot, lambda: "main" in app._tree_nodes)
            app._tree_widget.move_cursor(app._tree_nodes["main"])
            await _until(pilot, lambda: result_reads() == 1)
            seen = fetches
            await _until(pilot, lambda: fetches >= seen + 3)  # three batches more
            assert result_reads() == 1  # nothing committed: nothing read
            assert f"(a preview: its first {PREVIEW_CHARS} characters)" in _detail_text(app)
            assert '"name": "item 59"' not in _detail_text(app)

            with connect(journal) as writer:  # the journal writer's commit
                writer.execute("UPDATE tasks SET result_json = ? WHERE task_id = 'main'", (whole,))
            await _until(pilot, lambda: '"name": "item 59"' in _detail_text(app))
            assert "(a preview" not in _detail_text(app)
            assert result_reads() == 2
            assert app.model.tasks["main"].result == whole
            await pilot.press("q")
        assert app.failure is None

    asyncio.run(drive())


# -- names, order, memory, attempts ------------------------------------------------

TWELVE = """
from capsule import task

@task
def worker(n: int) -> int:
    print(f"worker {n}")
    return n

@task(name="main", max_retries=0)
def main() -> int:
    handles = [worker.spawn(n, name="critic-3" if n == 3 else None) for n in range(12)]
    return sum(handle.result() for handle in handles)
"""


def _tree_order(app: CapsuleApp) -> list[str | None]:
    """The tasks as the tree lists them, top to bottom."""
    order: list[str | None] = []

    def walk(node: Any) -> None:
        for child in node.children:
            order.append(child.data)
            walk(child)

    walk(app._tree_widget.root)
    return order


def test_names_order_and_memory_live_and_from_the_journal(tmp_path: Path) -> None:
    """The registered name shows in the tree and is searched ("no matches" when
    nothing is found); siblings are in spawn order (main/2 before main/10), the
    same live and from the journal; every ended task shows its peak memory."""
    program = _program(tmp_path, TWELVE, "twelve.py")
    journal = tmp_path / "journal.db"
    live = LiveRun(program, journal=journal)
    expected = ["main", *(f"main/{n}" for n in range(1, 13))]

    async def drive(app: CapsuleApp, searches: bool) -> list[str | None]:
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: app.model.ended_at is not None)
            await pilot.pause(0.3)
            order = _tree_order(app)
            assert '"critic-3"' in _labels(app)["main/4"]
            for view in app.model.tasks.values():
                assert view.peak_memory is not None and view.peak_memory > 2**20, view
                assert short_number(view.peak_memory) in _labels(app)[view.task_id]
            if searches:
                await pilot.press("slash", *"critic", "enter")
                await pilot.pause(0.1)
                assert set(app._tree_nodes) == {"main", "main/4"}
                assert "no matches" not in str(app._summary.render())
                await pilot.press("slash", "escape", "slash", *"nobody", "enter")
                await pilot.pause(0.1)
                assert not app._tree_nodes
                assert "no matches" in str(app._summary.render())
            await pilot.press("q")
        return order

    assert asyncio.run(drive(CapsuleApp(live.source), searches=True)) == expected
    live.join()
    replayed = asyncio.run(drive(_browsing_app(journal), searches=False))
    assert replayed == expected

    verbose = capsule_cli("run", "-v", str(program), "--no-journal")
    assert verbose.returncode == 0, verbose.stderr
    assert 'started main/4 (worker "critic-3"), attempt 1/' in verbose.stderr
    assert '[main/4 worker "critic-3"] worker 3' in verbose.stdout


def test_each_attempts_output_apart_and_the_keys_to_scroll(finished_journal: Path) -> None:
    app = _browsing_app(finished_journal)
    with sqlite3.connect(finished_journal) as connection:
        retried = connection.execute("SELECT data_json FROM events WHERE type = 'retrying'")
        # The failed attempt's memory was measured too (then fixed by the fixture).
        assert [json.loads(data)["peak_memory_bytes"] for (data,) in retried] == [23_000_000]

    async def drive() -> None:
        async with app.run_test(size=(100, 40)) as pilot:
            await _until(pilot, lambda: app.model.ended_at is not None)
            await pilot.pause(0.3)
            assert "memory" in str(app.query_one("#columns", Static).render())
            app._tree_widget.move_cursor(app._tree_nodes["main/1"])  # flaky: two attempts
            await pilot.pause(0.1)
            detail = _detail_text(app)
            first = detail.index("── attempt 1 ──")
            assert first < detail.index("flaky attempt 1") < detail.index("── attempt 2 ──")
            assert detail.index("── attempt 2 ──") < detail.index("flaky attempt 2")
            await pilot.press("question_mark")
            assert "page up" in str(app.screen.query_one("#help", Static).render())
            await pilot.press("escape", "tab")  # to the detail pane, which scrolls
            assert app.focused is app.query_one("#detail-box")
            await pilot.press("q")

    asyncio.run(drive())


def test_siblings_are_in_spawn_order_whatever_order_their_events_arrive_in() -> None:
    """Children's events come from their own threads, in any order: the tree
    lists them by number all the same (main/2 before main/10)."""
    numbers = list(range(1, 30))
    random.Random(3).shuffle(numbers)
    batches = [
        [{"type": "pending", "task_id": "main", "task": "main", "parent_id": None, "at": 1.0}]
    ]
    for number in numbers:  # one batch each: each one added to a tree already drawn
        event = {"type": "pending", "task_id": f"main/{number}", "task": "w", "at": 1.0}
        batches.append([{**event, "parent_id": "main"}])

    class Trickle(_Events):
        async def fetch(self) -> list[dict[str, Any]]:
            return batches.pop(0) if batches else []

    async def drive() -> None:
        app = CapsuleApp(Trickle([]))
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: len(app._tree_nodes) == 30)
            assert _tree_order(app) == ["main", *(f"main/{n}" for n in range(1, 30))]
            await pilot.press("q")

    asyncio.run(drive())


def test_following_moves_to_new_activity_and_leaves_the_cursor_alone_between(
    finished_journal: Path,
) -> None:
    app = _browsing_app(finished_journal)

    async def drive() -> None:
        async with app.run_test(size=(100, 32)) as pilot:
            await _until(pilot, lambda: app.model.ended_at is not None)
            await pilot.press("l")
            await app.refresh_run()
            await pilot.pause()
            latest = app.model.latest
            assert app._selected == latest
            await pilot.press("up" if latest != "main" else "down")
            moved = app._selected
            assert moved != latest
            for _ in range(3):  # refreshes with no new activity
                app._last_full = 0.0
                await app.refresh_run()
                await pilot.pause()
            assert app._selected == moved
            await pilot.press("q")

    asyncio.run(drive())


def test_a_live_typescript_run_shows_its_tree_output_and_errors(tmp_path: Path) -> None:
    """A TypeScript program's tasks in the TUI as a Python program's: the tree,
    a child's output and a failed child's JavaScript stack."""
    if shutil.which("node") is None and not os.environ.get("CI"):
        pytest.skip("node and npm are not installed: JS/TS programs cannot run here")
    program = _program(
        tmp_path,
        """
        import { task } from "@capsule-run/sdk";
        export const talk = task({ name: "talk" }, (n: number) => {
          console.log(`talking ${n}`);
          return n * 2;
        });
        export const broken = task({ name: "broken", maxRetries: 0 }, () => {
          throw new TypeError("this one always fails");
        });
        export const main = task({ name: "main" }, async () => {
          const said = await talk(21);
          try { await broken(); } catch (error: any) { return [said, error.kind]; }
          return [said, "no error"];
        });
        """,
        name="flow.ts",
    )
    live = LiveRun(program)

    async def drive() -> None:
        app = CapsuleApp(live.source)
        async with app.run_test(size=(100, 32)) as pilot:
            await _until(pilot, lambda: app.model.ended_at is not None)
            await pilot.pause(0.3)
            labels = _labels(app)
            assert labels["main"].startswith("✓ main")
            assert labels["main/1"].startswith("✓ talk")
            assert labels["main/2"].startswith("✗ broken")
            app._tree_widget.move_cursor(app._tree_nodes["main/1"])
            await pilot.pause(0.1)
            assert "talking 21" in str(app._detail.render())
            app._tree_widget.move_cursor(app._tree_nodes["main/2"])
            await pilot.pause(0.1)
            detail = str(app._detail.render())
            assert "this one always fails" in detail and "TypeError" in detail
            await pilot.press("q")

    asyncio.run(drive())
    report = live.join()
    assert report.result.value() == [42, "exception"]
