"""The journal: runs recorded in SQLite, `capsule runs` / `inspect`, resume after
a real `kill -9` (exactly-once for journaled steps, same clock and random
values), divergence, and journals that cannot be used."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import capsule_cli, kill_at_marker

# A workflow with a chain of calls, a fan-out, an actor fed a burst of messages,
# and guest clock / random reads. Every task prints a marker outside the sandbox.
FLOW = """
import random
import time
import uuid

from capsule import ask, receive, send, sleep, task


@task(name="step")
def step(n: int) -> int:
    print(f"MARK step {n}")
    sleep(0.05)
    return n * 10


@task(name="square")
def square(x: int) -> int:
    print(f"MARK square {x}")
    sleep(0.05 * x)
    return x * x


@task(name="counter")
def counter(expected: int) -> int:
    total = 0
    for _ in range(expected):
        message = receive()
        total += message.body
        print(f"MARK counted {message.body}")
    return total


@task(name="doubler")
def doubler(count: int) -> int:
    for _ in range(count):
        message = receive()
        print(f"MARK doubled {message.body}")
        message.reply(message.body * 2)
    return count


@task(name="main", timeout="5m")
def main(burst: int = 200) -> dict:
    stamp, draw, ident = time.time(), random.random(), str(uuid.uuid4())
    print(f"MARK main {stamp!r} {draw!r} {ident}")
    chain = [step(i) for i in range(4)]
    squares = square.map(range(5))
    sink = counter.spawn(burst)
    for i in range(burst):
        send(sink, i)
        if i % 50 == 0:
            sleep(0.05)
    total = sink.result()
    partner = doubler.spawn(30)
    doubled = []
    for i in range(30):
        doubled.append(ask(partner, i))
        if i % 5 == 0:
            sleep(0.05)
    print("MARK done")
    sleep(1)  # slack, so that a kill after any marker finds the run still going
    return {"stamp": stamp, "draw": draw, "id": ident, "chain": chain,
            "squares": squares, "total": total, "doubled": doubled}
"""


def _write(tmp_path: Path, source: str, name: str = "flow.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _journal(tmp_path: Path) -> Path:
    return tmp_path / ".capsule" / "journal.db"


def _markers(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("MARK")]


def _run_and_kill(program: Path, marker: str, extra_delay: float, core: str = "threads") -> str:
    """Start `capsule run` on ``core``, kill -9 it once ``marker`` was printed
    (and ``extra_delay`` later); returns what it printed. (Its resume runs on
    the core its journal records.)"""
    args = ["run", str(program), "--core", core]
    printed, code = kill_at_marker(args, marker, program.parent, extra_delay)
    assert code == -signal.SIGKILL, f"the run ended before the kill: {printed}"
    return printed


def _journaled_markers(journal: Path) -> set[str]:
    """The markers in the journal's output steps."""
    with sqlite3.connect(journal) as connection:
        requests = connection.execute("SELECT request FROM steps WHERE kind = 'output'")
        texts = [json.loads(request)[1] for (request,) in requests]
    return {marker for text in texts for marker in _markers(text)}


def _integrity(journal: Path) -> str:
    with sqlite3.connect(journal) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


def _final_tasks(journal: Path) -> dict[str, str]:
    with sqlite3.connect(journal) as connection:
        rows = connection.execute("SELECT task_id, name FROM tasks WHERE final = 1").fetchall()
    return dict(rows)


def _last_event(journal: Path) -> int:
    with sqlite3.connect(journal) as connection:
        return int(connection.execute("SELECT max(seq) FROM events").fetchone()[0] or 0)


def _started_after(journal: Path, seq: int) -> set[str]:
    with sqlite3.connect(journal) as connection:
        rows = connection.execute(
            "SELECT task_id FROM events WHERE seq > ? AND type = 'started'", (seq,)
        ).fetchall()
    return {row[0] for row in rows}


def _drop_leases(connection: sqlite3.Connection) -> None:
    """The runs table as it was before version 10 (leases)."""
    connection.execute("ALTER TABLE runs DROP COLUMN lease_owner")
    connection.execute("ALTER TABLE runs DROP COLUMN lease_expires_at")


