"""A reader that never reads cannot wedge a run: with stdout (and stderr) a
pipe nobody reads, a task's deadline still ends the run, and SIGTERM still
stops it (exit 130). The output the run could not write is dropped, said so on
stderr when stderr is read, and kept by the journal. On either core.

Each test reads no byte of the unread pipe until the process has ended; its
`wait(timeout=...)` only guards against a hang (the run itself ends in seconds).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security.support import core_flags

Starter = Callable[..., subprocess.Popen[bytes]]
#: Far past what the host buffers (8 MB) and a pipe holds (64 KB).
PRINTED_MB = 24
HANG_GUARD_SECONDS = 120


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `capsule ARGS` with the given streams; killed at the end if the
    test failed before it ended."""
    started: list[subprocess.Popen[bytes]] = []

    def run(args: list[str], **streams: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "capsule.cli", *args], stdin=subprocess.DEVNULL, **streams
        )
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def wait_or_kill(process: subprocess.Popen[bytes]) -> int:
    """The exit code; a hang guard, not a timing assertion."""
    try:
        return process.wait(timeout=HANG_GUARD_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"capsule hung with a reader that does not read ({HANG_GUARD_SECONDS}s)")


@pytest.fixture
def unread_pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose read end the test holds and does not read."""
    read_end, write_end = os.pipe()
    try:
        yield read_end, write_end
    finally:
        os.close(read_end)


def prints_then_loops(tmp_path: Path, timeout: str, marker_port: int | None = None) -> Path:
    """A program whose main prints PRINTED_MB to stdout, then tells the test
    (an HTTP request to ``marker_port``, if given), then loops."""
    tell = (
        f"capsule.http.get('http://127.0.0.1:{marker_port}/looping')"
        if marker_port is not None
        else "pass"
    )
    hosts = '["127.0.0.1"]' if marker_port is not None else "[]"
    return write(
        tmp_path,
        f"""
        import sys
        import capsule
        from capsule import task

        @task(name="main", timeout={timeout!r}, compute=10**15, max_retries=0,
              allowed_hosts={hosts})
        def main():
            line = "x" * 65535 + "\\n"
            for _ in range({PRINTED_MB} * 16):
                sys.stdout.write(line)
            print("printed", file=sys.stderr, flush=True)
            {tell}
            while True:
                pass
        """,
    )


@pytest.mark.parametrize("journal", ["journal", "no-journal"])
def test_a_deadline_ends_the_run_while_stdout_is_not_read(
    tmp_path: Path, core: str, unread_pipe: tuple[int, int], start: Starter, journal: str
) -> None:
    path = prints_then_loops(tmp_path, timeout="3s")
    read_end, write_end = unread_pipe
    err_path = tmp_path / "stderr.txt"
    flags = ["--no-journal"] if journal == "no-journal" else []
    with err_path.open("wb") as err:
        process = start(["run", str(path), *flags, *core_flags(core)], stdout=write_end, stderr=err)
    os.close(write_end)
    code = wait_or_kill(process)
    stderr = err_path.read_text()
    assert code == 1, stderr
    assert "capsule: error: task 'main' failed (timeout)" in stderr
    assert "capsule: stdout is not read fast enough" in stderr
    assert "bytes of output to stdout were not shown" in stderr
    assert ("the journal keeps it" in stderr) == (journal == "journal")
    assert "Traceback" not in stderr
    # What was written is what was printed, from its start.
    os.set_blocking(read_end, False)
    shown = os.read(read_end, 1 << 20)
    lines, rest = divmod(len(shown), 65536)
    assert shown and shown == (b"x" * 65535 + b"\n") * lines + b"x" * rest


class MarkerServer:
    """A one-request HTTP server: the program's request tells the test where
    the program is (an event, not a sleep)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(HANG_GUARD_SECONDS)
        self.port: int = self.socket.getsockname()[1]

    def wait_for_request(self) -> None:
        connection, _ = self.socket.accept()
        with connection:
            connection.settimeout(HANG_GUARD_SECONDS)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = connection.recv(4096)
                assert chunk, "the program closed the connection"
                request += chunk
            assert request.startswith(b"GET /looping ")
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def marker() -> Iterator[MarkerServer]:
    server = MarkerServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("journal", ["journal", "no-journal"])
