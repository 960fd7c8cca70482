"""The `capsule` command as a user runs it: real subprocesses, exit codes, output."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, capsule_cli


def write(tmp_path: Path, source: str, name: str = "prog.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_console_script_runs_hello() -> None:
    executable = shutil.which("capsule")
    assert executable is not None, "the capsule console script is not installed"
    process = subprocess.run(
        [executable, "run", str(EXAMPLES / "hello.py")], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout == "Hello from Capsule!\n"


def test_result_printed_as_json_for_non_strings() -> None:
    done = capsule_cli("run", str(EXAMPLES / "analyze.py"))
    assert done.returncode == 0, done.stderr
    assert done.json() == {"processed": 5, "status": "complete"}


ECHO = """
    from capsule import task

    @task(name="main")
    def main(*args):
        return {"args": list(args), "types": [type(a).__name__ for a in args]}
"""


def test_positional_args_are_strings(tmp_path: Path) -> None:
    path = write(tmp_path, ECHO)
    done = capsule_cli("run", str(path), "a", "42", "--verbose", "b")
    assert done.returncode == 0, done.stderr
    assert done.json() == {"args": ["a", "42", "b"], "types": ["str", "str", "str"]}


def test_args_json_gives_typed_values(tmp_path: Path) -> None:
    path = write(tmp_path, ECHO)
    done = capsule_cli("run", str(path), "--args-json", '[1, 2.5, {"k": [true, null]}]')
    assert done.returncode == 0, done.stderr
    assert done.json() == {"args": [1, 2.5, {"k": [True, None]}], "types": ["int", "float", "dict"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--args-json", "{not json"], "--args-json is not valid JSON"),
        (["--args-json", '{"a": 1}'], "must be a JSON list"),
        (["x", "--args-json", "[1]"], "either ARGS or --args-json"),
        (["--max-ram", "lots"], "--max-ram 'lots' is invalid"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    path = write(tmp_path, ECHO)
    done = capsule_cli("run", str(path), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""


def test_missing_file_exits_2(tmp_path: Path) -> None:
    done = capsule_cli("run", str(tmp_path / "nope.py"))
    assert done.returncode == 2
    assert "no such program file" in done.stderr


def test_missing_main_exits_2(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from capsule import task

        @task
        def helper():
            return 1
        """,
    )
    done = capsule_cli("run", str(path))
    assert done.returncode == 2
    assert "no task named 'main'" in done.stderr and "helper" in done.stderr


def test_bad_config_exits_2_before_any_task_runs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(compute="TURBO", ram="12 apples")
        def worker():
            print("should never run")

        @task(name="main", timeout="forever")
        def main():
            print("should never run")
            return worker()
        """,
    )
    done = capsule_cli("run", str(path), "--verbose")
    assert done.returncode == 2
    assert "task 'worker' (prog.worker): option compute='TURBO' is invalid" in done.stderr
    assert "option ram='12 apples' is invalid" in done.stderr
    assert "task 'main' (prog.main): option timeout='forever' is invalid" in done.stderr
    assert "LOW, MEDIUM or HIGH" in done.stderr
    assert "should never run" not in done.stdout + done.stderr
    assert "started" not in done.stderr


def test_duplicate_task_names_exit_2(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main")
        def main():
            return 1

        @task(name="main")
        def other_main():
            return 2
        """,
    )
    done = capsule_cli("run", str(path))
    assert done.returncode == 2
    assert "two tasks are named 'main'" in done.stderr


def test_syntax_error_in_program_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "def broken(:\n")
    done = capsule_cli("run", str(path))
    assert done.returncode == 2
    assert "SyntaxError" in done.stderr


FAILING = """
    from capsule import task

    @task(name="main", max_retries=1)
    def main():
        print("trying")
        raise RuntimeError("the workflow broke")
"""


def test_failed_workflow_exits_1_with_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, FAILING)
    done = capsule_cli("run", str(path), "--retry-backoff", "0.01")
    assert done.returncode == 1
    assert (
        "task 'main' failed (exception) after 2 attempt(s): RuntimeError: the workflow broke"
        in done.stderr
    )
    assert 'raise RuntimeError("the workflow broke")' in done.stderr
    assert done.stdout == "trying\ntrying\n"


