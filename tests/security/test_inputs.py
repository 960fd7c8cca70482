"""Hostile or odd inputs to the `capsule` command: flags, ARGS, --args-json, the
program path, capsule.toml, .env, the journal's path and records, the standard
streams. Each gives exit 2 and a message naming the file (or flag) and what is
wrong: never a traceback, never a hang."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import capsule_cli
from tests.security.support import write

PROGRAM = """
    import os
    from capsule import task

    @task(name="main", env=["GRANTED"])
    def main(*args):
        return {"args": list(args), "granted": os.environ.get("GRANTED")}
"""
#: Guards against a hang (a FIFO read, a runaway parse); not a timing assertion.
HANG_GUARD_SECONDS = 120


@pytest.fixture
def prog(tmp_path: Path) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(PROGRAM))
    return path


def capsule_raw(*args: str | bytes, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """`capsule ARGS`, where an argument may be bytes that are not UTF-8."""
    return subprocess.run(
        [sys.executable, "-m", "capsule.cli", *args],
        capture_output=True,
        cwd=cwd,
        timeout=HANG_GUARD_SECONDS,
    )


def refused(done: object, *expected: str) -> None:
    """Exit 2, no traceback, and a message holding each of ``expected``."""
    code = getattr(done, "returncode")  # noqa: B009 (Completed or CompletedProcess)
    stderr = getattr(done, "stderr")  # noqa: B009
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    for text in expected:
        assert text in stderr, stderr


# -- ARGS and --args-json ---------------------------------------------------------


def test_args_json_nested_too_deeply_is_refused(prog: Path) -> None:
    deep = "[" * 3000 + "]" * 3000
    refused(capsule_cli("run", str(prog), "--args-json", deep), "nests deeper than 200 levels")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_args_json_that_is_not_json_is_refused(prog: Path, constant: str) -> None:
    refused(
        capsule_cli("run", str(prog), "--args-json", f"[1, {constant}]"),
        "--args-json",
        "not valid JSON" if "e" not in constant else "number too large",
    )


@pytest.mark.parametrize("value", ['["\\ud800"]', '[{"\\udfff": 1}]', '[[["a\\ud83d"]]]'])
def test_args_json_with_a_lone_surrogate_is_refused(prog: Path, value: str) -> None:
    refused(capsule_cli("run", str(prog), "--args-json", value), "lone surrogate")


def test_args_that_are_not_utf8_are_refused(prog: Path) -> None:
    refused(
        capsule_raw("run", str(prog), "ok", b"\xff\xfe"), "argument 2 for main is not valid UTF-8"
    )
    refused(
        capsule_raw("run", str(prog), "--args-json", b'["\xff"]'), "--args-json is not valid UTF-8"
    )


# -- flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--cpu-slots", str(10**30)),
        ("--cpu-slots", "-1"),
        ("--cpu-slots", "0"),
        ("--cpu-slots", "nan"),
        ("--cpu-slots", "9" * 5000),  # past int()'s digit limit
        ("--max-live-tasks", str(10**30)),
        ("--max-children", "1e3"),
        ("--mailbox-capacity", "-5"),
        ("--retry-backoff", "nan"),
        ("--retry-backoff", "inf"),
        ("--retry-backoff", "-1"),
        ("--retry-backoff", "1e308"),
        ("--max-ram", "1e400"),
        ("--max-ram", "9" * 400 + "TB"),
        ("--max-timeout", "9" * 400 + "h"),
        ("--max-timeout", "nan"),
        ("--max-fuel", "9" * 5000),
        ("--max-message-size", "9" * 400 + "TB"),
        ("--max-queued-size", "9" * 400 + "TB"),
        ("--max-total-ram", "9" * 400 + "TB"),
        ("--hibernate-after", "9" * 400),
        ("--hibernate-after", "inf"),
    ],
)
def test_odd_flag_values_are_refused(prog: Path, flag: str, value: str) -> None:
    done = capsule_cli("run", str(prog), flag, value, "--no-journal")
    refused(done, flag)


def test_flag_messages_show_control_characters_visibly(prog: Path) -> None:
    done = capsule_raw("run", str(prog), "--cpu-slots", "\x1b]52;c;SGFja2Vk\x07")
    refused(done, "--cpu-slots", "\\x1b]52;c;SGFja2Vk\\x07")
    assert b"\x1b" not in done.stderr
    done = capsule_raw("runs", "\x1b[2J")  # argparse's "unrecognized arguments"
    refused(done, "\\x1b[2J")
    assert b"\x1b" not in done.stderr


# -- the program file ---------------------------------------------------------------


def test_program_paths_that_are_not_programs_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    refused(capsule_cli("run", str(fifo)), f"{fifo} is not a regular file")
    refused(capsule_cli("run", str(tmp_path)), "is a directory")
    refused(capsule_raw("run", b"/nonexistent/\xff.py"), "no such program file", "\\udcff")
    refused(capsule_cli("run", "/dev/null"), "/dev/null is not a regular file")


# -- capsule.toml ---------------------------------------------------------------------


def test_capsule_toml_nested_too_deeply_is_refused(prog: Path) -> None:
    toml = prog.parent / "capsule.toml"
    toml.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(capsule_cli("run", str(prog), "--no-journal"), str(toml), "nested too deeply")
    toml.write_text("[tasks]\nram = " + "[" * 50 + "]" * 50 + "\n")
    refused(capsule_cli("run", str(prog), "--no-journal"), str(toml), "nested too deeply")


def test_capsule_toml_that_is_not_a_file_is_refused_without_waiting(prog: Path) -> None:
    toml = prog.parent / "capsule.toml"
    os.mkfifo(toml)  # reading it would wait for a writer forever
    refused(capsule_cli("run", str(prog), "--no-journal"), f"{toml} is not a regular file")
    toml.unlink()
    toml.mkdir()
    refused(capsule_cli("run", str(prog), "--no-journal"), f"{toml} is a directory")


def test_capsule_toml_too_large_or_not_utf8_is_refused(prog: Path) -> None:
    toml = prog.parent / "capsule.toml"
    toml.write_text("# " + "x" * (2 * 1024**2) + "\n")
    refused(capsule_cli("run", str(prog), "--no-journal"), str(toml), "the most Capsule reads")
    toml.write_bytes(b"[tasks]\n\nram = '\xff'\n")
    refused(capsule_cli("run", str(prog), "--no-journal"), str(toml), "line 3 is not valid UTF-8")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Past int()'s digit limit: tomllib raises a plain ValueError.
        ("[tasks]\ncompute = " + "9" * 5000, "capsule.toml: cannot be read as TOML"),
        ("[tasks]\ntimeout = inf", "capsule.toml: [tasks] option timeout=inf is invalid"),
        ("[tasks]\nram = 1e400", "capsule.toml: [tasks] option ram=inf is invalid"),
        # A path the OS refuses (ENAMETOOLONG) as the grant is resolved.
        ("[tasks]\nallowed_files = ['" + "a/" * 3000 + "']", "invalid task config"),
    ],
)
def test_capsule_toml_odd_values_are_refused(prog: Path, content: str, message: str) -> None:
    (prog.parent / "capsule.toml").write_text(content + "\n")
    refused(capsule_cli("run", str(prog), "--no-journal"), message)


def test_capsule_toml_policy_with_an_infinite_size_is_refused(prog: Path) -> None:
    toml = prog.parent / "capsule.toml"
    toml.write_text(f'[policy]\nmax_ram = "{"9" * 400}TB"\n')
    refused(capsule_cli("run", str(prog), "--no-journal"), str(toml), "[policy] max_ram")


def test_task_config_with_an_infinite_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prog.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from capsule import task

            @task(name="main", ram="{"9" * 400}TB")
            def main():
                return 1
            """
        )
    )
    refused(capsule_cli("run", str(path), "--no-journal"), "ram=")


