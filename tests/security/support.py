"""What the hostile runs of this suite share: the cores they run on, writing
a program, the size of a run's journal, the peak memory of a `capsule` process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

MB = 1024**2


def core_flags(core: str) -> list[str]:
    """The `capsule run` flags of a run on ``core``."""
    return ["--core", core]


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
