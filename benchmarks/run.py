"""Capsule benchmarks: `python3 benchmarks/run.py` prints every figure in BENCHMARKS.md.

Each figure is the median of several runs (these machines are noisy). Nothing
here is asserted: targets are compared in the printed table.

    python3 benchmarks/run.py               # everything, including a fresh build
    python3 benchmarks/run.py --skip-build  # everything but the first build (~25 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROGRAMS = HERE / "programs"
CLI = [sys.executable, "-m", "capsule.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"capsule {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return elapsed, done


def sequential_calls(repeats: int) -> dict[str, float]:
    p50s, p95s = [], []
    for _ in range(repeats):
        _, done = run_cli("run", str(PROGRAMS / "sequential_calls.py"), "200")
        figures = json.loads(done.stdout)
        p50s.append(figures["p50_ms"])
        p95s.append(figures["p95_ms"])
    return {"p50_ms": statistics.median(p50s), "p95_ms": statistics.median(p95s)}


def instance_costs(repeats: int) -> dict[str, float]:
    """What one fresh instance costs, step by step, with nothing else running."""
    from capsule.sandbox.engine import Sandbox
    from capsule.sandbox.modules import site_package_dirs

    program = "sequential_calls"
    prepare, teardown = [], []
    with Sandbox([PROGRAMS, *site_package_dirs()]) as sandbox:
        sandbox.prepare(program).store.close()  # the first load compiles; later ones reuse it
        for _ in range(repeats * 3):
            start = time.perf_counter()
            prepared = sandbox.prepare(program)
            middle = time.perf_counter()
            prepared.store.close()
            prepare.append(middle - start)
            teardown.append(time.perf_counter() - middle)
    return {
        "prepare_ms (instantiate+import)": statistics.median(prepare) * 1000,
        "teardown_ms": statistics.median(teardown) * 1000,
    }


def calls_with_ready_pool(repeats: int) -> dict[str, float]:
    """Sequential calls when the pool was filled beforehand: the call path alone."""
    from capsule.sandbox.engine import Sandbox
    from capsule.sandbox.modules import site_package_dirs
    from capsule.supervisor.events import EventStream
    from capsule.supervisor.run import Run, RunSettings

    p50s = []
    for _ in range(max(1, repeats // 3)):
        with Sandbox([PROGRAMS, *site_package_dirs()]) as sandbox:
            configs, first = Run.load(sandbox, "sequential_calls", lambda *a: None)
            run = Run(
                sandbox, "sequential_calls", configs, EventStream(), RunSettings(pool_size=220)
            )
            result = run.run_main(["200", "3"], {}, first)  # 3 s for the pool to fill
            p50s.append(json.loads(result.result_json or "{}")["p50_ms"])
    return {"p50_ms": statistics.median(p50s)}


def warm_hello(repeats: int) -> dict[str, float]:
    hello = str(REPO / "examples" / "hello.py")
    run_cli("run", hello)  # make sure the runtime is built and the page cache warm
    module = [run_cli("run", hello)[0] for _ in range(repeats)]
    result = {"python_m_capsule_s": statistics.median(module)}
    script = shutil.which("capsule")
    if script:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([script, "run", hello], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        result["console_script_s"] = statistics.median(times)
    bare = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - start)
    result["bare_python_s"] = statistics.median(bare)
    return result


def edit_rerun(repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "edited.py"
        times = []
        for i in range(repeats):
            program.write_text(
                "from capsule import task\n\n\n"
                f"@task(name='main')\ndef main() -> int:\n    return {i}\n"
            )
            elapsed, done = run_cli("run", str(program))
            assert done.stdout.strip() == str(i), done
            times.append(elapsed)
    return {"edit_rerun_s": statistics.median(times)}


def timeout_overshoot(repeats: int) -> dict[str, float]:
    from capsule.supervisor.program import RunRequest, run_program

    overshoots = []
    for _ in range(repeats):
        events: list[object] = []
        run_program(RunRequest(path=PROGRAMS / "spin.py", args=[]), events.append)
        failed = [e for e in events if getattr(e, "type", None) == "failed"]
        overshoots.append(failed[0].duration_ms - 200.0)  # type: ignore[attr-defined]
    return {
        "overshoot_median_ms": statistics.median(overshoots),
        "overshoot_max_ms": max(overshoots),
    }


def first_build() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        elapsed, done = run_cli(
            "run", str(REPO / "examples" / "hello.py"), env={"CAPSULE_HOME": home}
        )
        assert "guest runtime ready" in done.stderr, done.stderr
        steps = [line for line in done.stderr.splitlines() if "done in" in line]
    return {"first_run_with_build_s": elapsed, "steps": steps}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-build", action="store_true")
    options = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    rows = [
        (
            "sequential child call (200 in a row)",
            sequential_calls(options.repeats),
            "p50 <= 1.0 ms",
        ),
        ("one fresh instance", instance_costs(options.repeats), "diagnostic"),
        (
            "sequential calls, pool filled before the calls",
            calls_with_ready_pool(options.repeats),
            "diagnostic",
        ),
        ("warm `capsule run hello.py`", warm_hello(options.repeats), "<= 0.35 s"),
        ("edit -> re-run", edit_rerun(options.repeats), "<= 1 s"),
        (
            "timeout of `while True: pass` (200 ms)",
            timeout_overshoot(options.repeats),
            "<= 50 ms late",
        ),
    ]
    if not options.skip_build:
        rows.append(("first build of the guest runtime", first_build(), "report"))
    for name, figures, target in rows:
        print(f"\n{name}  (target: {target})")
        for key, value in figures.items():
            if isinstance(value, float):
                print(f"  {key:28s} {value:10.3f}")
            else:
                for line in value:
                    print(f"  {line}")


if __name__ == "__main__":
    main()
