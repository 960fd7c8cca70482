"""Latency of the host API: ``run_code`` on a warm Runtime, and ``rt.run`` of a
trivial program against the supervisor's ``run_program`` (what each call costs
the application, in its own process).

    python3 benchmarks/host_api.py [--calls 20] [--journal]

Prints the median and 90th percentile of ``--calls`` calls of each, after a
warm-up; the machine's other load moves them, so compare runs made back to back.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from capsule.host import Runtime
from capsule.supervisor.option_specs import CORES
from capsule.supervisor.options import RunOptions
from capsule.supervisor.program import RunRequest, run_program

TRIVIAL = 'from capsule import task\n\n\n@task(name="main")\ndef main() -> int:\n    return 1\n'


def summary(name: str, seconds: list[float]) -> None:
    ordered = sorted(seconds)
    p90 = ordered[max(0, int(len(ordered) * 0.9) - 1)]
    print(
        f"{name:<34} median {statistics.median(ordered) * 1000:7.1f} ms  p90 {p90 * 1000:7.1f} ms"
    )


async def timed(call: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    for _ in range(3):  # warm-up
        await call()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - started)
    return seconds


async def main(calls: int, journaled: bool) -> None:
    with tempfile.TemporaryDirectory() as directory:
        program = Path(directory) / "trivial.py"
        program.write_text(TRIVIAL)
        journal: Path | bool = Path(directory) / "journal.db" if journaled else False
        async with Runtime(journal=journal) as rt:
            summary("run_code('result = 1')", await timed(lambda: rt.run_code("result = 1"), calls))
            summary("rt.run(trivial.py)", await timed(lambda: rt.run(program), calls))
            # Each core in turn, call by call: the machine's load moves both alike.
            on_core = {core: RunOptions(core=core) for core in CORES}
            seconds: dict[str, list[float]] = {core: [] for core in CORES}
            for core in CORES:  # warm-up
                await rt.run(program, options=on_core[core])
            for _ in range(calls):
                for core in CORES:
                    started = time.perf_counter()
                    await rt.run(program, options=on_core[core])
                    seconds[core].append(time.perf_counter() - started)
            for core in CORES:
                summary(f"rt.run(trivial.py), core={core}", seconds[core])

        def direct() -> Any:
            return run_program(RunRequest(path=program, args=[]), lambda event: None)

        summary(
            "run_program(trivial.py), no journal",
            await timed(lambda: anyio.to_thread.run_sync(direct), calls),
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--journal", action="store_true", help="journal the Runtime's runs")
    options = parser.parse_args()
    anyio.run(main, options.calls, options.journal)
