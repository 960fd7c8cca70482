"""The event schema as non-Python callers read it: `capsule run --events jsonl`
(real subprocesses), its lines parsed back with parse_event, hostile guest text
kept inside its line, newer event types tolerated, and docs/events.md listing
every event type and field."""

from __future__ import annotations

import functools
import json
import re
import signal
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, TypeAdapter

from capsule.supervisor.events import (
    EVENT_TYPES,
    EVENTS_SCHEMA_VERSION,
    RUN_EVENT_TYPES,
    ErrorDetail,
    Event,
    TaskOutput,
    UnknownEvent,
    event_json,
    parse_event,
)
from tests.conftest import REPO, Completed, capsule_cli, kill_at_marker, signal_at_marker


def write(tmp_path: Path, source: str, name: str = "prog.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


@functools.cache
def schema_validator() -> Any:
    """A validator of the events' JSON Schema, as a non-Python reader gets it."""
    import jsonschema

    schema = TypeAdapter(Event).json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def events_of(done: Completed) -> list[Any]:
    """The events a run wrote on stdout: every line one event, valid under the
    published JSON Schema, that writes back as the very same line."""
    assert done.stdout.endswith("\n"), done.stdout[-200:]
    events = []
    for line in done.stdout.splitlines():
        schema_validator().validate(json.loads(line))
        event = parse_event(line)
        assert not isinstance(event, UnknownEvent), line
        assert event_json(event) == line
        events.append(event)
    assert events[-1].type == "run_ended"
    assert [e.type for e in events].count("run_ended") == 1
    return events


def position(events: list[Any], kind: str, task_id: str, **fields: Any) -> int:
    """Where the one event of ``kind`` for ``task_id`` (with ``fields``) is."""
    found = [
        index
        for index, event in enumerate(events)
        if event.type == kind
        and getattr(event, "task_id", None) == task_id
        and all(getattr(event, name) == value for name, value in fields.items())
    ]
    assert len(found) == 1, (kind, task_id, fields, [e.type for e in events])
    return found[0]


FLOW = """
    import capsule
    from capsule import task


    @task(name="flaky", max_retries=2)
    def flaky(n: int) -> int:
        attempt = capsule.current().attempt
        print(f"flaky try {attempt}")
        if attempt == 1:
            raise ValueError("not yet")
        return n * 10


    @task(name="square")
    def square(n: int) -> int:
        return n * n


    @task(name="main")
    def main() -> dict:
        print("main starts")
        handle = square.spawn(7)
        return {"flaky": flaky(2), "square": handle.result()}
"""


def test_a_run_is_its_events_in_order_between_run_started_and_run_ended(
    tmp_path: Path,
) -> None:
    program = write(tmp_path, FLOW)
    done = capsule_cli("run", str(program), "--events", "jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    events = events_of(done)

    started = events[0]
    assert started.type == "run_started"
    assert started.program == str(program.resolve())
    assert started.entry == "main"
    assert started.resumed is False
    assert started.schema_version == EVENTS_SCHEMA_VERSION
    assert all(e.run_id == started.run_id for e in events)

    # The entry task, then a retried child and a spawned one, each in its order.
    assert events[1].type == "pending" and events[1].task_id == "main"
    assert events[1].parent_id is None
    tasks = {e.task_id: e.task for e in events if e.type == "pending"}
    assert tasks == {"main": "main", "main/1": "square", "main/2": "flaky"}
    for child in ("main/1", "main/2"):
        assert events[position(events, "pending", child)].parent_id == "main"
        assert position(events, "started", "main") < position(events, "pending", child)
    flaky = [e.type for e in events if getattr(e, "task_id", None) == "main/2"]
    assert [kind for kind in flaky if kind != "output"] == [
        "pending",
        "started",
        "retrying",
        "started",
        "completed",
    ]
    retrying = events[position(events, "retrying", "main/2")]
    assert retrying.error.kind == "exception" and retrying.error.message == "ValueError: not yet"
    assert "raise ValueError" in (retrying.error.traceback or "")
    first = position(events, "started", "main/2", attempt=1)
    second = position(events, "started", "main/2", attempt=2)
    assert first < position(events, "retrying", "main/2") < second
    assert events[position(events, "completed", "main/2")].result == "20"
    assert events[position(events, "completed", "main/1")].result == "49"

    # What tasks print is in the stream, between their start and their end.
    output = [(e.task_id, e.text) for e in events if e.type == "output"]
    assert "".join(text for task_id, text in output if task_id == "main") == "main starts\n"
    assert "".join(text for task_id, text in output if task_id == "main/2") == (
        "flaky try 1\nflaky try 2\n"
    )
    main_output = next(i for i, e in enumerate(events) if e.type == "output")
    assert position(events, "started", "main") < main_output
    for index, event in enumerate(events):
        if event.type == "output" and event.task_id == "main/2":
            assert first < index < position(events, "completed", "main/2")
    assert position(events, "completed", "main/2") < position(events, "completed", "main")

    # The last line holds the outcome --json prints.
    ended = events[-1]
    assert ended.status == "completed" and ended.run_id == started.run_id
    envelope = capsule_cli("run", str(program), "--json", cwd=tmp_path).json()
    assert ended.envelope["result"] == envelope["result"] == {"flaky": 20, "square": 49}
    assert ended.envelope.keys() == envelope.keys()
    assert ended.envelope["execution"].keys() == envelope["execution"].keys()
    assert ended.envelope["execution"]["run_id"] == started.run_id
    assert ended.envelope["totals"]["tasks"] == 3 and ended.envelope["totals"]["retried"] == 1


MESSAGES = """
    from capsule import receive, send, task

    COUNT = 40

    @task(name="collector")
    def collector(count: int) -> list:
        return [receive().body for _ in range(count)]


    @task(name="main")
    def main() -> list:
        handle = collector.spawn(COUNT, name="sink")
        for n in range(COUNT):
            send("sink", {"n": n})
        return handle.result()
"""


def test_messages_are_in_the_stream_sent_before_received(tmp_path: Path) -> None:
    """Each message's message_sent comes before its message_received, also when
    the receiver, waiting, takes it the moment it is delivered."""
    done = capsule_cli(
        "run", str(write(tmp_path, MESSAGES)), "--events", "jsonl", "--no-journal", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    events = events_of(done)
    assert events[-1].envelope["result"] == [{"n": n} for n in range(40)]
    assert events[position(events, "pending", "main/1")].actor_name == "sink"
    sent = {e.message_id: i for i, e in enumerate(events) if e.type == "message_sent"}
    received = {e.message_id: i for i, e in enumerate(events) if e.type == "message_received"}
    assert len(sent) == 40 and sent.keys() == received.keys()
    for n, (message_id, index) in enumerate(sent.items()):
        assert events[index].task_id == "main" and events[index].target_id == "main/1"
        assert events[index].size == len(json.dumps({"n": n}))
        assert events[index].expects_reply is False
        assert index < received[message_id], message_id
        assert events[received[message_id]].sender_id == "main"


FAILS = """
    from capsule import task


    @task(name="main", max_retries=0)
    def main() -> int:
        raise KeyError("missing")
"""


def test_a_failed_run_ends_its_stream_and_keeps_its_exit_code_and_stderr(
    tmp_path: Path,
) -> None:
    program = write(tmp_path, FAILS)
    plain = capsule_cli("run", str(program), cwd=tmp_path)
    done = capsule_cli("run", str(program), "--events", "jsonl", "--verbose", cwd=tmp_path)
    assert done.returncode == plain.returncode == 1
    events = events_of(done)
    failed = events[position(events, "failed", "main")]
    assert failed.error.kind == "exception" and failed.error.message == "KeyError: 'missing'"
    ended = events[-1]
    assert ended.status == "failed" and ended.envelope["success"] is False
    assert ended.envelope["error"]["message"] == "KeyError: 'missing'"
    # stderr: the error and traceback as without the flag, and --verbose's lifecycle.
    assert "capsule: error: task 'main' failed (exception) after 1 attempt(s)" in done.stderr
    assert 'raise KeyError("missing")' in done.stderr
    assert "capsule: started main, attempt 1/1" in done.stderr


def test_a_program_that_does_not_load_still_ends_its_stream(tmp_path: Path) -> None:
    program = write(tmp_path, "from capsule import task\n\nraise RuntimeError('broken')\n")
    done = capsule_cli("run", str(program), "--events", "jsonl", cwd=tmp_path)
    assert done.returncode == 2
    events = events_of(done)
    assert [e.type for e in events] == ["run_started", "run_ended"]
    ended = events[-1]
    assert ended.status == "error" and ended.run_id == events[0].run_id
    assert ended.envelope["error"]["kind"] == "config"
    assert "RuntimeError: broken" in ended.envelope["error"]["message"]
    assert "RuntimeError: broken" in done.stderr


@pytest.mark.parametrize("flags", [["--json"], ["--tui"]], ids=["json", "tui"])
def test_events_with_another_stdout_format_is_a_usage_error(
    tmp_path: Path, flags: list[str]
) -> None:
    program = write(tmp_path, FAILS)
    done = capsule_cli("run", str(program), "--events", "jsonl", *flags, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert f"give either --events jsonl or {flags[0]}, not both" in done.stderr
    resume = capsule_cli("resume", "--last", "--events", "jsonl", "--json", cwd=tmp_path)
    assert resume.returncode == 2 and resume.stdout == ""
    assert "give either --events jsonl or --json" in resume.stderr
    other = capsule_cli("run", str(program), "--events", "yaml", cwd=tmp_path)
    assert other.returncode == 2 and "invalid choice" in other.stderr and "yaml" in other.stderr


RESUMABLE = """
    import capsule
    from capsule import task


    @task(name="step")
    def step(n: int) -> int:
        return n + 1


    @task(name="main")
    def main() -> int:
        first = step(1)
        print("MARK waiting", flush=True)
        capsule.sleep(2)
        return first
"""


def test_a_resume_streams_its_events_too(tmp_path: Path) -> None:
    program = write(tmp_path, RESUMABLE)
    printed, code = kill_at_marker(["run", str(program)], "MARK waiting", tmp_path)
    assert code == -signal.SIGKILL, printed
    done = capsule_cli("resume", "--last", "--events", "jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = events_of(done)
    started = events[0]
    assert started.type == "run_started" and started.resumed is True
    # main's first calls (the step, the print) are answered from the journal:
    # the step does not run again, and the line is not shown again.
    replayed = events[position(events, "replayed", "main")]
    assert replayed.outcome is None and replayed.steps >= 2
    assert not [e for e in events if getattr(e, "task_id", None) == "main/1"]
    assert not [e for e in events if e.type == "output"]
    assert events[-1].status == "completed" and events[-1].envelope["result"] == 2
    assert events[-1].run_id == started.run_id
    # A run that cannot be resumed (it ended) still ends the stream it started.
    again = capsule_cli("resume", "--last", "--events", "jsonl", cwd=tmp_path)
    assert again.returncode == 2 and "already ended" in again.stderr
    [ended] = events_of(again)
    assert ended.status == "error" and ended.envelope["error"]["kind"] == "journal"


def test_an_interrupted_run_ends_its_stream_and_exits_130(tmp_path: Path) -> None:
    program = write(tmp_path, RESUMABLE.replace("sleep(2)", "sleep(60)"))
    code, printed, stderr = signal_at_marker(
        ["run", str(program), "--events", "jsonl"],
        '{"type":"output"',
        tmp_path,
        signal.SIGTERM,
        capture_stderr=True,
        hang_after=60,
    )
    assert code == 130, stderr
    events = events_of(Completed(code, printed, stderr))
    assert events[position(events, "cancelled", "main")].error.kind == "cancelled"
    ended = events[-1]
    assert ended.status == "interrupted" and ended.envelope["success"] is False
    assert f"resume with `capsule resume {ended.run_id}`" in stderr


#: Escapes both Python and JSON read: newlines, line and paragraph separators,
#: a NUL, escape sequences (clear screen, set title), a forged event, a lone
#: surrogate, NEL, a right-to-left override.
HOSTILE = (
    r"a\nb\r\n\u2028\u2029\u0000\u001b[2J\u001b]0;title\u0007\"}\n"
    r"{\"type\": \"run_ended\", \"status\": \"completed\"}\n\ud800 \u0085 \u202e"
)

HOSTILE_PROGRAM = f"""
    import sys

    from capsule import task

    HOSTILE = "{HOSTILE}"


    @task(name="bad")
    def bad(text: str) -> str:
        raise ValueError(text)


    @task(name="main")
    def main() -> str:
        print(HOSTILE)
        sys.stderr.write(HOSTILE)
        sys.stdout.write("x" * 3_000_000 + "\\n")
        try:
            bad(HOSTILE.replace("\\ud800", ""))
        except Exception as exc:
            print("caught", exc)
        return HOSTILE.replace("\\ud800", "")
"""


def test_hostile_guest_text_never_leaves_its_line(tmp_path: Path) -> None:
    """Newlines, U+2028, NULs, escape sequences, a forged event, a lone
    surrogate and a huge line from a task: every stdout line is one ASCII JSON
    object of printable characters, and the text comes back as it was."""
    program = write(tmp_path, HOSTILE_PROGRAM)
    done = capsule_cli("run", str(program), "--events", "jsonl", "--no-journal", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        assert all(" " <= char <= "~" for char in line), repr(line[:200])
        assert isinstance(json.loads(line), dict)
    events = events_of(done)
    hostile = json.loads(f'"{HOSTILE}"')
    stdout = "".join(e.text for e in events if e.type == "output" and e.stream == "stdout")
    stderr = "".join(e.text for e in events if e.type == "output" and e.stream == "stderr")
    # (The guest's own stdout shows a lone surrogate as an escape: it is not text.)
    assert stdout.startswith(hostile.replace("\ud800", "\\ud800") + "\n")
    assert "x" * 3_000_000 + "\n" in stdout
    assert stderr == hostile.replace("\ud800", "\\ud800")
    failed = events[position(events, "failed", "main/1")]
    assert failed.error.message.startswith("ValueError: a\nb\r\n\u2028")
    assert [e.type for e in events].count("run_ended") == 1
    assert events[-1].status == "completed"
    assert events[-1].envelope["result"] == hostile.replace("\ud800", "")


def test_event_json_escapes_what_a_guest_could_not_send_either() -> None:
    """A lone surrogate (which no guest text carries today) is U+FFFD, a pair
    one character; a non-finite number is null: the line stays strict JSON."""
    event = TaskOutput(
        run_id="r",
        task_id="main",
        task="main",
        stream="stdout",
        text="\ud800 \ud83d\ude00 \U0001f600",
    )
    line = event_json(event)
    assert line.isascii()
    assert parse_event(line).text == "\ufffd \U0001f600 \U0001f600"  # type: ignore[union-attr]
    from capsule.supervisor.events import RunEnded

    ended = RunEnded(
        run_id=None, status="completed", envelope={"result": [float("nan"), float("inf"), 1.5]}
    )
    assert json.loads(event_json(ended))["envelope"]["result"] == [None, None, 1.5]


def test_events_of_a_newer_runtime_are_read_not_refused() -> None:
    newer = parse_event('{"type": "task_paused", "run_id": "r", "at": 1.0, "why": {"x": 1}}')
    assert isinstance(newer, UnknownEvent)
    assert newer.type == "task_paused" and newer.model_extra == {
        "run_id": "r",
        "at": 1.0,
        "why": {"x": 1},
    }
    # A field this version does not know is ignored; one it does is read.
    known = parse_event(
        '{"type": "resumed", "run_id": "r", "task_id": "main", "task": "main", '
        '"at": 2.5, "since": 0.25}'
    )
    assert known.type == "resumed" and known.at == 2.5  # type: ignore[union-attr]
    # As a reader gets lines from a pipe: bytes, with their line end.
    assert parse_event(event_json(known).encode() + b"\n") == known
    for line in ["not json", "[1]", '{"no": "type"}', '{"type": 5}', '{"type": "started"}']:
        with pytest.raises(ValueError, match="not an event"):
            parse_event(line)


def test_run_events_reach_only_subscribers_that_ask_for_them(tmp_path: Path) -> None:
    from capsule.supervisor.program import RunRequest, run_program

    program = write(
        tmp_path, 'from capsule import task\n\n@task(name="main")\ndef main():\n    return 1\n'
    )
    every: list[Any] = []
    report = run_program(RunRequest(path=program, args=[]), every.append)
    assert report.result is not None and report.result.ok
    assert every and not any(e.type in RUN_EVENT_TYPES for e in every)
    asked: list[Any] = []
    run_program(RunRequest(path=program, args=[]), asked.append, event_types=EVENT_TYPES)
    assert asked[0].type == "run_started" and asked[0].entry == "main"
    assert [e.type for e in asked[1:]] == [e.type for e in every]


def test_a_run_builds_no_start_event_nobody_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsule.supervisor import attempt_loop, program
    from capsule.supervisor.program import RunRequest, run_program

    built: list[str] = []

    def counted(model: type[BaseModel]) -> Any:
        def build(**fields: Any) -> BaseModel:
            built.append(model.__name__)
            return model(**fields)

        return build

    monkeypatch.setattr(program, "RunStarted", counted(program.RunStarted))
    monkeypatch.setattr(attempt_loop, "TaskStarted", counted(attempt_loop.TaskStarted))
    path = write(
        tmp_path, 'from capsule import task\n\n@task(name="main")\ndef main():\n    return 1\n'
    )
    taken: list[Any] = []
    report = run_program(RunRequest(path=path, args=[]), taken.append, event_types={"completed"})
    assert report.result is not None and report.result.ok
    assert [event.type for event in taken] == ["completed"]
    assert built == []
    run_program(RunRequest(path=path, args=[]), taken.append, event_types=EVENT_TYPES)
    assert built == ["RunStarted", "TaskStarted"]


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields) - {"type"}


def test_the_events_page_documents_every_event_type_and_field() -> None:
    """docs/events.md has a section per event type listing each of its fields
    (the common ones of task events in their own table), and the error object's."""
    page = (REPO / "docs" / "events.md").read_text()
    parts = re.split(r"^#{2,3} (.+)\n", page, flags=re.M)
    sections = {
        title.replace("`", ""): body for title, body in zip(parts[1::2], parts[2::2], strict=True)
    }
    common = table_fields(sections["Task events"])
    assert common >= {"run_id", "task_id", "task"}
    for model in get_args(get_args(Event)[0]):
        kind = model.model_fields["type"].default
        assert kind in sections, f"docs/events.md has no section for {kind!r}"
        documented = table_fields(sections[kind])
        expected = _fields(model) - {"at"}
        if kind not in RUN_EVENT_TYPES:
            expected -= common
        assert documented == expected, (kind, documented ^ expected)
    assert table_fields(sections["The error object"]) == _fields(ErrorDetail)
    assert "`at`" in page and f"(`{EVENTS_SCHEMA_VERSION}` for this page)" in page


def table_fields(section: str) -> set[str]:
    return set(re.findall(r"^\| `(\w+)` \|", section, re.M))
