"""`capsule send` and `capsule ask`: messages from outside into a running run's
actors, as a user types them (real runs, real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import ProgramRunner, capsule_cli

if TYPE_CHECKING:
    from capsule.supervisor.run_loop import RunLoop


def _write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "flow.py"
    path.write_text(textwrap.dedent(source))
    return path


@contextmanager
def _running(
    args: list[str], marker: str, cwd: Path, stream: str = "stdout"
) -> Iterator[subprocess.Popen[str]]:
    """`capsule ARGS`, running, once it printed a line starting with ``marker``
    (on ``stream``)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        lines = process.stdout if stream == "stdout" else process.stderr
        assert lines is not None
        seen = []
        for line in lines:
            seen.append(line)
            if line.startswith(marker):
                break
        else:
            raise AssertionError(f"the run ended before {marker!r}: {seen}")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


def _run_id(cwd: Path) -> str:
    runs = capsule_cli("runs", "--json", cwd=cwd)
    assert runs.returncode == 0, runs.stderr
    run_id = json.loads(runs.stdout)[0]["run_id"]
    assert isinstance(run_id, str)
    return run_id


APPROVAL = """
    from capsule import receive, task

    @task(name="approver", timeout="2m")
    def approver():
        print("MARK waiting for approval", flush=True)
        approval = receive(timeout=100)
        question = receive(timeout=100)
        question.reply({"echo": question.body, "sender": question.sender})
        return {"approval": approval.body, "from": approval.sender}

    @task(name="main", timeout="2m")
    def main():
        return approver.spawn(name="approver").result()
"""


