"""The benchmarks run for real and report well-formed figures (what the figures
are is measured in benchmarks/, never asserted here)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

ACTORS_BENCHMARK = REPO / "benchmarks" / "actors.py"

FIGURES = {
    "spawn_s",
    "spawned_per_s",
    "private_mb",
    "pss_mb",
    "private_mb_per_actor",
    "private_mb_per_actor_above_start",
    "pss_mb_per_actor",
    "threads",
    "peak_private_mb (sampled)",
    "peak_rss_mb (VmHWM)",
    "wake_all_s",
    "wake_to_run_end_s",
}


def run_actors_benchmark(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ACTORS_BENCHMARK), "--actors", "20", "--repeats", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_idle_actors_benchmark_reports_every_figure_for_each_core() -> None:
    done = run_actors_benchmark("--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results, "no core measured"
    assert len({result["core"] for result in results}) == len(results)
    for result in results:
        figures = {key: value for key, value in result.items() if key not in ("core", "actors")}
        assert result["actors"] == 20
        assert set(figures) == FIGURES
        assert all(isinstance(value, float) and math.isfinite(value) for value in figures.values())
        assert figures["spawn_s"] > 0
        assert figures["spawned_per_s"] == pytest.approx(20 / figures["spawn_s"])
        assert figures["private_mb"] > 0 and figures["pss_mb"] > 0
        assert figures["private_mb_per_actor"] == pytest.approx(figures["private_mb"] / 20)
        assert figures["pss_mb_per_actor"] == pytest.approx(figures["pss_mb"] / 20)
        assert figures["peak_private_mb (sampled)"] >= figures["private_mb"]
        assert figures["peak_rss_mb (VmHWM)"] > 0
        assert figures["threads"] >= 1 and figures["threads"].is_integer()
        assert 0 <= figures["wake_all_s"] <= figures["wake_to_run_end_s"]


def test_idle_actors_benchmark_kills_the_run_when_the_machine_runs_low() -> None:
    # No machine has a million GB available: the first sample, taken before the
    # run has started, stops it.
    done = run_actors_benchmark("--min-available", "1000000", "--sample-every", "0.05")
    assert done.returncode == 1
    killed = "killed the run: the machine's available memory fell under 1000000.0 GB"
    assert killed in done.stderr
    assert "Traceback" not in done.stderr


def test_idle_actors_benchmark_kills_a_run_that_stops_reporting() -> None:
    done = run_actors_benchmark("--stall-after", "0", "--sample-every", "0.05")
    assert done.returncode == 1
    assert "killed the run: no event for 0 s" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_comparison_with_the_original_measures_every_shared_row() -> None:
    # (Without the original, which it would install from the package index:
    # the rows run against this checkout alone, as whole processes.)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "vs_original.py"),
            "--without-original",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    figures = re.findall(
        r"capsule \(this checkout\)\s+wall\s+([0-9.]+) s\s+CPU\s+([0-9.]+) s(.*)", done.stdout
    )
    assert len(figures) == 3, done.stdout  # the calls, a warm run, an edit
    assert all(float(wall) > 0 and float(cpu) > 0 for wall, cpu, _ in figures)
    assert "p50_ms" in figures[0][2] and "p95_ms" in figures[0][2]
