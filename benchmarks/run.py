"""Capsule benchmarks: `python3 benchmarks/run.py` prints every figure in BENCHMARKS.md.

Each figure is the median of several runs (these machines are noisy). Nothing
here is asserted: targets are compared in the printed table.

    python3 benchmarks/run.py               # everything, including a fresh build
    python3 benchmarks/run.py --skip-build  # everything but the first build (~25 s)
    python3 benchmarks/run.py --only messages journal  # some rows (see --help)
    python3 benchmarks/run.py --core threads --only calls  # on the thread core
    python3 benchmarks/run.py --vs-original  # the shared rows against capsule-run 0.8.10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import print_figures, print_machine

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROGRAMS = HERE / "programs"
CLI = [sys.executable, "-m", "capsule.cli"]
#: Flags every `capsule run` here is given (`--core CORE`: see main).
RUN_FLAGS: list[str] = []


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess[str]]:
    if args and args[0] == "run":
        args = ("run", *RUN_FLAGS, *args[1:])
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


def sequential_calls(repeats: int, program: str = "sequential_calls.py") -> dict[str, float]:
    p50s, p95s = [], []
    for _ in range(repeats):
        _, done = run_cli("run", str(PROGRAMS / program), "200")
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
            # (The thread core's pool: a Sandbox's.)
            settings = RunSettings(pool_size=220, core="threads")
            run = Run(sandbox, "sequential_calls", configs, EventStream(), settings, first=first)
            result = run.run_main(["200", "3"], {})  # 3 s for the pool to fill
            p50s.append(json.loads(result.result_json or "{}")["p50_ms"])
    return {"p50_ms": statistics.median(p50s)}


def _run_in_process(program: str, *args: str, **options: Any) -> Any:
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    report = run_program(
        RunRequest(path=PROGRAMS / program, args=list(args), options=RunOptions(**options)),
        lambda event: None,
    )
    assert report.result is not None and report.result.ok, report
    return report.result.value()


def _run_program(program: str, *args: str) -> Any:
    """Run a benchmark program with `capsule run`, as a user would; its JSON result."""
    _, done = run_cli("run", str(PROGRAMS / program), *args)
    return json.loads(done.stdout)


_SPIN = "s = 0\nfor i in range(5_000_000):\n    s += i\n"


def machine_parallelism(repeats: int) -> float:
    """How much faster two plain Python processes get through two equal CPU loops
    than one process does: the ceiling for any fan-out figure on this machine at
    this moment (2.0 on two idle cores; shared VMs often give less)."""
    ratios = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _SPIN], check=True)
        subprocess.run([sys.executable, "-c", _SPIN], check=True)
        one_after_other = time.perf_counter() - started
        started = time.perf_counter()
        pair = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(2)]
        for process in pair:
            process.wait()
        ratios.append(one_after_other / (time.perf_counter() - started))
    return statistics.median(ratios)


def fan_out(repeats: int) -> dict[str, float]:
    """100 children via map versus one by one, for three weights of child, next
    to the parallelism the machine gives plain processes at the time."""
    figures: dict[str, float] = {"machine_parallelism": machine_parallelism(repeats)}
    # (The weights: the guest's loop of that many additions, timed here as
    # the one-by-one children's mean, printed beside.)
    for label, iterations in (
        ("trivial", "1"),
        ("25ms_of_cpu", "300000"),
        ("100ms_of_cpu", "1200000"),
    ):
        runs = [_run_program("fan_out.py", "100", iterations) for _ in range(max(1, repeats // 2))]
        figures[f"speedup_{label}"] = statistics.median(run["speedup"] for run in runs)
        figures[f"child_ms_{label}"] = statistics.median(run["one_by_one_s"] * 10 for run in runs)
    figures["machine_parallelism_after"] = machine_parallelism(repeats)
    return figures


def fairness(repeats: int) -> dict[str, float]:
    """8 identical CPU-bound tasks on the machine's cores: the spread of their
    wall times, and the lag of an asyncio event loop in the host meanwhile."""
    runs = [_fairness_once() for _ in range(max(1, repeats // 2))]
    return {
        "spread_of_wall_times_pct": statistics.median(spread for spread, _ in runs) * 100,
        "event_loop_lag_p99_ms": statistics.median(lag for _, lag in runs),
    }


def _fairness_once() -> tuple[float, float]:
    import asyncio
    import threading

    spans: list[list[float]] = []
    done = threading.Event()

    def run() -> None:
        try:
            spans.extend(_run_in_process("fairness.py", "8", "3000000"))
        finally:
            done.set()

    async def measure_lag() -> list[float]:
        samples = []
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            samples.append(time.perf_counter() - before - 0.005)
        return samples

    worker = threading.Thread(target=run)
    worker.start()
    samples = sorted(asyncio.run(measure_lag()))
    worker.join()
    durations = [end - start for start, end in spans]
    spread = (max(durations) - min(durations)) / statistics.mean(durations)
    return spread, samples[int(len(samples) * 0.99)] * 1000


def messages(repeats: int) -> dict[str, float]:
    runs = [_run_program("messages.py", "5000") for _ in range(max(1, repeats // 2))]
    return {
        "one_way_per_s": statistics.median(r["one_way_per_s"] for r in runs),
        "ask_reply_per_s": statistics.median(r["ask_reply_per_s"] for r in runs),
    }


def printed_output(repeats: int, lines: int = 10_000) -> dict[str, float]:
    """A task printing ``lines`` lines of 1 KB through `capsule run` (journaled),
    its stdout a pipe: the run's wall time, and the journal's size per KB printed."""
    times, sizes = [], []
    for _ in range(max(1, repeats // 2)):
        with tempfile.TemporaryDirectory() as tmp:
            journal = Path(tmp) / "journal.db"
            elapsed, done = run_cli(
                "run", "--journal", str(journal), str(PROGRAMS / "output.py"), str(lines)
            )
            assert done.stdout.count("\n") == lines + 1, done.stderr
            printed = len(done.stdout.encode()) - len(done.stdout.splitlines()[-1]) - 1
            times.append(elapsed)
            sizes.append(sum(path.stat().st_size for path in Path(tmp).iterdir()) / printed)
    return {
        f"run_s ({lines:,} lines of 1 KB)": statistics.median(times),
        "journal KB per KB printed": statistics.median(sizes),
    }


def idle_actors(actors: int = 50) -> dict[str, float]:
    """Memory per actor blocked in receive, once hibernated (after the default
    1 s) and, with hibernation off, as it first blocks."""
    hibernated = idle_actor_rss(actors)
    awake = idle_actor_rss(actors, hibernate_after="off")
    return {
        **hibernated,
        **{
            key.replace("idle_actor", "actor_not_hibernated"): value for key, value in awake.items()
        },
    }


def idle_actor_rss(
    actors: int = 50, hibernate_after: str | None = None, program: Path | None = None
) -> dict[str, float]:
    """Memory of the host process per actor blocked in receive: RSS, and PSS and
    private memory, which count the copy-on-write memory image the instances
    share (mapped, read, never copied) once instead of once per instance. Each
    sample is taken 1.5 s after the last task started waiting (by then each
    has hibernated, unless ``hibernate_after`` says otherwise)."""
    import threading

    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    def memory() -> dict[str, int]:
        figures = {}
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Dirty", "Private_Clean"):
                    figures[key] = int(rest.split()[0]) * 1024
        return figures

    waiting: set[str] = set()
    main_sleeping = threading.Event()

    def on_event(event: Any) -> None:
        if event.type == "waiting" and event.on == "receive" and event.task == "idle":
            waiting.add(event.task_id)
        if event.type == "waiting" and event.task == "main":
            main_sleeping.set()

    request = RunRequest(
        path=program or PROGRAMS / "idle_actors.py",
        args=[str(actors), "4"],
        options=RunOptions(hibernate_after=hibernate_after),
    )
    thread = threading.Thread(target=run_program, args=(request, on_event))
    thread.start()
    main_sleeping.wait(60)
    time.sleep(1.5)  # the pool refilled, main asleep: the baseline
    baseline = memory()
    while len(waiting) < actors:
        time.sleep(0.05)
    time.sleep(1.5)
    loaded = memory()
    thread.join()

    def per_actor(*keys: str) -> float:
        return sum(loaded[k] - baseline[k] for k in keys) / actors / 1024**2

    return {
        "rss_per_idle_actor_mb": per_actor("Rss"),
        "pss_per_idle_actor_mb": per_actor("Pss"),
        "private_per_idle_actor_mb": per_actor("Private_Dirty", "Private_Clean"),
    }


def idle_actors_at_scale(repeats: int, actors: int = 1000) -> dict[str, float]:
    """``actors`` actors blocked in receive, on each core the checkout has:
    spawn rate, the process's memory and threads, waking them (benchmarks/actors.py,
    which also measures 5,000: `--actors 5000`)."""
    from actors import core_name, cores, measure

    figures = {}
    for core in cores():
        for label, value in measure(actors, core, max(1, repeats // 2)).items():
            figures[f"{core_name(core)}: {label}"] = value
    return figures


def _journal_modes(tmp: Path) -> tuple[tuple[str, list[str]], ...]:
    return (("off", ["--no-journal"]), ("on", ["--journal", str(tmp / "journal.db")]))


def journal_overhead(repeats: int) -> dict[str, Any]:
    """The same benchmarks with the journal on and off (the default is on), run
    in pairs back to back, which of the two goes first alternating. The
    overhead is the median of the pairs' own overheads: this machine's speed
    drifts by 20 - 40% within minutes, far more than the journal costs, and a
    pair's two runs share the moment they ran in (medians of each mode's runs,
    printed too, do not)."""
    samples: dict[str, list[float]] = {}
    pairs: dict[str, list[float]] = {}

    def add(name: str, mode: str, value: float) -> None:
        samples.setdefault(f"{name}_journal_{mode}", []).append(value)

    # (name, lower is better)
    metrics = (
        ("call_p50_ms", True),
        ("map_100_s", True),
        ("one_way_per_s", False),
        ("ask_per_s", False),
        ("steps_per_s", False),
    )
    with tempfile.TemporaryDirectory() as tmp:
        modes = _journal_modes(Path(tmp))
        for repeat in range(repeats):
            for mode, flags in modes if repeat % 2 == 0 else modes[::-1]:
                _, done = run_cli("run", str(PROGRAMS / "sequential_calls.py"), "200", *flags)
                add("call_p50_ms", mode, json.loads(done.stdout)["p50_ms"])
                _, done = run_cli("run", str(PROGRAMS / "fan_out.py"), "100", "1", *flags)
                add("map_100_s", mode, json.loads(done.stdout)["map_s"])
                _, done = run_cli("run", str(PROGRAMS / "messages.py"), "5000", *flags)
                result = json.loads(done.stdout)
                add("one_way_per_s", mode, result["one_way_per_s"])
                add("ask_per_s", mode, result["ask_reply_per_s"])
                _, done = run_cli("run", str(PROGRAMS / "journal_steps.py"), *flags)
                add("steps_per_s", mode, json.loads(done.stdout.splitlines()[-1])["steps_per_s"])
            for name, lower_is_better in metrics:
                off = samples[f"{name}_journal_off"][-1]
                on = samples[f"{name}_journal_on"][-1]
                cost = (on - off) / off if lower_is_better else (off - on) / off
                pairs.setdefault(name, []).append(cost * 100)
    figures: dict[str, Any] = {
        name: statistics.median(values) for name, values in sorted(samples.items())
    }
    for name, _ in metrics:
        figures[f"{name}_overhead_pct"] = statistics.median(pairs[name])
    figures["each pair's overhead, %"] = [
        f"{name}: {' '.join(f'{cost:.0f}' for cost in pairs[name])}" for name, _ in metrics
    ]
    return figures


def resume_time(repeats: int, steps: int = 10_000) -> dict[str, float]:
    """Kill a run after it journaled ``steps`` steps, then time `capsule resume`
    replaying them (minus the 1 s the program then sleeps live)."""
    times = []
    for _ in range(max(1, repeats // 2)):
        with tempfile.TemporaryDirectory() as tmp:
            journal = str(Path(tmp) / "journal.db")
            process = subprocess.Popen(
                [sys.executable, "-m", "capsule.cli", "run", "--journal", journal,
                 str(PROGRAMS / "journal_steps.py"), str(steps), "1"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith("steps done"):
                    break
            process.kill()
            process.wait()
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "capsule.cli", "resume", "--last", "--journal", journal],
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - started - 1.0)
    return {f"resume_{steps}_steps_s": statistics.median(times)}


def warm_hello(repeats: int) -> dict[str, float]:
    hello = str(REPO / "examples" / "hello.py")
    run_cli("run", hello)  # make sure the runtime is built and the page cache warm
    module = [run_cli("run", hello)[0] for _ in range(repeats)]
    result = {"python_m_capsule_s": statistics.median(module)}
    # (This interpreter's console script: another `capsule` on PATH may be
    # another installation's.)
    script = Path(sys.executable).with_name("capsule")
    if script.exists():
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


PYTHON_EDITED = (
    "from capsule import task\n\n\n@task(name='main')\ndef main() -> int:\n    return {i}\n"
)
TS_EDITED = (
    'import {{ task }} from "@capsule-run/sdk";\n'
    'export const main = task({{ name: "main" }}, (): number => {i});\n'
)


def edit_rerun(
    repeats: int, name: str = "edited.py", source: str = PYTHON_EDITED
) -> dict[str, float]:
    """Edit a program, run it again (the first run, which may bundle or
    cache what later ones reuse, is not counted)."""
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / name
        times = []
        for i in range(repeats + 1):
            program.write_text(source.format(i=i))
            elapsed, done = run_cli("run", str(program))
            assert done.stdout.strip() == str(i), done
            times.append(elapsed)
    return {"edit_rerun_s": statistics.median(times[1:])}


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


def first_build(example: str = "hello.py", built: str = "guest runtime") -> dict[str, float]:
    """The first run of ``example`` with an empty cache: ``built`` is built."""
    with tempfile.TemporaryDirectory() as home:
        elapsed, done = run_cli("run", str(REPO / "examples" / example), env={"CAPSULE_HOME": home})
        assert f"{built} ready" in done.stderr, done.stderr
        steps = [line for line in done.stderr.splitlines() if "done in" in line]
    return {"first_run_with_build_s": elapsed, "steps": steps}  # type: ignore[dict-item]


def js_sequential_calls(repeats: int) -> dict[str, float]:
    """As sequential_calls, with a TypeScript task calling a TypeScript child."""
    figures = sequential_calls(repeats, "sequential_calls.ts")
    return {f"js_call_{key}": value for key, value in figures.items()}


def js_idle_actors(_: int) -> dict[str, float]:
    """Memory per JS actor blocked in receive (as idle_actor_rss)."""
    figures = idle_actor_rss(program=PROGRAMS / "idle_actors.ts")
    return {key.replace("idle_actor", "idle_js_actor"): value for key, value in figures.items()}


#: Each row: (key for --only, title, what measures it, target).
ROWS: list[tuple[str, str, Callable[[int], dict[str, Any]], str]] = [
    ("calls", "sequential child call (200 in a row)", sequential_calls, "p50 <= 1.0 ms"),
    ("instance", "one fresh instance", instance_costs, "diagnostic"),
    (
        "pool",
        "sequential calls, pool filled before the calls",
        calls_with_ready_pool,
        "diagnostic",
    ),
    ("hello", "warm `capsule run hello.py`", warm_hello, "<= 0.2 s"),
    ("edit", "edit -> re-run", edit_rerun, "<= 0.3 s"),
    ("fan_out", "100 children: map vs one by one", fan_out, ">= 1.8x"),
    (
        "fairness",
        "fairness: 8 CPU-bound tasks",
        fairness,
        "spread <= ±25%, loop lag p99 <= 20 ms",
    ),
    ("messages", "messages between two actors", messages, ">= 50,000/s one-way"),
    ("idle", "an actor blocked in receive", lambda _: idle_actors(), "<= 6 MB"),
    (
        "actors",
        "1,000 actors blocked in receive",
        idle_actors_at_scale,
        ">= 1,000 spawned/s, <= 1.5 MB private each",
    ),
    ("output", "printed output, journaled", printed_output, "report"),
    ("journal", "journal on vs off", journal_overhead, "<= 5% overhead"),
    ("resume", "resume a run of 10,000 journaled steps", resume_time, "report"),
    ("timeout", "timeout of `while True: pass` (200 ms)", timeout_overshoot, "<= 50 ms late"),
    ("build", "first build of the guest runtime", lambda _: first_build(), "report"),
    ("js_calls", "TypeScript: sequential child call (200 in a row)", js_sequential_calls, "report"),
    (
        "js_edit",
        "TypeScript: edit -> re-run",
        lambda n: edit_rerun(n, "edited.ts", TS_EDITED),
        "<= 0.5 s",
    ),
    ("js_idle", "TypeScript: an actor blocked in receive", js_idle_actors, "report"),
    (
        "js_build",
        "TypeScript: first run on a machine (installs the toolchain)",
        lambda _: first_build("hello.ts", "JavaScript runtime"),
        "report",
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[key for key, *_ in ROWS],
        help="run these rows only",
    )
    parser.add_argument(
        "--core",
        choices=["async", "threads"],
        help="the core every `capsule run` here runs on (default: Capsule's default)",
    )
    parser.add_argument(
        "--vs-original",
        action="store_true",
        help="only the rows shared with capsule-run 0.8.10, against it (benchmarks/vs_original.py)",
    )
    options = parser.parse_args()
    if options.vs_original:
        import vs_original

        raise SystemExit(vs_original.main(["--repeats", str(options.repeats)]))
    if options.core is not None:
        RUN_FLAGS[:] = ["--core", options.core]
    print_machine()
    for key, name, measure, target in ROWS:
        if options.only is not None and key not in options.only:
            continue
        if key in ("build", "js_build") and options.skip_build:
            continue
        print_figures(f"{name}  (target: {target})", measure(options.repeats))


if __name__ == "__main__":
    main()