def _as_schema_3(journal: Path) -> None:
    """Rewrite a journal as Capsule wrote it with schema version 3: every request
    as its text, every step with its time, a received message as an object;
    batches without their time; no source files recorded."""
    from capsule.journal.schema import MIGRATIONS
    from capsule.supervisor.steps import json_strings, received_messages

    create_view = next(s for s in MIGRATIONS[3] if "CREATE VIEW" in s)
    with sqlite3.connect(journal) as connection:
        batches = connection.execute(
            "SELECT run_id, task_id, attempt, first_step, steps_json, committed_at "
            "FROM step_batches"
        ).fetchall()
        connection.execute("DROP VIEW steps")
        connection.execute("ALTER TABLE step_batches DROP COLUMN committed_at")
        for run_id, task_id, attempt, first_step, steps_json, at in batches:
            steps = [
                [number, kind, r if isinstance(r, str) else json_strings(*r), ok, answer, at]
                for number, kind, r, ok, answer in json.loads(steps_json)
            ]
            for step in steps:
                # (A batch of messages, which that Capsule never took in one
                # receive, is left as version 8 wrote it: an array of arrays,
                # the bodies as values; the replay reads every form.)
                if step[1] == "receive" and step[3]:
                    received = received_messages(step[4])
                    if len(received) == 1:
                        ((message_id, sender, body, expects_reply),) = received
                        step[4] = json.dumps(
                            {
                                "id": message_id,
                                "sender": sender,
                                "expects_reply": expects_reply,
                                "body": json.loads(body),
                            }
                        )
                    else:
                        step[4] = json.dumps([[m, s, json.loads(b), e] for m, s, b, e in received])
            connection.execute(
                "UPDATE step_batches SET steps_json = ? "
                "WHERE run_id = ? AND task_id = ? AND attempt = ? AND first_step = ?",
                (json.dumps(steps), run_id, task_id, attempt, first_step),
            )
        connection.execute(create_view)
        connection.execute("DROP TABLE program_files")  # (version 6)
        _drop_leases(connection)
        connection.execute("DROP TABLE secret_answers")  # (version 11)
        connection.execute("DROP TABLE run_sources")  # (version 12)
        connection.execute("DROP INDEX runs_by_status")
        connection.execute("PRAGMA user_version = 3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    done = capsule_cli("run", str(_write(tmp_path, FLOW)), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["result"]


@pytest.mark.parametrize(
    ("marker", "delay", "as_written_by", "core"),
    [
        ("MARK main", 0.0, None, "threads"),  # right after the first clock and random reads
        ("MARK step 2", 0.0, None, "threads"),  # in the chain of calls
        ("MARK square 3", 0.05, None, "threads"),  # in the fan-out
        ("MARK counted 40", 0.02, None, "threads"),  # in the burst of messages (journal writes)
        ("MARK doubled 12", 0.0, None, "threads"),  # in an ask / reply exchange
        # killed by a Capsule that wrote schema version 3, resumed by this one
        ("MARK counted 40", 0.02, _as_schema_3, "threads"),
        # the same on the async core (no thread per task)
        ("MARK main", 0.0, None, "async"),
        ("MARK step 2", 0.0, None, "async"),
        ("MARK square 3", 0.05, None, "async"),
        ("MARK counted 40", 0.02, None, "async"),
        ("MARK doubled 12", 0.0, None, "async"),
    ],
)
def test_kill_9_then_resume_finishes_the_run_with_journaled_steps_run_once(
    tmp_path: Path,
    uninterrupted: dict,
    marker: str,
    delay: float,
    as_written_by: Callable[[Path], None] | None,
    core: str,
) -> None:
    program = _write(tmp_path, FLOW)
    first = _run_and_kill(program, marker, delay, core)
    journal = _journal(tmp_path)
    assert _integrity(journal) == "ok"
    if as_written_by is not None:
        as_written_by(journal)
    ended_before = _final_tasks(journal)
    killed_at = _last_event(journal)
    journaled_before = _journaled_markers(journal)

    runs = capsule_cli("runs", "--json", cwd=tmp_path)
    assert runs.returncode == 0, runs.stderr
    [run] = json.loads(runs.stdout)
    assert run["status"] == "crashed"

    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    envelope = json.loads(resumed.stdout)
    assert envelope["execution"]["run_id"] == run["run_id"]  # the run keeps its id
    result = envelope["result"]
    # The same outcome as a run that was never interrupted...
    for key in ("chain", "squares", "total", "doubled"):
        assert result[key] == uninterrupted[key]
    # ...with the clock, random and uuid values the killed run had already seen.
    main_marker = next(m for m in _markers(first) if m.startswith("MARK main"))
    assert main_marker == f"MARK main {result['stamp']!r} {result['draw']!r} {result['id']}"

    # Tasks whose end was journaled before the kill did not start again...
    restarted = _started_after(journal, killed_at)
    assert not restarted & set(ended_before), restarted & set(ended_before)
    assert "main" in restarted  # (main was in flight: it re-executed, replaying)
    # ...and no printed marker is shown twice (replayed output is not shown again).
    markers = _markers(first) + _markers(resumed.stderr)
    assert len(markers) == len(set(markers)), sorted(m for m in markers if markers.count(m) > 1)
    expected = {f"MARK step {i}" for i in range(4)} | {f"MARK square {i}" for i in range(5)}
    expected |= {f"MARK counted {i}" for i in range(200)} | {"MARK done"}
    expected |= {f"MARK doubled {i}" for i in range(30)}
    # Output is committed, then shown: a kill between the two loses its display
    # (at most once, by design), never its record.
    unseen = expected - set(markers)
    assert unseen <= journaled_before, unseen - journaled_before
    assert _integrity(journal) == "ok"

    # Resuming again is refused clearly: the run is over.
    again = capsule_cli("resume", run["run_id"], cwd=tmp_path)
    assert again.returncode == 2
    assert "already ended (completed)" in again.stderr
    assert f"`capsule inspect {run['run_id']}` shows how it ended" in again.stderr


def test_completed_tasks_are_not_executed_again(tmp_path: Path, core: str) -> None:
    """A child whose completion was journaled returns its journaled result; the
    task in flight re-executes only what it had not journaled."""
    source = """
    from capsule import sleep, task

    @task(name="child")
    def child(n: int) -> int:
        print(f"MARK child {n} ran")
        return n + 1

    @task(name="main", timeout="5m")
    def main() -> list:
        done = [child(1), child(2)]
        print("MARK waiting")
        sleep(2)
        return done + [child(3)]
    """
    program = _write(tmp_path, source)
    _run_and_kill(program, "MARK waiting", 0.1, core)
    assert sorted(_final_tasks(_journal(tmp_path)).values()) == ["child", "child"]
    resumed = capsule_cli("resume", "--last", "-v", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines() == ["[main/3 child] MARK child 3 ran", "[2, 3, 4]"]
    # main replays its two calls and its first output from the journal.
    assert "replaying main, attempt 1: its first 3 host call(s)" in resumed.stderr
    assert not re.search(r"started main/[12] ", resumed.stderr)


def test_a_changed_program_is_refused_unless_forced_and_divergence_names_the_step(
    tmp_path: Path, core: str
) -> None:
    source = """
    from capsule import sleep, task

    @task(name="child")
    def child(n: int) -> int:
        return n

    @task(name="main", timeout="5m")
    def main() -> int:
        first = child(1)
        print("MARK waiting")
        sleep(30)
        return first
    """
    program = _write(tmp_path, source)
    _run_and_kill(program, "MARK waiting", 0.1, core)
    program.write_text(program.read_text().replace("first = child(1)", "first = child(7)"))

    refused = capsule_cli("resume", "--last", cwd=tmp_path)
    assert refused.returncode == 2
    assert "changed since run" in refused.stderr and "--force" in refused.stderr

    forced = capsule_cli("resume", "--last", "--force", "--json", cwd=tmp_path)
    assert forced.returncode == 1, forced.stderr
    error = json.loads(forced.stdout)["error"]
    assert error["kind"] == "divergence"
    assert "'main' (main) diverged from the journal at step" in error["message"]
    assert "call(" in error["message"] and "[1]" in error["message"]
    assert "[7]" in error["message"]
    # `capsule inspect` says why the run ended so; its task tree does not.
    shown = capsule_cli("inspect", "--last", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "error: divergence: " in shown.stdout and "diverged from the journal" in shown.stdout


#: A program whose child imports a module of the program's directory (HELPER).
USES_HELPER = """
from capsule import sleep, task

@task(name="child")
def child(n: int) -> int:
    import helper
    return helper.scale(n)

@task(name="main", timeout="5m")
def main() -> int:
    first = child(1)
    print("MARK waiting", first)
    sleep(3)  # killed during it; a resume sleeps it again
    print("MARK again")
    sleep(3)
    return first
"""
HELPER = "def scale(n: int) -> int:\n    return n * 10\n"


def test_a_changed_imported_module_is_refused_too(tmp_path: Path, core: str) -> None:
    """The main file is not the whole program: a module it imports (read by a
    task, after the run started) is journaled with its hash and checked too."""
    (tmp_path / "helper.py").write_text(HELPER)
    program = _write(tmp_path, USES_HELPER)
    _run_and_kill(program, "MARK waiting", 0.1, core)
    with sqlite3.connect(_journal(tmp_path)) as connection:
        recorded = dict(connection.execute("SELECT path, sha256 FROM program_files"))
    helper = tmp_path / "helper.py"
    assert set(recorded) == {str(program.resolve()), str(helper.resolve())}
    original = helper.read_text()
    helper.write_text(original.replace("n * 10", "n * 20"))

    refused = capsule_cli("resume", "--last", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert f"{helper.resolve()} changed since run" in refused.stderr
    assert str(program.resolve()) not in refused.stderr  # only what changed is named

    helper.unlink()
    gone = capsule_cli("resume", "--last", cwd=tmp_path)
    assert gone.returncode == 2 and "helper.py changed since run" in gone.stderr

    helper.write_text(original)  # restored: the resume goes on
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"] == 10


def test_a_forced_resume_records_the_files_as_they_are_now(tmp_path: Path, core: str) -> None:
    """After --force, the next resume checks the files as the forced one found
    them, also a module that only a task ended before the crash imported."""
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    program = _write(tmp_path, USES_HELPER)
    _run_and_kill(program, "MARK waiting", 0.1, core)
    helper.write_text(HELPER.replace("n * 10", "n * 20"))
    assert capsule_cli("resume", "--last", cwd=tmp_path).returncode == 2
    printed, code = kill_at_marker(["resume", "--last", "--force"], "MARK again", tmp_path)
    assert code == -signal.SIGKILL, printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == 10  # the child's journaled result


def test_printed_lines_share_commits_and_are_shown_in_order_before_the_task_ends(
    tmp_path: Path, core: str
) -> None:
    """A task that prints does not wait for a commit per line (it did: 2,000
    lines were 2,000 commits); each line is still journaled before it is shown,
    all are shown in order, and before the task is reported completed."""
    source = """
    from capsule import task

    @task(name="main", timeout="5m")
    def main() -> int:
        for i in range(2000):
            print(f"MARK line {i} " + "x" * 1000)
        return 2000
    """
    program = _write(tmp_path, source)
    # With --json, output and the lifecycle (-v) share stderr: their order shows.
    done = capsule_cli("run", str(program), "--json", "-v", "--core", core, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.json()["result"] == 2000
    shown = done.stderr.splitlines()
    marks = [line.split("] ", 1)[1].split(" x")[0] for line in shown if "] MARK" in line]
    assert marks == [f"MARK line {i}" for i in range(2000)]
    last_mark = max(i for i, line in enumerate(shown) if "] MARK" in line)
    assert any("completed main" in line for line in shown[last_mark:]), shown[-5:]
    journal = _journal(tmp_path)
    with sqlite3.connect(journal) as connection:
        batches = connection.execute(
            "SELECT count(*) FROM step_batches WHERE task_id = 'main'"
        ).fetchone()[0]
        journaled = _journaled_markers(journal)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert batches < 500, batches  # bursts of lines share a commit
    assert {line.split(" x")[0] for line in journaled} == set(marks)
    # Each line is in an output event and a step: about twice its size, not the
    # ~9 times of rows that spilled into an overflow page each.
    assert journal.stat().st_size < 4 * 2000 * 1000, journal.stat().st_size


def test_a_parents_lines_are_shown_before_the_child_it_then_starts(
    tmp_path: Path, core: str
) -> None:
    source = """
    from capsule import task

    @task(name="child")
    def child() -> int:
        print("MARK child")
        return 1

    @task(name="main")
    def main() -> int:
        print("MARK parent")
        return child()
    """
    program = _write(tmp_path, source)
    done = capsule_cli("run", str(program), "--json", "-v", "--core", core, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = done.stderr.splitlines()
    order = [
        i
        for mark in ("MARK parent", "started main/1", "MARK child", "completed main/1")
        for i, line in enumerate(shown)
        if mark in line
    ]
    assert order == sorted(order) and len(order) == 4, shown


@pytest.mark.parametrize("journaled", [True, False])
def test_a_closed_stdout_is_said_once_and_the_run_goes_on(tmp_path: Path, journaled: bool) -> None:
    """`capsule run prog.py | head -1`: the pipe closes while the task prints."""
    source = """
    from capsule import task

    @task(name="main")
    def main() -> str:
        for i in range(3000):
            print("MARK line", i)
        return "done"
    """
    program = _write(tmp_path, source)
    flags = [] if journaled else ["--no-journal"]
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program), *flags],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == "MARK line 0\n"
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr  # the run's own exit code
    assert stderr.count("output can no longer be shown (BrokenPipeError") == 1, stderr
    assert "Traceback" not in stderr
    assert ("the journal keeps it" in stderr) == journaled
    if journaled:
        assert len(_journaled_markers(_journal(tmp_path))) == 3000


def test_with_json_and_stdout_closed_the_error_still_reaches_stderr(tmp_path: Path) -> None:
    program = _write(tmp_path, "from capsule import task\n@task(name='main')\ndef main(:\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", "--json", str(program)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # `| true`: nobody reads the envelope
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "importing the program failed" in stderr and "Traceback (most" not in stderr


def test_an_interrupted_run_can_be_resumed_twice_safely(tmp_path: Path, core: str) -> None:
    source = """
    from capsule import sleep, task

    @task(name="main", timeout="5m")
    def main() -> str:
        print("MARK one")
        sleep(0.5)
        print("MARK two")
        sleep(1)
        return "done"
    """
    program = _write(tmp_path, source)
    _run_and_kill(program, "MARK one", 0.0, core)
    kill_at_marker(["resume", "--last"], "MARK two", tmp_path)
    with sqlite3.connect(_journal(tmp_path)) as connection:
        kinds = [row[0] for row in connection.execute("SELECT kind FROM steps ORDER BY step")]
    assert kinds[:3] == ["output", "sleep", "output"]
    assert _integrity(_journal(tmp_path)) == "ok"
    runs = json.loads(capsule_cli("runs", "--json", cwd=tmp_path).stdout)
    assert runs[0]["status"] == "crashed" and runs[0]["resumes"] == 1
    # The second resume replays both outputs and the first sleep (printing
    # nothing again), sleeps the second live, and ends the run.
    second = capsule_cli("resume", "--last", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "done\n"
    runs = json.loads(capsule_cli("runs", "--json", cwd=tmp_path).stdout)
    assert runs[0]["status"] == "completed" and runs[0]["resumes"] == 2


def test_runs_and_inspect_show_the_task_tree(tmp_path: Path, core: str) -> None:
    source = """
    from capsule import task

    @task(name="flaky", max_retries=2)
    def flaky(n: int) -> int:
        from capsule import current
        if current().attempt < 2:
            raise ValueError("not yet")
        return n

    @task(name="main")
    def main() -> int:
        return flaky(5)
    """
    (tmp_path / "project").mkdir()
    program = _write(tmp_path / "project", source, "tree.py")
    assert capsule_cli("run", str(program), "--core", core, cwd=tmp_path).returncode == 0
    # Journaled beside the program, not here: the error says where it is.
    elsewhere = capsule_cli("runs", cwd=tmp_path)
    assert elsewhere.returncode == 2
    assert "there is one at project/.capsule/journal.db" in elsewhere.stderr
    assert "pass --journal project/.capsule/journal.db" in elsewhere.stderr
    listing = capsule_cli("runs", "--journal", "project/.capsule/journal.db", cwd=tmp_path)
    assert listing.returncode == 0 and "completed" in listing.stdout and "tree.py" in listing.stdout
    tmp_path = tmp_path / "project"  # the rest from the program's directory
    run_id = json.loads(capsule_cli("runs", "--json", cwd=tmp_path).stdout)[0]["run_id"]
    latest = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert latest.returncode == 0 and json.loads(latest.stdout)["run_id"] == run_id
    neither = capsule_cli("inspect", cwd=tmp_path)
    assert neither.returncode == 2 and "give a RUN_ID or --last" in neither.stderr
    shown = capsule_cli("inspect", run_id[:6], "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    tree = json.loads(shown.stdout)
    tasks = {task["task_id"]: task for task in tree["tasks"]}
    assert tasks["main"]["result"] == 5 and tasks["main"]["status"] == "completed"
    assert tasks["main/1"]["parent_id"] == "main"
    assert tasks["main/1"]["attempts"] == 2 and tasks["main/1"]["fuel_consumed"] > 0
    text = capsule_cli("inspect", run_id, cwd=tmp_path).stdout
    assert "main/1 flaky  [completed]  attempt 2/3" in text


def test_no_journal_writes_nothing(tmp_path: Path) -> None:
    program = _write(
        tmp_path,
        "from capsule import task\n@task(name='main')\ndef main():\n    return 1\n",
        "plain.py",
    )
    assert capsule_cli("run", str(program), "--no-journal", cwd=tmp_path).returncode == 0
    assert not (tmp_path / ".capsule").exists()
    env_journal = tmp_path / "elsewhere.db"
    done = capsule_cli("run", str(program), cwd=tmp_path, env={"CAPSULE_JOURNAL": str(env_journal)})
    assert done.returncode == 0 and env_journal.is_file()


def test_bad_journals_are_refused_with_exit_2_and_left_untouched(tmp_path: Path) -> None:
    program = _write(
        tmp_path,
        "from capsule import task\n@task(name='main')\ndef main():\n    return 1\n",
        "ok.py",
    )
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    before = corrupt.read_bytes()
    for command in (["run", str(program)], ["runs"], ["resume", "--last"]):
        done = capsule_cli(*command, "--journal", str(corrupt), cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr)
        assert "not a readable Capsule journal" in done.stderr
    assert corrupt.read_bytes() == before

    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 99")
        connection.execute("CREATE TABLE future (x)")
    for command in (["run", str(program)], ["runs"]):
        done = capsule_cli(*command, "--journal", str(newer), cwd=tmp_path)
        assert done.returncode == 2 and "schema version 99" in done.stderr, done.stderr

    good = tmp_path / "good.db"
    assert capsule_cli("run", str(program), "--journal", str(good), cwd=tmp_path).returncode == 0
    unknown = capsule_cli("inspect", "nosuchrun", "--journal", str(good), cwd=tmp_path)
    assert unknown.returncode == 2 and "no run 'nosuchrun'" in unknown.stderr
    assert "`capsule runs` lists them" in unknown.stderr
    missing = capsule_cli("runs", "--journal", str(tmp_path / "none.db"), cwd=tmp_path)
    assert missing.returncode == 2 and "no journal at" in missing.stderr


def test_a_full_disk_stops_the_run_with_exit_2_and_a_consistent_journal(
    tmp_path: Path, core: str
) -> None:
    """The file-size limit makes the journal's writes fail as on a full disk."""
    source = """
    from capsule import task

    @task(name="main", timeout="5m")
    def main() -> int:
        for i in range(20000):
            print("x" * 200, i)
        return 1
    """
    program = _write(tmp_path, source, "big.py")
    journal = tmp_path / "small.db"

    def limit_file_size() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    command = [sys.executable, "-m", "capsule.cli", "run", str(program), "--journal", str(journal)]
    process = subprocess.run(
        [*command, "--core", core],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ},
    )
    assert process.returncode == 2, process.stderr[-2000:]
    assert "cannot be written" in process.stderr
    assert _integrity(journal) == "ok"
    runs = capsule_cli("runs", "--json", "--journal", str(journal), cwd=tmp_path)
    assert runs.returncode == 0 and json.loads(runs.stdout)[0]["status"] == "crashed"


def test_a_journal_that_cannot_be_written_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    program = _write(
        tmp_path,
        "from capsule import task\n@task(name='main')\ndef main():\n"
        "    print('MARK ran')\n    return 1\n",
        "ok.py",
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = capsule_cli("run", str(program), "--journal", str(blocker / "journal.db"))
    assert done.returncode == 2
    assert "cannot be written" in done.stderr and "MARK ran" not in done.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_a_read_only_journal_is_refused_with_exit_2(tmp_path: Path) -> None:
    program = _write(
        tmp_path,
        "from capsule import task\n@task(name='main')\ndef main():\n    return 1\n",
        "ok.py",
    )
    journal = tmp_path / "ro.db"
    assert capsule_cli("run", str(program), "--journal", str(journal)).returncode == 0
    before = journal.read_bytes()
    journal.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        done = capsule_cli("run", str(program), "--journal", str(journal))
    finally:
        tmp_path.chmod(0o755)
    assert done.returncode == 2 and "read-only" in done.stderr, done.stderr
    assert journal.read_bytes() == before


def test_capsule_tui_without_a_journal_says_where_it_looked(tmp_path: Path) -> None:
    done = capsule_cli("tui", "--journal", str(tmp_path / "none.db"))
    assert done.returncode == 2 and "no journal at" in done.stderr


def test_a_directory_given_as_the_journal_is_named_as_such(tmp_path: Path) -> None:
    program = _write(
        tmp_path, "from capsule import task\n@task(name='main')\ndef main():\n    return 1\n"
    )
    done = capsule_cli("run", str(program), "--journal", str(tmp_path))
    assert done.returncode == 2
    assert f"the journal {tmp_path} is a directory" in done.stderr


def test_the_tui_without_a_terminal_is_refused_not_left_waiting(tmp_path: Path) -> None:
    """Textual would wait for keys on a pipe: a clear error instead, before the
    program runs (the tests' subprocesses have pipes, not a terminal)."""
    program = _write(
        tmp_path,
        "from capsule import task\n@task(name='main')\ndef main():\n    print('MARK ran')\n",
    )
    done = capsule_cli("run", "--tui", str(program), cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "--tui needs a terminal, and std" in done.stderr
    assert "MARK" not in done.stdout + done.stderr and not _journal(tmp_path).exists()
    assert capsule_cli("run", str(program), cwd=tmp_path).returncode == 0
    browse = capsule_cli("tui", cwd=tmp_path, timeout=60)
    assert browse.returncode == 2 and "capsule tui needs a terminal" in browse.stderr


def test_a_kill_during_the_retry_backoff_resumes_with_the_next_attempt(
    tmp_path: Path, core: str
) -> None:
    source = """
    from capsule import current, task

    @task(name="main", max_retries=1)
    def main() -> int:
        print(f"MARK attempt {current().attempt}")
        if current().attempt == 1:
            raise ValueError("first attempt fails")
        return current().attempt
    """
    program = _write(tmp_path, source)
    # Killed 1 s after the failure: it is journaled, and the 30 s backoff is under way.
    args = ["run", str(program), "--retry-backoff", "30", "--core", core]
    kill_at_marker(args, "MARK attempt 1", tmp_path, 1.0)
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    envelope = json.loads(resumed.stdout)
    assert envelope["result"] == 2 and envelope["execution"]["attempts"] == 2


def test_a_refused_call_does_not_shift_child_ids_on_replay(tmp_path: Path, core: str) -> None:
    source = """
    from capsule import sleep, task
    from capsule.sdk import task as sdk

    @task
    def child() -> str:
        print("MARK child ran")
        return "done"

    @task(name="main", timeout="5m")
    def main() -> list:
        try:
            sdk._backend.call_task("no_such_task", (), {})
        except Exception as exc:
            refused = exc.kind
        handle = child.spawn()
        result = handle.result()
        print("MARK waiting")
        sleep(2)
        return [refused, result]
    """
    program = _write(tmp_path, source)
    _run_and_kill(program, "MARK waiting", 0.1, core)
    journal = _journal(tmp_path)
    killed_at = _last_event(journal)
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"] == ["exception", "done"]
    assert not _started_after(journal, killed_at) - {"main"}  # the child did not run again


def test_an_older_journal_is_migrated_in_place_and_keeps_its_runs(tmp_path: Path) -> None:
    from capsule.journal.schema import MIGRATIONS, SCHEMA_VERSION

    journal = tmp_path / "old.db"
    with sqlite3.connect(journal) as connection:
        for statement in MIGRATIONS[1]:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO runs (run_id, program, program_hash, args_json, settings_json, seed, "
            "status, started_at, capsule_version) VALUES ('oldrun', '/p.py', 'h', '[[], {}]', "
            "'{}', '00', 'completed', 1.0, '0.0.1')"
        )
        connection.execute("PRAGMA user_version = 1")
    listed = capsule_cli("runs", "--json", "--journal", str(journal))
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["run_id"] == "oldrun"
    program = _write(
        tmp_path,
        "from capsule import task\n@task(name='main')\ndef main():\n    return 1\n",
        "new.py",
    )
    assert capsule_cli("run", str(program), "--journal", str(journal)).returncode == 0
    with sqlite3.connect(journal) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        runs = {row[0] for row in connection.execute("SELECT run_id FROM runs")}
    assert "oldrun" in runs and len(runs) == 2


def test_a_version_6_journal_moves_its_events_and_steps_to_rowid_tables(tmp_path: Path) -> None:
    """Built as version 6 created it (WITHOUT ROWID tables), with rows of both
    sizes: migrated in place, every row and the steps view intact."""
    from capsule.journal.schema import MIGRATIONS, SCHEMA_VERSION, connect

    journal = tmp_path / "v6.db"
    big = json.dumps({"text": "x" * 3000})
    steps = json.dumps([[1, "output", ["stdout", "y" * 2000], True, ""], [2, "sleep", "1", 1, ""]])
    with sqlite3.connect(journal) as connection:
        for version in range(1, 7):
            for statement in MIGRATIONS[version]:
                connection.execute(statement)
        connection.execute(
            "INSERT INTO runs (run_id, program, program_hash, args_json, settings_json, seed, "
            "status, started_at, capsule_version) VALUES ('r6', '/p.py', 'h', '[[], {}]', "
            "'{}', '00', 'completed', 1.0, '0.0.1')"
        )
        connection.executemany(
            "INSERT INTO events VALUES ('r6', ?, 'main', ?, 1.0, ?)",
            [(1, "started", "{}"), (2, "output", big), (3, "completed", "{}")],
        )
        connection.execute(
            "INSERT INTO step_batches VALUES ('r6', 'main', 1, 1, 2, ?, 2.0)", (steps,)
        )
        connection.execute("PRAGMA user_version = 6")
        assert (
            "WITHOUT ROWID"
            in connection.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[
                0
            ]
        )

    connect(journal, create=False).close()  # migrates
    with sqlite3.connect(journal) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for table in ("events", "step_batches"):
            sql = connection.execute(
                "SELECT sql FROM sqlite_master WHERE name = ?", (table,)
            ).fetchone()[0]
            assert "WITHOUT ROWID" not in sql, sql
        rows = connection.execute("SELECT seq, type, data_json FROM events ORDER BY seq")
        assert [tuple(row) for row in rows] == [
            (1, "started", "{}"),
            (2, "output", big),
            (3, "completed", "{}"),
        ]
        view = connection.execute("SELECT step, kind, at FROM steps ORDER BY step").fetchall()
        assert view == [(1, "output", 2.0), (2, "sleep", 2.0)]
        # The unique index keeps (run, seq) a key: a second write replaces.
        connection.execute("INSERT OR REPLACE INTO events VALUES ('r6', 2, 'main', 'x', 1, '{}')")
        assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 3


def _as_schema_2(journal: Path) -> None:
    """Rewrite a journal as Capsule wrote it with schema version 2: a row per step."""
    from capsule.journal.schema import MIGRATIONS
    from capsule.supervisor.steps import json_strings

    create_steps = next(s for s in MIGRATIONS[1] if "CREATE TABLE steps" in s)
    with sqlite3.connect(journal) as connection:
        rows = []
        batches = "SELECT run_id, task_id, attempt, steps_json, committed_at FROM step_batches"
        for run_id, task_id, attempt, steps_json, committed_at in connection.execute(batches):
            for number, kind, request, ok, answer in json.loads(steps_json):
                # Version 2 kept every request as its text.
                text = request if isinstance(request, str) else json_strings(*request)
                rows.append(
                    (run_id, task_id, attempt, number, kind, text, ok, answer, committed_at)
                )
        connection.execute("DROP VIEW steps")
        connection.execute("DROP TABLE step_batches")
        connection.execute(create_steps)
        connection.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        connection.execute("DROP TABLE program_files")  # (version 6)
        _drop_leases(connection)
        connection.execute("DROP TABLE secret_answers")  # (version 11)
        connection.execute("DROP TABLE run_sources")  # (version 12)
        connection.execute("DROP INDEX runs_by_status")
        connection.execute("PRAGMA user_version = 2")


def test_a_run_in_flight_in_a_schema_2_journal_resumes_after_migrating(tmp_path: Path) -> None:
    """Version 3 keeps steps in batches (and 4 a request of strings as their
    array): a run interrupted under version 2 has its steps moved over, and its
    resume replays them."""
    from capsule.journal.schema import SCHEMA_VERSION

    source = """
    from capsule import sleep, task

    @task(name="main", timeout="5m")
    def main() -> str:
        print("MARK one")
        sleep(0.2)
        print("MARK two")
        return "done"
    """
    program = _write(tmp_path, source)
    _run_and_kill(program, "MARK one", 0.0)
    journal = _journal(tmp_path)
    _as_schema_2(journal)
    with sqlite3.connect(journal) as connection:
        old = connection.execute("SELECT kind, request FROM steps ORDER BY step").fetchall()
    assert old[0] == ("output", '["stdout", "MARK one\\n"]')

    resumed = capsule_cli("resume", "--last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "MARK two\ndone\n"  # "MARK one" was replayed, not shown again
    with sqlite3.connect(journal) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        steps = connection.execute("SELECT step, kind, request FROM steps ORDER BY step").fetchall()
        batches = connection.execute("SELECT count(*) FROM step_batches").fetchone()[0]
    assert steps[: len(old)] == [(n + 1, *row) for n, row in enumerate(old)]
    assert [kind for _, kind, _ in steps] == ["output", "sleep", "output"]
    assert batches >= 2  # the migrated step(s), and what the resume journaled
    assert _integrity(journal) == "ok"


def test_a_busy_task_journals_its_steps_a_batch_per_commit(tmp_path: Path, core: str) -> None:
    source = """
    import time
    from capsule import task

    @task(name="main")
    def main() -> int:
        return sum(1 for _ in range(600) if time.time() > 0)
    """
    program = _write(tmp_path, source)
    done = capsule_cli("run", str(program), "--core", core, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(_journal(tmp_path)) as connection:
        steps = connection.execute("SELECT step, kind FROM steps ORDER BY step").fetchall()
        batches = connection.execute(
            "SELECT first_step, last_step, steps_json FROM step_batches ORDER BY first_step"
        ).fetchall()
    assert [kind for _, kind in steps].count("wall_clock") == 600
    assert [number for number, _ in steps] == list(range(1, len(steps) + 1))
    assert len(batches) < 60  # committed some 20 times a second, not once a step
    for first, last, steps_json in batches:
        numbers = [step[0] for step in json.loads(steps_json)]
        assert numbers == list(range(first, last + 1))


def test_the_random_bytes_a_task_sees_are_the_ones_journaled(tmp_path: Path, core: str) -> None:
    # os.urandom in the guest goes through WASI random (a list<u8> per 256
    # bytes), which the host lowers in bulk; an empty draw is one too.
    source = """
    import os
    from capsule import task

    @task(name="main")
    def main() -> list:
        return [os.urandom(300).hex(), os.urandom(0).hex()]
    """
    program = _write(tmp_path, source)
    done = capsule_cli("run", str(program), "--json", "--core", core, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    drawn, empty = json.loads(done.stdout)["result"]
    with sqlite3.connect(_journal(tmp_path)) as connection:
        journaled = connection.execute(
            "SELECT answer FROM steps WHERE kind = 'random' ORDER BY step"
        ).fetchall()
    assert len(drawn) == 600 and empty == ""
    assert drawn in "".join(answer for (answer,) in journaled), (drawn, journaled)
    assert len(set(bytes.fromhex(drawn))) > 100  # not a constant or a pattern


def test_a_step_queued_while_the_writer_sleeps_is_committed(tmp_path: Path) -> None:
    """Steps are queued without the writer's lock; one that comes while the
    writer sleeps (nothing queued, no cancellations to look for) wakes it, and
    is kept as schema 4 keeps it: a request of strings as their array."""
    from capsule.journal.writer import JournalWriter

    journal = tmp_path / "journal.db"

    def steps() -> list[tuple]:
        with sqlite3.connect(journal) as connection:
            return connection.execute(
                "SELECT step, kind, request, ok, answer, at FROM steps"
            ).fetchall()

    with JournalWriter(journal, "run1") as writer:
        time.sleep(0.3)  # the writer has found nothing to write, and sleeps
        before = time.time()
        writer.step("main", 1, 1, "send", ("main/1", "0"), True, '{"id": "main#1"}')
        deadline = time.monotonic() + 10  # generous: a sleeping writer never wakes by itself
        while not steps() and time.monotonic() < deadline:
            time.sleep(0.02)
        [(number, kind, request, ok, answer, at)] = steps()
    assert (number, kind, request, ok, answer) == (
        1,
        "send",
        '["main/1","0"]',
        1,
        '{"id": "main#1"}',
    )
    assert before <= at <= time.time()  # the time of its batch


def test_a_continuation_waiting_for_a_commit_is_told_of_it_or_of_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable step of a task that holds no thread (the async core) waits for
    its commit by continuation: called once it is committed, or, if the journal
    fails first, with why (never left waiting)."""
    import threading

    from capsule.journal.writer import JournalWriter

    told: list[str | None] = []
    each = threading.Event()

    def then(failure: Exception | None) -> None:
        told.append(None if failure is None else str(failure))
        each.set()

    with JournalWriter(tmp_path / "journal.db", "run1") as writer:
        writer.step("main", 1, 1, "http", "GET", True, "{}")
        writer.when_committed(then)
        assert each.wait(30)
        assert told == [None]
        with sqlite3.connect(tmp_path / "journal.db") as connection:
            assert connection.execute("SELECT count(*) FROM steps").fetchone() == (1,)

        def full_disk(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(writer, "_commit", full_disk)
        each.clear()
        writer.step("main", 1, 2, "http", "GET", True, "{}")
        writer.when_committed(then)
        assert each.wait(30)
    assert len(told) == 2 and told[1] is not None and "disk is full" in told[1]


def test_a_resumed_run_keeps_its_entry_point(tmp_path: Path, core: str) -> None:
    source = """
    from capsule import sleep, task

    @task(name="main")
    def main() -> str:
        return "main ran"

    @task(name="slow", timeout="5m")
    def slow(word: str) -> str:
        print("MARK slept")
        sleep(1)
        return f"slow ran with {word}"
    """
    program = _write(tmp_path, source)
    args = ["run", f"{program}:slow", "hi", "--core", core]
    printed, code = kill_at_marker(args, "MARK slept", tmp_path)
    assert code == -signal.SIGKILL, printed
    resumed = capsule_cli("resume", "--last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "slow ran with hi\n"


def test_a_resumed_wait_delivers_the_children_it_delivered_before(
    tmp_path: Path, core: str
) -> None:
    """A wait that returned once some children had ended is replayed with the
    same ones ended, even where more have ended by the time of the resume."""
    source = """
    import capsule
    from capsule import gather, task

    @task
    def quick(tag: str) -> str:
        return tag

    @task
    def slower(tag: str) -> str:
        capsule.sleep(0.3)
        return tag

    @task(name="main", timeout="5m")
    def main() -> list:
        handles = [quick.spawn("a"), slower.spawn("b")]
        done, pending = capsule.wait(handles, return_when=capsule.FIRST_COMPLETED)
        first = sorted(h.result() for h in done)
        print(f"MARK first {first}")
        capsule.sleep(2)
        return [first, gather(*pending)]
    """
    program = _write(tmp_path, source)
    printed = _run_and_kill(program, "MARK first", 1.0, core)  # (slower has ended by then)
    [marker] = _markers(printed)
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    first, rest = json.loads(resumed.stdout)["result"]
    assert marker == f"MARK first {first}"
    assert sorted(first + rest) == ["a", "b"]


def test_a_resumed_wait_that_timed_out_delivers_nothing_and_does_not_wait_again(
    tmp_path: Path, core: str
) -> None:
    """A wait that timed out is replayed as it ended: it delivered no child (not
    one that has ended by the time of the resume), and it is not waited again."""
    source = """
    import capsule
    from capsule import task

    @task
    def slow() -> str:
        capsule.sleep(0.5)
        return "slow"

    @task(name="main", timeout="5m", max_retries=0)
    def main() -> list:
        handle = slow.spawn()
        try:
            handle.result(timeout=0.1)
            first = "ended"
        except TimeoutError:
            first = "timed out"
        print("MARK waited", flush=True)
        capsule.sleep(3)
        return [first, handle.result()]
    """
    program = _write(tmp_path, source)
    _run_and_kill(program, "MARK waited", 1.0, core)  # (slow has ended by then)
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    envelope = json.loads(resumed.stdout)
    assert envelope["result"] == ["timed out", "slow"]
    assert envelope["execution"]["attempts"] == 1  # (its replay did not fail)


def test_connections_creating_a_new_journal_at_once_all_succeed(tmp_path: Path) -> None:
    """Runs that start together on a journal that does not exist yet each make
    it: the one that waited for the lock finds it made, and uses it. (SQLite
    answers a switch to WAL racing another's busy at once, without waiting:
    a few of these trials met it.)"""
    import threading

    from capsule.journal.schema import connect

    failures: list[BaseException] = []
    for trial in range(60):
        journal = tmp_path / f"journal-{trial}.db"
        ready = threading.Barrier(8)

        def open_it(journal: Path = journal, ready: threading.Barrier = ready) -> None:
            ready.wait()
            try:
                connect(journal, create=True).close()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert sqlite3.connect(journal).execute("SELECT count(*) FROM runs").fetchone() == (0,)


RECEIVE_TIMED_OUT = """
import capsule
from capsule import task

@task
def later() -> None:
    capsule.sleep(0.2)
    capsule.send("main", "late")

@task(name="main", max_retries=0)
def main() -> list:
    seen = []
    try:
        capsule.receive(timeout=0.01)
    except capsule.ReceiveTimeout:
        seen.append("timed out")
    later.spawn()
    seen.append(capsule.receive(timeout=30).body)
    print("MARK received", flush=True)
    capsule.sleep(1.5)  # (killed meanwhile; the resume sleeps it)
    return seen
"""


def test_a_receive_that_timed_out_replays_as_a_time_out(tmp_path: Path, core: str) -> None:
    """A receive whose time ran out is a journaled step like any other: the
    resume replays it as the same time-out (it was read as a message, and
    the resumed task trapped)."""
    program = tmp_path / "waits.py"
    program.write_text(textwrap.dedent(RECEIVE_TIMED_OUT))
    printed, code = kill_at_marker(["run", str(program), "--core", core], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == ["timed out", "late"]