def test_send_approves_an_actor_waiting_in_receive_and_ask_gets_its_reply(
    tmp_path: Path, core: str
) -> None:
    from capsule.supervisor.inbox import socket_path

    program = _write(tmp_path, APPROVAL)
    with _running(["run", str(program), "--core", core], "MARK waiting", tmp_path) as process:
        run_id = _run_id(tmp_path)
        path = socket_path(run_id)
        # Only the run's user reaches it.
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
        sent = capsule_cli("send", run_id[:6], "approver", '{"approved": true}', cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
        asked = capsule_cli("ask", run_id, "approver", '["is", 2]', "--timeout", "60", cwd=tmp_path)
        assert asked.returncode == 0, asked.stderr
        assert json.loads(asked.stdout) == {"echo": ["is", 2], "sender": "cli"}
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert json.loads(out) == {"approval": {"approved": True}, "from": "cli"}
    assert not socket_path(run_id).exists()  # removed as the run ended


ACTORS = """
    from capsule import receive, sleep, task

    @task(name="sleeper", timeout="2m")
    def sleeper():
        sleep(100)  # never takes its messages

    @task(name="deaf", timeout="2m")
    def deaf():
        while True:
            receive()  # never replies

    @task(name="main", timeout="2m")
    def main():
        sleeper.spawn(name="sleeper")
        deaf.spawn(name="deaf")
        print("MARK ready", flush=True)
        return receive(timeout=100).body
"""


def test_each_refusal_has_its_own_exit_code_and_says_why(tmp_path: Path, core: str) -> None:
    program = _write(tmp_path, ACTORS)
    args = ["run", str(program), "--mailbox-capacity", "1", "--core", core]
    with _running(args, "MARK ready", tmp_path) as process:
        run_id = _run_id(tmp_path)

        def send(*args: str) -> tuple[int, str]:
            done = capsule_cli(*args, cwd=tmp_path)
            assert "Traceback" not in done.stderr, done.stderr
            return done.returncode, done.stderr

        assert send("send", run_id, "sleeper", "1") == (0, "")
        code, err = send("send", run_id, "sleeper", "2")
        assert code == 7 and "mailbox of 'sleeper' is full" in err
        code, err = send("send", run_id, "nobody", "1")
        assert code == 6 and "'nobody'" in err
        code, err = send("send", run_id, "sleeper", "{not json")
        assert code == 2 and "give the message as JSON" in err
        code, err = send("ask", run_id, "deaf", '"hello?"', "--timeout", "0.5")
        assert code == 8 and "no reply from 'deaf' within 0.5s" in err
        code, err = send("send", "ffffffffffff", "deaf", "1")
        assert code == 4 and "no running run has the id 'ffffffffffff'" in err
        code, err = send("send", run_id, "", "1")
        assert code == 2 and "NAME '' is not" in err
        code, err = send("send", "../../etc", "deaf", "1")
        assert code == 2 and "is not a run id" in err
        assert send("send", run_id, "main", '"stop"') == (0, "")
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert out == "stop\n"
    code, err = send("send", run_id, "main", "1")
    assert code == 5 and f"run {run_id} is not running (completed)" in err


def test_a_client_that_sends_garbage_or_nothing_does_not_hold_up_the_run(
    tmp_path: Path, core: str
) -> None:
    from capsule.supervisor.inbox import socket_path

    program = _write(tmp_path, ACTORS)
    with _running(["run", str(program), "--core", core], "MARK ready", tmp_path) as process:
        run_id = _run_id(tmp_path)
        path = str(socket_path(run_id))
        with socket.socket(socket.AF_UNIX) as garbage:
            garbage.connect(path)
            garbage.sendall(b'{"op": "send", "to": "main", "body": NaN}')
            garbage.shutdown(socket.SHUT_WR)
            answer = json.loads(garbage.makefile().read())
        assert answer["ok"] is False and answer["kind"] == "bad_request"
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(path)  # sends nothing, and stays while the run ends
            assert capsule_cli("send", run_id, "main", '"done"', cwd=tmp_path).returncode == 0
            out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert out == "done\n"


def test_a_message_from_outside_is_journaled_and_replayed_on_resume(
    tmp_path: Path, core: str
) -> None:
    program = _write(
        tmp_path,
        """
        from capsule import receive, sleep, task

        @task(name="main", timeout="2m")
        def main():
            print("MARK waiting", flush=True)
            approval = receive(timeout=100)
            print("MARK got it", flush=True)
            sleep(2)
            return {"approval": approval.body, "from": approval.sender}
        """,
    )
    with _running(["run", str(program), "--core", core], "MARK waiting", tmp_path) as process:
        run_id = _run_id(tmp_path)
        assert capsule_cli("send", run_id, "main", "[42]", cwd=tmp_path).returncode == 0
        assert process.stdout is not None
        assert process.stdout.readline().startswith("MARK got it")
        process.send_signal(signal.SIGKILL)
    resumed = capsule_cli("resume", run_id, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"approval": [42], "from": "cli"}


def test_a_message_sent_and_not_yet_received_is_delivered_after_a_resume(
    tmp_path: Path, core: str
) -> None:
    program = _write(
        tmp_path,
        """
        from capsule import receive, task

        @task(name="gate", timeout="2m")
        def gate():
            return receive(timeout=100).body

        @task(name="main", timeout="2m")
        def main():
            opened = gate.spawn(name="gate")
            print("MARK ready", flush=True)
            opened.result()  # killed here, with a message in main's mailbox
            return receive(timeout=100).body
        """,
    )
    with _running(["run", str(program), "--core", core], "MARK ready", tmp_path) as process:
        run_id = _run_id(tmp_path)
        assert capsule_cli("send", run_id, "main", '"kept"', cwd=tmp_path).returncode == 0
        process.send_signal(signal.SIGKILL)
    resume = ["resume", run_id, "--verbose"]
    with _running(resume, "capsule: replaying main/1 (gate", tmp_path, "stderr") as process:
        assert capsule_cli("send", run_id, "gate", '"open"', cwd=tmp_path).returncode == 0
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out == "kept\n"


def test_no_task_may_register_as_the_sender_of_messages_from_outside(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        """
        from capsule import TaskError, task

        @task(name="impostor")
        def impostor():
            return 1

        @task(name="main")
        def main():
            try:
                impostor.spawn(name="cli")
            except TaskError as exc:
                return exc.message
            return "registered"
        """
    )
    assert "the name 'cli' is the sender of messages from outside the run" in outcome.value


@pytest.fixture(params=["own loop", "run's loop"])
def inbox_loop(request: pytest.FixtureRequest) -> Iterator[RunLoop | None]:
    """The loop a RunInbox serves on: one of its own (a run with none, on the
    thread core), or a run's (the async core's)."""
    from capsule.supervisor.run_loop import RunLoop

    if request.param == "own loop":
        yield None
        return
    loop = RunLoop("capsule-loop inbox-test")
    loop.start()
    try:
        yield loop
    finally:
        loop.close()


def test_a_request_over_the_runs_message_size_is_refused_unread(
    inbox_loop: RunLoop | None,
) -> None:
    from capsule.actors.external import ExternalMessages
    from capsule.actors.router import Router
    from capsule.supervisor.inbox import REQUEST_OVERHEAD_BYTES, RunInbox
    from capsule.supervisor.inbox_client import request

    router = Router(mailbox_capacity=10, max_queued_bytes=2**28)
    router.open("main")
    delivered: list[str] = []
    external = ExternalMessages(router, 1000, lambda message, _: delivered.append(message.id))
    with RunInbox("bounds-test", external, inbox_loop) as inbox:
        huge = "x" * (1000 + REQUEST_OVERHEAD_BYTES)
        answer = request(inbox.path, {"op": "send", "to": "main", "body": huge}, 60)
        assert answer["ok"] is False and answer["kind"] == "too_large"
        small = request(inbox.path, {"op": "send", "to": "main", "body": "x" * 999}, 60)
        assert small["ok"] is False and "exceeds the run's limit of 1,000 bytes" in small["message"]
        fits = request(inbox.path, {"op": "send", "to": "main", "body": [1]}, 60)
        assert fits["ok"] is True and fits["to"] == "main"
        for shape in ({"op": "exec", "to": "main", "body": 1}, {"to": "main"}, [1]):
            wrong = request(inbox.path, shape, 60)  # type: ignore[arg-type]
            assert wrong["ok"] is False and wrong["kind"] == "bad_request", shape
    assert delivered == [fits["id"]]
    assert not inbox.path.exists()


def test_a_message_delivered_as_the_run_ends_still_gets_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inbox_loop: RunLoop | None
) -> None:
    """The run may end the moment its task takes the message (its last act):
    closing the inbox then must not cut the answer to the sender."""
    from capsule.actors.external import Delivered, ExternalMessages
    from capsule.actors.router import Router
    from capsule.supervisor.inbox import RunInbox
    from capsule.supervisor.inbox_client import request

    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path))
    closing = threading.Thread()

    class EndsTheRunOnDelivery(ExternalMessages):
        def send(self, target: str, body_json: str) -> Delivered:
            nonlocal closing
            closing = threading.Thread(target=inbox.close)
            closing.start()
            while not _waiting_in_close(closing, inbox):  # (the run waits for the inbox)
                time.sleep(0.001)
            return Delivered("cli#1", "main")

    external = EndsTheRunOnDelivery(
        Router(mailbox_capacity=8, max_queued_bytes=2**28), 1 << 20, lambda message, target: None
    )
    inbox = RunInbox("abcdef123456", external, inbox_loop)
    inbox.start()
    answer = request(inbox.path, {"op": "send", "to": "main", "body": "1"}, timeout=30)
    closing.join()
    assert answer == {"ok": True, "id": "cli#1", "to": "main"}


