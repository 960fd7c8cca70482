"""The run's memory budget (--max-total-ram): tasks that together fill more
than it are stopped, the largest running one first, and the host stays within
it. Real runs of `capsule run` in subprocesses, whose peak resident memory the
kernel reports (wait4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox.budget import MIN_BUDGET_BYTES, MemoryBudget, default_budget, machine_memory
from tests.conftest import capsule_cli

MB = 1024**2

HOGS = """
    import capsule
    from capsule import task

    @task(ram="1GB", compute="HIGH", max_retries=0)
    def hog(mb: int) -> int:
        chunks = []
        for _ in range(mb // 4):
            chunks.append(b"x" * (4 * 1024 * 1024))
        return len(chunks) * 4

    @task(compute="HIGH")
    def bystander(n: int) -> int:
        total = 0
        for i in range(n):
            total += i
        return total

    @task(name="main", compute="HIGH", timeout="2m")
    def main(hogs: int, mb: int) -> dict:
        small = bystander.spawn(2_000_000)
        handles = [hog.spawn(mb) for _ in range(hogs)]
        outcomes = capsule.gather(*handles, return_exceptions=True)
        return {
            "hogs": [o if isinstance(o, int) else [o.kind, o.message] for o in outcomes],
            "bystander": small.result(),
        }
"""


def _run_measured(path: Path, *args: str) -> tuple[int, Any, int]:
    """`capsule run` in a subprocess: exit code, its JSON result, and its peak
    resident memory in bytes (as the kernel counted it)."""
    with open(path.parent / "out", "w+") as out, open(path.parent / "err", "w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "capsule.cli", "run", "--no-journal", str(path), *args],
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    assert process.returncode in (0, 1), errors
    return (
        process.returncode,
        json.loads(text) if process.returncode == 0 else errors,
        (usage.ru_maxrss * 1024),
    )


def _write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "hogs.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_tasks_over_the_budget_are_stopped_and_the_host_stays_within_it(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, HOGS)
    budget = 700 * MB
    code, result, peak = _run_measured(path, "--max-total-ram", "700MB", "--args-json", "[3, 300]")
    assert code == 0, result
    stopped = [hog for hog in result["hogs"] if isinstance(hog, list)]
    assert stopped, result
    for kind, message in stopped:
        assert kind == "memory_limit"
        assert "went over its budget of 700 MB (--max-total-ram)" in message
        assert "had the largest memory of those running" in message
    assert all(hog == 300 for hog in result["hogs"] if not isinstance(hog, list))
    assert result["bystander"] == sum(range(2_000_000))
    # Over by at most what the running tasks add in a few ticks.
    assert peak < budget + 150 * MB, peak / MB

    # The same run without a budget: every hog gets its memory, well over it.
    code, result, peak = _run_measured(path, "--max-total-ram", "off", "--args-json", "[3, 300]")
    assert code == 0, result
    assert result["hogs"] == [300, 300, 300]
    assert peak > budget + 150 * MB, peak / MB


def test_the_largest_running_task_is_stopped_not_the_one_allocating_beside_it(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        """
        import capsule
        from capsule import task

        @task(ram="1GB", compute="HIGH", max_retries=0)
        def big() -> int:
            chunks = []
            for _ in range(150):  # 600 MB, 4 MB at a time
                chunks.append(b"x" * (4 * 1024 * 1024))
            return len(chunks)

        @task(ram="1GB", compute="HIGH", max_retries=0)
        def small() -> int:
            # Allocates all along too (and frees), at ~40 MB.
            kept = []
            for i in range(20000):
                kept.append(b"y" * (256 * 1024))
                if len(kept) > 160:
                    kept.pop(0)
            return len(kept)

        @task(name="main", compute="HIGH", timeout="2m")
        def main() -> list:
            handles = [big.spawn(), small.spawn()]
            outcomes = capsule.gather(*handles, return_exceptions=True)
            return [o if isinstance(o, int) else o.kind for o in outcomes]
        """,
    )
    code, result, _ = _run_measured(
        path, "--max-total-ram", "450MB", "--cpu-slots", "2", "--args-json", "[]"
    )
    assert code == 0, result
    assert result == ["memory_limit", 160]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("lots", "--max-total-ram 'lots' is invalid; expected a size such as"),
        ("100MB", "--max-total-ram '100MB' is below 256 MB"),
    ],
)
def test_a_bad_budget_is_a_usage_error(tmp_path: Path, value: str, expected: str) -> None:
    path = _write(tmp_path, HOGS)
    done = capsule_cli("run", "--no-journal", str(path), "--max-total-ram", value)
    assert done.returncode == 2
    assert expected in done.stderr


def test_the_default_budget_is_half_of_what_the_machine_gives() -> None:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < machine_memory() <= physical
    assert default_budget() == max(machine_memory() // 2, MIN_BUDGET_BYTES)


def test_a_task_is_chosen_only_once_every_running_one_could_report() -> None:
    sizes = {"a": 100 * MB, "b": 300 * MB}
    current = ["a"]
    budget = MemoryBudget(1, lambda: sizes[current[0]])  # (always over)
    try:
        assert budget.over
        assert budget.stop("a") is None  # a's first report: b has not said yet
        current[0] = "b"
        assert budget.stop("b") is None
        current[0] = "a"
        assert budget.stop("a") is None  # b is larger
        current[0] = "b"
        why = budget.stop("b")
        assert why is not None and "(300 MB)" in why
        assert budget.stopping("b") and budget.stopped == 1
        current[0] = "a"
        assert budget.stop("a") is None  # not while b's instance is still open
        budget.forget("b")
        assert not budget.stopping("b")
        assert budget.stop("a") is not None  # now a is the largest left
    finally:
        budget.close()
