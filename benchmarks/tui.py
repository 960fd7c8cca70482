"""The TUI with 1,000 actors: `python3 benchmarks/tui.py` prints how long a batch
of updates takes to apply and draw, and how fast a key is answered, headless.

A synthetic source stands in for a run: 1,000 tasks under ``main`` start, every
one of them reports new live fuel at every refresh, and then they complete.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capsule.tui.app import CapsuleApp

ACTORS = 1000


@dataclass
class Reading:
    task_id: str
    fuel_used: int
    mailbox_depth: int
    fuel_budget: int = 2_000_000_000


class SyntheticSource:
    can_cancel = False
    owns_run = False
    run_id = "benchmark"
    program = "synthetic.py"

    def __init__(self) -> None:
        now = time.time()
        self.pending: list[dict[str, Any]] = [
            {"type": "pending", "task_id": "main", "task": "main", "at": now, "parent_id": None,
             "max_attempts": 1},
            {"type": "started", "task_id": "main", "task": "main", "at": now, "attempt": 1,
             "max_attempts": 1, "fuel_budget": 2_000_000_000},
        ]  # fmt: skip
        for i in range(1, ACTORS + 1):
            task_id = f"main/{i}"
            self.pending += [
                {"type": "pending", "task_id": task_id, "task": "worker", "at": now,
                 "parent_id": "main", "max_attempts": 2, "call": f"[[{i}], {{}}]"},
                {"type": "started", "task_id": task_id, "task": "worker", "at": now,
                 "attempt": 1, "max_attempts": 2, "fuel_budget": 2_000_000_000},
            ]  # fmt: skip
        self.tick = 0
        self.finished = False

    async def fetch(self) -> list[dict[str, Any]]:
        events, self.pending = self.pending, []
        return events

    def live(self) -> list[Reading]:
        self.tick += 1
        return [Reading(f"main/{i}", self.tick * 1000 + i, i % 7) for i in range(1, ACTORS + 1)]

    def complete_all(self) -> None:
        now = time.time()
        self.pending = [
            {"type": "completed", "task_id": f"main/{i}", "task": "worker", "at": now,
             "attempt": 1, "duration_ms": 5.0, "fuel_consumed": 1000 + i, "result": str(i)}
            for i in range(1, ACTORS + 1)
        ]  # fmt: skip

    def outcome(self) -> tuple[str, int | None] | None:
        return None

    def cancel(self, task_id: str) -> str:
        return "no"

    def stop(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def measure() -> dict[str, float]:
    source = SyntheticSource()
    app = CapsuleApp(source)  # type: ignore[arg-type]
    figures: dict[str, float] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        started = time.perf_counter()
        await app.refresh_run()  # 2,002 events: the whole tree appears
        await pilot.pause()
        figures["first_batch_1000_tasks_ms"] = (time.perf_counter() - started) * 1000
        batches = []
        for _ in range(20):  # every task's fuel changed: 1,000 labels
            started = time.perf_counter()
            app._last_full = 0.0  # and the once-a-second relabel of running tasks
            await app.refresh_run()
            await pilot.pause()
            batches.append((time.perf_counter() - started) * 1000)
        figures["batch_1000_changed_ms_p50"] = statistics.median(batches)
        figures["batch_1000_changed_ms_max"] = max(batches)
        keys = []
        for _ in range(30):
            started = time.perf_counter()
            await pilot.press("down")
            keys.append((time.perf_counter() - started) * 1000)
        figures["key_down_ms_p50"] = statistics.median(keys)
        figures["key_down_ms_max"] = max(keys)
        source.complete_all()
        started = time.perf_counter()
        await app.refresh_run()
        await pilot.pause()
        figures["complete_1000_ms"] = (time.perf_counter() - started) * 1000
        assert len(app._tree_nodes) == ACTORS + 1
    return figures


def main() -> None:
    figures = asyncio.run(measure())
    print(f"TUI with {ACTORS:,} actors (headless, 120x40); refresh period 250 ms")
    for key, value in figures.items():
        print(f"  {key:28s} {value:9.1f}")


if __name__ == "__main__":
    main()