def test_json_envelope_on_success() -> None:
    done = capsule_cli("run", str(EXAMPLES / "analyze.py"), "--json")
    assert done.returncode == 0, done.stderr
    envelope = done.json()
    assert envelope["success"] is True
    assert envelope["result"] == {"processed": 5, "status": "complete"}
    assert envelope["error"] is None
    execution = envelope["execution"]
    assert set(execution) == {
        "run_id",
        "task",
        "duration_ms",
        "attempts",
        "fuel_consumed",
        "peak_memory_bytes",
    }
    assert execution["task"] == "main" and execution["attempts"] == 1
    assert execution["fuel_consumed"] > 0 and execution["duration_ms"] > 0
    assert len(execution["run_id"]) >= 8


def test_peak_memory_is_the_size_of_the_main_task_s_memory(tmp_path: Path) -> None:
    from capsule.sandbox.engine import MIN_RAM_BYTES
    from capsule.sandbox.prefault import _kernel_can_query_mappings

    if not _kernel_can_query_mappings():
        pytest.skip("this kernel has no PROCMAP_QUERY (6.11): peak memory is not measured")
    path = tmp_path / "grows.py"
    path.write_text(
        "from capsule import task\n\n"
        "@task(name='main', ram='512MB')\n"
        "def main(mb: str) -> int:\n"
        "    kept = b'x' * (int(mb) * 1024 * 1024)\n"
        "    return len(kept) // (1024 * 1024)\n"
    )
    peaks = []
    for mb in ("1", "200"):
        done = capsule_cli("run", str(path), mb, "--json", "--no-journal")
        assert done.returncode == 0, done.stderr
        peaks.append(done.json()["execution"]["peak_memory_bytes"])
    small, large = peaks
    assert MIN_RAM_BYTES <= small < 64 * 1024**2  # the runtime's own memory
    assert large - small >= 190 * 1024**2


def test_json_envelope_on_failure(tmp_path: Path) -> None:
    path = write(tmp_path, FAILING)
    done = capsule_cli("run", str(path), "--json", "--retry-backoff", "0")
    assert done.returncode == 1
    envelope = done.json()  # stdout holds the envelope alone; guest prints went to stderr
    assert envelope["success"] is False and envelope["result"] is None
    assert envelope["error"]["kind"] == "exception"
    assert envelope["error"]["task"] == "main"
    assert envelope["error"]["message"] == "RuntimeError: the workflow broke"
    assert "Traceback" in envelope["error"]["traceback"]
    assert envelope["execution"]["attempts"] == 2
    assert "trying" in done.stderr


def test_json_envelope_on_config_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'from capsule import task\n\n@task(name="main", max_retries=-2)\ndef main():\n    return 1\n',
    )
    done = capsule_cli("run", str(path), "--json")
    assert done.returncode == 2
    envelope = done.json()
    assert envelope["success"] is False
    assert envelope["error"]["kind"] == "config"
    assert "max_retries=-2" in envelope["error"]["message"]


def test_verbose_shows_lifecycle_and_tagged_output(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import capsule
        from capsule import task

        @task(max_retries=1)
        def flaky():
            print("attempt", capsule.current().attempt)
            if capsule.current().attempt == 1:
                raise ValueError("first try")
            return "ok"

        @task(name="main")
        def main():
            return flaky()
        """,
    )
    done = capsule_cli("run", str(path), "--verbose", "--retry-backoff", "0.01")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "[main/1 flaky] attempt 1",
        "[main/1 flaky] attempt 2",
        "ok",
    ]
    err = done.stderr
    assert "started main, attempt 1/2" in err
    assert "started main/1 (flaky), attempt 1/2" in err
    assert "retrying main/1 (flaky): attempt 1 failed (exception: ValueError: first try)" in err
    assert "completed main/1 (flaky) in" in err and "fuel" in err
    assert err.index("retrying main/1") < err.index("completed main/1")


def test_verbose_failure_names_kind(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", timeout="200ms", max_retries=0, compute="HIGH")
        def main():
            while True:
                pass
        """,
    )
    done = capsule_cli("run", str(path), "--verbose")
    assert done.returncode == 1
    assert "failed main (timeout) after 1 attempt(s)" in done.stderr


