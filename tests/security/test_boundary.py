"""Hostile guests at the host-guest boundary: whatever a task hands the host
(message bodies, results, failures, call requests), through the SDK or the raw
WIT imports, it fails only that task, with kind ``protocol``: no forged
message reaches another task, no host traceback, no poisoned journal; on
either core."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Completed, capsule_cli
from tests.security.support import core_flags


def strict_json(text: str) -> Any:
    """``text`` as JSON, refusing what Python's json takes beyond it (NaN, Infinity)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def hostile_run(
    tmp_path: Path, core: str, source: str, *args: str
) -> tuple[dict[str, Any], Completed]:
    """Run ``source`` with ``capsule run --json`` on ``core``; the envelope and
    the process. Asserts what must hold of any run, however hostile: the
    envelope is JSON, the host printed no traceback of its own, the journal
    (if the core keeps one) reads back."""
    path = tmp_path / "hostile.py"
    path.write_text(textwrap.dedent(source))
    done = capsule_cli("run", str(path), "--json", *core_flags(core), *args, cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    envelope = strict_json(done.stdout)
    inspected = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    strict_json(inspected.stdout)
    return envelope, done


def assert_protocol_failure(envelope: dict[str, Any], done: Completed, *phrases: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    error = envelope["error"]
    assert error["kind"] == "protocol", error
    assert envelope["execution"]["attempts"] == 1  # a protocol failure is not retried
    for phrase in phrases:
        assert phrase in error["message"], error["message"]


def test_a_body_cannot_forge_messages_for_its_receiver(tmp_path: Path, core: str) -> None:
    """A body spliced into the receive envelope could close it and add messages
    with any sender and id: bodies are checked as one JSON value when sent, and
    cross to the receiver as a record field."""
    envelope, done = hostile_run(
        tmp_path,
        core,
        """
        from capsule import receive, task
        from wit_world.imports import messaging

        @task(name="victim", timeout="10s")
        def victim():
            message = receive(timeout=5)
            return [message.id, message.sender, message.body]

        @task(name="main", max_retries=2)
        def main():
            handle = victim.spawn()
            forged = '1],["main/9#1","forged-sender",{"evil":1},false'
            messaging.send(handle.id, forged, None)
            return "the forged send was accepted"
        """,
    )
    assert_protocol_failure(envelope, done, "the body of a message to 'main/1' is not valid JSON")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("NaN", "not valid JSON"),
        ("[Infinity]", "not valid JSON"),
        ('{"n": 1e999}', "number too large"),
        ('"\\ud800"', "lone surrogate"),
        ('["\\udc00 tail"]', "lone surrogate"),
        ("[" * 300 + "]" * 300, "deeper than 200"),
        ("1 2", "trailing characters"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_bodies_fail_their_sender_and_spare_the_receiver(
    tmp_path: Path, core: str, body: str, why: str
) -> None:
    """Each raw body is refused where it enters; the receiver, which would have
    crashed parsing it, never sees it, and is cancelled with its parent."""
    envelope, done = hostile_run(
        tmp_path,
        core,
        f"""
        from capsule import receive, task
        from wit_world.imports import messaging

        @task(name="receiver", timeout="10s")
        def receiver():
            return receive(timeout=5).body

        @task(name="main")
        def main():
            handle = receiver.spawn()
            messaging.send(handle.id, {body!r}, None)
            return "sent"
        """,
    )
    assert_protocol_failure(envelope, done, why)
    tasks = json.loads(capsule_cli("inspect", "--last", "--json", cwd=tmp_path).stdout)["tasks"]
    receiver = next(t for t in tasks if t["name"] == "receiver")
    assert receiver["status"] == "cancelled", receiver


def test_a_malformed_reply_fails_the_replier_and_the_asker_is_told(
    tmp_path: Path, core: str
) -> None:
    envelope, done = hostile_run(
        tmp_path,
        core,
        """
        from capsule import MessageError, ask, receive, task
        from wit_world.imports import messaging

        @task(name="liar", timeout="10s", restart="temporary")
        def liar():
            message = receive(timeout=5)
            messaging.reply(message.id, '{"ok": true}, "extra"')
            return "replied"

        @task(name="main")
        def main():
            handle = liar.spawn()
            try:
                return ask(handle, "question", timeout=5)
            except MessageError as exc:
                failure = None
                try:
                    handle.result()
                except Exception as child:
                    failure = child.kind
                return {"asker": exc.kind, "replier": failure}
        """,
    )
    assert done.returncode == 0, done.stderr
    assert envelope["result"] == {"asker": "actor_ended", "replier": "protocol"}


@pytest.mark.parametrize(
    ("result", "why"),
    [
        ("NaN", "not valid JSON"),
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('"unterminated', "not valid JSON"),
        ("1e400", "number too large"),
        ('{"a": 1' + "0" * 400 + ".5}", "number too large"),  # (no exponent)
        ('"ok" ["second value"]', "trailing characters"),
    ],
)
def test_a_result_that_is_not_json_fails_the_task_not_the_host(
    tmp_path: Path, core: str, result: str, why: str
) -> None:
    """A guest that replaces its own encoder returns whatever text it likes;
    the host refuses it before any event, journal row or output holds it."""
    envelope, done = hostile_run(
        tmp_path,
        core,
        f"""
        import capsule_guest
        from capsule import task

        @task(name="main", max_retries=3)
        def main():
            capsule_guest._dumps = lambda value: {result!r}
            return "anything"
        """,
    )
    assert_protocol_failure(envelope, done, "the result of task 'main'", why)


def test_a_childs_bad_result_is_its_own_protocol_failure(tmp_path: Path, core: str) -> None:
    envelope, done = hostile_run(
        tmp_path,
        core,
        """
        import capsule_guest
        from capsule import TaskError, task

        @task(name="child")
        def child():
            capsule_guest._dumps = lambda value: "[1, 2"
            return 0

        @task(name="main")
        def main():
            try:
                return child()
            except TaskError as exc:
                return [exc.kind, exc.task]
        """,
    )
    assert done.returncode == 0
    assert envelope["result"] == ["protocol", "child"]


@pytest.mark.parametrize("kind", ["cancelled", "timeout", "divergence", "restart_intensity", ""])
def test_a_guest_cannot_report_a_failure_only_the_host_decides(
    tmp_path: Path, core: str, kind: str
) -> None:
    """A claimed ``cancelled`` would dodge retries, a claimed ``divergence``
    would stop the run: a task may report exception, bad_arguments or
    memory_limit only."""
    envelope, done = hostile_run(
        tmp_path,
        core,
        f"""
        import capsule_guest
        from capsule import task

        @task(name="main", max_retries=2)
        def main():
            capsule_guest._failure = lambda task, exc, fn: capsule_guest._err({kind!r}, "claimed")
            raise RuntimeError("boom")
        """,
    )
    assert_protocol_failure(envelope, done, f"reported a failure of kind {kind!r}")


def test_huge_and_odd_failure_texts_are_bounded_and_the_journal_survives(
    tmp_path: Path, core: str
) -> None:
    """A 60 MB exception (twice, with a retry) and lone surrogates in the
    failure's texts: the failure keeps the head of the message and both ends of
    the traceback, and the journal stays small and readable."""
    envelope, done = hostile_run(
        tmp_path,
        core,
        """
        import capsule_guest
        from capsule import task

        @task(name="main", ram="1GB", compute="HIGH", max_retries=1)
        def main():
            raise ValueError("\\ud800 start " + "x" * (60 * 1024 * 1024) + " end")
        """,
    )
    assert done.returncode == 1
    error = envelope["error"]
    assert error["kind"] == "exception"
    assert error["message"].startswith("ValueError: \\ud800 start xxx")
    assert "characters not kept" in error["message"]
    assert error["message"].endswith(" end")
    assert len(error["message"]) < 20_000
    assert "characters not kept" in error["traceback"]
    assert len(error["traceback"]) < 70_000
    journal = tmp_path / ".capsule" / "journal.db"
    size = sum(p.stat().st_size for p in journal.parent.glob("journal.db*"))
    assert size < 4 * 1024**2, size


def test_a_failure_with_a_lone_surrogate_cannot_kill_the_journal(tmp_path: Path, core: str) -> None:
    """Raw failure records with lone surrogates cannot even be handed over
    (WIT strings are UTF-8): the attempt traps, the journal writer lives, the
    run ends normally and reads back."""
    envelope, done = hostile_run(
        tmp_path,
        core,
        """
        import capsule_guest
        from capsule import task

        @task(name="main", max_retries=0)
        def main():
            capsule_guest._text = lambda value: value  # no more escaping
            print("before \\ud800 after")
            raise ValueError("\\udfff")
        """,
    )
    assert done.returncode == 1
    assert envelope["error"]["kind"] in ("trap", "exception"), envelope["error"]


def test_prints_with_lone_surrogates_are_shown_escaped(tmp_path: Path, core: str) -> None:
    path = tmp_path / "prints.py"
    path.write_text(
        textwrap.dedent(
            """
            from capsule import task

            @task(name="main")
            def main():
                print("a \\ud800 b")
                return "done"
            """
        )
    )
    done = capsule_cli("run", str(path), *core_flags(core), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a \\ud800 b\ndone\n"


@pytest.mark.parametrize(
    ("call", "why"),
    [
        ('tasks.call("main", "[1, 2]")', "must be a JSON object"),
        ('tasks.call("main", \'{"args": [], "kwargs": {}, "x": 1}\')', "must be a JSON object"),
        ('tasks.call("main", \'{"args": [NaN], "kwargs": {}}\')', "not valid JSON"),
        ('tasks.call("m" * 5000, \'{"args": [], "kwargs": {}}\')', "names are at most"),
        ('tasks.spawn("main", \'{"args": [], "kwargs": {}}\', "[]")', "spawn options"),
        (
            'tasks.spawn("main", \'{"args": [], "kwargs": {}}\', \'{"actor_name": 7}\')',
            "an actor name must be a string",
        ),
        (
            'tasks.spawn("main", \'{"args": [], "kwargs": {}}\', \'{"awaited": "yes"}\')',
            "must be true or false",
        ),
        ('tasks.wait("{}", None)', "array of strings"),
        ('tasks.wait("[1, 2]", None)', "array of strings"),
        ('tasks.wait_any("[1, 2]", None)', "array of strings"),
        (
            'tasks.spawn("main", \'{"args": [], "kwargs": {}}\', \'{"link": 1}\')',
            "must be true or false",
        ),
        ('tasks.cancel("x" * 100000)', "names are at most"),
        ('messaging.send("t" * 2000, "1", None)', "names are at most"),
        ('messaging.reply("i" * 2000, "1")', "names are at most"),
    ],
)
def test_malformed_requests_through_the_raw_imports_are_protocol_failures(
    tmp_path: Path, core: str, call: str, why: str
) -> None:
    envelope, done = hostile_run(
        tmp_path,
        core,
        f"""
        from capsule import task
        from wit_world.imports import messaging, tasks

        @task(name="main")
        def main():
            {call}
            return "the host took it"
        """,
    )
    assert_protocol_failure(envelope, done, why)


def test_module_level_code_that_fakes_the_program_description_is_refused(
    tmp_path: Path,
    core: str,
) -> None:
    """What a program's import returns is the guest's word too: a description
    that is not a list of tasks stops the run with a clear error (exit 2)."""
    path = tmp_path / "faker.py"
    path.write_text(
        textwrap.dedent(
            """
            import capsule_guest
            from capsule import task
            from capsule.sdk import task as sdk_task

            class Weird:
                name = 3
                qualified_name = None
                options = []

            sdk_task.registry["x"] = Weird()

            @task(name="main")
            def main():
                return 1
            """
        )
    )
    done = capsule_cli("run", str(path), *core_flags(core), cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert "description of its tasks is malformed" in done.stderr


def test_the_journal_of_a_hostile_run_resumes_and_inspects(tmp_path: Path, core: str) -> None:
    """After protocol failures the journal is consistent: every step batch is
    JSON, and an interrupted run of the same program resumes."""
    hostile_run(
        tmp_path,
        core,
        """
        from capsule import task
        from wit_world.imports import messaging

        @task(name="main", max_retries=0)
        def main():
            print("some output")
            messaging.send("nobody", "not json", None)
        """,
    )
    with sqlite3.connect(tmp_path / ".capsule" / "journal.db") as db:
        for (batch,) in db.execute("SELECT steps_json FROM step_batches"):
            json.loads(batch)
