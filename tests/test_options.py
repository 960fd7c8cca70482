"""RunOptions: every run setting declared once. Each option has a field, a
flag, a row in docs/cli.md and a validation; a bad value names the option
through the core and the flag through the CLI; a run's options are recorded
and taken over by its resume, from journals old and forged too."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox.config import ConfigError
from capsule.supervisor.option_specs import (
    DEFAULT_MAX_MESSAGE_BYTES,
    OPTION_SPECS,
    RUN_OPTIONS,
    flag_of,
    options_table,
    size_text,
)
from capsule.supervisor.options import FORM_PARSERS, OptionError, RunOptions, shown
from tests.conftest import capsule_cli, kill_at_marker

ROOT = Path(__file__).resolve().parent.parent

#: For each form: values accepted (and what RunOptions holds), and values refused.
ACCEPTED: dict[str, list[tuple[Any, Any]]] = {
    "fuel": [("low", 100_000_000), (5000, 5000), ("5000", 5000)],
    "size": [("2MB", 2 * 1024**2), (4096, 4096), ("1.5KB", 1536)],
    "duration": [("500ms", 0.5), (3, 3.0), ("2m", 120.0)],
    "count": [(4, 4), ("4", 4), (1_000_000_000, 1_000_000_000)],
    "tasks": [(0, 0), ("0", 0), (4, 4), (1_000_000_000, 1_000_000_000)],
    "seconds": [(0, 0.0), (0.25, 0.25), ("3600", 3600.0)],
    "size_or_off": [("off", "off"), ("1GB", 1024**3)],
    "duration_or_off": [("off", "off"), ("50ms", 0.05)],
    "core": [("threads", "threads"), ("async", "async")],
}
REFUSED: dict[str, list[Any]] = {
    "fuel": ["loads", 0, -1, True, 2**63, 1.5],
    "size": ["lots", 0, "-1MB", True, "9" * 400 + "TB", [1]],
    "duration": ["soon", 0, "0", -1.0, math.inf, False],
    "count": ["many", 0, -3, 1_000_000_001, True, 2.0, "1e3", "9" * 40, "\uff14"],
    "tasks": ["many", -1, 1_000_000_001, False, 0.0, "1e3", "\u0663"],
    "seconds": ["later", -0.1, 3600.5, math.nan, math.inf, True, "nan"],
    "size_or_off": ["on", "lots", 0, "1MB", True],
    "duration_or_off": ["never", 0, "0s", True],
    "core": ["fibers", "", "ASYNC", 1, True, ["async"]],
}


def test_every_option_is_a_field_of_run_options_in_the_same_order() -> None:
    assert tuple(RunOptions.model_fields) == tuple(spec.name for spec in RUN_OPTIONS)
    for spec in RUN_OPTIONS:
        assert RunOptions.model_fields[spec.name].description == spec.help
        assert spec.flag == flag_of(spec.name) == "--" + spec.name.replace("_", "-")


@pytest.mark.parametrize("spec", RUN_OPTIONS, ids=lambda spec: spec.name)
def test_each_option_takes_its_forms_and_holds_them_canonical(spec: Any) -> None:
    # (A queue must hold the largest message: each size is tried with small ones.)
    others = {"max_message_size": 1} if spec.name == "max_queued_size" else {}
    for value, held in ACCEPTED[spec.form]:
        options = RunOptions(**{spec.name: value}, **others)
        assert getattr(options, spec.name) == held
        assert options.given() == {spec.name: held, **others}
        # What it holds is accepted again as it is (a journal records it so).
        assert RunOptions.from_mapping(options.given()) == options


@pytest.mark.parametrize("spec", RUN_OPTIONS, ids=lambda spec: spec.name)
def test_each_option_refuses_a_bad_value_naming_the_option(spec: Any) -> None:
    forms = FORM_PARSERS[spec.form][1]
    for value in REFUSED[spec.form]:
        with pytest.raises(OptionError) as raised:
            RunOptions(**{spec.name: value})
        error = raised.value
        assert isinstance(error, ConfigError)
        assert (error.option, error.value) == (spec.name, value)
        if "below" not in error.message:  # (max_total_ram's floor says so instead)
            assert error.message == f"{spec.name} {shown(value)} is invalid; expected {forms}"
        assert error.message.startswith(f"{spec.name} {shown(value)} is ")
        assert error.worded(flag_of).startswith(f"{spec.flag} {shown(value)} is ")
        assert str(error) == error.message


def test_the_queue_must_hold_the_largest_message() -> None:
    with pytest.raises(OptionError) as raised:
        RunOptions(max_queued_size="100KB")
    assert raised.value.option == "max_queued_size"
    assert raised.value.message == (
        "max_queued_size (102,400 bytes) is below the largest message (max_message_size, "
        f"{DEFAULT_MAX_MESSAGE_BYTES:,} bytes): such a message could never be sent"
    )
    assert raised.value.worded(flag_of).startswith(
        "--max-queued-size (102,400 bytes) is below the largest message (--max-message-size, "
    )
    with pytest.raises(OptionError, match=r"max_queued_size \(2,097,152 bytes\) is below"):
        RunOptions(max_message_size="4MB", max_queued_size="2MB")
    assert RunOptions(max_message_size="1KB", max_queued_size="100KB").given() == {
        "max_message_size": 1024,
        "max_queued_size": 102_400,
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_rams": "1GB"}, "'max_rams' is not a run option; the run options are max_fuel,"),
        ({7: 1}, "7 is not a run option"),
        ({"max_ram": {"nested": [1]}}, "max_ram {'nested': [1]} is invalid; expected a size"),
        ({"max_ram": "x" * 10_000}, "max_ram 'xxxxxxxx"),
    ],
)
def test_any_mapping_gives_options_or_an_option_error(values: dict[Any, Any], message: str) -> None:
    with pytest.raises(OptionError) as raised:
        RunOptions.from_mapping(values)
    assert raised.value.message.startswith(message)
    assert len(raised.value.message) < 1000  # a huge value is quoted shortened


@pytest.mark.parametrize("given", ["not a mapping", 5, [("max_ram", 1)], None])
def test_pydantic_validation_errors_never_leave_run_options(given: Any) -> None:
    with pytest.raises(OptionError, match="run options are"):
        RunOptions.model_validate(given)


def test_options_from_json_are_checked_as_any_others() -> None:
    with pytest.raises(OptionError, match="Invalid JSON"):
        RunOptions.model_validate_json("[not json")
    with pytest.raises(OptionError, match="'max_fuels' is not a run option"):
        RunOptions.model_validate_json('{"max_fuel": "LOW", "max_fuels": 1}')
    with pytest.raises(OptionError, match="max_fuel 'lots' is invalid"):
        RunOptions.model_validate_json('{"max_fuel": "lots"}')
    assert RunOptions.model_validate_json('{"max_fuel": "LOW"}').max_fuel == 100_000_000


def test_a_copy_with_changes_is_checked_too() -> None:
    options = RunOptions(max_ram="64MB", retry_backoff=1)
    changed = options.model_copy(update={"max_fuel": "low", "retry_backoff": None})
    assert changed.given() == {"max_ram": 64 * 1024**2, "max_fuel": 100_000_000}
    with pytest.raises(OptionError, match="max_fuel 'lots' is invalid"):
        options.model_copy(update={"max_fuel": "lots"})
    assert options.model_copy() == options
    assert options.replaced(RunOptions(max_ram="1GB")).given() == {
        "max_ram": 1024**3,
        "retry_backoff": 1.0,
    }


def test_defaults_are_declared_once() -> None:
    """The settings of a run given no options are RunSettings' defaults, which
    the help and docs quote from the same constants."""
    from capsule.sandbox.project import Project
    from capsule.supervisor.program import resolve_settings
    from capsule.supervisor.run import RunSettings

    settings, _ = resolve_settings(RunOptions(), Project())
    assert settings == RunSettings()
    assert f"({settings.max_live_tasks})" in OPTION_SPECS["max_live_tasks"].help
    assert f"({settings.max_children})" in OPTION_SPECS["max_children"].help
    assert f"({settings.mailbox_capacity})" in OPTION_SPECS["mailbox_capacity"].help
    for name, default in (
        ("max_message_size", settings.max_message_bytes),
        ("max_queued_size", settings.max_queued_bytes),
        ("max_task_output", settings.max_task_output_bytes),
        ("max_run_journal", settings.max_run_journal_bytes),
    ):
        assert f'(default "{size_text(default)}")' in OPTION_SPECS[name].help
    assert f"(default {settings.hibernate_after:g}s;" in OPTION_SPECS["hibernate_after"].help
    assert f"(default {settings.backoff.initial_s:g})" in OPTION_SPECS["retry_backoff"].help


def test_every_option_reaches_the_run_settings() -> None:
    from capsule.sandbox.budget import can_read_memory
    from capsule.sandbox.config import HostCaps
    from capsule.sandbox.prefault import can_measure_memory
    from capsule.sandbox.project import Project
    from capsule.supervisor.program import resolve_settings

    options = RunOptions(
        max_fuel="LOW",
        max_ram="64MB",
        max_timeout="2s",
        max_live_tasks=7,
        max_children=3,
        mailbox_capacity=9,
        max_message_size="2KB",
        max_queued_size="3MB",
        max_task_output="5MB",
        max_run_journal="6MB",
        hibernate_after="off",
        retry_backoff=0.5,
        max_total_ram="1GB",
    )
    settings, budget = resolve_settings(options, Project())
    assert settings.caps == HostCaps(100_000_000, 64 * 1024**2, 2.0)
    assert (settings.max_live_tasks, settings.max_children, settings.mailbox_capacity) == (7, 3, 9)
    assert (settings.max_message_bytes, settings.max_queued_bytes) == (2048, 3 * 1024**2)
    assert settings.max_task_output_bytes == 5 * 1024**2
    assert settings.max_run_journal_bytes == 6 * 1024**2
    assert settings.hibernate_after is None
    assert settings.backoff.initial_s == 0.5
    if can_read_memory() and can_measure_memory():
        assert budget == 1024**3
    # capsule.toml's [policy] caps them: the stricter wins.
    policy = Project(
        caps=HostCaps(10, None, 60.0), max_task_output_bytes=1024, max_run_journal_bytes=10**9
    )
    settings, _ = resolve_settings(options, policy)
    assert settings.caps == HostCaps(10, 64 * 1024**2, 2.0)
    assert (settings.max_task_output_bytes, settings.max_run_journal_bytes) == (1024, 6 * 1024**2)
    # cpu_slots sizes the sandbox, not the settings (test_scheduling runs it).
    assert RunOptions(cpu_slots=2).cpu_slots == 2


def test_a_budget_this_system_cannot_keep_names_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsule.supervisor import program
    from capsule.supervisor.program import RunRequest, run_program

    monkeypatch.setattr(program, "can_read_memory", lambda: False)
    path = tmp_path / "p.py"
    path.write_text("from capsule import task\n@task(name='main')\ndef main():\n    return 1\n")
    request = RunRequest(path=path, args=[], options=RunOptions(max_total_ram="1GB"))
    report = run_program(request, lambda event: None)
    assert report.result is None and report.option_error is not None
    assert report.option_error.option == "max_total_ram"
    assert report.usage_error is not None
    assert report.usage_error.startswith("max_total_ram needs Linux's /proc/self/statm")
    assert report.option_error.worded(flag_of).startswith("--max-total-ram needs Linux's")


def test_every_option_is_a_flag_of_capsule_run_and_resume_flags_are_declared() -> None:
    from capsule.cli import _parser

    commands = next(action for action in _parser()._actions if action.dest == "command").choices  # type: ignore[union-attr]
    for command, specs in (
        ("run", RUN_OPTIONS),
        ("resume", [spec for spec in RUN_OPTIONS if spec.resume_help is not None]),
    ):
        flags = {
            action.option_strings[0]: action
            for action in commands[command]._actions
            if action.option_strings
        }
        for spec in specs:
            action = flags[spec.flag]
            assert (action.dest, action.metavar) == (spec.name, spec.metavar)
            assert action.help == (spec.help if command == "run" else spec.resume_help)
    assert {spec.name for spec in RUN_OPTIONS if spec.resume_help} == {
        "max_task_output",
        "max_run_journal",
        "core",
    }


def test_the_docs_list_every_option_as_declared() -> None:
    """docs/cli.md's table of run options is options_table()'s: an option
    added without its row fails here (paste the table from options_table())."""
    text = (ROOT / "docs" / "cli.md").read_text()
    start = text.index("<!-- run-options:")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end of run-options -->")
    assert text[start:end] == options_table()
    for spec in RUN_OPTIONS:
        assert f"| `{spec.flag} {spec.metavar}` | `{spec.name}` |" in text


def test_policy_keys_that_are_run_options_parse_as_the_options_do() -> None:
    from capsule.sandbox.project import _POLICY_KEYS

    shared = set(_POLICY_KEYS) & set(OPTION_SPECS)
    assert shared == {"max_fuel", "max_ram", "max_timeout", "max_task_output", "max_run_journal"}
    for key in shared:
        assert _POLICY_KEYS[key] == FORM_PARSERS[OPTION_SPECS[key].form], key


PROGRAM = """
from capsule import task

