"""Async code inside tasks: ``async def`` tasks, asyncio's event loop waiting
on the host (sleeps, timeouts, tasks, its deadline), HTTP requests in flight
together on the host (journaled and replayed), and the clear errors of what
the sandbox has not: threads and sockets."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LocalServer, ProgramRunner, capsule_cli, kill_at_marker, on_core


@pytest.fixture
def run_program(run_program: ProgramRunner, core: str) -> ProgramRunner:
    """Each program of this module runs on each core (they must answer alike)."""
    return on_core(run_program, core)


ASYNCIO = """
import asyncio
from capsule import task

@task
async def double(x):
    await asyncio.sleep(0.01)
    return x * 2

@task
def sync_child():
    async def both():
        return await asyncio.gather(asyncio.sleep(0.01, "a"), asyncio.sleep(0.02, "b"))
    with asyncio.Runner() as runner:
        first = runner.run(both())
    loop = asyncio.new_event_loop()
    try:
        second = loop.run_until_complete(both())
    finally:
        loop.close()
    return asyncio.run(both()) + first + second

@task
def calls_async():
    return double(5)  # (no loop runs here: a call, as of any task)

@task
async def main():
    out = {}
    out["gather"] = await asyncio.gather(*(asyncio.sleep(0.05 * (3 - i), i) for i in range(3)))
    finished = []
    async def record(delay, name):
        await asyncio.sleep(delay)
        finished.append(name)
    tasks = [asyncio.create_task(record(0.06, "slow")), asyncio.create_task(record(0.01, "fast"))]
    await asyncio.wait(tasks)
    out["order"] = finished
    try:
        await asyncio.wait_for(asyncio.sleep(30), 0.05)
        out["wait_for"] = "not cut"
    except TimeoutError:
        out["wait_for"] = "timed out"
    try:
        async with asyncio.timeout(0.05):
            await asyncio.sleep(30)
        out["timeout"] = "not cut"
    except TimeoutError:
        out["timeout"] = "timed out"
    out["loop"] = type(asyncio.get_running_loop()).__name__
    queue, lock, event = asyncio.Queue(), asyncio.Lock(), asyncio.Event()
    async def produce():
        for n in range(3):
            await queue.put(n)
            await asyncio.sleep(0.01)
        event.set()
    async def consume():
        got = []
        while not (event.is_set() and queue.empty()):
            try:
                got.append(await asyncio.wait_for(queue.get(), 0.05))
            except TimeoutError:
                pass
        async with lock:
            return got
    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        consumed = group.create_task(consume())
    out["task_group"] = consumed.result()
    out["to_thread"] = await asyncio.to_thread(sum, [1, 2, 3])
    out["async_children"] = await asyncio.gather(double(21), double(1))
    out["sync_child"] = sync_child()
    out["from_sync"] = calls_async()
    return out
"""


def test_async_tasks_and_asyncio_run_on_the_hosts_loop(run_program: ProgramRunner) -> None:
    outcome = run_program(ASYNCIO)
    assert outcome.value == {
        "gather": [0, 1, 2],
        "order": ["fast", "slow"],
        "wait_for": "timed out",
        "timeout": "timed out",
        "loop": "CapsuleEventLoop",
        "task_group": [0, 1, 2],
        "to_thread": 6,
        "async_children": [42, 2],
        "sync_child": ["a", "b", "a", "b", "a", "b"],
        "from_sync": 10,
    }
    # The loop's waits are the host's: sleeps that free the CPU slot.
    assert {"sleep", "result"} <= {event.on for event in outcome.of_type("waiting")}


def test_an_async_tasks_deadline_ends_its_sleep(run_program: ProgramRunner) -> None:
    error = run_program(
        """
        import asyncio
        from capsule import task

        @task(timeout="300ms")
        async def main():
            await asyncio.sleep(600)
        """
    ).error
    assert error.kind == "timeout"


def test_a_loop_with_nothing_to_wait_for_says_deadlock(run_program: ProgramRunner) -> None:
    error = run_program(
        """
        import asyncio
        from capsule import task

        @task
        async def main():
            await asyncio.get_running_loop().create_future()
        """
    ).error
    assert error.kind == "exception"
    assert "Deadlock" in error.message and "nothing it waits for can happen" in error.message


class _Together(BaseHTTPRequestHandler):
    """Answers 200 only once ``server.barrier`` has all its parties: every
    request it counts is in flight at the same time; 504 if they never were."""

    server: Any

    def do_GET(self) -> None:
        try:
            self.server.barrier.wait()
            status, body = 200, json.dumps({"path": self.path}).encode()
        except threading.BrokenBarrierError:
            status, body = 504, b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def together_server() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Together)
    server.daemon_threads = True
    server.barrier = threading.Barrier(3, timeout=20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.barrier.abort()
        server.shutdown()
        server.server_close()
        thread.join()


GATHERED = """
import asyncio
from capsule import task
from capsule.http import get_async

