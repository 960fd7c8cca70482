"""capsule.http against a real local server: methods, bodies, headers, status
codes, timeouts, redirects, the size cap, allow-lists, cancellation, the CPU
slot while waiting, journal replay after kill -9, and redaction."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox.grants import HostRule, url_parts
from tests.conftest import LocalServer, ProgramRunner, capsule_cli, kill_at_marker, on_core


@pytest.fixture
def run_program(run_program: ProgramRunner, core: str) -> ProgramRunner:
    """Each program of this module runs on each core (they must answer alike)."""
    return on_core(run_program, core)


ROUND_TRIP = """
import base64
from capsule import task
from capsule.http import delete, get, head, patch, post, put

@task(name="main", allowed_hosts=["127.0.0.1"])
def main(base: str) -> dict:
    out = {}
    binary = bytes(range(256)) * 4
    for name, call in (("get", get), ("delete", delete)):
        r = call(base + "/echo", params={"q": "a b", "n": 1}, headers={"X-Custom": "yes"})
        out[name] = [r.status_code, r.ok(), r.json()]
    for name, call in (("post", post), ("put", put), ("patch", patch)):
        r = call(base + "/echo", json={"k": [1, 2]})
        out[name] = [r.status_code, r.json()]
    r = post(base + "/echo", data=binary, headers={"Content-Type": "application/octet-stream"})
    out["binary_sent"] = bytes.fromhex(r.json()["body_hex"]) == binary
    r = post(base + "/echo", data="plain text")
    out["text_sent"] = bytes.fromhex(r.json()["body_hex"]).decode()
    r = get(base + "/bytes/70000")
    out["binary_received"] = r.content == (bytes(range(256)) * 273 + bytes(range(112)))
    out["content_type"] = r.headers["content-type"]
    r = head(base + "/echo")
    out["head"] = [r.status_code, len(r.content)]
    r = get(base + "/status/404")
    out["404"] = [r.status_code, r.ok(), r.text()]
    out["500"] = get(base + "/status/500").status_code
    return out
"""


def test_methods_bodies_headers_and_statuses(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    value = run_program(ROUND_TRIP, http_server.url).value
    status, ok, echoed = value["get"]
    assert (status, ok, echoed["method"]) == (200, True, "GET")
    assert echoed["path"] == "/echo?q=a+b&n=1"
    assert echoed["headers"]["x-custom"] == "yes"
    assert value["delete"][2]["method"] == "DELETE"
    for name in ("post", "put", "patch"):
        status, echoed = value[name]
        assert echoed["method"] == name.upper()
        assert json.loads(bytes.fromhex(echoed["body_hex"])) == {"k": [1, 2]}
        assert echoed["headers"]["content-type"] == "application/json"
    assert value["binary_sent"] is True and value["binary_received"] is True
    assert value["text_sent"] == "plain text"
    assert value["content_type"] == "application/octet-stream"
    assert value["head"] == [200, 0]
    assert value["404"] == [404, False, '{"status": "as asked"}']
    assert value["500"] == 500


ERRORS = """
from capsule import task
from capsule.http import HttpError, get

@task(name="main", allowed_hosts=["127.0.0.1"])
def main(url: str, timeout: float = 30.0) -> list:
    try:
        r = get(url, timeout=timeout)
        return ["ok", r.status_code]
    except HttpError as exc:
        return [type(exc).__name__, exc.kind, str(exc)]