@task(name="main")
def main():
    return "ran"
"""


@pytest.mark.parametrize("spec", RUN_OPTIONS, ids=lambda spec: spec.name)
def test_a_bad_flag_value_names_the_flag_and_exits_2(tmp_path: Path, spec: Any) -> None:
    path = tmp_path / "p.py"
    path.write_text(PROGRAM)
    bad = str(REFUSED[spec.form][0])
    done = capsule_cli("run", str(path), spec.flag, bad)
    assert done.returncode == 2
    forms = FORM_PARSERS[spec.form][1]
    assert f"capsule: error: {spec.flag} '{bad}' is invalid; expected {forms}" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    # --json has it in the envelope, as any run that could not start.
    done = capsule_cli("run", str(path), "--json", spec.flag, bad)
    assert done.returncode == 2
    assert done.json()["error"]["kind"] == "config"
    assert done.json()["error"]["message"].startswith(f"{spec.flag} '{bad}' is invalid")
    assert not (tmp_path / ".capsule" / "journal.db").exists()  # nothing ran


def _forge_settings(journal: Path, settings_json: str) -> None:
    with sqlite3.connect(journal) as connection:
        connection.execute("UPDATE runs SET settings_json = ?", (settings_json,))


SENDS_AFTER_A_SLEEP = """
from capsule import MessageError, receive, send, sleep, task

