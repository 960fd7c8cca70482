"""The run's memory budget (--max-total-ram): tasks that together fill more
than it are stopped, the largest first (running or blocked), and the host
stays within it. Real runs of `capsule run` in subprocesses, whose peak
resident memory the kernel reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox.budget import MemoryBudget, machine_memory
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
    resident memory in bytes (the kernel's VmHWM, read until it exits: wait4's
    figure would count the test process's own memory, from before the exec)."""
    with open(path.parent / "out", "w+") as out, open(path.parent / "err", "w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "capsule.cli", "run", "--no-journal", str(path), *args],
            stdout=out,
            stderr=err,
        )
        peak = 0
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:  # (it just ended)
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    assert process.returncode in (0, 1), errors
    return process.returncode, json.loads(text) if process.returncode == 0 else errors, peak


def _write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "hogs.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_tasks_over_the_budget_are_stopped_and_the_host_stays_within_it(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, HOGS)
    budget = 600 * MB
    code, result, peak = _run_measured(path, "--max-total-ram", "600MB", "--args-json", "[3, 300]")
    assert code == 0, result
    stopped = [hog for hog in result["hogs"] if isinstance(hog, list)]
    assert stopped, result
    for kind, message in stopped:
        assert kind == "memory_limit"
        assert "went over its budget of 600.0 MB (the run option max_total_ram)" in message
        assert "this task held the most of any" in message
    assert all(hog == 300 for hog in result["hogs"] if not isinstance(hog, list))
    assert result["bystander"] == sum(range(2_000_000))
    # (The peak counts the files the host maps too, ~70 - 100 MB, which the
    # budget leaves out: they are in the page cache once, however many map them.)
    assert peak < budget + 200 * MB, peak / MB

    # The same run without a budget: every hog gets its memory, well over it.
    code, result, peak = _run_measured(path, "--max-total-ram", "off", "--args-json", "[3, 300]")
    assert code == 0, result
    assert result["hogs"] == [300, 300, 300]
    assert peak > budget + 300 * MB, peak / MB


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
        path, "--max-total-ram", "400MB", "--cpu-slots", "2", "--args-json", "[]"
    )
    assert code == 0, result
    assert result == ["memory_limit", 160]


def test_a_blocked_task_holding_the_most_is_the_one_stopped(tmp_path: Path) -> None:
    # The others grow while it sleeps: they are not the ones to stop.
    path = _write(
        tmp_path,
        """
        import time
        import capsule
        from capsule import task

        @task(ram="1GB", compute="HIGH", max_retries=0)
        def holder() -> int:
            kept = [b"h" * (4 * 1024 * 1024) for _ in range(75)]  # 300 MB
            time.sleep(3)
            return len(kept)

        @task(ram="1GB", compute="HIGH", max_retries=0)
        def worker() -> int:
            kept = []
            for _ in range(40):  # 80 MB, a little at a time
                kept.append(b"w" * (2 * 1024 * 1024))
                total = 0
                for i in range(20_000):
                    total += i
            return len(kept)

        @task(name="main", compute="HIGH", timeout="2m")
        def main() -> list:
            first = holder.spawn()
            capsule.sleep(1.5)
            handles = [first] + [worker.spawn() for _ in range(3)]
            outcomes = capsule.gather(*handles, return_exceptions=True)
            return [o if isinstance(o, int) else o.kind for o in outcomes]
        """,
    )
    code, result, _ = _run_measured(path, "--max-total-ram", "500MB", "--args-json", "[]")
    assert code == 0, result
    assert result == ["memory_limit", 40, 40, 40]


def test_a_task_that_hides_its_memory_from_the_host_is_stopped_first(tmp_path: Path) -> None:
    # Its size is found through bytes the host gave its instance alone; a guest
    # that overwrites them cannot be measured, and must not be immune for that.
    path = _write(
        tmp_path,
        """
        import sys
        import capsule
        from capsule import task

        @task(ram="1GB", compute="HIGH", max_retries=0)
        def sneaky() -> int:
            sys.modules["capsule_guest"]._marker = b""
            # (Its marker's memory reused: bytes of the marker's length (16,
            # prefault.NONCE_SIZE), so of its
            # allocator size class, whatever else the runtime allocated before.)
            junk = [bytes(16) for _ in range(20000)]
            del junk
            kept = [b"x" * (4 * 1024 * 1024) for _ in range(150)]  # 600 MB
            capsule.sleep(2)
            return len(kept)

        @task(ram="1GB", compute="HIGH", max_retries=0)
        def honest() -> int:
            kept = [b"i" * (4 * 1024 * 1024) for _ in range(25)]  # 100 MB
            capsule.sleep(4)
            return len(kept)

        @task(name="main", compute="HIGH", timeout="2m")
        def main() -> list:
            handles = [honest.spawn(), sneaky.spawn()]
            outcomes = capsule.gather(*handles, return_exceptions=True)
            return [o if isinstance(o, int) else o.message for o in outcomes]
        """,
    )
    code, result, _ = _run_measured(path, "--max-total-ram", "400MB", "--args-json", "[]")
    assert code == 0, result
    assert result[0] == 25
    assert "held the most of any (its memory could not be found)" in result[1]


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


