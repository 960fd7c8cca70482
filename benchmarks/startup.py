"""Warm start-up of `capsule run examples/hello.py`: wall and CPU time, journaled and not.

A run's CPU time (user + sys, from ``os.wait4``) moves far less than its wall time
when other processes share the machine, so both are printed. With another checkout
(``git worktree add ../base <commit>``), the two run in alternating pairs and the
medians are compared side by side:

    python3 benchmarks/startup.py                       # this checkout
    python3 benchmarks/startup.py --other ../base -n 21 # the other one (A) vs this one (B)
    python3 benchmarks/startup.py --core async          # on the async core (`--core async`)
    python3 benchmarks/startup.py --other ../base --core async --other-core threads
                                                        # A on its thread core, B on the async one

A checkout whose async core does not journal runs is measured on it with
``--variant no-journal``. With another checkout it also prints the median of the
differences within pairs, which the machine's load moves less than either side.

Bytecode is cached as on a user's machine (``PYTHONDONTWRITEBYTECODE`` is unset).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: (in each checkout: see one_run)
HELLO = "examples/hello.py"
VARIANTS: dict[str, list[str]] = {"journaled": [], "--no-journal": ["--no-journal"]}


def one_run(checkout: Path, flags: list[str]) -> tuple[float, float]:
    """One `capsule run examples/hello.py` with ``checkout``'s Capsule: (wall s,
    CPU s). It runs in ``checkout``: ``python -m`` puts the current directory
    first on sys.path, before PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-m", "capsule.cli", "run", HELLO, *flags]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(
            f"{checkout}: {' '.join(command)} failed ({process.returncode}):\n{stderr}"
        )
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, help="checkout A to compare with (this one is B)")
    parser.add_argument("-n", "--runs", type=int, default=21, help="runs of each side and variant")
    parser.add_argument(
        "--core", choices=["threads", "async"], help="the core to run on (default: the default)"
    )
    parser.add_argument(
        "--other-core",
        choices=["threads", "async"],
        help="the core the other checkout (A) runs on (default: --core's)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        choices=[name.lstrip("-") for name in VARIANTS],
        help="measure only this variant (repeatable; default: every one)",
    )
    options = parser.parse_args()
    core = [] if options.core is None else ["--core", options.core]
    other_core = options.other_core or options.core
    cores = {"A": [] if other_core is None else ["--core", other_core], "B": core}
    names = [
        name for name in VARIANTS if options.variant is None or name.lstrip("-") in options.variant
    ]
    sides = {"B": REPO} if options.other is None else {"A": options.other.resolve(), "B": REPO}

    def flags(side: str, variant: str) -> list[str]:
        return [*VARIANTS[variant], *cores[side]]

    for side, checkout in sides.items():  # warms the page cache and the bytecode caches
        for variant in names:
            one_run(checkout, flags(side, variant))
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for index in range(options.runs):
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        for variant in names:
            for side in order:
                figures.setdefault((side, variant), []).append(
                    one_run(sides[side], flags(side, variant))
                )
    print(f"median of {options.runs} runs, ms")
    for side, checkout in sides.items():
        print(f"  {side} = {checkout} {' '.join(cores[side]) or '(default core)'}")
    for variant in names:
        row = []
        for side in sides:
            runs = figures[(side, variant)]
            wall = statistics.median(wall for wall, _ in runs) * 1000
            cpu = statistics.median(cpu for _, cpu in runs) * 1000
            least = min(cpu for _, cpu in runs) * 1000
            row.append(f"{side}: wall {wall:6.1f}  cpu {cpu:6.1f} (min {least:6.1f})")
        print(f"{variant:>13}  " + "   ".join(row))
    if len(sides) == 2:
        # The load of the machine moves between rounds; the difference within
        # each pair (run back to back) moves less.
        print("B - A, median of the pairs' differences, ms (95 % bootstrap interval)")
        for variant in names:
            pairs = list(zip(figures[("A", variant)], figures[("B", variant)], strict=True))
            wall = _median_and_interval([(b[0] - a[0]) * 1000 for a, b in pairs])
            cpu = _median_and_interval([(b[1] - a[1]) * 1000 for a, b in pairs])
            print(f"{variant:>13}  wall {wall}   cpu {cpu}")


def _median_and_interval(differences: list[float]) -> str:
    """The median of ``differences`` and its 95 % bootstrap interval."""
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(differences, k=len(differences))) for _ in range(2000)
    )
    middle = statistics.median(differences)
    return f"{middle:+6.1f} ({medians[50]:+.1f} .. {medians[1949]:+.1f})"


if __name__ == "__main__":
    main()
