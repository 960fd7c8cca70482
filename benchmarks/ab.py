"""Compare two checkouts of Capsule on one benchmark program, in alternating pairs.

These machines are noisy: a figure measured an hour apart moves by 20-40%. So
the two sides run back to back, A then B then A..., each as `capsule run` of the
same program (its JSON result's figures), and the medians are compared.

    python3 benchmarks/ab.py OTHER_CHECKOUT --pairs 8 messages.py 20000
    python3 benchmarks/ab.py OTHER_CHECKOUT --core async messages.py 5000

OTHER_CHECKOUT is another working tree of the repository (``git worktree add
../base <commit>``); this one is B. Each side builds its own guest runtime on
first use, before the pairs start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(checkout: Path, program: Path, args: list[str], core: str | None) -> dict[str, Any]:
    """One `capsule run` of ``program`` with ``checkout``'s Capsule (on ``core``,
    or its default one): its result."""
    on_core = [] if core is None else ["--core", core]
    done = subprocess.run(
        [sys.executable, "-m", "capsule.cli", "run", "--json", *on_core, str(program), *args],
        capture_output=True,
        text=True,
        cwd=checkout,  # (`python -m` puts the current directory first on sys.path)
        env={**os.environ, "PYTHONPATH": str(checkout)},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: capsule run failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)["result"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="checkout A (this one is B)")
    parser.add_argument("program", help="a program in benchmarks/programs")
    parser.add_argument("args", nargs="*", help="its arguments")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument(
        "--core", choices=("async", "threads"), help="the core both sides run on (default: theirs)"
    )
    options = parser.parse_args()
    program = HERE / "programs" / options.program
    sides = {"A": options.other.resolve(), "B": REPO}
    for checkout in sides.values():  # builds (or finds) each side's runtime first
        run(checkout, program, options.args, options.core)
    figures: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    for pair in range(options.pairs):
        order = ("A", "B") if pair % 2 == 0 else ("B", "A")
        for side in order:
            for name, value in run(sides[side], program, options.args, options.core).items():
                figures[side].setdefault(name, []).append(float(value))
    on = "" if options.core is None else f" on the {options.core} core"
    print(f"A = {sides['A']}\nB = {sides['B']}\n{options.pairs} pairs of {options.program}{on}")
    for name in figures["A"]:
        a, b = statistics.median(figures["A"][name]), statistics.median(figures["B"][name])
        print(f"  {name}: A {a:,.1f}  B {b:,.1f}  (B/A {b / a:.3f})")


if __name__ == "__main__":
    main()
