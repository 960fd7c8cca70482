"""The security suite's fixtures: each hostile run, on both cores."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Outcome, ProgramRunner


@pytest.fixture
def run_on_core(run_program: ProgramRunner, core: str) -> ProgramRunner:
    """``run_program`` on the ``core`` under test."""

    def runner(source: str, *args: Any, **options: Any) -> Outcome:
        return run_program(source, *args, core=core, **options)

    return runner
