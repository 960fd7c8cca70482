"""Guest text meeting a terminal: escape sequences, C0/C1 controls and bidi
overrides printed, returned or raised by a task are shown as visible escapes on
a terminal and in Capsule's own messages; data written to a pipe or a file
(guest output, the result, --json) keeps its exact text."""

from __future__ import annotations

import json
import os
import pty
import selectors
import subprocess
import sys
import textwrap
import tty
from pathlib import Path
from typing import Any

from tests.conftest import capsule_cli

#: What a hostile task prints: a clipboard write (OSC 52), a screen clear, a
#: cursor move up and line erase, a lone carriage return, a bell, a backspace,
#: a C1 CSI (U+009B) and a right-to-left override.
HOSTILE = "\x1b]52;c;SGFja2Vk\x07\x1b[2J\x1b[1A\x1b[2K\rcapsule: completed\x07\x08\x9b31m\u202eevil"
#: Bytes that must never reach a terminal from guest text.
RAW_CONTROLS = [b"\x1b", b"\x07", b"\x08", b"\xc2\x9b", "\u202e".encode()]


def _visible_only(data: bytes) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in data, (raw, data[-400:])
    # A carriage return only as part of a line end.
    assert b"\r" not in data.replace(b"\r\n", b"\n"), data[-400:]


def run_on_terminal(
    args: list[str], cwd: Path, stdout_tty: bool = True, stderr_tty: bool = True
) -> tuple[int, bytes, bytes]:
    """Run `capsule ARGS` with stdout and/or stderr on a terminal (a pty in raw
    mode, so that its bytes arrive unchanged) and the others on pipes; (exit code,
    stdout bytes, stderr bytes)."""
    ends: dict[str, tuple[int, int]] = {}
    for name, wanted in (("stdout", stdout_tty), ("stderr", stderr_tty)):
        if wanted:
            master, slave = pty.openpty()
            tty.setraw(slave)
        else:
            master, slave = os.pipe()
        ends[name] = (master, slave)
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=ends["stdout"][1],
        stderr=ends["stderr"][1],
    )
    for _, slave in ends.values():
        os.close(slave)
    received = {name: bytearray() for name in ends}
    selector = selectors.DefaultSelector()
    for name, (master, _) in ends.items():
        selector.register(master, selectors.EVENT_READ, name)
    try:
        while selector.get_map():
            for key, _ in selector.select():
                try:
                    chunk = os.read(key.fd, 65536)
                except OSError:  # EIO: the terminal's other end is closed
                    chunk = b""
                if chunk:
                    received[key.data].extend(chunk)
                else:
                    selector.unregister(key.fd)
                    os.close(key.fd)
        code = process.wait(timeout=120)
    finally:
        selector.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, bytes(received["stdout"]), bytes(received["stderr"])