@task(allowed_hosts=["127.0.0.1"])
async def main(base):
    responses = await asyncio.gather(*(get_async(f"{base}/r{n}") for n in range(3)))
    return [[r.status_code, r.json()] for r in responses]
"""


def test_gathered_requests_are_in_flight_together(
    run_program: ProgramRunner, together_server: Any
) -> None:
    host, port = together_server.server_address[:2]
    outcome = run_program(GATHERED, f"http://{host}:{port}")
    # Each answered only once all three were at the server together.
    assert outcome.value == [[200, {"path": f"/r{n}"}] for n in range(3)]
    assert len(outcome.of_type("http")) == 3


REPLAYED = """
import asyncio
from capsule import task
from capsule.http import HttpError, get_async, post_async

@task(allowed_hosts=["127.0.0.1"])
async def main(base):
    first, second = await asyncio.gather(
        post_async(base + "/echo", json={"n": 1}, headers={"Authorization": "Bearer SECRET-TOKEN"}),
        get_async(base + "/status/404"),
    )
    try:
        await asyncio.wait_for(get_async(base + "/slow/30"), 0.1)
        cut = "no"
    except TimeoutError:
        cut = "yes"
    try:
        await get_async("http://example.com/")
        refused = "no"
    except HttpError as exc:
        refused = exc.kind
    print("MARK requested", flush=True)
    await asyncio.sleep(1)
    sent = first.json()["headers"]["authorization"] == "Bearer SECRET-TOKEN"
    return [first.json()["method"], sent, second.status_code, cut, refused]
"""


def test_requests_in_flight_together_are_journaled_and_replayed(
    tmp_path: Path, http_server: LocalServer, core: str
) -> None:
    program = tmp_path / "fetcher.py"
    program.write_text(textwrap.dedent(REPLAYED))
    args = ["run", str(program), http_server.url, "--core", core]
    kill_at_marker(args, "MARK requested", tmp_path)
    hits = dict(http_server.hits)
    assert hits == {"/echo": 1, "/status/404": 1, "/slow/30": 1}

    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert http_server.hits == hits  # none sent again: their answers were replayed
    assert json.loads(resumed.stdout)["result"] == [
        "POST",
        True,  # (the replay answers what the guest saw: the real header)
        404,
        "yes",
        "host_not_allowed",
    ]
    with sqlite3.connect(tmp_path / ".capsule" / "journal.db") as connection:
        kinds = [row[0] for row in connection.execute("SELECT kind FROM steps")]
    assert {"http_start", "poll", "abandon"} <= set(kinds)
    journal = (tmp_path / ".capsule" / "journal.db").read_bytes()
    assert b"SECRET-TOKEN" not in journal


def test_a_task_has_at_most_64_requests_in_flight(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    value = run_program(
        """
        import asyncio
        from capsule import task
        from capsule.http import get_async

        @task(allowed_hosts=["127.0.0.1"])
        async def main(url):
            started = [asyncio.ensure_future(get_async(url)) for _ in range(65)]
            outcomes = await asyncio.gather(*started, return_exceptions=True)
            return [
                getattr(o, "status_code", None) or [type(o).__name__, o.kind, str(o)]
                for o in outcomes
            ]
        """,
        http_server.url + "/echo",
    ).value
    assert value[:64] == [200] * 64
    name, kind, message = value[64]
    assert (name, kind) == ("TooManyRequests", "limit")
    assert "64 operations in flight" in message


AWAITED = """
import asyncio
import capsule
from capsule import task

