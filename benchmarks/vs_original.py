"""Capsule against the system it re-creates: capsule-run 0.8.10 from the package index.

    python3 benchmarks/run.py --vs-original            # the shared rows, both systems
    python3 benchmarks/vs_original.py [--repeats 7]    # the same
    python3 benchmarks/vs_original.py --without-original  # this checkout's figures alone

The original (a Rust host running a componentize-py CPython component, a fresh
instance per task, the program built into the component on every edit) is
installed into a virtual environment of its own under
``~/.cache/capsule-benchmarks/`` the first time; without the package index the
comparison is skipped with a message (exit 0). Each row runs the same program
under both, in alternating pairs, as whole processes: wall time, CPU time of the
process and everything it waited for (user + sys), and the guest's own figures
where the program prints them. Bytecode is cached as on a user's machine
(``PYTHONDONTWRITEBYTECODE`` is unset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROGRAMS = HERE / "programs"
ORIGINAL = "capsule-run==0.8.10"
ORIGINAL_VENV = Path.home() / ".cache" / "capsule-benchmarks" / "capsule-run-0.8.10"
TRIVIAL = "from capsule import task\n\n\n@task(name='main')\ndef main() -> int:\n    return {i}\n"


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float
    output: str


class System:
    """How to run a program under one of the two systems."""

    name: str

    def command(self, program: Path, *args: str) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def result(self, stdout: str) -> Any:
        """The program's result, from what the run printed."""
        raise NotImplementedError

    def run(self, program: Path, *args: str) -> Measured:
        """One whole process: its wall time, and the CPU time (user + sys) of it
        and of everything it waited for (``RUSAGE_CHILDREN`` grows by those
        once it is reaped)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        process = subprocess.Popen(
            self.command(program, *args),
            cwd=program.parent,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout, stderr = process.communicate()
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            raise SystemExit(
                f"{self.name}: {program.name} failed ({process.returncode}):\n{stderr}"
            )
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return Measured(wall, cpu, stdout)


class ThisCapsule(System):
    name = "capsule (this checkout)"

    def command(self, program: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "capsule.cli", "run", str(program), *args]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = str(REPO)
        return env

    def result(self, stdout: str) -> Any:
        return json.loads(stdout)


class Original(System):
    name = "capsule-run 0.8.10"

    def __init__(self, venv: Path) -> None:
        self.venv = venv

    def command(self, program: Path, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "capsule"), "run", program.name, *args]

    def env(self) -> dict[str, str]:
        env = super().env()
        # (it finds its SDK through the `python` on PATH, as in an activated venv)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        env.pop("PYTHONPATH", None)
        return env

    def result(self, stdout: str) -> Any:
        line = stdout.strip().splitlines()[-1]
        answer = json.loads(line)
        if not answer.get("success"):
            raise SystemExit(f"{self.name} failed: {answer.get('error')}")
        return answer["result"]


def install_original(venv: Path = ORIGINAL_VENV) -> Original | None:
    """The original in its own venv, installed on first use; None (and why,
    printed) when it cannot be installed."""
    if (venv / "bin" / "capsule").exists():
        return Original(venv)
    print(f"installing {ORIGINAL} into {venv} (once) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", ORIGINAL],
            check=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        print(f"the original could not be installed ({error}); comparison skipped")
        return None
    return Original(venv)


@dataclass
class Row:
    key: str
    title: str
    program: str  # source text, {i} replaced by the repeat's number
    args: tuple[str, ...] = ()
    #: the guest's figures to print (keys of the program's result)
    figures: tuple[str, ...] = ()
    #: a new source each run (an edit), or the same one (a warm run)
    edit: bool = False


ROWS = [
    Row(
        "calls",
        "200 sequential child calls, whole process",
        (PROGRAMS / "sequential_calls.py").read_text(),
        figures=("p50_ms", "p95_ms"),
    ),
    Row("trivial", "warm `capsule run` of a trivial program", TRIVIAL.format(i=0)),
    Row("edit", "edit the program, run again", TRIVIAL, edit=True),
]


def compare(row: Row, systems: list[System], repeats: int, warmups: int = 1) -> None:
    results: dict[str, list[Measured]] = {system.name: [] for system in systems}
    with tempfile.TemporaryDirectory() as tmp:
        homes = {}
        for system in systems:
            home = Path(tmp) / system.name.split()[0].replace("-", "_")
            home.mkdir()
            homes[system.name] = home / "program.py"
        for round_ in range(warmups + repeats):
            # (alternate which goes first: a pair shares the machine's state)
            order = systems if round_ % 2 == 0 else list(reversed(systems))
            for system in order:
                program = homes[system.name]
                source = row.program.replace("{i}", str(round_)) if row.edit else row.program
                program.write_text(source)
                measured = system.run(program, *row.args)
                if row.edit:
                    got = system.result(measured.output)
                    if got != round_:
                        raise SystemExit(f"{system.name}: the edited program returned {got!r}")
                if round_ >= warmups:
                    results[system.name].append(measured)
    print(f"\n{row.title}  (medians of {repeats}, alternating)", flush=True)
    medians = {}
    for system in systems:
        runs = results[system.name]
        wall = statistics.median(m.wall_s for m in runs)
        cpu = statistics.median(m.cpu_s for m in runs)
        medians[system.name] = (wall, cpu)
        extra = ""
        if row.figures:
            values = [system.result(m.output) for m in runs]
            extra = "".join(
                f"  {key} {statistics.median(v[key] for v in values):.2f}" for key in row.figures
            )
        print(f"  {system.name:26s} wall {wall:7.3f} s  CPU {cpu:7.3f} s{extra}", flush=True)
    if len(systems) == 2:
        (wall_a, cpu_a), (wall_b, cpu_b) = medians.values()
        print(f"  this / original: wall {wall_a / wall_b:.2f}x  CPU {cpu_a / cpu_b:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--only", nargs="+", choices=[row.key for row in ROWS], help="run these rows only"
    )
    parser.add_argument(
        "--without-original",
        action="store_true",
        help="this checkout alone (nothing installed): the rows' own figures",
    )
    options = parser.parse_args(argv)
    systems: list[System] = [ThisCapsule()]
    original = None if options.without_original else install_original()
    if original is not None:
        systems.append(original)
    for row in ROWS:
        if options.only is not None and row.key not in options.only:
            continue
        # (the original rebuilds on every edit, ~20 s a run: fewer repeats)
        repeats = min(options.repeats, 3) if row.edit else options.repeats
        compare(row, systems, repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
