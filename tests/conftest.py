"""Shared helpers: write a program to a temp dir and run it for real, in process
(through the same entry point the CLI uses) or as a `capsule` subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


#: The cores a run may run its tasks on (RunOptions.core, --core).
CORES = ("threads", "async")


@pytest.fixture(params=CORES)
def core(request: pytest.FixtureRequest) -> str:
    """Each core a run may run its tasks on: a test taking it runs on both."""
    return str(request.param)


@pytest.fixture(scope="session", autouse=True)
def guest_runtime() -> None:
    """Build (or find) the guest runtime once, before any test times itself."""
    from capsule.sandbox.engine import Sandbox

    with Sandbox([REPO]):
        pass


@pytest.fixture(params=["procmap_query", "maps_text"])
def mappings_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Releasing an idle instance's pages both ways of asking about the
    process's mappings: with PROCMAP_QUERY (Linux 6.11) and, as on older
    kernels, by reading /proc/self/maps (prefaulting, which needs the former,
    is off then)."""
    from capsule.sandbox import prefault

    if request.param == "procmap_query":
        if not prefault._kernel_can_query_mappings():
            pytest.skip("this kernel has no PROCMAP_QUERY (6.11)")
    else:
        monkeypatch.setenv("CAPSULE_PREFAULT", "0")
        monkeypatch.setattr(prefault, "_kernel_can_query_mappings", lambda: False)
    return str(request.param)


#: A guest task (a program's, which imports capsule) that is busy: it counts
#: in ``chunks`` of ``steps`` with no host call between, and sends each
#: chunk's number to "progress" as it is done (how far it got, and when).
SPIN_TASK = """
@capsule.task
def spin(chunks, steps):
    total = 0
    for chunk in range(chunks):
        for step in range(steps):
            total += step
        capsule.send("progress", chunk + 1)
    return total
"""


def assert_busy_calls_take_turns(
    race: Callable[[Any], dict[Any, int]], without_yields: int | None
) -> None:
    """Four busy calls of SPIN_TASK (8 chunks each) raced on one poll thread:
    ``race(fuel_yield_interval)`` says how many chunks each had done when the
    first ended. With a yield each million units of fuel they take turns:
    every other is at most a chunk behind; ``without_yields`` one poll thread
    runs each to its end in turn."""
    fair = race(1_000_000)
    assert min(fair.values()) >= 7, fair
    unfair = race(without_yields)
    assert sorted(unfair.values()) == [0, 0, 0, 8], unfair


def private_bytes() -> int:
    """This process's private memory, as the system counts it (what many
    waiting tasks or calls cost, each)."""
    with open("/proc/self/smaps_rollup") as rollup:
        fields = dict(line.split(":", 1) for line in rollup if line.startswith("Private_"))
    return sum(int(value.split()[0]) for value in fields.values()) * 1024


def os_threads() -> int:
    """This process's threads, as the system counts them (Python's and
    wasmtime's)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


@dataclass
class Outcome:
    report: Any
    events: list[Any]

    @property
    def result(self) -> Any:
        assert self.report.result is not None, self.report
        return self.report.result

    @property
    def value(self) -> Any:
        assert self.result.ok, self.result.error
        return self.result.value()

    @property
    def error(self) -> Any:
        assert not self.result.ok, self.result.value()
        return self.result.error

    def of_type(self, kind: str) -> list[Any]:
        return [event for event in self.events if event.type == kind]


ProgramRunner = Callable[..., Outcome]


@pytest.fixture
def program(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a program file; returns its path."""

    def write(source: str, name: str = "prog.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def run_program(program: Callable[[str, str], Path]) -> ProgramRunner:
    """Run a program's main in process; returns its report and every event."""
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest
    from capsule.supervisor.program import run_program as run

    def runner(source: str, *args: Any, **options: Any) -> Outcome:
        """``options``: the run's options (``max_ram="64MB"``), and ``name``
        (the program's file name), ``entry`` and ``kwargs`` of the request."""
        path = program(source, options.pop("name", "prog.py"))
        request = {key: options.pop(key) for key in ("entry", "kwargs") if key in options}
        events: list[Any] = []
        report = run(
            RunRequest(path=path, args=list(args), options=RunOptions(**options), **request),
            events.append,
        )
        return Outcome(report, events)

    return runner


def on_core(run_program: ProgramRunner, core: str) -> ProgramRunner:
    """``run_program`` with its runs on ``core`` (a module that overrides its
    run_program fixture with it runs each of its programs on both cores)."""

    def runner(source: str, *args: Any, **options: Any) -> Outcome:
        return run_program(source, *args, core=core, **options)

    return runner


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def capsule_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> Completed:
    """Run the `capsule` command as a real subprocess."""
    process = subprocess.run(
        [sys.executable, "-m", "capsule.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Completed(process.returncode, process.stdout, process.stderr)


class _EchoHandler(BaseHTTPRequestHandler):
    """A local test server: /echo returns what it got, /status/N that status,
    /bytes/N N bytes, /slow/S after S seconds, /redirect?to=URL a 302, /cookie
    a Set-Cookie. It counts requests per path."""

    server: LocalServer

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        self.server.hits[parts.path] = self.server.hits.get(parts.path, 0) + 1
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, payload = 200, [("Content-Type", "application/json")], b""
        if parts.path == "/echo":
            payload = json.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body_hex": body.hex(),
                }
            ).encode()
        elif parts.path.startswith("/status/"):
            status = int(parts.path.rsplit("/", 1)[1])
            payload = b'{"status": "as asked"}'
        elif parts.path.startswith("/bytes/"):
            count = int(parts.path.rsplit("/", 1)[1])
            headers = [("Content-Type", "application/octet-stream")]
            payload = bytes(range(256)) * (count // 256) + bytes(range(count % 256))
        elif parts.path.startswith("/slow/"):
            time.sleep(float(parts.path.rsplit("/", 1)[1]))
            payload = b'{"slow": true}'
        elif parts.path == "/redirect":
            status, headers = 302, [("Location", parse_qs(parts.query)["to"][0])]
        elif parts.path == "/cookie":
            headers.append(("Set-Cookie", "session=SECRET-COOKIE"))
            payload = b"{}"
        else:
            status, payload = 404, b'{"error": "no such path"}'
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        return None


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True
    hits: dict[str, int]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """A real HTTP server on 127.0.0.1 (a free port), for the test's duration."""
    server = LocalServer(("127.0.0.1", 0), _EchoHandler)
    server.hits = {}
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def kill_at_marker(
    args: list[str],
    marker: str,
    cwd: Path,
    extra_delay: float = 0.0,
    sig: signal.Signals = signal.SIGKILL,
) -> tuple[str, int]:
    """Start `capsule ARGS`, kill -9 it (or send it ``sig``) once a line of its
    stdout starts with ``marker`` (and ``extra_delay`` seconds later): (what it
    printed, exit code)."""
    code, printed, _ = signal_at_marker(args, marker, cwd, sig, extra_delay)
    return printed, code


def signal_at_marker(
    args: list[str],
    marker: str,
    cwd: Path,
    sig: signal.Signals,
    extra_delay: float = 0.0,
    capture_stderr: bool = False,
    hang_after: float | None = None,
) -> tuple[int, str, str]:
    """Start `capsule ARGS`, send it ``sig`` once a line of its stdout starts
    with ``marker`` (and ``extra_delay`` seconds later): (exit code, what it
    printed, its stderr if captured). Still running ``hang_after`` seconds
    after the signal, it did not stop: an AssertionError."""
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if capture_stderr else subprocess.DEVNULL,
        text=True,
        cwd=cwd,
    )
    assert process.stdout is not None
    seen: list[str] = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(marker):
            break
    time.sleep(extra_delay)
    process.send_signal(sig)
    try:
        rest, stderr = process.communicate(timeout=hang_after)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"{sig.name} did not stop the run") from None
    return process.returncode, "".join(seen) + rest, stderr or ""