def test_c_extension_import_names_module_and_reason(tmp_path: Path) -> None:
    pytest.importorskip("pydantic_core")
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", compute="HIGH", max_retries=0)
        def main():
            import pydantic_core
        """,
    )
    done = capsule_cli("run", str(path))
    assert done.returncode == 1
    assert "pydantic_core._pydantic_core" in done.stderr
    assert (
        "is a C extension" in done.stderr and "cannot run in the WebAssembly sandbox" in done.stderr
    )


def test_unavailable_module_names_module(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", max_retries=0)
        def main():
            import tkinter
        """,
    )
    done = capsule_cli("run", str(path))
    assert done.returncode == 1
    assert "No module named 'tkinter': it is not in the sandbox's standard library" in done.stderr


def test_the_stdlib_modules_libraries_import_and_every_codec_are_there(tmp_path: Path) -> None:
    """Libraries import platform, pickle, threading, asyncio... at their top
    (attrs imported platform and failed), and codecs are modules the registry
    imports by name (idna's punycode failed): all are in the snapshot."""
    path = write(
        tmp_path,
        """
        from capsule import task

        @task(name="main", max_retries=0)
        def main():
            import asyncio, configparser, pickle, platform, queue, shutil, tempfile
            import threading, zipfile, xml.etree.ElementTree as tree

            assert pickle.loads(pickle.dumps({"a": [1, 2]})) == {"a": [1, 2]}
            assert tree.fromstring("<a><b/></a>")[0].tag == "b"
            return [
                "bücher".encode("punycode").decode(),
                "bü".encode("cp1252").hex(),
                "€".encode("utf-16-le").hex(),
                platform.python_implementation(),
            ]
        """,
    )
    done = capsule_cli("run", str(path), "--no-journal")
    assert done.returncode == 0, done.stderr
    assert done.json() == ["bcher-kva", "62fc", "ac20", "CPython"]


def test_user_modules_and_pure_python_packages_load_at_run_time(tmp_path: Path) -> None:
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("from .text import shout\n")
    (tmp_path / "helpers" / "text.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    path = write(
        tmp_path,
        """
        from capsule import task
        from helpers import shout
        import typing_extensions  # a pure-Python package from the host environment

        @task(name="main")
        def main(word):
            return shout(word) + " " + typing_extensions.__name__
        """,
    )
    done = capsule_cli("run", str(path), "hey")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "HEY! typing_extensions\n"
    # Editing the program takes effect on the next run with no rebuild.
    (tmp_path / "helpers" / "text.py").write_text("def shout(s):\n    return s.lower() + '?'\n")
    done = capsule_cli("run", str(path), "HEY")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hey? typing_extensions\n"
    assert "building the guest runtime" not in done.stderr


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_cancels_every_task_and_exits_130(tmp_path: Path, signal_name: str) -> None:
    """Ctrl-C, and SIGTERM (`kill`, `docker stop`) alike."""
    import signal
    import sys
    import time

    path = write(
        tmp_path,
        """
        from capsule import task

        @task(compute="HIGH", max_retries=5)
        def spin():
            print("spinning", flush=True)
            while True:
                pass

        @task(name="main", compute="HIGH", max_retries=5)
        def main():
            return spin()
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    assert process.stderr.readline() == "spinning\n"  # the child is in its CPU loop
    process.send_signal(getattr(signal, signal_name))
    interrupted_at = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert time.monotonic() - interrupted_at < 10  # not after the fuel runs out (~12 s)
    envelope = json.loads(out)
    assert envelope["error"]["kind"] == "cancelled"
    assert envelope["error"]["message"] == "cancelled: the run was interrupted"
    assert envelope["execution"]["attempts"] == 1  # a cancelled task is not retried
    assert "every task was cancelled" in err


def test_arguments_that_do_not_fit_fail_once_with_a_clear_message() -> None:
    done = capsule_cli("run", str(EXAMPLES / "hello.py"), "unexpected", "--json")
    assert done.returncode == 1
    envelope = done.json()
    assert envelope["error"]["kind"] == "bad_arguments"
    assert envelope["error"]["message"] == (
        "task 'main' cannot take these arguments: "
        "main() takes 0 positional arguments but 1 was given"
    )
    assert envelope["execution"]["attempts"] == 1  # no retry can fix it


def test_run_limits_are_command_line_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import capsule
        from capsule import TaskError, task

        @task
        def idle():
            capsule.receive()

        @task(name="main")
        def main():
            started = []
            try:
                while True:
                    started.append(idle.spawn())
            except TaskError as error:
                return [len(started), error.kind]
        """,
    )
    done = capsule_cli(
        "run", str(path), "--max-children", "3", "--hibernate-after", "50ms", "--verbose"
    )
    assert done.returncode == 0, done.stderr
    assert done.json() == [3, "limit"]
    assert "cancelled main/1 (idle): cancelled: its parent ended" in done.stderr
    for flag in ("--max-message-size", "--max-queued-size"):
        bad = capsule_cli("run", str(path), flag, "huge")
        assert bad.returncode == 2
        assert f"{flag} 'huge' is invalid" in bad.stderr
    bad = capsule_cli("run", str(path), "--max-queued-size", "100KB")
    assert bad.returncode == 2
    assert "--max-queued-size (102,400 bytes) is below the largest message" in bad.stderr
    for never in ("soon", "0"):  # 0 would hibernate at every blocking wait
        bad = capsule_cli("run", str(path), "--hibernate-after", never)
        assert bad.returncode == 2
        assert f"--hibernate-after '{never}' is invalid; expected a duration" in bad.stderr


