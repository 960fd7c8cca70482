"""Concurrent resumes of one crashed run, many times over: in each trial two
Runtimes (each its own connections and lease, as two processes or machines
would have) resume the same crashed run at the same instant. Exactly one may
run it; a trial where both did, or where its task started twice, is a double
execution. On SQLite and on PostgreSQL (a throwaway server, as the tests
make one).

    python3 benchmarks/resume_trials.py [--trials 1000] [--only sqlite postgresql]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capsule import SyncRuntime  # noqa: E402
from capsule.host.errors import NotResumable  # noqa: E402
from capsule.journal.database import open_connection  # noqa: E402
from capsule.journal.location import journal_at  # noqa: E402
from tests.postgres_cluster import throwaway_cluster  # noqa: E402

PROGRAM = """
from capsule import task

@task(name="main")
def main() -> str:
    print("executed")
    return "done"
"""

_RUN_COLUMNS = "program, program_hash, args_json, settings_json, seed, started_at, capsule_version"


def trials(journal: str, count: int, workdir: Path) -> dict[str, Any]:
    """``count`` trials on ``journal``: runs executed twice, resumes refused,
    and trials that did not end with one run completed and one refused."""
    program = workdir / "once.py"
    program.write_text(textwrap.dedent(PROGRAM))
    location = journal_at(journal)
    with SyncRuntime(journal=journal) as first, SyncRuntime(journal=journal) as second:
        template = first.run(program).run_id
        connection = open_connection(location, create=False)
        twice = refused = anomalies = 0
        try:
            for trial in range(count):
                run_id = f"trial{trial:05d}"
                # A run that crashed before its first step: running, its lease
                # long expired, nothing journaled.
                connection.execute(
                    f"INSERT INTO runs (run_id, status, resumes, host_pid, lease_owner, "
                    f"lease_expires_at, {_RUN_COLUMNS}) SELECT ?, 'running', 0, 999999, "
                    f"'gone-host 999999 - 000000000000', 1.0, {_RUN_COLUMNS} FROM runs "
                    f"WHERE run_id = ?",
                    (run_id, template),
                )
                outcomes: list[str] = []
                barrier = threading.Barrier(2)
                threads = [
                    threading.Thread(target=_resume, args=(rt, run_id, barrier, outcomes))
                    for rt in (first, second)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                [(starts,)] = connection.execute(
                    "SELECT count(*) FROM events WHERE run_id = ? AND type = 'started'",
                    (run_id,),
                ).fetchall()
                if outcomes.count("completed") > 1 or starts != 1:
                    twice += 1
                if sorted(outcomes) != ["completed", "refused"] or starts != 1:
                    anomalies += 1
                    print(f"  trial {trial}: {outcomes}, main started {starts} times", flush=True)
                refused += outcomes.count("refused")
        finally:
            connection.close()
    return {
        "trials": count,
        "double executions": twice,
        "resumes refused": refused,
        "other outcomes": anomalies,
    }


def _resume(
    runtime: SyncRuntime, run_id: str, barrier: threading.Barrier, outcomes: list[str]
) -> None:
    barrier.wait()
    try:
        outcomes.append(runtime.resume(run_id).status)
    except NotResumable:
        outcomes.append("refused")
    except Exception as exc:  # (any other end is an anomaly, counted)
        outcomes.append(type(exc).__name__)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--only", nargs="+", choices=["sqlite", "postgresql"])
    options = parser.parse_args()
    backends = options.only or ["sqlite", "postgresql"]
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            started = time.perf_counter()
            if backend == "sqlite":
                figures = trials(str(Path(tmp) / "journal.db"), options.trials, Path(tmp))
            else:
                with throwaway_cluster() as cluster:
                    figures = trials(cluster.new_database(), options.trials, Path(tmp))
            took = time.perf_counter() - started
            print(f"{backend}: {figures} in {took:.0f} s", flush=True)


if __name__ == "__main__":
    main()
