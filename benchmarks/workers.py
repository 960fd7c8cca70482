"""Workers and the journal on PostgreSQL, against a throwaway PostgreSQL server
(initdb and pg_ctl, as the tests make one; needs the server binaries).

- throughput: CPU-bound runs submitted, then taken by one worker, and by two
  worker processes (alternating pairs): runs per second, and the ratio;
- journal: the journal benchmarks (sequential calls, journaled steps, messages)
  on PostgreSQL against SQLite, alternating pairs: PostgreSQL's overhead;
- failover: a worker killed (kill -9) mid-run, another waiting: the time from
  the kill until the other resumes the run, in lease periods.

    python3 benchmarks/workers.py [--repeats 5] [--only throughput journal failover]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"
sys.path.insert(0, str(REPO))

from report import print_figures, print_machine  # noqa: E402

from tests.postgres_cluster import Cluster, throwaway_cluster  # noqa: E402

#: A CPU-bound run: main spins ``n`` million additions in its sandbox.
CPU_BOUND = """
from capsule import task

@task(name="main", compute="HIGH", timeout="5m")
def main(millions: int) -> int:
    total = 0
    for i in range(millions * 1_000_000):
        total += i
    return total
"""

#: A run that takes a while, a journaled step at a time.
SLOW = """
from capsule import sleep, task

@task(name="main", timeout="10m")
def main() -> int:
    for _ in range(600):
        sleep(0.1)
    return 1
"""


def _capsule(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capsule.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )


def _worker(env: dict[str, str], cwd: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "worker", "--poll", "0.1", *flags],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def throughput(cluster: Cluster, repeats: int, runs: int = 8, millions: int = 20) -> dict[str, Any]:
    """Runs per second with one worker, and with two worker processes."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "cpu.py"
        program.write_text(textwrap.dedent(CPU_BOUND))
        for repeat in range(repeats):
            for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
                env = {**os.environ, "CAPSULE_JOURNAL": cluster.new_database()}
                for _ in range(runs):
                    _capsule(
                        "submit",
                        str(program),
                        "--args-json",
                        f"[{millions}]",
                        env=env,
                        cwd=Path(tmp),
                    )
                started = time.perf_counter()
                processes = [_worker(env, Path(tmp), "--until-idle") for _ in range(workers)]
                for process in processes:
                    process.communicate()
                rates[workers].append(runs / (time.perf_counter() - started))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    return {
        "one worker, runs/s": one,
        "two workers, runs/s": two,
        "two / one": two / one,
        f"({runs} runs of {millions}M additions each; per pair)": [
            f"{a:.2f} {b:.2f}" for a, b in zip(rates[1], rates[2], strict=True)
        ],
    }


def journal(cluster: Cluster, repeats: int) -> dict[str, Any]:
    """The journal's costs on PostgreSQL against SQLite, in alternating pairs."""
    metrics = (("call_p50_ms", True), ("steps_per_s", False), ("one_way_per_s", False))
    samples: dict[str, dict[str, list[float]]] = {"sqlite": {}, "postgresql": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            backends = [
                ("sqlite", str(Path(tmp) / f"j{repeat}.db")),
                ("postgresql", cluster.new_database()),
            ]
            for name, where in backends if repeat % 2 == 0 else backends[::-1]:
                env = {**os.environ, "CAPSULE_JOURNAL": where}
                got = samples[name]
                done = _capsule(
                    "run", str(PROGRAMS / "sequential_calls.py"), "200", env=env, cwd=Path(tmp)
                )
                got.setdefault("call_p50_ms", []).append(json.loads(done.stdout)["p50_ms"])
                done = _capsule("run", str(PROGRAMS / "journal_steps.py"), env=env, cwd=Path(tmp))
                steps = json.loads(done.stdout.splitlines()[-1])["steps_per_s"]
                got.setdefault("steps_per_s", []).append(steps)
                done = _capsule(
                    "run", str(PROGRAMS / "messages.py"), "5000", env=env, cwd=Path(tmp)
                )
                got.setdefault("one_way_per_s", []).append(json.loads(done.stdout)["one_way_per_s"])
    figures: dict[str, Any] = {}
    for metric, lower_is_better in metrics:
        sqlite, postgres = samples["sqlite"][metric], samples["postgresql"][metric]
        costs = [
            ((p - s) / s if lower_is_better else (s - p) / s) * 100
            for s, p in zip(sqlite, postgres, strict=True)
        ]
        figures[f"{metric}, SQLite"] = statistics.median(sqlite)
        figures[f"{metric}, PostgreSQL"] = statistics.median(postgres)
        figures[f"{metric}, PostgreSQL's cost, %"] = statistics.median(costs)
    return figures


def failover(cluster: Cluster, repeats: int, lease: float = 3.0) -> dict[str, Any]:
    """From kill -9 of the worker running a run to another worker resuming it."""
    delays = []
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "slow.py"
        program.write_text(textwrap.dedent(SLOW))
        for _ in range(repeats):
            env = {
                **os.environ,
                "CAPSULE_JOURNAL": cluster.new_database(),
                "CAPSULE_LEASE_SECONDS": str(lease),
            }
            run_id = _capsule("submit", str(program), env=env, cwd=Path(tmp)).stdout.strip()
            first = _worker(env, Path(tmp))
            assert first.stdout is not None
            for line in first.stdout:
                if f"running run {run_id}" in line:
                    break
            time.sleep(1.0)  # (it runs, renewing its lease)
            second = _worker(env, Path(tmp))
            time.sleep(0.5)  # (the other is up, and idle)
            first.kill()
            killed = time.perf_counter()
            first.communicate()
            assert second.stdout is not None
            for line in second.stdout:
                if f"resuming run {run_id}" in line:
                    delays.append(time.perf_counter() - killed)
                    break
            second.kill()
            second.communicate()
    median = statistics.median(delays)
    return {
        f"kill -9 to resumed elsewhere, s (lease {lease:g} s)": median,
        "in lease periods": median / lease,
        "each trial, s": [" ".join(f"{delay:.2f}" for delay in delays)],
    }


ROWS = {"throughput": throughput, "journal": journal, "failover": failover}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS))
    options = parser.parse_args()
    print_machine()
    with throwaway_cluster() as cluster:
        for name, measure in ROWS.items():
            if options.only is not None and name not in options.only:
                continue
            print_figures(name, measure(cluster, options.repeats), width=48)


if __name__ == "__main__":
    main()