def test_a_request_the_inbox_fails_on_is_answered_and_the_inbox_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inbox_loop: RunLoop | None
) -> None:
    """A failure answering a request (a bug) is told to its client, and the
    inbox (on the run's loop: the run's tasks with it) goes on."""
    from capsule.actors.external import Delivered, ExternalMessages
    from capsule.actors.router import Router
    from capsule.supervisor.inbox import RunInbox
    from capsule.supervisor.inbox_client import request

    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path))

    class FailsOnce(ExternalMessages):
        failed = False

        def send(self, target: str, body_json: str) -> Delivered:
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug in delivering")
            return Delivered("cli#2", "main")

    external = FailsOnce(
        Router(mailbox_capacity=8, max_queued_bytes=2**28), 1 << 20, lambda message, target: None
    )
    with RunInbox("fails-once", external, inbox_loop) as inbox:
        failed = request(inbox.path, {"op": "send", "to": "main", "body": 1}, 30)
        assert failed["ok"] is False and failed["kind"] == "internal", failed
        again = request(inbox.path, {"op": "send", "to": "main", "body": 2}, 30)
        assert again == {"ok": True, "id": "cli#2", "to": "main"}
    assert inbox_loop is None or inbox_loop.running


def _waiting_in_close(thread: threading.Thread, inbox: object) -> bool:
    """Whether ``thread`` is blocked in ``inbox.close()``, waiting for what
    the inbox handles to end."""
    frame = sys._current_frames().get(thread.ident or 0)
    blocked = frame is not None and frame.f_code.co_name in ("wait", "_wait_for_tstate_lock")
    while frame is not None:
        if frame.f_code.co_name == "close" and frame.f_locals.get("self") is inbox:
            return blocked
        frame = frame.f_back
    return False