ENTRIES = """
    from capsule import task

    @task(name="main")
    def main():
        return "main ran"

    @task(name="double")
    def double(x):
        return x * 2
"""


@pytest.mark.parametrize("how", ["file:task", "--entry"])
def test_any_task_can_be_the_entry_point(tmp_path: Path, how: str) -> None:
    path = write(tmp_path, ENTRIES)
    target = [f"{path}:double"] if how == "file:task" else [str(path), "--entry", "double"]
    done = capsule_cli("run", *target, "--args-json", "[21]", "--json", "--verbose")
    assert done.returncode == 0, done.stderr
    envelope = done.json()
    assert envelope["result"] == 42 and envelope["execution"]["task"] == "double"
    assert "started main (double), attempt 1/" in done.stderr  # the root's id stays main


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (["{path}:nope"], "no task named 'nope' to run as the entry point"),
        (["{path}", "--entry", "nope"], "no task named 'nope' to run as the entry point"),
        (["{path}:"], "names no task after the colon"),
        (["{path}:double", "--entry", "main"], "give the entry task once"),
    ],
)
def test_an_unknown_entry_point_exits_2_listing_the_tasks(
    tmp_path: Path, target: list[str], message: str
) -> None:
    path = write(tmp_path, ENTRIES)
    done = capsule_cli("run", *(part.format(path=path) for part in target))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    if "no task named" in message:
        assert "tasks found: double, main" in done.stderr


CHILD_FAILS = """
    from capsule import task

    @task(name="worker", max_retries=0)
    def worker(x):
        return add_one(x)

    def add_one(x):
        return x + 1

    @task(name="main", max_retries=0)
    def main(x):
        return worker(x)
"""


def test_a_failing_childs_traceback_and_a_hint_on_string_args_are_shown(tmp_path: Path) -> None:
    path = write(tmp_path, CHILD_FAILS)
    done = capsule_cli("run", str(path), "3", "--no-journal")
    assert done.returncode == 1
    err = done.stderr
    assert "capsule: the failure began in task 'worker':" in err
    began = err.index("the failure began in task 'worker'")
    assert "in add_one" in err[began:] and "return x + 1" in err[began:]
    assert "capsule: hint: ARGS on the command line reach the task as strings" in err
    assert "--args-json" in err
    # Typed arguments that still fail: no hint about ARGS.
    typed = capsule_cli("run", str(path), "--args-json", '["3"]', "--no-journal")
    assert typed.returncode == 1
    assert "the failure began in task 'worker'" in typed.stderr
    assert "hint" not in typed.stderr


