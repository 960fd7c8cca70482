"""The host's own troubles (a bug in a tick, a poll, the memory budget, an
action after a commit, output that can no longer be shown) go to the logging
module, a logger per package, never straight to the embedding application's
stderr; the `capsule` command shows them on its own."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from capsule.journal.writer import JournalWriter
from capsule.sandbox.budget import MemoryBudget
from capsule.sandbox.engine import EpochTicker
from capsule.supervisor.events import TaskOutput
from capsule.supervisor.options import RunOptions
from capsule.supervisor.program import RunRequest, run_program


class Bug(RuntimeError):
    """What a host bug raises, so that its log record is told from any other."""


def logged(caplog: pytest.LogCaptureFixture, name: str, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name and r.levelno == level]


def test_a_failed_epoch_tick_is_logged_and_the_ticker_goes_on(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    ticker = EpochTicker(wasmtime.Engine())
    ticked_again = threading.Event()
    failed: list[bool] = []

    def work() -> None:
        if not failed:
            failed.append(True)
            raise Bug("a bug in a tick")
        ticked_again.set()

    ticker.add(work)
    try:
        assert ticked_again.wait(60)
    finally:
        ticker.remove(work)
    [record] = logged(caplog, "capsule.sandbox", logging.ERROR)
    assert "epoch tick failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is Bug
    assert capfd.readouterr().err == ""


def test_a_failure_of_the_memory_budget_is_logged_and_it_tries_again(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    stopped = threading.Event()
    looks: list[int] = []

    def measure(tasks: list[object]) -> list[int | None]:
        looks.append(len(tasks))
        if len(looks) == 1:
            raise Bug("a look at /proc failed")
        return [1 << 20 for _ in tasks]

    budget = MemoryBudget(1, measure, lambda task, why: stopped.set())  # (always over)
    try:
        budget.register("task")
        budget.sample()
        while not stopped.wait(0.05):  # (each sample after the failure tries again)
            budget.sample()
    finally:
        budget.close()
    [record] = logged(caplog, "capsule.sandbox", logging.ERROR)
    assert "memory budget failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is Bug
    assert capfd.readouterr().err == ""


def test_a_failed_action_after_a_commit_is_logged_and_the_writer_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    ran = threading.Event()

    def broken() -> None:
        raise Bug("a bug in an action")

    with JournalWriter(tmp_path / "journal.db", "run1") as writer:
        writer.after_commit(broken)
        writer.after_commit(ran.set)
        writer.sync()
    assert ran.is_set()
    [record] = logged(caplog, "capsule.journal", logging.ERROR)
    assert record.exc_info is not None and record.exc_info[0] is Bug
    assert capfd.readouterr().err == ""


PRINTS = """
from capsule import task

@task(name="main")
def main():
    for n in range(3):
        print("line", n)
    return "done"
"""


def test_output_that_cannot_be_shown_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "prog.py"
    path.write_text(PRINTS)

    def sink(event: Any) -> None:
        if isinstance(event, TaskOutput):
            raise Bug("the display is gone")

    report = run_program(RunRequest(path=path, args=[], options=RunOptions()), sink)
    assert report.result is not None and report.result.value() == "done"
    [record] = logged(caplog, "capsule.supervisor", logging.WARNING)
    assert "output can no longer be shown (Bug('the display is gone'))" in record.getMessage()
    assert capfd.readouterr().err == ""


def test_the_command_shows_the_logs_on_its_stderr(tmp_path: Path) -> None:
    """`capsule run > /dev/full`: the warning, as the command says things."""
    path = tmp_path / "prog.py"
    path.write_text(PRINTS)
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "capsule.cli", "run", str(path), "--no-journal"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("capsule: output can no longer be shown (OSError(28, ")
