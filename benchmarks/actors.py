"""Idle actors at scale: `python3 benchmarks/actors.py [--actors 1000] [--repeats 3]`
prints, for each core the checkout has, the medians of a few runs of
benchmarks/programs/waiting_actors.py, each in a process of its own (through the
host API, without a journal: benchmarks/host_run.py), measured from outside that
process (its events, and its /proc files):

- spawn: from the first actor's `pending` to the last one's `waiting` (in
  `receive`), and the rate;
- memory as the system counts it once every actor waits: the process's private
  memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) and its PSS,
  in all and per actor; the peak of its private memory (sampled as main starts
  and once every actor waits, and every `--rollup-every` seconds if given:
  reading it stalls a run of thousands of actors) and of its RSS (VmHWM, which
  counts shared pages once per mapping, read every second, `--sample-every`);
- the process's threads (/proc/PID/status) then;
- wake: from main taking the benchmark's go-ahead and sending each actor a
  message to the last actor's `completed`, and to the end of the run.

Nothing here is asserted. The run's limits are raised to fit the actors, and
its memory bound is off; instead, the run is killed if the machine's available
memory falls under 4 GB (`--min-available`), or if it reports nothing for
two minutes (`--stall-after`), and the benchmark says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROGRAM = HERE / "programs" / "waiting_actors.py"
HOST_RUN = [sys.executable, str(HERE / "host_run.py")]
#: The checkout's Capsule, in the measured run too.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MB = 1024**2


class Stopped(Exception):
    """The run could not be measured to its end: why, in words."""


def cores() -> list[str | None]:
    """The cores to measure: the run option `core`'s "threads" and "async" if
    the checkout has that option, else only the one core (None: no flag)."""
    specs = subprocess.run(
        [sys.executable, "-c", "from capsule.supervisor.option_specs import OPTION_SPECS as o;"
         "print('core' in o)"],
        capture_output=True, text=True, env=ENV, check=True,
    )  # fmt: skip
    return ["threads", "async"] if specs.stdout.strip() == "True" else [None]


def core_name(core: str | None) -> str:
    return core if core is not None else "threads (the only core)"


@dataclass(frozen=True)
class Memory:
    """A process's memory, in bytes, as /proc counts it."""

    private: int
    pss: int
    threads: int
    peak_rss: int


def memory_of(pid: int, rollup: bool = True) -> Memory | None:
    """``pid``'s memory now; None once it has ended. Without ``rollup``, its
    threads and peak RSS only (the private memory and PSS are 0): reading
    smaps_rollup walks every mapping under the lock that making an instance
    needs, which with thousands of actors stalls the run it measures."""
    try:
        rolled = {}
        if rollup:
            with open(f"/proc/{pid}/smaps_rollup") as rolled_up:
                rolled = _kilobytes(rolled_up)
        with open(f"/proc/{pid}/status") as status:
            stated = _kilobytes(status)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return Memory(
        private=rolled.get("Private_Clean", 0) + rolled.get("Private_Dirty", 0),
        pss=rolled.get("Pss", 0),
        threads=stated.get("Threads", 0),
        peak_rss=stated.get("VmHWM", 0),
    )


def _kilobytes(lines: IO[str]) -> dict[str, int]:
    """The ``Key: N kB`` (and ``Threads: N``) lines of a /proc file, in bytes."""
    figures = {}
    for line in lines:
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            figures[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return figures


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        return _kilobytes(meminfo)["MemAvailable"]


@dataclass(frozen=True)
class Watch:
    """How the benchmark watches the run it measures: its memory sampled every
    ``sample_every`` seconds; the run killed when the machine's available memory
    falls under ``min_available`` bytes (other work shares the machine), or after
    ``stall_after`` seconds without an event."""

    sample_every: float = 1.0
    min_available: int = 4 * 1024**3
    stall_after: float = 120.0
    #: How often a sample reads the private memory too (0: only as main
    #: starts and once every actor waits; see memory_of).
    rollup_every: float = 0.0


class Sampler:
    """Samples a process's memory on its own thread, keeping the peaks, and
    kills the process when ``watch`` says."""

    def __init__(self, process: subprocess.Popen[str], watch: Watch) -> None:
        self.process = process
        self.watch = watch
        self.peak_private = 0
        self.peak_rss = 0
        #: Why the sampler killed the process, if it did.
        self.killed_because: str | None = None
        self.last_event = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def sample(self, rollup: bool = True) -> Memory | None:
        memory = memory_of(self.process.pid, rollup)
        if memory is not None:
            self.peak_private = max(self.peak_private, memory.private)
            self.peak_rss = max(self.peak_rss, memory.peak_rss)
        return memory

    def _sample_until_stopped(self) -> None:
        rolled_up = time.monotonic()
        while not self._stop.wait(self.watch.sample_every):
            if available_bytes() < self.watch.min_available:
                gigabytes = self.watch.min_available / 1024**3
                self.killed_because = f"the machine's available memory fell under {gigabytes} GB"
            elif time.monotonic() - self.last_event > self.watch.stall_after:
                self.killed_because = f"no event for {self.watch.stall_after:g} s"
            if self.killed_because is not None:
                self.process.kill()
                return
            every = self.watch.rollup_every
            rollup = every > 0 and time.monotonic() - rolled_up >= every
            if rollup:
                rolled_up = time.monotonic()
            self.sample(rollup)

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def measure_once(actors: int, core: str | None, watch: Watch) -> dict[str, float]:
    """One run of ``actors`` waiting actors on ``core``: its figures."""
    options: dict[str, Any] = {
        "max_live_tasks": actors + 1,
        "max_children": actors,
        "max_total_ram": "off",
        **({"core": core} if core is not None else {}),
    }
    command = [*HOST_RUN, json.dumps(options), str(PROGRAM), str(actors)]
    with tempfile.TemporaryDirectory() as tmp:
        with (
            open(Path(tmp) / "stderr", "w+") as stderr,
            subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=ENV,
            ) as process,
        ):
            sampler = Sampler(process, watch)
            try:
                with sampler.running():
                    assert process.stdout is not None and process.stdin is not None
                    return _follow(process.stdout, process.stdin, sampler, actors)
            except Stopped as stopped:
                try:  # (it is ending: its events ended, or it was killed)
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                if sampler.killed_because is not None:
                    raise Stopped(f"killed the run: {sampler.killed_because} ({stopped})") from None
                stderr.seek(0)
                raise Stopped(
                    f"{stopped}; exit code {process.returncode}:\n{stderr.read()}"
                ) from None