#: Trials per test: without the guarantee, a kill lands before the writer's
#: next commit (it lets a batch gather for 50 ms) in nearly every one.
TRIALS = 5


class _Payments(BaseHTTPRequestHandler):
    """POST /pay/TRIAL records the request's Idempotency-Key; the first one of
    each trial is never answered: the test kills the run meanwhile. GET
    answers 204."""

    server: PaymentServer

    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def do_POST(self) -> None:
        trial = self.path.rsplit("/", 1)[1]
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        key = self.headers.get("Idempotency-Key", "")
        server = self.server
        with server.lock:
            keys = server.keys.setdefault(trial, [])
            keys.append(key)
            first = len(keys) == 1
        if first:
            server.arrived[trial].set()
            server.killed[trial].wait(60)  # (the run is gone: nobody reads an answer)
            return
        payload = json.dumps({"key": key}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class PaymentServer(LocalServer):
    keys: dict[str, list[str]]
    arrived: dict[str, threading.Event]
    killed: dict[str, threading.Event]
    lock: threading.Lock


@pytest.fixture
def payments() -> Iterator[PaymentServer]:
    server = PaymentServer(("127.0.0.1", 0), _Payments)
    server.keys, server.lock = {}, threading.Lock()
    server.arrived = {str(n): threading.Event() for n in range(TRIALS)}
    server.killed = {str(n): threading.Event() for n in range(TRIALS)}
    thread = threading.Thread(target=server.serve_forever, name="test-payments", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        for event in server.killed.values():
            event.set()
        server.shutdown()
        server.server_close()
        thread.join()


def killed_in_flight_then_resumed(
    source: str, name: str, payments: PaymentServer, tmp_path: Path, *options: str
) -> None:
    """TRIALS times: run ``source`` (whose main GETs the URL it is given, then
    POSTs to it with an Idempotency-Key it drew, and returns the key the
    server echoes), kill -9 it once its POST arrived, resume it: the POST is
    sent again with the same key. (The GET makes the run's HTTP client: a
    run's first request waits for it, ~0.3 s, time enough for the journal
    to commit the draw anyway.)"""
    for trial in map(str, range(TRIALS)):
        where = tmp_path / f"trial{trial}"
        where.mkdir()
        program = where / name
        program.write_text(source)
        url = f"{payments.url}/pay/{trial}"
        run = subprocess.Popen(
            [sys.executable, "-m", "capsule.cli", "run", str(program), url, *options],
            cwd=where,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not payments.arrived[trial].wait(0.1):
                assert run.poll() is None, f"the run ended before its request: {run.stderr}"
                assert time.monotonic() < deadline, "the request never arrived"
            run.kill()  # (before the server answers: the request is in flight)
            run.communicate()
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
            payments.killed[trial].set()
        resumed = capsule_cli("resume", "--last", "--json", cwd=where, timeout=180)
        assert resumed.returncode == 0, resumed.stderr
        first, *again = payments.keys[trial]
        assert again == [first], f"trial {trial}: the resumed run sent {again}, first {first}"
        assert resumed.json()["result"] == first


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the session (see postgres_cluster.py)."""
    from tests.postgres_cluster import throwaway_cluster

    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_journal(postgres_cluster: Any) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return str(postgres_cluster.new_database())


#: The journal backends a test taking ``any_journal`` runs against.
JOURNAL_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=JOURNAL_BACKENDS)
def any_journal(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new journal on each backend: an SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "journal.db")
    return str(request.getfixturevalue("postgres_journal"))