def test_a_second_run_of_the_same_id_leaves_the_first_one_reachable(
    tmp_path: Path, core: str
) -> None:
    """Caller-chosen run ids repeat (two services, two journals): the run that
    holds the id's socket keeps it while it runs; the later one runs on, told
    that `capsule send` cannot reach it."""
    from capsule.host import SyncRuntime
    from capsule.supervisor.options import RunOptions

    options = RunOptions(core=core)
    program = _write(
        tmp_path,
        """
        from capsule import receive, task

        @task(name="main")
        def main(tag):
            while True:
                message = receive(timeout=120)
                if message.body == "stop":
                    return tag
                message.reply(tag)
        """,
    )

    def ask_from_outside() -> object:
        asked = capsule_cli("ask", "order-17", "main", '"who"', "--timeout", "60", cwd=tmp_path)
        assert asked.returncode == 0, asked.stderr
        return json.loads(asked.stdout)

    with SyncRuntime(journal=False) as one, SyncRuntime(journal=False) as other:
        first = one.start(program, "first", run_id="order-17", options=options)
        assert first.ask("main", "who", timeout=60) == "first"
        second = other.start(program, "second", run_id="order-17", options=options)
        assert second.ask("main", "who", timeout=60) == "second"
        assert ask_from_outside() == "first"
        second.send("main", "stop")
        assert second.result().value == "second"
        warnings = [e.text for e in second.events() if e.type == "warning"]
        assert any("another running run has its id" in text for text in warnings), warnings
        # The second run's end left the first one's socket in place.
        assert ask_from_outside() == "first"
        first.send("main", "stop")
        assert first.result().value == "first"


def test_on_the_async_core_the_inbox_holds_no_thread_and_capsule_send_reaches_the_run(
    tmp_path: Path,
) -> None:
    """On the async core the inbox listens and answers on the run's loop: a
    live run has no capsule-inbox thread, and `capsule send` still reaches it."""
    from capsule.supervisor.events import TaskOutput
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    program = _write(
        tmp_path,
        """
        from capsule import receive, task

        @task(name="main", timeout="2m")
        def main():
            print("MARK waiting", flush=True)
            return receive(timeout=100).body
        """,
    )
    waiting = threading.Event()
    runs: list[Any] = []

    def on_event(event: object) -> None:
        if isinstance(event, TaskOutput) and event.text.startswith("MARK waiting"):
            waiting.set()

    threads_while_waiting: list[str] = []
    sent: list[Any] = []

    def send_from_outside() -> None:
        waiting.wait()
        if runs:
            threads_while_waiting.extend(t.name for t in threading.enumerate())
            sent.append(capsule_cli("send", runs[0].run_id, "main", '"from outside"', cwd=tmp_path))

    sender = threading.Thread(target=send_from_outside)
    sender.start()
    try:
        report = run_program(
            RunRequest(path=program, args=[], options=RunOptions(core="async")),
            on_event,
            on_run=runs.append,
        )
    finally:
        waiting.set()
        sender.join()
    assert sent[0].returncode == 0, sent[0].stderr
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == "from outside"
    assert [name for name in threads_while_waiting if name.startswith("capsule-inbox")] == []
    assert any(name.startswith("capsule-loop") for name in threads_while_waiting)