@task
def echo():
    return capsule.receive(timeout=30).body

@task
def failing():
    raise ValueError("no")

@task
def greeter(target):
    capsule.send(target, "hello")

@task
def answerer():
    for _ in range(2):
        message = capsule.receive(timeout=30)
        message.reply(message.body * 2)

@task(timeout="60s")
async def main():
    out = {}
    child = echo.spawn()
    async def ping_later():
        await asyncio.sleep(0.01)
        capsule.send(child, "ping")
    # The child ends only once the loop, awaiting it, has run ping_later.
    out["echoed"], _ = await asyncio.gather(child, ping_later())
    try:
        await failing.spawn()
        out["failed"] = "no"
    except capsule.TaskError as exc:
        out["failed"] = exc.kind
    slow = echo.spawn()
    try:
        await slow.result_async(timeout=0.05)
    except TimeoutError as exc:
        out["timeout"] = str(exc)
    capsule.send(slow, "late")
    out["late"] = await slow
    async def greet_later():
        await asyncio.sleep(0.01)
        greeter.spawn(capsule.current().id)
    message, _ = await asyncio.gather(capsule.receive_async(timeout=30), greet_later())
    out["received"] = [message.body, message.sender]
    try:
        await capsule.receive_async(timeout=0.05)
    except capsule.ReceiveTimeout as exc:
        out["receive_timeout"] = str(exc)
    answering = answerer.spawn(name="answerer")
    out["asked"] = await asyncio.gather(
        capsule.ask_async("answerer", 1, timeout=30), capsule.ask_async(answering, 2)
    )
    await answering  # (it ended: an ask to it is refused)
    try:
        await capsule.ask_async(answering, 3, timeout=30)
    except capsule.MessageError as exc:
        out["no_answer"] = exc.kind
    return out
"""


def test_children_and_messages_awaited_without_blocking_the_loop(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(AWAITED)
    # Reported waiting on what its loop waits for.
    assert {"result", "receive"} <= {event.on for event in outcome.of_type("waiting")}
    assert outcome.value == {
        "echoed": "ping",
        "failed": "exception",
        "timeout": "children ['main/3'] had not ended after 0.05s",
        "late": "late",
        "received": ["hello", "main/4"],
        "receive_timeout": "no message arrived within 0.05s",
        "asked": [2, 4],
        "no_answer": "no_such_actor",
    }


AWAITED_THEN_KILLED = """
import asyncio
import capsule
from capsule import task

@task
def work(n):
    print("work", n, flush=True)
    return n * 10

@task
def greeter(target):
    capsule.send(target, "hello")

@task
def answerer():
    message = capsule.receive(timeout=30)
    message.reply(message.body * 2)

@task
async def main():
    values = await asyncio.gather(work.spawn(1), work.spawn(2))
    greeter.spawn(capsule.current().id)
    message = await capsule.receive_async(timeout=30)
    reply = await capsule.ask_async(answerer.spawn(), 21, timeout=30)
    print("MARK awaited", flush=True)
    await asyncio.sleep(1)
    return [values, message.body, reply]