@task
def sink():
    return receive(timeout=30).body

@task(name="main")
def main():
    print("MARK sleeping", flush=True)
    sleep(2)
    actor = sink.spawn()
    try:
        send(actor, "x" * 2000)
        refused = None
    except MessageError as error:
        refused = error.kind
    send(actor, "small")
    return [refused, actor.result()]
"""


@pytest.fixture
def crashed_run(tmp_path: Path) -> Path:
    """A journaled run killed -9 while main sleeps (resumable); its journal."""
    path = tmp_path / "flow.py"
    path.write_text(SENDS_AFTER_A_SLEEP)
    kill_at_marker(["run", str(path), "--max-message-size", "1KB"], "MARK sleeping", tmp_path)
    journal = tmp_path / ".capsule" / "journal.db"
    with sqlite3.connect(journal) as connection:
        (settings,) = connection.execute("SELECT settings_json FROM runs").fetchone()
    assert json.loads(settings) == {"entry": "main", "max_message_size": 1024}
    return journal


def test_a_resume_takes_over_the_options_of_an_older_journal(crashed_run: Path) -> None:
    """A journal written before RunOptions recorded every setting by name,
    None for the defaults and values as given: a resume takes them over."""
    old = {
        "entry": "main",
        **dict.fromkeys(OPTION_SPECS),
        "max_message_size": "1KB",
        "retry_backoff": 0.01,
    }
    _forge_settings(crashed_run, json.dumps(old))
    resumed = capsule_cli("resume", "--last", "--json", cwd=crashed_run.parent.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == ["too_large", "small"]


@pytest.mark.parametrize(
    ("settings_json", "message"),
    [
        ("[1, 2]", "records the settings of run"),
        ('{"max_ram": "lots"}', "max_ram 'lots' is invalid; expected a size"),
        ('{"max_ram": {"deep": [[[]]]}}', "max_ram {'deep': [[[]]]} is invalid"),
        ('{"launch_missiles": true}', "'launch_missiles' is not a run option"),
        ('{"max_queued_size": 10}', "max_queued_size (10 bytes) is below the largest message"),
    ],
)
def test_forged_settings_in_a_journal_are_a_journal_error(
    crashed_run: Path, settings_json: str, message: str
) -> None:
    _forge_settings(crashed_run, settings_json)
    resumed = capsule_cli("resume", "--last", cwd=crashed_run.parent.parent)
    assert resumed.returncode == 2
    assert "capsule: error: the journal" in resumed.stderr
    assert message in resumed.stderr and "may be damaged" in resumed.stderr
    assert "Traceback" not in resumed.stderr


def test_resume_overrides_are_checked_and_named_as_flags(crashed_run: Path) -> None:
    cwd = crashed_run.parent.parent
    bad = capsule_cli("resume", "--last", "--max-run-journal", "huge", cwd=cwd)
    assert bad.returncode == 2
    assert "capsule: error: --max-run-journal 'huge' is invalid; expected a size" in bad.stderr
    resumed = capsule_cli("resume", "--last", "--json", "--max-task-output", "10MB", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == ["too_large", "small"]  # its own options kept


def test_options_from_the_command_line_are_checked_without_building_the_schema() -> None:
    """`capsule run` checks its flags with the parsers alone: the model's
    pydantic schema (about 1.5 ms to build) is not built on its way."""
    import subprocess
    import sys

    code = (
        "from capsule.cli import _parser, _run_options\n"
        "from capsule.supervisor.options import RunOptions\n"
        "args = _parser().parse_args(['run', 'p.py', '--max-ram', '64MB', '--cpu-slots', '2'])\n"
        "options = _run_options(args)\n"
        "assert options.given() == {'max_ram': 64 * 1024**2, 'cpu_slots': 2}, options\n"
        "assert not RunOptions.__pydantic_complete__\n"
        "assert RunOptions(max_ram='64MB', cpu_slots='2') == options\n"
        "assert RunOptions.__pydantic_complete__\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
