"""Shared helpers: write a program to a temp dir and run it for real, in process
(through the same entry point the CLI uses) or as a `capsule` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session", autouse=True)
def guest_runtime() -> None:
    """Build (or find) the guest runtime once, before any test times itself."""
    from capsule.sandbox.engine import Sandbox

    with Sandbox([REPO]):
        pass


@dataclass
class Outcome:
    report: Any
    events: list[Any]

    @property
    def result(self) -> Any:
        assert self.report.result is not None, self.report
        return self.report.result

    @property
    def value(self) -> Any:
        assert self.result.ok, self.result.error
        return self.result.value()

    @property
    def error(self) -> Any:
        assert not self.result.ok, self.result.value()
        return self.result.error

    def of_type(self, kind: str) -> list[Any]:
        return [event for event in self.events if event.type == kind]


ProgramRunner = Callable[..., Outcome]


@pytest.fixture
def program(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a program file; returns its path."""

    def write(source: str, name: str = "prog.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def run_program(program: Callable[[str, str], Path]) -> ProgramRunner:
    """Run a program's main in process; returns its report and every event."""
    from capsule.supervisor.program import RunRequest
    from capsule.supervisor.program import run_program as run

    def runner(source: str, *args: Any, **options: Any) -> Outcome:
        path = program(source, options.pop("name", "prog.py"))
        events: list[Any] = []
        report = run(RunRequest(path=path, args=list(args), **options), events.append)
        return Outcome(report, events)

    return runner


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def capsule_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> Completed:
    """Run the `capsule` command as a real subprocess."""
    process = subprocess.run(
        [sys.executable, "-m", "capsule.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Completed(process.returncode, process.stdout, process.stderr)