def test_sigterm_stops_the_run_while_stdout_is_not_read(
    tmp_path: Path,
    core: str,
    unread_pipe: tuple[int, int],
    marker: MarkerServer,
    start: Starter,
    journal: str,
) -> None:
    path = prints_then_loops(tmp_path, timeout="10m", marker_port=marker.port)
    _, write_end = unread_pipe
    flags = ["--no-journal"] if journal == "no-journal" else []
    process = start(
        ["run", str(path), *flags, *core_flags(core)], stdout=write_end, stderr=subprocess.PIPE
    )
    os.close(write_end)
    assert process.stderr is not None
    marker.wait_for_request()  # printed it all (most of it dropped), then asked
    process.send_signal(signal.SIGTERM)
    code = wait_or_kill(process)
    stderr = process.stderr.read().decode()
    assert code == 130, stderr
    assert "capsule: stdout is not read fast enough" in stderr
    assert "every task was cancelled" in stderr
    assert "Traceback" not in stderr


def test_sigterm_stops_the_run_while_neither_stdout_nor_stderr_is_read(
    tmp_path: Path, core: str, unread_pipe: tuple[int, int], marker: MarkerServer, start: Starter
) -> None:
    """`capsule run p.py 2>&1 | sleep 600`: not even the notices can be written."""
    path = prints_then_loops(tmp_path, timeout="10m", marker_port=marker.port)
    _, write_end = unread_pipe
    process = start(["run", str(path), *core_flags(core)], stdout=write_end, stderr=write_end)
    os.close(write_end)
    marker.wait_for_request()
    process.send_signal(signal.SIGTERM)
    assert wait_or_kill(process) == 130


def test_sigterm_during_the_final_wait_for_the_reader_exits_130(
    tmp_path: Path, core: str, unread_pipe: tuple[int, int], start: Starter
) -> None:
    """The run ended; what it printed waits for a reader that never reads: a
    signal ends that wait (else the run's own exit code, 0, after it)."""
    path = write(
        tmp_path,
        f"""
        import sys
        from capsule import task

        @task(name="main")
        def main():
            line = "x" * 65535 + "\\n"
            for _ in range({PRINTED_MB} * 16):
                sys.stdout.write(line)
            return "done"
        """,
    )
    _, write_end = unread_pipe
    process = start(["run", str(path), *core_flags(core)], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    assert process.stderr is not None
    for line in process.stderr:  # said as the run ends, before the wait
        if b"bytes of output to stdout were not shown" in line:
            break
    else:
        pytest.fail("no notice of the dropped output")
    process.send_signal(signal.SIGTERM)
    assert wait_or_kill(process) == 130
    assert b"Traceback" not in process.stderr.read()


def test_a_stdout_that_fails_is_said_once_and_the_run_goes_on(tmp_path: Path, core: str) -> None:
    """`capsule run p.py > /dev/full`: every write fails (ENOSPC)."""
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main")
        def main():
            for n in range(1000):
                print("line", n)
            return "done"
        """,
    )
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "capsule.cli", "run", str(path), *core_flags(core)],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=HANG_GUARD_SECONDS,
        )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert stderr.count("capsule: output can no longer be shown (OSError(28, ") == 1
    kept = "; the journal keeps it"
    assert f"writing stdout){kept}" in stderr
    assert "Traceback" not in stderr


def test_sigterm_stops_a_run_whose_stdout_nobody_reads(tmp_path: Path, core: str) -> None:
    program = write(
        tmp_path,
        """
        import sys
        from capsule import receive, task

        @task(name="main", compute="HIGH", timeout="5m")
        def main():
            print("MARK flooding", file=sys.stderr, flush=True)
            print("x" * (1024 * 1024), flush=True)  # more than a pipe holds
            receive()
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(program), *core_flags(core)],
        stdout=subprocess.PIPE,  # never read until the end
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith(b"MARK"):
            break
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("SIGTERM did not stop the run while stdout was blocked") from None
    process.communicate()
    assert process.returncode == 130