# -- .env ---------------------------------------------------------------------------


def test_dotenv_values_reach_a_granted_task(prog: Path) -> None:
    (prog.parent / ".env").write_text('GRANTED="from ${HOME_DIR}"\nHOME_DIR=x\n# note\n')
    done = capsule_cli("run", str(prog), "--no-journal", env={"HOME_DIR": "home"})
    assert done.returncode == 0, done.stderr
    assert done.json()["granted"] == "from home"


def test_dotenv_not_utf8_is_refused_naming_the_line(prog: Path) -> None:
    dotenv = prog.parent / ".env"
    dotenv.write_bytes(b"A=1\nGRANTED=\xff\xfe\n")
    done = capsule_cli("run", str(prog), "--no-journal")
    refused(done, str(dotenv), "line 2 is not valid UTF-8")


def test_dotenv_that_is_a_fifo_is_refused_without_waiting(prog: Path) -> None:
    dotenv = prog.parent / ".env"
    os.mkfifo(dotenv)
    refused(capsule_cli("run", str(prog), "--no-journal"), f"{dotenv} is not a regular file")


def test_dotenv_directory_is_a_virtualenv_not_a_file(prog: Path) -> None:
    """`python -m venv .env` is a common name for a project's virtualenv."""
    (prog.parent / ".env").mkdir()
    done = capsule_cli("run", str(prog), "--no-journal")
    assert done.returncode == 0, done.stderr