"""


def test_a_slow_response_times_out(run_program: ProgramRunner, http_server: LocalServer) -> None:
    started = time.monotonic()
    value = run_program(ERRORS, f"{http_server.url}/slow/3", 0.3).value
    assert value[:2] == ["HttpTimeout", "timeout"]
    assert "longer than 0.3s" in value[2]
    assert time.monotonic() - started < 2.5


def test_redirects_are_followed_only_to_allowed_hosts(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    inside = f"{http_server.url}/redirect?to=/status/201"
    assert run_program(ERRORS, inside).value == ["ok", 201]
    port = http_server.server_address[1]
    outside = f"{http_server.url}/redirect?to=http://localhost:{port}/echo"
    kind, code, message = run_program(ERRORS, outside).value
    assert (kind, code) == ("HostNotAllowed", "host_not_allowed")
    assert "localhost" in message and "a redirect from" in message
    assert http_server.hits.get("/echo") is None  # never sent


def test_hosts_not_granted_are_refused_and_connection_failures_reported(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    kind, code, message = run_program(ERRORS, "http://example.com/").value
    assert (kind, code) == ("HostNotAllowed", "host_not_allowed")
    assert "allowed_hosts" in message
    kind, code, _ = run_program(ERRORS, "ftp://127.0.0.1/file").value
    assert (kind, code) == ("InvalidRequest", "invalid_request")
    # A granted host with nothing listening: connection_failed.
    with socket_bound() as free_port:
        kind, code, _ = run_program(ERRORS, f"http://127.0.0.1:{free_port}/").value
    assert (kind, code) == ("ConnectionFailed", "connection_failed")


class socket_bound:
    """A port on 127.0.0.1 that is bound but not listening."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_the_response_size_cap_comes_from_the_policy(
    tmp_path: Path, http_server: LocalServer
) -> None:
    (tmp_path / "capsule.toml").write_text('[policy]\nmax_response_size = "1KB"\n')
    program = tmp_path / "big.py"
    program.write_text(textwrap.dedent(ERRORS))
    done = capsule_cli("run", str(program), f"{http_server.url}/bytes/5000", "--no-journal")
    kind, code, message = json.loads(done.stdout)
    assert (kind, code) == ("ResponseTooLarge", "too_large")
    assert "1,024 bytes" in message and "max_response_size" in message
    small = capsule_cli("run", str(program), f"{http_server.url}/bytes/1000", "--no-journal")
    assert json.loads(small.stdout) == ["ok", 200]


@pytest.mark.parametrize(
    ("pattern", "url", "allowed"),
    [
        ("api.example.com", "https://api.example.com/v1", True),
        ("api.example.com", "http://api.example.com:8080/", True),
        ("api.example.com", "https://example.com/", False),
        ("api.example.com", "https://evil-api.example.com/", False),
        ("*.example.com", "https://a.b.example.com/", True),
        ("*.example.com", "https://example.com/", False),
        ("*.example.com", "https://example.com.evil.org/", False),
        ("*", "http://anything.org/", True),
        ("https://api.example.com", "http://api.example.com/", False),
        ("api.example.com:8443", "https://api.example.com/", False),
        ("api.example.com:8443", "https://api.example.com:8443/", True),
        ("127.0.0.1", "http://127.0.0.1:9999/", True),
        ("[::1]", "http://[::1]:8080/", True),
    ],
)
def test_allowed_host_patterns(pattern: str, url: str, allowed: bool) -> None:
    assert HostRule.parse(pattern).matches(*url_parts(url)) is allowed