"""


def test_awaited_children_and_messages_are_replayed(tmp_path: Path, core: str) -> None:
    program = tmp_path / "awaiting.py"
    program.write_text(textwrap.dedent(AWAITED_THEN_KILLED))
    printed, _ = kill_at_marker(["run", str(program), "--core", core], "MARK awaited", tmp_path)
    assert sorted(line for line in printed.splitlines() if line.startswith("work")) == [
        "work 1",
        "work 2",
    ]
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"] == [[10, 20], "hello", 42]
    with sqlite3.connect(tmp_path / ".capsule" / "journal.db") as connection:
        kinds = [row[0] for row in connection.execute("SELECT kind FROM steps")]
        started = [
            row[0]
            for row in connection.execute("SELECT task_id FROM events WHERE type = 'started'")
        ]
    assert {"wait_start", "receive_start", "ask_start", "poll"} <= set(kinds)
    # The gathered children ran once: their outcomes came from the journal. (The
    # greeter and the answerer may have been in flight at the kill: then they
    # resume too.)
    assert started.count("main") == 2
    assert started.count("main/1") == started.count("main/2") == 1


ASKED_THEN_KILLED = """
import asyncio
import capsule
from capsule import task

@task
def answerer():
    message = capsule.receive(timeout=30)
    capsule.sleep(1.5)
    message.reply(message.body * 2)

@task
async def main():
    asking = asyncio.ensure_future(capsule.ask_async(answerer.spawn(), 21, timeout=60))
    await asyncio.sleep(0.1)
    print("MARK asking", flush=True)
    return await asking
"""


def test_an_ask_in_flight_when_the_run_stopped_gets_its_reply_after_resume(
    tmp_path: Path, core: str
) -> None:
    program = tmp_path / "asking.py"
    program.write_text(textwrap.dedent(ASKED_THEN_KILLED))
    kill_at_marker(["run", str(program), "--core", core], "MARK asking", tmp_path)
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"] == 42


def test_threads_and_sockets_say_to_use_capsule_http(run_program: ProgramRunner) -> None:
    value = run_program(
        """
        import asyncio
        import socket
        import threading
        from capsule import task

        def failure(call):
            try:
                call()
            except BaseException as exc:
                return f"{type(exc).__name__}: {exc}"
            return "no error"

        def import_requests():
            import requests

        def import_aiohttp():
            import aiohttp

        async def connect():
            await asyncio.open_connection("example.com", 80)

        @task
        def main():
            return {
                "thread": failure(lambda: threading.Thread(target=print).start()),
                "socket": failure(socket.socket),
                "connection": failure(lambda: socket.create_connection(("example.com", 80))),
                "requests": failure(import_requests),
                "aiohttp": failure(import_aiohttp),
                "asyncio": failure(lambda: asyncio.run(connect())),
                "lock": failure(lambda: threading.Lock().acquire()),
            }
        """
    ).value
    assert value["thread"].startswith("RuntimeError: can't start new thread")
    assert "asyncio" in value["thread"] and "task.spawn" in value["thread"]
    for what in ("socket", "connection", "asyncio"):
        assert value[what].startswith("PermissionError:"), value[what]
        assert "capsule.http" in value[what]
    # Whether the host has the package (it stops at ssl) or not, the same hint.
    for what in ("requests", "aiohttp"):
        assert value[what].startswith("SandboxImportError: No module named"), value[what]
        assert "capsule.http" in value[what]
    assert value["lock"] == "no error"  # (a module that merely uses threading still works)


def test_async_http_in_plain_python(http_server: LocalServer) -> None:
    from capsule.http import get_async

    async def both() -> list[int]:
        responses = await asyncio.gather(
            get_async(http_server.url + "/echo"), get_async(http_server.url + "/status/201")
        )
        return [response.status_code for response in responses]

    assert asyncio.run(both()) == [200, 201]


def test_async_tasks_in_plain_python() -> None:
    from capsule import current, task

    @task(name="test_async_double")
    async def double(x: int) -> list[Any]:
        await asyncio.sleep(0)
        return [x * 2, current().id]

    @task(name="test_async_parent")
    async def parent() -> list[Any]:
        return await asyncio.gather(double(1), double(2))

    assert double(21) == [42, "test_async_double"]  # from sync code: run to its end
    (two, first), (four, second) = parent()  # awaited from async code: children
    assert (two, four) == (2, 4)
    assert sorted([first, second]) == ["test_async_parent/1", "test_async_parent/2"]