def test_dotenv_too_large_is_refused_at_once(prog: Path) -> None:
    dotenv = prog.parent / ".env"
    dotenv.write_text("A=1\n" * 2_000_000)  # 8 MB: python-dotenv alone takes minutes
    refused(capsule_cli("run", str(prog), "--no-journal"), str(dotenv), "the most Capsule reads")
    dotenv.write_text("\n" * 20_000)  # small, but a parse of ~40 us per line
    refused(capsule_cli("run", str(prog), "--no-journal"), str(dotenv), "lines")


def test_dotenv_near_the_bounds_is_read_at_once(prog: Path) -> None:
    """Just under the bounds: a line per variable (python-dotenv's expansion
    copies every variable for each line), and a value of unclosed "${" (which
    its pattern scans to the end from each)."""
    dotenv = prog.parent / ".env"
    lines = [f"V{n}=1" for n in range(9_000)]
    lines.append("UNCLOSED=" + "${A:" * 40_000)
    lines.append("GRANTED=last")
    dotenv.write_text("\n".join(lines) + "\n")
    done = capsule_cli("run", str(prog), "--no-journal", timeout=HANG_GUARD_SECONDS)
    assert done.returncode == 0, done.stderr
    assert done.json()["granted"] == "last"


def test_dotenv_expanding_without_bound_is_refused(prog: Path) -> None:
    """Each line doubles the one before: 2**60 bytes from a few hundred."""
    dotenv = prog.parent / ".env"
    lines = ["A0=xxxxxxxxxxxxxxxx"]
    lines += [f"A{n}=${{A{n - 1}}}${{A{n - 1}}}" for n in range(1, 60)]
    dotenv.write_text("\n".join(lines) + "\n")
    refused(capsule_cli("run", str(prog), "--no-journal"), str(dotenv), "expand")


def test_dotenv_errors_name_lines_never_values(prog: Path) -> None:
    dotenv = prog.parent / ".env"
    dotenv.write_text('A=1\nSECRET="sk-live-123\n')  # an unclosed quote
    done = capsule_cli("run", str(prog), "--no-journal")
    refused(done, str(dotenv), "line 2")
    assert "sk-live" not in done.stderr
    dotenv.write_bytes(b"GRANTED=sk-live-\x00456\n")
    done = capsule_cli("run", str(prog), "--no-journal")
    refused(done, str(dotenv), "GRANTED", "NUL")
    assert "sk-live" not in done.stderr


# -- the journal ------------------------------------------------------------------------