def _follow(lines: IO[str], go: IO[str], sampler: Sampler, actors: int) -> dict[str, float]:
    """Reads the run's events to its end, sampling its memory as main starts and
    once every actor waits, then sending main the go-ahead."""
    start: Memory | None = None
    waiting: Memory | None = None
    first_pending = all_waiting = woken = last_completed = 0.0
    waiters: set[str] = set()
    completed = 0
    for line in lines:
        event = json.loads(line)
        sampler.last_event = time.monotonic()
        kind, at, task = event["type"], float(event["at"]), event.get("task")
        if kind == "started" and event["task_id"] == "main" and start is None:
            start = sampler.sample()
        elif kind == "pending" and task == "actor" and not first_pending:
            first_pending = at
        elif kind == "waiting" and task == "actor" and event["on"] == "receive":
            waiters.add(event["task_id"])
            if len(waiters) == actors and waiting is None:
                all_waiting = at
                waiting = sampler.sample()
                go.write("go\n")
                go.flush()
        elif kind == "resumed" and event["task_id"] == "main" and waiting and not woken:
            woken = at
        elif kind == "completed" and task == "actor":
            completed += 1
            last_completed = at
        elif kind == "run_ended":
            if (
                event["envelope"].get("result") != {"woken": actors}
                or start is None
                or waiting is None
            ):
                raise Stopped(
                    f"the run ended {event['status']} with {len(waiters)} of {actors} actors "
                    f"waiting, {completed} ended: {json.dumps(event['envelope'].get('error'))}"
                )
            return {
                "spawn_s": all_waiting - first_pending,
                "spawned_per_s": actors / (all_waiting - first_pending),
                "private_mb": waiting.private / MB,
                "pss_mb": waiting.pss / MB,
                "private_mb_per_actor": waiting.private / actors / MB,
                "private_mb_per_actor_above_start": (waiting.private - start.private) / actors / MB,
                "pss_mb_per_actor": waiting.pss / actors / MB,
                "threads": float(waiting.threads),
                "peak_private_mb (sampled)": sampler.peak_private / MB,
                "peak_rss_mb (VmHWM)": sampler.peak_rss / MB,
                "wake_all_s": last_completed - woken,
                "wake_to_run_end_s": at - woken,
            }
    raise Stopped(f"the run's events stopped with {len(waiters)} of {actors} actors waiting")


def measure(
    actors: int, core: str | None, repeats: int, watch: Watch | None = None
) -> dict[str, float]:
    """The medians of ``repeats`` runs."""
    runs = [measure_once(actors, core, watch or Watch()) for _ in range(repeats)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--actors", type=int, default=1000, help="waiting actors (1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per core (3)")
    parser.add_argument(
        "--core", action="append", help="measure this core only (default: every core there is)"
    )
    parser.add_argument(
        "--min-available",
        type=float,
        default=4.0,
        metavar="GB",
        help="kill the run if the machine's available memory falls under this (4)",
    )
    parser.add_argument(
        "--sample-every",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="sample the run's memory this often (1)",
    )
    parser.add_argument(
        "--rollup-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="read the run's private memory this often too (0, the default: only as main "
        "starts and once every actor waits; reading it stalls a run of thousands of actors)",
    )
    parser.add_argument(
        "--stall-after",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="kill the run if it reports no event for this long (120)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    if options.actors < 1 or options.repeats < 1:
        parser.error("--actors and --repeats take a whole number of at least 1")
    results = []
    for core in options.core or cores():
        try:
            figures = measure(
                options.actors,
                core,
                options.repeats,
                Watch(
                    options.sample_every,
                    int(options.min_available * 1024**3),
                    options.stall_after,
                    options.rollup_every,
                ),
            )
        except Stopped as stopped:
            print(f"{core_name(core)}: {stopped}", file=sys.stderr)
            raise SystemExit(1) from None
        results.append({"core": core_name(core), "actors": options.actors, **figures})
        if not options.json:
            print(f"\n{options.actors:,} idle actors, core {core_name(core)}", flush=True)
            for label, value in figures.items():
                print(f"  {label:36s} {value:10.3f}", flush=True)
    if options.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