def test_inspect_shows_why_a_run_ended_in_error(tmp_path: Path) -> None:
    path = write(tmp_path, "from capsule import task\n\nraise RuntimeError('broken at import')\n")
    done = capsule_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 2
    shown = capsule_cli("inspect", "--last", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert ": error" in shown.stdout.splitlines()[0]
    assert "error: error: " in shown.stdout and "RuntimeError: broken at import" in shown.stdout
    as_json = capsule_cli("inspect", "--last", "--json", cwd=tmp_path).json()
    assert "broken at import" in as_json["error"]["message"]


def test_json_envelope_has_the_runs_totals(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import capsule
        from capsule import task, TaskError

        @task(max_retries=1)
        def flaky():
            if capsule.current().attempt == 1:
                raise ValueError("first try")
            return 1

        @task(max_retries=0)
        def broken():
            raise ValueError("always")

        @task(name="main")
        def main():
            try:
                broken()
            except TaskError:
                pass
            return flaky() + flaky()
        """,
    )
    done = capsule_cli("run", str(path), "--json", "--retry-backoff", "0", "--no-journal")
    assert done.returncode == 0, done.stderr
    envelope = done.json()
    totals = envelope["totals"]
    assert set(totals) == {"tasks", "failed", "retried", "fuel_consumed", "duration_ms"}
    assert (totals["tasks"], totals["failed"], totals["retried"]) == (4, 1, 2)
    assert totals["fuel_consumed"] > envelope["execution"]["fuel_consumed"] > 0
    assert totals["duration_ms"] >= envelope["execution"]["duration_ms"]


def test_verbose_shows_messages_sent_and_received(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        from capsule import receive, send, task

        @task(name="listener")
        def listener():
            return receive().body

        @task(name="main")
        def main():
            child = listener.spawn()
            send(child, {"hello": 1})
            return child.result()
        """,
    )
    done = capsule_cli("run", str(path), "--verbose", "--no-journal")
    assert done.returncode == 0, done.stderr
    sent = [line for line in done.stderr.splitlines() if " sent by main to main/1 " in line]
    received = [
        line
        for line in done.stderr.splitlines()
        if " received by main/1 (listener) from main" in line
    ]
    assert len(sent) == 1 and len(received) == 1, done.stderr


def test_an_unset_declared_env_var_is_a_warning_at_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import os
        from capsule import task

        @task(name="main", env=["CAPSULE_TEST_NEVER_SET", "CAPSULE_TEST_SET"])
        def main():
            return sorted(os.environ)
        """,
    )
    done = capsule_cli("run", str(path), "--no-journal", env={"CAPSULE_TEST_SET": "1"})
    assert done.returncode == 0, done.stderr
    assert done.json() == ["CAPSULE_TEST_SET"]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("capsule: warning")]
    assert len(warnings) == 1, done.stderr
    assert "task 'main'" in warnings[0] and "CAPSULE_TEST_NEVER_SET" in warnings[0]


def test_the_run_modules_load_without_collections_and_the_run_collects() -> None:
    """`capsule run` loads its modules with the garbage collector off (it would
    only walk what they made), then freezes what they made and turns it on
    again before the run starts."""
    import sys

    probe = (
        "import gc, capsule.cli as cli\n"
        "collections = []\n"
        "gc.callbacks.append(lambda phase, info: collections.append(phase))\n"
        "cli._load_run_modules()\n"
        "print(len(collections), gc.isenabled(), gc.get_freeze_count() > 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["0", "True", "True"]


def test_a_run_without_a_journal_loads_no_module_it_does_not_use() -> None:
    """Start-up: no journal (sqlite3) without --journal, no TOML parser without
    a capsule.toml, no live-task model (the TUI's) without --tui, no event loop
    of the run's own on task threads (the command's loop runs the host API)."""
    import sys

    unused = (
        "sqlite3",
        "tomllib",
        "capsule.host.live",
        "capsule.supervisor.run_loop",
        "capsule.supervisor.continuations",
    )
    probe = (
        "import sys, capsule.cli as cli\n"
        "try:\n"
        f"    cli.main(['run', {str(EXAMPLES / 'hello.py')!r}, '--no-journal', '--core', 'threads'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(name for name in {unused!r} if name in sys.modules))\n"
    )
    env = {**os.environ}
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.stdout.splitlines() == ["Hello from Capsule!", "[]"], done.stderr


def test_a_command_line_naming_a_command_declares_only_it_and_parses_the_same() -> None:
    from capsule.cli import _COMMANDS, _command_named, _parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        action = next(action for action in parser._actions if action.dest == "command")
        assert isinstance(action.choices, dict)
        return action.choices

    every = subcommands(_parser())
    assert list(every) == list(_COMMANDS)
    for name in _COMMANDS:
        assert _command_named([name, "--help"]) == name
        only = subcommands(_parser(name))
        assert list(only) == [name]
        assert only[name].format_help() == every[name].format_help()
    assert _command_named(["--version"]) is None
    assert _command_named(["bogus", "run"]) is None
