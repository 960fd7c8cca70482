"""What the hostile runs of this suite share: writing a program, the size of
a run's journal, the peak memory of a `capsule` process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

MB = 1024**2


def write(directory: Path, source: str, name: str = "prog.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def journal_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in (directory / ".capsule").glob("journal.db*"))


def peak_rss_of_run(*args: str, cwd: Path) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run `capsule ARGS` under a small wrapper process that reports the peak
    resident memory of the `capsule` process alone (bytes)."""
    wrapper = textwrap.dedent(
        """
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "capsule.cli", *sys.argv[1:]])
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)
        sys.exit(done.returncode)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return int(done.stderr.strip().splitlines()[-1]), done


def signal_at_marker(
    args: list[str], cwd: Path, sig: signal.Signals, hang_after: float = 60
) -> tuple[int, str, str]:
    """Start `capsule ARGS`, send it ``sig`` once a line of its stdout starts
    with "MARK": (exit code, the rest of stdout, stderr). A process still
    running ``hang_after`` seconds later did not stop: an AssertionError."""
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("MARK"):
            break
    process.send_signal(sig)
    try:
        stdout, stderr = process.communicate(timeout=hang_after)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"{sig.name} did not stop the run") from None
    return process.returncode, stdout, stderr