def test_journal_paths_that_are_not_journal_files_are_refused(prog: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    for args in (["run", str(prog)], ["runs"], ["inspect", "--last"], ["resume", "--last"]):
        refused(
            capsule_cli(*args, "--journal", str(fifo)), f"the journal {fifo} is not a regular file"
        )
        refused(capsule_cli(*args, env={"CAPSULE_JOURNAL": str(fifo)}), str(fifo))
        refused(capsule_cli(*args, "--journal", "/dev/null"), "/dev/null is not a regular file")
        refused(capsule_cli(*args, "--journal", str(tmp_path)), "is a directory")
        refused(capsule_cli(*args, "--journal", ""), "--journal needs a path")
    refused(
        capsule_cli("run", str(prog), "--journal", str(prog / "journal.db")),
        str(prog / "journal.db"),
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_journal_is_refused(prog: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    assert capsule_cli("run", str(prog), "--journal", str(journal)).returncode == 0
    journal.chmod(0)
    try:
        refused(capsule_cli("runs", "--journal", str(journal)), str(journal))
        refused(capsule_cli("run", str(prog), "--journal", str(journal)), str(journal))
    finally:
        journal.chmod(0o600)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE runs SET args_json = '{'",
        "UPDATE runs SET settings_json = '[['",
        "UPDATE runs SET started_at = 'yesterday'",
        "UPDATE tasks SET error_json = '\"a string\"' WHERE name = 'main'",
        "UPDATE tasks SET fuel = 'lots'",
        "UPDATE tasks SET result_json = '{' WHERE name = 'main'",
        "UPDATE tasks SET parent_id = task_id",
        "UPDATE runs SET status = 'running', seed = 'not hex'",
        "UPDATE runs SET status = 'running', settings_json = '7'",
        "UPDATE runs SET status = 'running'; UPDATE tasks SET error_json = '\"a string\"'",
    ],
)
def test_damaged_journal_records_are_refused_not_a_traceback(
    prog: Path, tmp_path: Path, damage: str
) -> None:
    journal = tmp_path / "journal.db"
    assert capsule_cli("run", str(prog), "--journal", str(journal)).returncode == 0
    with sqlite3.connect(journal) as db:
        db.executescript(damage)
    for args in (
        ["runs"],
        ["runs", "--json"],
        ["inspect", "--last"],
        ["inspect", "--last", "--json"],
        ["resume", "--last"],
    ):
        done = capsule_cli(*args, "--journal", str(journal))
        assert "Traceback" not in done.stderr, (args, done.stderr)
        assert done.returncode in (0, 2), (args, done.stderr)
        if done.returncode == 2:  # (a resume may also find the run ended)
            assert "capsule: error: " in done.stderr
            assert f"the journal {journal}" in done.stderr or args[0] == "resume"


def test_capsule_home_that_cannot_hold_the_runtime_is_reported(prog: Path, tmp_path: Path) -> None:
    for home in ("/dev/null", str(prog)):
        done = capsule_cli("run", str(prog), "--no-journal", env={"CAPSULE_HOME": home})
        assert done.returncode == 3, done.stderr
        assert "Traceback" not in done.stderr
        assert "cannot create the runtime cache" in done.stderr


# -- the standard streams ------------------------------------------------------------------


def test_a_closed_stdout_does_not_end_up_in_the_journal(prog: Path, tmp_path: Path) -> None:
    """`capsule run p.py >&-`: the journal, opened first, would get descriptor 1."""
    journal = tmp_path / "journal.db"
    closed = subprocess.run(
        [
            "sh",
            "-c",
            f'exec "{sys.executable}" -m capsule.cli run "{prog}" --journal "{journal}" >&- 2>&-',
        ],
        timeout=HANG_GUARD_SECONDS,
    )
    assert closed.returncode == 0
    listed = capsule_cli("inspect", "--last", "--json", "--journal", str(journal))
    assert listed.returncode == 0, listed.stderr
    assert listed.json()["status"] == "completed"
    with sqlite3.connect(journal) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", "10**400"),
        ("restart_window", "10**400"),
        ("ram", '"9" * 400 + "GB"'),
        ("timeout", '"9" * 400 + "h"'),
        ("compute", "2**64"),  # (wasmtime's fuel would wrap around to nothing)
        ("compute", '"9" * 30'),
        ("ram", "10**30"),
    ],
)
def test_task_options_too_large_for_a_float_are_config_errors(
    tmp_path: Path, option: str, value: str
) -> None:
    """The program declares its tasks' options (its module-level code may
    write any JSON there): a number no float holds crashed the host with a
    traceback (OverflowError) and left the run as crashed in the journal."""
    program = write(
        tmp_path,
        f"""
        from capsule import task
        from capsule.sdk import task as sdk_task

        @task(name="main")
        def main():
            return "ran"

        for declared in sdk_task.registry.values():
            declared.options["{option}"] = {value}
        """,
    )
    done = capsule_cli("run", str(program), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and option in done.stderr, done.stderr[-2000:]
    runs = capsule_cli("runs", "--json", cwd=tmp_path)
    assert [run["status"] for run in json.loads(runs.stdout)] == ["error"]