def test_the_machine_s_memory_is_the_lowest_cgroup_limit_on_the_way_up(tmp_path: Path) -> None:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/machine/service/task\n")
    levels = {"machine": "max", "machine/service": str(3 * 1024**3), "machine/service/task": "max"}
    for level, limit in levels.items():
        (cgroups / level).mkdir(parents=True)
        (cgroups / level / "memory.max").write_text(limit + "\n")
    assert machine_memory(proc, cgroups) == min(physical, 3 * 1024**3)
    # cgroup v1: the memory controller's own hierarchy.
    (proc / "self" / "cgroup").write_text("4:cpu:/x\n7:memory:/docker/abc\n")
    (cgroups / "memory" / "docker" / "abc").mkdir(parents=True)
    (cgroups / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("536870912\n")
    assert machine_memory(proc, cgroups) == min(physical, 512 * MB)
    (proc / "self" / "cgroup").unlink()
    assert machine_memory(proc, cgroups) == physical


def test_the_largest_task_is_chosen_once_until_its_instance_is_closed() -> None:
    sizes: dict[object, int | None] = {"a": 100 * MB, "b": 300 * MB, "c": None}
    stopped: list[tuple[object, str]] = []
    budget = MemoryBudget(
        1,  # (always over)
        lambda tasks: [sizes[task] for task in tasks],
        lambda task, why: stopped.append((task, why)),
    )

    def stops_after_a_tick() -> list[object]:
        budget.sample()
        time.sleep(0.2)  # (the budget's thread chooses)
        return [task for task, _ in stopped]

    try:
        for task in sizes:
            budget.register(task)
        # c's memory cannot be found (its guest hid it): it comes first.
        assert stops_after_a_tick() == ["c"]
        assert "this task held the most of any (its memory could not be found)" in stopped[0][1]
        assert budget.stopping("c") and budget.stopped == 1
        assert stops_after_a_tick() == ["c"]  # not again while c's instance is open
        budget.forget("c")
        assert stops_after_a_tick() == ["c", "b"]
        assert "this task held the most of any (300.0 MB)" in stopped[1][1]
        budget.forget("b")
        assert stops_after_a_tick() == ["c", "b", "a"]
        budget.forget("a")
        assert stops_after_a_tick() == ["c", "b", "a"]  # nobody left
        sizes["d"] = None
        budget.register("d")
        # Only tasks of unknown size (the host could not look): no grounds.
        assert stops_after_a_tick() == ["c", "b", "a"]
    finally:
        budget.close()
    assert not any(thread.name == "capsule-memory" for thread in threading.enumerate())


def test_what_the_host_holds_for_a_task_counts_as_its_memory(tmp_path: Path) -> None:
    """A task whose mailbox holds 200 MB of messages it never reads makes the
    host hold them: over the budget, it is the one stopped (its mailbox goes
    with it), not a task with a larger linear memory of its own."""
    path = tmp_path / "inbox.py"
    path.write_text(
        textwrap.dedent(
            """
            import capsule
            from capsule import receive, send, task

            @task(ram="512MB", compute="HIGH", max_retries=0)
            def hog() -> int:
                held = [b"x" * (4 * 1024 * 1024) for _ in range(15)]
                receive(timeout=90)
                return len(held) * 4

            @task(max_retries=0, restart="temporary")
            def inbox() -> str:
                capsule.sleep(90)
                return "never read"

            @task(name="main", compute="HIGH", ram="256MB", timeout="2m")
            def main() -> dict:
                big = hog.spawn()
                sink = inbox.spawn()
                chunk = "m" * (1024 * 1024 - 16)
                try:
                    for _ in range(200):
                        send(sink, chunk)
                except capsule.MessageError:
                    pass  # (it was stopped: its mailbox went with it)
                (stopped,) = capsule.gather(sink, return_exceptions=True)
                send(big, "done")
                return {"hog": big.result(), "inbox": getattr(stopped, "kind", None)}
            """
        )
    )
    code, value, _ = _run_measured(
        path,
        "--max-total-ram",
        "256MB",
        "--max-message-size",
        "2MB",
        "--max-queued-size",
        "250MB",
    )
    assert code == 0, value
    assert value == {"hog": 60, "inbox": "memory_limit"}, value