def capsule_raw(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`capsule ARGS` on pipes, its output as bytes (text mode would turn a lone
    carriage return into a line end)."""
    return subprocess.run(
        [sys.executable, "-m", "capsule.cli", *args],
        capture_output=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, source: str, name: str = "prog.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


PRINTER = f"""
    import sys
    from capsule import task

    HOSTILE = {HOSTILE!r}

    @task(name="main")
    def main():
        print("out:" + HOSTILE)
        print("err:" + HOSTILE, file=sys.stderr)
        return "result:" + HOSTILE
"""


def test_guest_output_and_result_on_a_terminal_are_made_visible(tmp_path: Path) -> None:
    path = write(tmp_path, PRINTER)
    code, out, err = run_on_terminal(["run", str(path), "--no-journal"], tmp_path)
    assert code == 0, err
    _visible_only(out)
    _visible_only(err)
    assert b"Traceback" not in err
    shown = out.decode()
    assert "out:\\x1b]52;c;SGFja2Vk\\x07\\x1b[2J" in shown
    assert "\\rcapsule: completed\\x07\\x08\\x9b31m\\u202eevil" in shown
    assert "result:\\x1b]52;c;" in shown
    assert "err:\\x1b]52;c;" in err.decode()


def test_verbose_on_a_terminal_tags_every_line_visibly(tmp_path: Path) -> None:
    path = write(tmp_path, PRINTER)
    code, out, err = run_on_terminal(["run", str(path), "--no-journal", "-v"], tmp_path)
    assert code == 0, err
    _visible_only(out)
    _visible_only(err)
    assert out.decode().startswith("[main main] out:\\x1b]52;c;")


def test_guest_output_to_pipes_keeps_its_exact_text(tmp_path: Path) -> None:
    """`capsule run p.py > out.txt` keeps the bytes the task printed."""
    path = write(tmp_path, PRINTER)
    done = capsule_raw("run", str(path), "--no-journal")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"out:{HOSTILE}\nresult:{HOSTILE}\n".encode()
    assert done.stderr == f"err:{HOSTILE}\n".encode()


def test_json_envelope_keeps_the_exact_values_and_is_safe_on_a_terminal(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, PRINTER)
    done = capsule_raw("run", str(path), "--no-journal", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "result:" + HOSTILE
    assert done.stderr == f"out:{HOSTILE}\nerr:{HOSTILE}\n".encode()  # guest output, raw
    code, out, err = run_on_terminal(["run", str(path), "--no-journal", "--json"], tmp_path)
    assert code == 0, err
    _visible_only(out)
    _visible_only(err)
    assert json.loads(out)["result"] == "result:" + HOSTILE


FAILING = f"""
    from capsule import task

    HOSTILE = {HOSTILE!r}

    @task(name="child" + HOSTILE, max_retries=1)
    def child():
        raise ValueError("first line\\n" + HOSTILE)

    @task(name="main", max_retries=0)
    def main():
        return child()
"""


def test_failure_messages_and_tracebacks_are_visible_even_in_a_log_file(
    tmp_path: Path,
) -> None:
    """Capsule's own messages quote guest text (error messages, tracebacks, task
    names): always made visible, so that a log of stderr `cat` later to a
    terminal runs nothing either."""
    path = write(tmp_path, FAILING)
    for args in (["--no-journal"], ["--no-journal", "-v", "--retry-backoff", "0"]):
        done = capsule_raw("run", str(path), *args)
        assert done.returncode == 1, done.stderr
        _visible_only(done.stderr)
        assert b"ValueError: first line" in done.stderr
        assert b"\\x1b]52;c;SGFja2Vk\\x07" in done.stderr
        code, out, err = run_on_terminal(["run", str(path), *args], tmp_path)
        assert code == 1, err
        _visible_only(out)
        _visible_only(err)


def test_verbose_lifecycle_lines_stay_one_line_each(tmp_path: Path) -> None:
    """A message with line breaks cannot add lines that look like Capsule's."""
    path = write(tmp_path, FAILING)
    done = capsule_raw("run", str(path), "--no-journal", "-v", "--retry-backoff", "0")
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert "\r" not in stderr
    retrying = [line for line in stderr.splitlines() if line.startswith("capsule: retry")]
    assert len(retrying) == 1, done.stderr
    assert "first line\\n\\x1b]52;c;" in retrying[0]
    for line in stderr.splitlines():
        if line.startswith("capsule: ") and "completed" in line:
            assert not line.startswith("capsule: completed"), line


def test_verbose_http_url_is_shown_visibly(tmp_path: Path, http_server: object) -> None:
    url = f"{http_server.url}/echo?q=\x1b]52;c;SGFja2Vk\x07\u202e"  # type: ignore[attr-defined]
    path = write(
        tmp_path,
        f"""
        import capsule
        from capsule import task

        @task(name="main", allowed_hosts=["127.0.0.1"])
        def main():
            try:
                capsule.http.get({url!r})
            except Exception as exc:
                return type(exc).__name__
            return "sent"
        """,
    )
    done = capsule_raw("run", str(path), "--no-journal", "-v")
    assert done.returncode == 0, done.stderr
    _visible_only(done.stderr)
    assert b"capsule: http main: GET" in done.stderr