def test_a_child_gets_only_its_own_grants(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    source = """
    from capsule import task
    from capsule.http import HttpError, get

    @task(name="child")
    def child(url: str) -> str:
        try:
            return str(get(url).status_code)
        except HttpError as exc:
            return exc.kind

    @task(name="main", allowed_hosts=["*"])
    def main(url: str) -> list:
        return [get(url).status_code, child(url)]
    """
    assert run_program(source, f"{http_server.url}/status/200").value == [200, "host_not_allowed"]


def test_waiting_for_a_response_frees_the_cpu_slot_and_cancellation_aborts_it(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    source = """
    import time
    from capsule import task
    from capsule.http import get

    @task(name="fetch", allowed_hosts=["127.0.0.1"])
    def fetch(url: str) -> int:
        return get(url).status_code

    @task(name="spin", compute="HIGH")
    def spin() -> float:
        total = 0
        for i in range(300_000):
            total += i
        return time.time()

    @task(name="main", compute="HIGH")
    def main(base: str) -> dict:
        slow = fetch.spawn(base + "/slow/2")
        time.sleep(0)  # let the request start
        spun_at = spin()
        started = time.time()
        slow.cancel()
        try:
            slow.result()
            cancelled = False
        except Exception as exc:
            cancelled = getattr(exc, "kind", "") == "cancelled"
        return {"spun_at": spun_at, "cancel_took": time.time() - started,
                "cancelled": cancelled, "now": time.time()}
    """
    started = time.time()
    outcome = run_program(source, http_server.url, cpu_slots=1)
    value = outcome.value
    # With one CPU slot, spin ran while fetch waited for its 2 s response...
    assert value["spun_at"] - started < 1.8
    # ...and cancelling fetch ended it without waiting for the response.
    assert value["cancelled"] is True and value["cancel_took"] < 0.5
    waits = [e for e in outcome.of_type("waiting") if e.on == "http"]
    assert waits and waits[0].task == "fetch"


REPLAYED = """
import os
from capsule import sleep, task
from capsule.http import get, post

@task(name="main", timeout="5m", allowed_hosts=["127.0.0.1"])
def main(base: str) -> list:
    first = post(base + "/echo?api_key=SECRET-KEY", json={"n": 1},
                 headers={"Authorization": "Bearer SECRET-TOKEN"})
    cookie = get(base + "/cookie")
    print("MARK requested", flush=True)
    sleep(1)
    sent = first.json()["headers"]["authorization"] == "Bearer SECRET-TOKEN"
    return [first.json()["method"], sent, cookie.headers.get("set-cookie") == "session=SECRET-COOKIE"]
"""


def test_a_journaled_response_is_replayed_not_sent_again_and_secrets_are_redacted(
    tmp_path: Path, http_server: LocalServer, core: str
) -> None:
    program = tmp_path / "fetcher.py"
    program.write_text(textwrap.dedent(REPLAYED))
    args = ["run", str(program), http_server.url, "--core", core]
    kill_at_marker(args, "MARK requested", tmp_path)
    assert http_server.hits == {"/echo": 1, "/cookie": 1}

    resumed = capsule_cli("resume", "--last", "--json", "-v", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert http_server.hits == {"/echo": 1, "/cookie": 1}  # exactly once, over both runs
    # The replayed response is the journaled one: its secrets were redacted.
    method, sent, cookie = json.loads(resumed.stdout)["result"]
    assert method == "POST"
    assert sent is True  # the server got the real header
    # The replay answers what the guest saw; the journal holds it redacted (the
    # real value was kept apart, and is gone now that the run is over).
    assert cookie is True
    run_id = json.loads(resumed.stdout)["execution"]["run_id"]
    from capsule.journal.secrets import secrets_file

    assert not secrets_file(run_id).exists()

    journal = (tmp_path / ".capsule" / "journal.db").read_bytes()
    assert b"SECRET-TOKEN" not in journal  # (the echoed body is base64 in the journal)
    with sqlite3.connect(tmp_path / ".capsule" / "journal.db") as connection:
        requests = [
            row[0] for row in connection.execute("SELECT request FROM steps WHERE kind = 'http'")
        ]
        events = " ".join(row[0] for row in connection.execute("SELECT data_json FROM events"))
    assert "SECRET-KEY" not in " ".join(requests) and "SECRET-KEY" not in events
    assert "Bearer" not in " ".join(requests)
    assert "SECRET-COOKIE" not in journal.decode("utf-8", "replace")
    assert "SECRET" not in resumed.stderr


def test_the_llm_agent_example_runs_against_its_stand_in_api() -> None:
    """examples/agents/llm_demo.py starts the stand-in API and runs researcher.py."""
    from tests.conftest import EXAMPLES

    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "agents" / "llm_demo.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES / "agents",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    assert result["topic"] == "sandboxed agents"
    assert [section.split(":")[0] for section in result["sections"]] == [
        "Isolation of sandboxed agents",
        "Durability of sandboxed agents",
        "Fairness of sandboxed agents",
    ]


def test_many_tasks_making_their_first_request_at_once(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    source = """
    from capsule import gather, task
    from capsule.http import get

    @task(allowed_hosts=["127.0.0.1"])
    def fetch(url: str) -> int:
        return get(url).status_code

    @task(name="main")
    def main(url: str) -> list:
        return gather(*[fetch.spawn(url) for _ in range(8)])
    """
    assert run_program(source, f"{http_server.url}/status/200").value == [200] * 8


@pytest.mark.parametrize("granted", [True, False])
def test_the_client_starts_with_the_run_when_a_task_may_make_requests(
    program: Any, http_server: LocalServer, granted: bool
) -> None:
    """Starting the client (importing httpx, a TLS context with its CA bundle)
    took the first request ~0.5 s on this machine: a run whose tasks are
    granted hosts starts it at once, on a thread of its own; other runs never."""
    import threading

    from capsule.net.http import HttpClient
    from capsule.supervisor.program import RunRequest, run_program

    hosts = '["127.0.0.1"]' if granted else "[]"
    path = program(
        f"""
        import capsule
        from capsule import task
        from capsule.http import get

        @task(name="main", allowed_hosts={hosts})
        def main(url: str) -> int:
            capsule.sleep(0.3)
            return get(url).status_code if url else 0
        """
    )
    started_on: list[str] = []
    made = HttpClient._made

    def note(client: HttpClient) -> Any:
        started_on.append(threading.current_thread().name)
        return made(client)

    HttpClient._made = note  # type: ignore[method-assign]
    try:
        url = f"{http_server.url}/status/200" if granted else ""
        report = run_program(RunRequest(path=path, args=[url]), lambda _: None)
    finally:
        HttpClient._made = made  # type: ignore[method-assign]
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == (200 if granted else 0)
    if granted:
        assert started_on[0] == "capsule-http-start", started_on  # not the task's thread
    else:
        assert started_on == []
    assert "capsule-http-start" not in {t.name for t in threading.enumerate()}


def test_cookies_are_not_shared_between_tasks_and_errors_hide_secrets(
    tmp_path: Path, http_server: LocalServer, core: str
) -> None:
    program = tmp_path / "cookies.py"
    program.write_text(
        textwrap.dedent(
            """
            from capsule import task
            from capsule.http import HttpError, get

            @task(allowed_hosts=["127.0.0.1"])
            def login(base: str) -> str:
                return get(base + "/cookie").headers.get("set-cookie", "")

            @task(allowed_hosts=["127.0.0.1"])
            def other(base: str) -> str:
                return get(base + "/echo").json()["headers"].get("cookie", "none")

            @task(name="main")
            def main(base: str) -> list:
                try:
                    get("http://example.com/?api_key=SECRET9")
                    refused = "sent"
                except HttpError as exc:
                    refused = str(exc)
                return [login(base) != "", other(base), refused]
            """
        )
    )
    journal = tmp_path / "journal.db"
    done = capsule_cli(
        "run", str(program), http_server.url, "--journal", str(journal), "--core", core
    )
    assert done.returncode == 0, done.stderr
    logged_in, cookie_sent, refused = json.loads(done.stdout)
    assert logged_in is True and cookie_sent == "none"
    assert "api_key=[redacted]" in refused
    assert b"SECRET9" not in journal.read_bytes()


def test_credentials_do_not_follow_a_redirect_to_another_origin(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    source = """
    from capsule import task
    from capsule.http import get

    @task(name="main", allowed_hosts=["127.0.0.1", "localhost"])
    def main(url: str) -> dict:
        headers = {"X-Api-Key": "k-123", "Authorization": "Bearer t", "X-Plain": "p"}
        return get(url, headers=headers).json()["headers"]
    """
    port = http_server.server_address[1]
    same = f"{http_server.url}/redirect?to=/echo"
    other = f"{http_server.url}/redirect?to=http://localhost:{port}/echo"
    kept = run_program(source, same).value
    assert kept["x-api-key"] == "k-123" and kept["x-plain"] == "p"
    dropped = run_program(source, other).value
    assert "x-api-key" not in dropped and "authorization" not in dropped
    assert dropped["x-plain"] == "p"


def test_a_client_that_fails_to_start_is_reported_by_the_request_not_the_warm_up(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Starting ahead of need must not print a traceback of its own, nor leave
    the event loop's thread behind; the first request then says what failed."""
    import threading

    from capsule.net import http
    from capsule.net.redact import NO_SECRETS

    def broken() -> Any:
        raise ImportError("no httpx here")

    monkeypatch.setattr(http, "_new_client", broken)
    client = http.HttpClient(1024)
    client.warm_up()
    client.close()
    assert "Traceback" not in capfd.readouterr().err
    request = http.HttpRequest("GET", "http://127.0.0.1:9/", [], b"", 5.0)
    with pytest.raises(ImportError, match="no httpx here"):
        client.start(request, lambda _: True, NO_SECRETS)
    client.close()
    names = {thread.name for thread in threading.enumerate()}
    assert not {"capsule-http", "capsule-http-start"} & names, names


def test_on_the_async_core_requests_run_on_the_run_s_loop_not_a_thread_of_their_own(
    program: Any, http_server: LocalServer
) -> None:
    """The async core's run has an event loop already: its HTTP requests run
    there (no capsule-http loop thread), and end with the run."""
    import threading

    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    path = program(
        """
        from capsule import task
        from capsule.http import get

        @task(name="main", allowed_hosts=["127.0.0.1"])
        def main(url: str) -> int:
            return get(url).status_code
        """
    )
    url = f"{http_server.url}/slow/0.5"
    reports: list[Any] = []
    running = threading.Thread(
        target=lambda: reports.append(
            run_program(
                RunRequest(path=path, args=[url], options=RunOptions(core="async")),
                lambda _: None,
            )
        )
    )
    running.start()
    try:
        deadline = time.monotonic() + 60
        while not http_server.hits.get("/slow/0.5") and time.monotonic() < deadline:
            time.sleep(0.005)  # (until the request reached the server)
        during = {thread.name for thread in threading.enumerate()}
    finally:
        running.join()
    assert http_server.hits.get("/slow/0.5") == 1
    assert not {"capsule-http", "capsule-http-start"} & during, during
    assert any(name.startswith("capsule-loop") for name in during), during
    report = reports[0]
    assert report.result is not None and report.result.value() == 200, report


def test_what_an_exchange_in_flight_holds_is_counted_as_it_arrives() -> None:
    """The run's memory budget counts a task's HTTP exchange with its memory:
    the request's body, and the response's as it streams in (a real server
    that sends half a body, then waits)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from capsule.net import http
    from capsule.net.redact import NO_SECRETS

    half_sent, finish = threading.Event(), threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(2 << 20))
            self.end_headers()
            self.wfile.write(b"x" * (1 << 20))
            self.wfile.flush()
            half_sent.set()
            finish.wait(30)
            self.wfile.write(b"y" * (1 << 20))

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    client = http.HttpClient(16 << 20)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        request = http.HttpRequest("POST", url, [], b"z" * 5000, 30.0)
        held = http.Transfer()
        future = client.start(request, lambda _: True, NO_SECRETS, held)
        assert half_sent.wait(30)
        deadline = time.monotonic() + 30
        while held.bytes < 5000 + (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)  # (the client reads what was sent: a poll, not a timing)
        assert held.bytes >= 5000 + (1 << 20), held.bytes
        finish.set()
        assert len(future.result(30).body) == 2 << 20
        assert held.bytes == 5000 + (2 << 20)
    finally:
        finish.set()
        client.close()
        server.shutdown()
        server.server_close()
