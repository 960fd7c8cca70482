"""A program's import is hostile code too: module-level code that sleeps, or
fills its memory, in every instance that imports the program (the pool's, a
task's own) stops with the task or the run, within the task's deadline and
its memory cap, counted by the run's memory budget; and Ctrl-C or SIGTERM
while the program is first imported stop the run cleanly (exit 130); on either
core."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest

from tests.conftest import capsule_cli, signal_at_marker
from tests.security.support import MB, core_flags, peak_rss_of_run, write

#: Module-level code that sleeps on the host while an instance imports the
#: program for a task (not while the program is first loaded, so the run starts).
SLEEPS_WHEN_PREPARED = """
import sys, time
_describe = True
_frame = sys._getframe()
while _frame is not None:
    _program = _frame.f_locals.get("program")
    if _program is not None and hasattr(_program, "describe"):
        _describe = _program.describe
    _frame = _frame.f_back
if not _describe:
    time.sleep(29.9)
    time.sleep(30)
"""


#: A main (its options to fill in) that calls a child: the child's instance is
#: imported for it. MARK tells a test the call is about to be made.
CALLS_A_CHILD = """
from capsule import task

@task(name="child")
def child():
    return 1

@task(name="main", {main})
def main():
    print("MARK calling", flush=True)
    return child()
"""


def test_a_sleep_while_importing_the_program_does_not_outlast_a_deadline(
    tmp_path: Path,
    core: str,
) -> None:
    program = write(
        tmp_path, SLEEPS_WHEN_PREPARED + CALLS_A_CHILD.format(main='timeout="2s", max_retries=0')
    )
    # The run's main has a 2 s deadline; the import of its child's instance
    # sleeps a minute. A wedge shows as the subprocess's timeout.
    done = capsule_cli("run", str(program), "--json", *core_flags(core), cwd=tmp_path, timeout=40)
    assert json.loads(done.stdout)["error"]["kind"] == "timeout"


def test_sigterm_stops_a_run_whose_instances_sleep_while_importing(
    tmp_path: Path, core: str
) -> None:
    program = write(tmp_path, SLEEPS_WHEN_PREPARED + CALLS_A_CHILD.format(main='timeout="5m"'))
    code, _, stderr = signal_at_marker(
        ["run", str(program), *core_flags(core)],
        "MARK",
        tmp_path,
        signal.SIGTERM,
        capture_stderr=True,
        hang_after=60,
    )
    assert code == 130, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_program_is_first_imported(
    tmp_path: Path, core: str, sig: signal.Signals
) -> None:
    program = write(
        tmp_path,
        """
        import time
        print("MARK importing", flush=True)
        time.sleep(20)

        from capsule import task

        @task(name="main")
        def main():
            return "ran"
        """,
    )
    code, stdout, stderr = signal_at_marker(
        ["run", str(program), *core_flags(core)],
        "MARK",
        tmp_path,
        sig,
        capture_stderr=True,
        hang_after=120,
    )
    assert code == 130, (code, stderr[-2000:])
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert "ran" not in stdout


def test_instances_importing_the_program_count_against_the_memory_budget(
    tmp_path: Path,
    core: str,
) -> None:
    program = write(
        tmp_path,
        SLEEPS_WHEN_PREPARED.replace(
            "    time.sleep(29.9)\n    time.sleep(30)\n",
            "    _hoard = bytearray(200 * 1024 * 1024)\n"
            "    for _at in range(0, len(_hoard), 4096):\n"
            "        _hoard[_at] = 1\n",
        )
        + textwrap.dedent(
            """
            from capsule import gather, task

            @task(name="child", ram="16MB", restart="temporary", max_retries=0)
            def child(number):
                return number

            @task(name="main", timeout="120s", max_retries=0)
            def main():
                children = [child.spawn(number) for number in range(40)]
                return len(gather(*children, return_exceptions=True))
            """
        ),
    )
    peak, done = peak_rss_of_run(
        "run", str(program), "--max-total-ram", "512MB", *core_flags(core), cwd=tmp_path
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert peak < 1024 * MB, f"the host peaked at {peak / MB:,.0f} MB"