def test_a_result_with_a_lone_surrogate_never_reaches_a_stream(tmp_path: Path) -> None:
    """No UTF-8 stream can encode "\\ud800": the guest refuses such a result
    where it is returned (a ValueError of the task), and the error shows it
    escaped, on a pipe as on a terminal."""
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", max_retries=0)
        def main():
            return "lone \\ud800 surrogate"
        """,
    )
    done = capsule_cli("run", str(path), "--no-journal")
    assert done.returncode == 1, done.stderr
    assert "lone surrogate ('\\ud800')" in done.stderr
    envelope = capsule_cli("run", str(path), "--no-journal", "--json").json()
    assert envelope["error"]["kind"] == "exception" and envelope["result"] is None
    code, out, err = run_on_terminal(["run", str(path), "--no-journal"], tmp_path)
    assert code == 1 and out == b"", err
    assert b"lone surrogate ('\\ud800')" in err


def test_inspect_and_runs_show_journaled_guest_text_visibly(tmp_path: Path) -> None:
    """Results, errors, task names and the program's path, from a journal."""
    directory = tmp_path / ("dir\x1b]0;title\x07\u202e")
    directory.mkdir()
    path = write(
        directory,
        f"""
        from capsule import task

        HOSTILE = {HOSTILE!r}

        @task(name="named" + HOSTILE)
        def named():
            return "value\\n" + HOSTILE

        @task(name="broken", max_retries=0)
        def broken():
            raise ValueError("message\\n" + HOSTILE)

        @task(name="main")
        def main():
            named()
            try:
                broken()
            except Exception:
                pass
            return HOSTILE
        """,
    )
    journal = tmp_path / "journal.db"
    done = capsule_cli("run", str(path), "--journal", str(journal))
    assert done.returncode == 0, done.stderr
    shown = capsule_raw("inspect", "--last", "--journal", str(journal))
    assert shown.returncode == 0, shown.stderr
    _visible_only(shown.stdout)
    lines = shown.stdout.decode().splitlines()
    assert len(lines) == 4, shown.stdout  # the run, and one line per task
    assert "dir\\x1b]0;title\\x07\\u202e" in lines[0]
    # A result is shown as its JSON text, which escapes controls itself.
    assert any("named\\x1b]52;c;" in line and '"value\\n\\u001b' in line for line in lines)
    assert any("message\\n\\x1b]52;c;" in line for line in lines)
    listed = capsule_raw("runs", "--journal", str(journal))
    assert listed.returncode == 0, listed.stderr
    _visible_only(listed.stdout)
    assert len(listed.stdout.splitlines()) == 2
    code, out, err = run_on_terminal(["inspect", "--last", "--journal", str(journal)], tmp_path)
    assert code == 0, err
    _visible_only(out)
    # --json keeps the exact values.
    as_json = capsule_cli("inspect", "--last", "--json", "--journal", str(journal)).json()
    assert as_json["program"] == str(path)
    assert {task["name"] for task in as_json["tasks"]} == {"main", "named" + HOSTILE, "broken"}
    assert capsule_cli("runs", "--json", "--journal", str(journal)).json()[0]["program"] == str(
        path
    )


def test_errors_quoting_a_file_name_are_visible(tmp_path: Path) -> None:
    """A program path (say, from `capsule run *.py` in a downloaded directory)."""
    name = "no\x1b]52;c;SGFja2Vk\x07such.py"
    done = capsule_raw("run", str(tmp_path / name))
    assert done.returncode == 2
    _visible_only(done.stderr)
    assert b"no\\x1b]52;c;SGFja2Vk\\x07such.py" in done.stderr


def test_json_output_is_json_even_when_a_result_holds_nan(tmp_path: Path) -> None:
    """NaN and Infinity are not JSON: a result holding them is refused where
    it is returned, and the envelope (and inspect --json) stay strict JSON for
    a strict reader."""
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", max_retries=0)
        def main():
            return {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "ok": 1.5}
        """,
    )

    def strict(text: bytes) -> Any:
        def refuse(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        return json.loads(text, parse_constant=refuse)

    journal = tmp_path / "journal.db"
    done = capsule_raw("run", str(path), "--json", "--journal", str(journal))
    assert done.returncode == 1, done.stderr
    error = strict(done.stdout)["error"]
    assert error["kind"] == "exception" and "Out of range float values" in error["message"]
    shown = capsule_raw("inspect", "--last", "--json", "--journal", str(journal))
    assert shown.returncode == 0, shown.stderr
    strict(shown.stdout)


def test_text_the_output_encoding_cannot_hold_is_escaped_not_a_traceback(tmp_path: Path) -> None:
    """PYTHONIOENCODING=ascii (or a Latin-1 locale) and a task printing Chinese."""
    path = write(
        tmp_path,
        """
        import sys
        from capsule import task

        @task(name="main")
        def main():
            print("\u4e2d\u6587 ok")
            print("\u2713 err", file=sys.stderr)
            return "r\u00e9sum\u00e9"
        """,
    )
    done = capsule_raw("run", str(path), "--no-journal", env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"\\u4e2d\\u6587 ok\nr\\xe9sum\\xe9\n"
    assert done.stderr == b"\\u2713 err\n"
