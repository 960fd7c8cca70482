"""The ``capsule`` command.

Exit codes: 0 the workflow succeeded; 1 the workflow failed (its ``main`` task
failed after its retries) or diverged (a resume's replay made other host calls
than its journal holds: resumable once fixed); 2 usage, config, program or journal error (nothing
ran, or the journal could not be written); 3 the sandbox runtime could not be
built or loaded; 9 the terminal UI failed (``--tui``: the run went on without
it, and succeeded; ``capsule tui``); 130 interrupted (Ctrl-C, or SIGTERM).
`capsule send` and `capsule ask` add 4 to 8 (see capsule.supervisor.inbox_client).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import re
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from capsule.logs import show_on_stderr
from capsule.sandbox import js
from capsule.stdio import STREAMS, StdioWriter, Stream
from capsule.supervisor.option_specs import RUN_OPTIONS, WordedError, flag_of
from capsule.terminal import visible

if TYPE_CHECKING:
    from concurrent.futures import Future

    from capsule.host import LiveTask, RunError, RunHandle, RunResult, Runtime
    from capsule.journal.location import Journal
    from capsule.supervisor.events import RunEnded
    from capsule.supervisor.loop_thread import LoopThread

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
#: (Past 4 - 8, which `capsule send` and `capsule ask` use.)
EXIT_TUI_FAILED = 9
EXIT_INTERRUPTED = 130


class UsageError(WordedError):
    """Bad command-line input; reported with exit code 2."""


#: After a run, how long output still queued waits for a reader that takes
#: nothing before it is dropped (and after an interrupt, which asked to stop).
DRAIN_STALL_SECONDS = 10.0
DRAIN_STALL_AFTER_INTERRUPT_SECONDS = 1.0
#: How long the TUI waits for a task's cancellation to be answered.
CANCEL_ANSWER_S = 10.0


class _Parser(argparse.ArgumentParser):
    """argparse, whose messages quote what was typed (file names included)
    with control characters shown, not sent to the terminal."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {visible(message)}\n")


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given the ``command`` the line names, only its
    subcommand is declared (declaring the rest is ~1 % of a run's start-up);
    without, every one (for ``capsule --help``, and a line that names none)."""
    parser = _Parser(
        prog="capsule",
        description="Run multi-agent Python workflows with every task in its own WebAssembly sandbox.",
    )
    from capsule import __version__

    parser.add_argument("--version", action="version", version=f"capsule {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, (summary, declare) in _COMMANDS.items():
        if command is None or command == name:
            declare(commands.add_parser(name, **summary))
    return parser


def _command_named(argv: list[str] | None) -> str | None:
    """The subcommand a command line names, if its first word is one (the
    top level takes no option but --version and --help, which come first)."""
    words = sys.argv[1:] if argv is None else argv
    return words[0] if words and words[0] in _COMMANDS else None


def _program_arguments(command: argparse.ArgumentParser) -> None:
    """What to run: `capsule run`'s and `capsule submit`'s."""
    command.add_argument(
        "file",
        metavar="FILE[:TASK]",
        help="the program (a .py, .ts or .js file), and the task to run if not main",
    )
    command.add_argument("args", nargs="*", metavar="ARGS", help="string arguments for the task")
    command.add_argument(
        "--entry", metavar="TASK", help="the task to run as the entry point (default: main)"
    )
    command.add_argument(
        "--args-json",
        metavar="JSON",
        help="arguments for main as a JSON list (typed values), instead of ARGS",
    )


def _run_arguments(run: argparse.ArgumentParser) -> None:
    _program_arguments(run)
    run.add_argument("--json", action="store_true", help="print one JSON envelope with the outcome")
    _events_option(run)
    run.add_argument(
        "-v", "--verbose", action="store_true", help="print each task's lifecycle on stderr"
    )
    _option_flags(run)
    _journal_option(run)
    run.add_argument(
        "--no-journal", action="store_true", help="do not journal the run (it cannot be resumed)"
    )
    run.add_argument(
        "--tui", action="store_true", help="watch the run in the terminal UI (q quits)"
    )


def _submit_arguments(submit: argparse.ArgumentParser) -> None:
    _program_arguments(submit)
    submit.add_argument("--run-id", metavar="ID", help="the run's id (default: a new one)")
    submit.add_argument("--json", action="store_true", help="print the run id as JSON")
    _option_flags(submit)
    _journal_option(submit)


def _worker_arguments(worker: argparse.ArgumentParser) -> None:
    from capsule.worker.loop import DEFAULT_GRACE_SECONDS, DEFAULT_POLL_SECONDS

    worker.add_argument(
        "--concurrency",
        metavar="N",
        type=_bounded(int, 1, 256),
        default=1,
        help="runs at once (default 1; about one per core for CPU-bound runs)",
    )
    worker.add_argument(
        "--grace",
        metavar="SECONDS",
        type=_bounded(float, 0, 86400),
        default=DEFAULT_GRACE_SECONDS,
        help="on SIGTERM, how long runs may take to finish before they are handed back "
        f"(default {DEFAULT_GRACE_SECONDS:g})",
    )
    worker.add_argument(
        "--poll",
        metavar="SECONDS",
        type=_bounded(float, 0.05, 60),
        default=DEFAULT_POLL_SECONDS,
        help=f"how often an idle worker looks for work (default {DEFAULT_POLL_SECONDS:g})",
    )
    worker.add_argument(
        "--workdir",
        metavar="DIR",
        help="where runs' sources are unpacked (default: CAPSULE_HOME/worker)",
    )
    worker.add_argument(
        "--until-idle",
        action="store_true",
        help="stop once no run waits and none runs (a batch), instead of waiting for more",
    )
    _journal_option(worker)


def _bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    """An argparse type: ``kind`` of the text, from ``low`` to ``high``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({low:g} to {high:g})")
        return value

    return parse


def _tui_arguments(tui: argparse.ArgumentParser) -> None:
    tui.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (or a prefix)")
    _journal_option(tui)


def _resume_arguments(resume: argparse.ArgumentParser) -> None:
    resume.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (or a prefix)")
    resume.add_argument("--last", action="store_true", help="resume the newest run")
    resume.add_argument(
        "--force", action="store_true", help="resume even if the program's code changed"
    )
    resume.add_argument("--json", action="store_true", help="print one JSON envelope")
    _events_option(resume)
    _option_flags(resume, resuming=True)
    resume.add_argument("-v", "--verbose", action="store_true", help="print the lifecycle")
    _journal_option(resume)


def _runs_arguments(runs: argparse.ArgumentParser) -> None:
    runs.add_argument("--json", action="store_true", help="print JSON")
    _journal_option(runs)


def _message_arguments(message: argparse.ArgumentParser, asks: bool = False) -> None:
    message.add_argument("run_id", metavar="RUN_ID", help="the running run (or a prefix)")
    message.add_argument("target", metavar="NAME", help="the actor's name or task id")
    message.add_argument("body", metavar="JSON", help="the message, a JSON value")
    if asks:
        message.add_argument(
            "--timeout",
            metavar="SECONDS",
            type=_ask_timeout,
            default=60.0,
            help="how long to wait for the reply (default 60)",
        )
    _journal_option(message)


def _ask_arguments(ask: argparse.ArgumentParser) -> None:
    _message_arguments(ask, asks=True)


def _inspect_arguments(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (or a prefix)")
    inspect.add_argument("--last", action="store_true", help="show the newest run")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    _journal_option(inspect)


def _message_summary(summary: str) -> dict[str, Any]:
    return {
        "help": summary,
        "description": f"{summary[0].upper()}{summary[1:]}: NAME is the name it was "
        "registered under (spawn(..., name=NAME)) or its task id; JSON is the "
        "message. The task receives it from the sender 'cli'.",
        "epilog": _MESSAGE_EXIT_CODES,
    }


_EXIT_CODES = (
    "exit codes: 0 success, 1 the workflow failed (or diverged on resume), 2 usage, "
    "config, program or journal error, 3 the sandbox runtime could not be built or "
    "loaded, 9 the terminal UI failed (the run went on without it), 130 interrupted "
    "(Ctrl-C, SIGTERM)"
)


_MESSAGE_EXIT_CODES = (
    "exit codes: 0 delivered (ask: the reply printed), 2 usage or bad JSON, 4 no such run, "
    "5 the run is not running, 6 no such actor (or it ended without replying), 7 its "
    "mailbox is full, 8 no reply in time"
)


#: Each subcommand: what `capsule --help` and its own --help say of it, and
#: what declares its arguments, in the order --help lists them.
_COMMANDS: dict[str, tuple[dict[str, Any], Callable[[argparse.ArgumentParser], None]]] = {
    "run": (
        {
            "help": "run a program's main task (or another: FILE:TASK)",
            "description": "Run the task named 'main' in FILE (or the one FILE:TASK or "
            "--entry names), passing ARGS as positional string arguments.",
            "epilog": _EXIT_CODES,
        },
        _run_arguments,
    ),
    "tui": (
        {
            "help": "open a journaled run in the terminal UI",
            "description": "Watch a run from its journal: live while another process runs "
            "it, or browse it once it ended. Without RUN_ID, pick one from a list.",
        },
        _tui_arguments,
    ),
    "resume": (
        {
            "help": "resume a run that stopped before it ended",
            "description": "Run main of a journaled run again: tasks that ended return their "
            "journaled results without running, tasks in flight replay their journaled host "
            "calls and go on live. The run keeps its id.",
            "epilog": _EXIT_CODES,
        },
        _resume_arguments,
    ),
    "runs": ({"help": "list journaled runs, newest first"}, _runs_arguments),
    "submit": (
        {
            "help": "queue a run for workers (capsule worker) to run",
            "description": "Queue a run of FILE's main task (or FILE:TASK) in the journal, "
            "with the source files of FILE's directory, for a worker on any machine that "
            "shares the journal to run. Prints its run id.",
        },
        _submit_arguments,
    ),
    "worker": (
        {
            "help": "run submitted runs from the journal, and resume those whose worker died",
            "description": "Take queued runs, and runs whose worker stopped renewing its "
            "lease, from the journal (a postgresql:// URL shared by many machines, or a "
            "file), and run them. SIGTERM or Ctrl-C: take no more, let those running "
            "finish within --grace seconds, then hand them back to other workers.",
        },
        _worker_arguments,
    ),
    "send": (_message_summary("send a message to an actor of a running run"), _message_arguments),
    "ask": (
        _message_summary("send a message to an actor of a running run and print its reply"),
        _ask_arguments,
    ),
    "inspect": ({"help": "show a run's task tree and outcomes"}, _inspect_arguments),
}


def _ask_timeout(text: str) -> float:
    """--timeout of `capsule ask`: seconds, finite, above 0, at most a week."""
    from capsule.supervisor.inbox import MAX_ASK_TIMEOUT_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= MAX_ASK_TIMEOUT_S):
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range; expected seconds above 0, at most {MAX_ASK_TIMEOUT_S:g}"
        )
    return value


def _events_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--events",
        choices=["jsonl"],
        help="write every event of the run to stdout as a JSON line, the last one with "
        "the outcome (instead of --json; see docs/events.md)",
    )


def _option_flags(command: argparse.ArgumentParser, resuming: bool = False) -> None:
    """A flag for each run option (for `capsule resume`, each it may change),
    as capsule.supervisor.option_specs declares them. Their values are checked
    by RunOptions once the command runs (see _run_options)."""
    for spec in RUN_OPTIONS:
        text = spec.resume_help if resuming else spec.help
        if text is not None:
            command.add_argument(spec.flag, metavar=spec.metavar, dest=spec.name, help=text)


def _run_options(options: argparse.Namespace, resuming: bool = False) -> Any:
    """The RunOptions the flags give; OptionError (naming the option) if one
    is not valid."""
    from capsule.supervisor.options import RunOptions

    return RunOptions.from_mapping(
        {
            spec.name: getattr(options, spec.name)
            for spec in RUN_OPTIONS
            if (spec.resume_help is not None or not resuming)
            and getattr(options, spec.name) is not None
        }
    )


def _refused_options(options: argparse.Namespace, error: Any) -> int:
    """Flags RunOptions refused: reported as a run that could not start is
    (with --json, in its envelope), naming the flag; exit 2."""
    from capsule.supervisor.program import RunReport

    outcome = _Outcome.of_report(RunReport(usage_error=error.message, option_error=error))
    return _show_run(options, lambda _: outcome, journaled=False)


def _journal_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--journal",
        metavar="PATH|URL",
        help="the journal: a file, or a postgresql:// URL (default: $CAPSULE_JOURNAL, else "
        ".capsule/journal.db beside the program, or in the current directory for commands "
        "without a program)",
    )


def main(argv: list[str] | None = None) -> NoReturn:
    _open_standard_streams()
    show_on_stderr()  # (the command owns its stderr; a library's logs are its app's)
    parser = _parser(_command_named(argv))
    try:
        # Known-args, so that `capsule run FILE a --verbose b` works as people type it:
        # positionals after an option are still ARGS for main.
        options, extra = parser.parse_known_args(argv)
        unknown = [item for item in extra if item.startswith("-")]
        if unknown or (extra and options.command != "run"):
            parser.parse_args(argv)  # reports the unrecognised arguments and exits 2
        if options.command == "run":
            options.args = [*options.args, *extra]
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        sys.exit(exc.code)
    commands = {
        "run": _run_command,
        "resume": _resume_command,
        "runs": _runs_command,
        "inspect": _inspect_command,
        "tui": _tui_command,
        "send": _message_command,
        "ask": _message_command,
        "submit": _submit_command,
        "worker": _worker_command,
    }
    try:
        code = commands[options.command](options)
        if argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
    except KeyboardInterrupt:  # a listing or a message written to a reader that stalls
        _say_now("capsule: error: interrupted\n")
        code = EXIT_INTERRUPTED
        if argv is None:
            os._exit(code)  # what is left in stdout's buffer would block again
    except BrokenPipeError:  # `capsule runs | head -1`: the reader has what it wanted
        _discard_stdout()
        code = EXIT_OK
    if argv is None:
        # Invoked as the `capsule` program: every instance and thread of the run
        # is closed by now, so skip the interpreter's teardown of wasmtime, pydantic
        # and asyncio modules (about 0.1 s) once the output is flushed.
        os._exit(code)
    sys.exit(code)


def _open_standard_streams() -> None:
    """stdin, stdout and stderr open, on /dev/null if they were closed
    (`capsule run p.py >&-`): else the journal, opened next, would get
    descriptor 1, and what is meant for stdout would be written into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    # Python leaves a stream that was closed at start-up as None.
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, closefd=False)


def _discard_stdout() -> None:
    """stdout's reader is gone: /dev/null from here (Python would fail flushing
    it at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _say_now(text: str) -> None:
    """A last word on stderr, written only if stderr takes it at once: nothing
    waits for a reader that does not read."""
    data = text.encode(sys.stderr.encoding or "utf-8", "backslashreplace")[: select.PIPE_BUF]
    try:
        _, writable, _ = select.select([], [2], [], 0)
        if writable:
            os.write(2, data)
    except (OSError, ValueError):
        pass


def _error(message: str) -> None:
    """Report a usage or journal error before or without a run."""
    sys.stderr.write(f"capsule: error: {visible(message)}\n")


def _parse_args_json(raw: str | None, plain: list[str]) -> list[Any]:
    """main's arguments: ARGS as strings, or --args-json as typed values. Both must
    be text (a lone surrogate, from an argument that is not UTF-8 or from a
    "\\ud800" escape, is refused) and JSON as RFC 8259 has it (no NaN, no
    Infinity)."""
    if raw is None:
        for number, arg in enumerate(plain, 1):
            if not _is_text(arg):
                raise UsageError(f"argument {number} for main is not valid UTF-8: {arg!r}")
        return list(plain)
    if plain:
        raise UsageError("give either ARGS or --args-json, not both")
    if not _is_text(raw):
        raise UsageError("--args-json is not valid UTF-8")
    # Checked as a task's arguments are: strict JSON (no NaN or Infinity, no
    # lone surrogate, nested at most 200 deep).
    from capsule.sandbox.guest_data import ProtocolError, json_value

    try:
        value = json_value(raw, "--args-json")
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(value, list):
        raise UsageError(
            f"--args-json must be a JSON list of arguments, got {type(value).__name__}"
        )
    return value


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_json(value: Any) -> str:
    """JSON text any reader accepts: a non-finite float, which a guest's JSON may
    hold and JSON has not, is written as null (as JavaScript writes it)."""
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except ValueError:
        finite = json.loads(json.dumps(value), parse_constant=lambda _: None)
        return json.dumps(finite, indent=2, allow_nan=False)


def _run_command(options: argparse.Namespace) -> int:
    try:
        path, entry = _program_and_entry(options.file, options.entry)
        args = _parse_args_json(options.args_json, options.args)
        if options.no_journal and options.journal is not None:
            raise UsageError("give either --journal or --no-journal, not both")
        _check_events_option(options)
        journal = None if options.no_journal else _journal_path(options, program=path)
        if journal is not None:
            _check_secret_key()
        _check_program(path)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    _load_run_modules()
    from capsule.supervisor.options import OptionError

    try:
        run_options = _run_options(options)
    except OptionError as exc:
        return _refused_options(options, exc)
    if options.tui:
        if not _in_terminal("--tui"):
            return EXIT_USAGE
        return _run_with_tui(path, args, entry, run_options, options, journal)

    def run(renderer: _Renderer) -> _Outcome:
        async def start(rt: Runtime) -> RunHandle:
            return await rt.start(
                path, *args, entry=entry, options=run_options, event_types=renderer.event_types
            )

        return _run_through_host(journal, start, renderer.on_event, _HostedRun.wait)

    return _show_run(options, run, journaled=journal is not None)


def _submit_command(options: argparse.Namespace) -> int:
    from capsule.host.errors import RunError

    try:
        path, entry = _program_and_entry(options.file, options.entry)
        args = _parse_args_json(options.args_json, options.args)
        journal = _journal_path(options, program=path)
        _check_program(path)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    from capsule.host.runtime import Runtime
    from capsule.supervisor.options import OptionError

    try:
        run_options = _run_options(options)
    except OptionError as exc:
        _error(str(exc))
        return EXIT_USAGE

    async def submit() -> str:
        async with Runtime(journal=journal, prepare=False) as runtime:
            return await runtime.submit(
                path, *args, entry=entry, options=run_options, run_id=options.run_id
            )

    import anyio

    try:
        run_id = anyio.run(submit)
    except RunError as exc:
        _error(exc.worded(flag_of))
        return EXIT_USAGE
    print(json.dumps({"run_id": run_id}) if options.json else run_id)
    return EXIT_OK


def _worker_command(options: argparse.Namespace) -> int:
    import anyio

    from capsule.host.errors import RunError
    from capsule.journal.schema import JournalError
    from capsule.worker.loop import Worker, WorkerSettings, default_workdir

    try:
        journal = _journal_path(options)
        _check_secret_key()  # (else every run that journals a secret would fail)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    settings = WorkerSettings(
        journal=journal,
        concurrency=options.concurrency,
        grace=options.grace,
        poll=options.poll,
        until_idle=options.until_idle,
        workdir=Path(options.workdir) if options.workdir else default_workdir(),
    )

    def say(line: str) -> None:
        print(f"capsule worker: {line}", flush=True)

    worker = Worker(settings, say)
    try:
        worker.open()
    except JournalError as exc:
        _error(exc.worded(flag_of))
        return EXIT_USAGE

    failures: list[RunError] = []

    async def work() -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_stop_on_signals, worker, group)
                say(f"taking runs from {journal} ({settings.concurrency} at once)")
                await worker.run()
                group.cancel_scope.cancel()
        except* RunError as group:  # (the Runtime could not open: its guest runtime)
            failures.extend(error for error in group.exceptions if isinstance(error, RunError))

    anyio.run(work)
    if failures:
        _error(failures[0].worded(flag_of))
        return EXIT_RUNTIME
    say(f"stopped ({worker.completed} run(s) ended here)")
    return EXIT_OK


async def _stop_on_signals(worker: Any, group: Any) -> None:
    """The first SIGTERM or SIGINT stops the worker gracefully; a second
    hands its runs back at once."""
    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            if worker.stopping:
                worker.hurry()
            else:
                worker.stop()


def _check_events_option(options: argparse.Namespace) -> None:
    """--events writes stdout alone: no --json (its envelope is in the last
    event, run_ended), no --tui (which draws on stdout)."""
    if options.events is None:
        return
    for flag, given in (("--json", options.json), ("--tui", getattr(options, "tui", False))):
        if given:
            raise UsageError(
                f"give either --events {options.events} or {flag}, not both (with --events, "
                f"stdout carries the events alone; the last, run_ended, holds the outcome "
                f"--json prints)"
            )


def _program_and_entry(file: str, entry: str | None) -> tuple[Path, str]:
    """The program file and the entry task of `capsule run FILE[:TASK]` and
    --entry (a file whose own name has a colon is taken whole if it exists)."""
    name, colon, task = file.rpartition(":")
    if colon and name.endswith((".py", *js.SUFFIXES)) and not os.path.exists(file):
        if not task.strip():
            raise UsageError(f"{file!r} names no task after the colon; give FILE:TASK")
        if entry is not None and entry != task:
            raise UsageError(f"give the entry task once: {file!r} or --entry {entry!r}")
        file, entry = name, task
    if entry is not None and not entry.strip():
        raise UsageError("--entry needs a task name (e.g. --entry main)")
    if entry is not None and not _is_text(entry):
        raise UsageError(f"the entry task {entry!r} is not valid UTF-8")
    return Path(file), entry or "main"


def _check_program(path: Path) -> None:
    """UsageError saying why ``path`` cannot be a program file, if it cannot."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreachable, or a NUL in the name
        raise UsageError(f"no such program file: {path}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{path} is a directory; give the program's file (.py, .ts or .js)")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file (a FIFO, a device or a socket)")


@dataclass(frozen=True)
class _Outcome:
    """How a run the command shows ended: its result, or the error of the call
    (nothing ran, or the journal failed); and its last event, ``run_ended``
    (None: the run never began: the journal could not be opened, or the run
    to resume is not there or cannot be resumed)."""

    result: RunResult | None
    error: RunError | None
    ended: RunEnded | None
    #: Whether it came from the run's own event stream (not made from a report).
    streamed: bool = False
    #: Events the stream skipped because they were not read fast enough.
    events_dropped: int = 0

    @classmethod
    def of_report(cls, report: Any, run_id: str | None = None) -> _Outcome:
        """The outcome a supervisor's report says (the TUI runs on it directly)."""
        from capsule.host.errors import RunError
        from capsule.host.result import report_result

        ended = report.ended_event(run_id)
        try:
            return cls(report_result(report), None, ended)
        except RunError as exc:
            return cls(None, exc, ended)

    @property
    def interrupted(self) -> bool:
        if self.ended is not None and self.ended.status == "interrupted":
            return True
        return self.result is not None and self.result.status == "interrupted"

    @property
    def run_id(self) -> str | None:
        if self.result is not None:
            return self.result.run_id
        return None if self.ended is None else self.ended.run_id

    def worded(self) -> _Outcome:
        """The outcome, each run setting its error names (a refused option, the
        journal) named as the flag that sets it (--max-fuel, not max_fuel)."""
        error = self.error
        if error is None or error.named is None:
            return self
        message = error.worded(flag_of)
        ended = self.ended
        if ended is not None and isinstance(ended.envelope.get("error"), dict):
            envelope = {**ended.envelope, "error": {**ended.envelope["error"], "message": message}}
            ended = ended.model_copy(update={"envelope": envelope})
        reworded = copy.copy(error)
        reworded.args = (message,)
        return replace(self, error=reworded, ended=ended)


def _load_run_modules() -> None:
    """Load what a run through the host API needs (the loop, the Runtime, the
    supervisor, wasmtime, pydantic) once there is work to do, and before the
    run's clock starts: the time an interrupt reports is the run's own.

    Without the garbage collector: these imports make hundreds of thousands of
    objects and no garbage, which every collection they set off would walk for
    nothing (~7 % of the command's start-up). What they made lives as long as
    the process (modules, classes, functions), so it is frozen: the run's
    collections do not walk it either."""
    # Our models are internal: skip pydantic's scan of every installed
    # distribution for plugins.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    if "capsule.supervisor.program" in sys.modules:
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        import capsule.host.runtime
        import capsule.supervisor.loop_thread
        import capsule.supervisor.program  # noqa: F401
    finally:
        if collecting:
            gc.freeze()
            gc.enable()


def _run_through_host(
    journal: Journal | None,
    start: Callable[[Runtime], Awaitable[RunHandle]],
    on_event: Callable[[Any], None],
    attend: Callable[[_HostedRun], T],
) -> T:
    """A run through the host API: a Runtime on an event loop on a thread this
    function owns, where ``on_event`` is given the run's events (all but the
    last, run_ended); this thread attends to the run (``attend``: waits for
    its outcome, say, where Ctrl-C and SIGTERM land and interrupt it) while
    the Runtime is open. On the async core the run is a task group on that
    same loop (Runtime._on_loop_thread): one loop thread, not two."""
    from concurrent.futures import Future

    import anyio

    from capsule.host import InvalidRequest, RunError
    from capsule.host.runtime import Runtime
    from capsule.supervisor.loop_thread import LoopThread
    from capsule.supervisor.program import RunReport

    handles: list[RunHandle] = []
    interrupted = threading.Event()
    outcome: Future[_Outcome] = Future()

    async def watch(rt: Runtime) -> _Outcome:
        try:
            handle = await start(rt)
        except InvalidRequest as exc:  # (a request the command checks less: the entry's name)
            return _Outcome.of_report(RunReport(usage_error=str(exc), traceback=exc.traceback))
        except RunError as exc:
            return _Outcome(None, exc, None)
        handles.append(handle)
        if interrupted.is_set():  # (set before the handle was there)
            handle.interrupt()
        ended: RunEnded | None = None
        async for event in handle.events():
            if event.type == "run_ended":
                ended = event
            else:
                on_event(event)
        dropped = handle.events_dropped
        try:
            result = await handle.result()
        except RunError as exc:
            return _Outcome(None, exc, ended, True, dropped)
        return _Outcome(result, None, ended, True, dropped)

    closed = threading.Event()
    #: What closing the Runtime raised once the outcome was told (a bug).
    failed: list[Exception] = []
    #: Set if the command stops attending before the run ended: the Runtime
    #: closes then, stopping the run while the loop still runs (its scope,
    #: cancelled on the loop's thread).
    stopping = threading.Event()
    scopes: list[anyio.CancelScope] = []

    def stop() -> None:
        stopping.set()
        for scope in scopes:
            scope.cancel()

    async def host(runtime: Runtime) -> None:
        """On the loop: the Runtime open while the run goes on; its outcome
        is told as it is known (the Runtime then closes meanwhile)."""
        try:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                if stopping.is_set():  # (stopped before this task began)
                    scope.cancel()
                async with runtime as rt:
                    outcome.set_result(await watch(rt))
        except Exception as exc:  # (a bug: the command is told)
            if outcome.done():
                failed.append(exc)
            else:
                outcome.set_exception(exc)
        finally:
            closed.set()

    loop = LoopThread("capsule-loop")
    try:
        runtime = Runtime._on_loop_thread(loop, journal if journal is not None else False, False)
    except RunError as exc:  # (a journal that is not a regular file)
        return attend(_HostedRun.ended(_Outcome(None, exc, None)))
    loop.start()
    try:
        asyncio_loop = loop.loop()
        asyncio_loop.call_soon_threadsafe(
            loop.start_soon, partial(host, runtime), "capsule run", context=loop.context
        )
        try:
            attended = attend(_HostedRun(outcome, handles, interrupted, loop))
        except BaseException:
            # (Ctrl-C as the TUI started, say.) The run is stopped, resumable,
            # as the Runtime closes, on the loop its run is on: the loop stops
            # only once the run ended (closing it first would cancel the run's
            # task group under it).
            asyncio_loop.call_soon_threadsafe(stop, context=loop.context)
            raise
        finally:
            while not closed.wait(0.5) and loop.running:
                pass
    finally:
        loop.close()
    if failed:
        raise failed[0]
    return attended


class _HostedRun:
    """A run _run_through_host started, as the command's main thread holds it
    while the loop's thread runs it: its outcome to come, the run to interrupt
    (before its handle exists too), and its handle's controls (the TUI's)."""

    def __init__(
        self,
        outcome: Future[_Outcome],
        handles: list[RunHandle],
        interrupted: threading.Event,
        loop: LoopThread | None,
    ) -> None:
        self.outcome = outcome
        #: The run's handle, once the Runtime started it (on the loop's thread).
        self._handles = handles
        #: Set by interrupt(); a handle that comes later is interrupted as it does.
        self._interrupted = interrupted
        self._loop = loop

    @classmethod
    def ended(cls, outcome: _Outcome) -> _HostedRun:
        """A run that ended before it had a Runtime (its journal was refused)."""
        from concurrent.futures import Future

        done: Future[_Outcome] = Future()
        done.set_result(outcome)
        return cls(done, [], threading.Event(), None)

    def wait(self) -> _Outcome:
        """The run's outcome, once it ended; Ctrl-C (or SIGTERM) meanwhile
        interrupts the run, whose outcome is then waited for as any other.
        (A timed wait: a signal another thread received is raised here only
        once this thread looks up from its wait; see capsule.interrupts.)"""
        from capsule.interrupts import wait_interruptibly

        ended = threading.Event()
        self.outcome.add_done_callback(lambda _: ended.set())
        wait_interruptibly(ended, self.interrupt)
        return self.outcome.result()

    def interrupt(self) -> None:
        """Stop the run (resumable) without waiting, as Ctrl-C does."""
        self._interrupted.set()
        for handle in self._handles:
            handle.interrupt()

    def live_tasks(self) -> list[LiveTask]:
        # (Thread-safe, and it never waits on the loop.)
        return self._handles[0].live_tasks() if self._handles else []

    def cancel(self, task_id: str) -> bool:
        """Cancel a running task of the run (False if none of that id runs)."""
        import asyncio

        if not self._handles or self._loop is None:
            return False
        try:
            cancelled = asyncio.run_coroutine_threadsafe(
                self._handles[0].cancel(task_id), self._loop.loop()
            )
            # (Bounded: the TUI's thread asks, and a loop that stopped meanwhile
            # would never answer.)
            return bool(cancelled.result(timeout=CANCEL_ANSWER_S))
        except (RuntimeError, TimeoutError):  # the run's loop has stopped
            return False


def _show_run(
    options: argparse.Namespace,
    run: Callable[[_Renderer], _Outcome],
    journaled: bool,
    started: float | None = None,
) -> int:
    """Run (``run(renderer)`` returns its outcome) and show it; the exit code.
    What the run prints goes through a writer that never blocks it; at the end,
    what is still queued is written while its reader takes some (see
    _Renderer.end)."""
    started = time.monotonic() if started is None else started
    _stop_on_sigterm()
    kept = "; the journal keeps it" if journaled else ""
    with StdioWriter(notice_suffix=kept) as out:
        string_args = bool(getattr(options, "args", None)) and options.args_json is None
        renderer = (
            _EventLines(out, options.verbose, journaled)
            if getattr(options, "events", None) is not None
            else _Renderer(out, options.json, options.verbose, journaled, string_args)
        )
        try:
            try:
                outcome = run(renderer).worded()
            except KeyboardInterrupt:  # before the run started, or while it was cleaning up
                message = f"interrupted after {time.monotonic() - started:.1f}s"
                renderer.error(message)
                renderer.ended_without_report(interrupted=message)
                return renderer.end(EXIT_INTERRUPTED, interrupted=True)
            if outcome.ended is None and outcome.error is not None:  # it never began
                renderer.error(str(outcome.error))
                renderer.ended_without_report(journal_error=str(outcome.error))
                return renderer.end(_exit_code(outcome))
            renderer.finish(outcome)
            if outcome.events_dropped:
                renderer.out.write(
                    "stderr",
                    f"capsule: {outcome.events_dropped:,} events of the run were not shown: "
                    f"they were not read fast enough{kept}\n",
                    droppable=False,
                )
            if outcome.interrupted:
                hint = (
                    f"; resume with `capsule resume {outcome.run_id}`"
                    if journaled and outcome.run_id
                    else ""
                )
                renderer.error(
                    f"interrupted after {time.monotonic() - started:.1f}s; every task was "
                    f"cancelled{hint}"
                )
            return renderer.end(_exit_code(outcome), interrupted=outcome.interrupted)
        except KeyboardInterrupt:  # while the outcome was being written: stop now
            return EXIT_INTERRUPTED


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `docker stop`, systemd) stops a run as Ctrl-C does: every
    task cancelled, the journal written, exit 130, resumable. By default Python
    would die at once, like kill -9 (resumable too, but with the last moments of
    the journal and of the output lost)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _exit_code(outcome: _Outcome) -> int:
    """The exit code of a run (see the module docstring)."""
    from capsule.host.errors import RuntimeFailure

    if outcome.interrupted:
        return EXIT_INTERRUPTED
    if isinstance(outcome.error, RuntimeFailure):
        return EXIT_RUNTIME
    if outcome.error is not None or outcome.result is None:
        return EXIT_USAGE
    return EXIT_OK if outcome.result.ok else EXIT_FAILED


def _run_with_tui(
    path: Path,
    args: list[Any],
    entry: str,
    run_options: Any,
    options: argparse.Namespace,
    journal: Journal | None,
) -> int:
    """The run through the host API, as `capsule run` runs one; the TUI on the
    main thread, fed the run's events, reading and cancelling its tasks through
    its handle. Quitting the TUI while the run goes on interrupts the run
    (resumable); the exit code is the run's. If the TUI fails, the run goes on
    without it, shown as `capsule run` shows one, and a run that succeeded
    exits with EXIT_TUI_FAILED."""
    from capsule.supervisor.events import EVENT_TYPES
    from capsule.tui.app import CapsuleApp
    from capsule.tui.sources import LiveSource

    started = time.monotonic()
    journaled = journal is not None
    source = LiveSource(str(path.resolve()), journal)

    async def start(rt: Runtime) -> RunHandle:
        # Every type of event: the TUI's timelines show the messages too.
        handle = await rt.start(
            path, *args, entry=entry, options=run_options, event_types=EVENT_TYPES
        )
        source.run_id = handle.run_id
        return handle

    def show_end(done: Future[_Outcome]) -> None:
        """The run ended (on the loop's thread): its status and exit code to the TUI."""
        outcome = None if done.cancelled() or done.exception() else done.result()
        if outcome is None:  # (wait() raises why, once the TUI is gone)
            source.ended("error", None)
        elif outcome.ended is not None:
            source.ended(outcome.ended.status, _exit_code(outcome))
        else:
            status = "error" if outcome.result is None else outcome.result.status
            source.ended(status, _exit_code(outcome))

    def attend(run: _HostedRun) -> int:
        source.attach(run)
        run.outcome.add_done_callback(show_end)
        try:
            failure = _run_app(CapsuleApp(source))
        except BaseException:  # Ctrl-C as the app started, say: the run stops too
            source.stop()
            run.wait()
            raise
        if failure is None:
            source.stop()  # (the user quit: a run still going was stopped, resumable)
            outcome = run.wait()
            # The outcome stays on the terminal once the TUI is gone.
            return _show_run(options, lambda _: outcome, journaled, started)

        def rest_of_run(renderer: _Renderer) -> _Outcome:
            """The TUI failed: the run goes on, shown as `capsule run` shows one."""
            renderer.error(
                f"the terminal UI failed ({type(failure).__name__}: {failure}); the run goes "
                f"on without it, shown from here as `capsule run` shows it"
            )
            source.hand_over(renderer.on_event)
            return run.wait()

        code = _show_run(options, rest_of_run, journaled, started)
        return EXIT_TUI_FAILED if code == EXIT_OK else code

    return _run_through_host(journal, start, source.on_event, attend)


def _run_app(app: Any) -> BaseException | None:
    """Run the TUI until it is quit: what made it fail, if something did (a
    failure never passes for a quit, whose exit code is the run's)."""
    try:
        outcome = app.run()
    except Exception as exc:  # the terminal itself failed (Textual's driver)
        return exc
    failure: BaseException | None = app.failure
    if failure is not None:
        return failure  # (Textual printed its traceback as it exited)
    if outcome is None:
        return RuntimeError("the terminal UI ended without being quit")
    return None


def _in_terminal(what: str) -> bool:
    """Whether the terminal UI can run: it draws on stdout and reads keys from
    stdin. (Without a terminal, Textual would wait for a key that never comes.)"""
    keys = sys.stdin is not None and sys.stdin.isatty()
    if keys and sys.stdout is not None and sys.stdout.isatty():
        return True
    which = "stdout" if keys else "stdin"
    _error(
        f"{what} needs a terminal, and {which} is not one; `capsule run` without "
        f"--tui prints the run, `capsule inspect` shows a journaled one"
    )
    return False


def _tui_command(options: argparse.Namespace) -> int:
    from capsule.journal.reader import find_run, list_runs
    from capsule.journal.schema import JournalError
    from capsule.tui.app import CapsuleApp
    from capsule.tui.sources import JournalSource

    try:
        journal = _journal_path(options)
        if options.run_id is not None:
            record = _read_journal(journal, find_run, journal, options.run_id)
            app = CapsuleApp(JournalSource(journal, record))
        else:
            runs = _read_journal(journal, list_runs, journal)
            if not runs:
                raise JournalError(f"the journal {journal} holds no runs yet")
            by_id = {run.run_id: run for run in runs}
            app = CapsuleApp(picker=(runs, lambda run_id: JournalSource(journal, by_id[run_id])))
    except (UsageError, JournalError) as exc:
        _error(exc.worded(flag_of))
        return EXIT_USAGE
    if not _in_terminal("capsule tui"):
        return EXIT_USAGE
    failure = _run_app(app)
    if failure is not None:
        _error(f"the terminal UI failed ({type(failure).__name__}: {failure})")
        return EXIT_TUI_FAILED
    return EXIT_OK


def _check_secret_key() -> None:
    """UsageError if CAPSULE_SECRET_KEY is set but is no key: said before the
    run starts, not once it first journals a secret."""
    if not os.environ.get("CAPSULE_SECRET_KEY", "").strip():
        return  # (unset: nothing to import)
    from capsule.journal.secrets import SecretKeyError, secret_key

    try:
        secret_key()
    except SecretKeyError as exc:
        raise UsageError(str(exc)) from None


def _journal_path(options: argparse.Namespace, program: Path | None = None) -> Journal:
    """The journal --journal, $CAPSULE_JOURNAL or the default names; UsageError if
    it is empty or names something other than a file (a directory; a FIFO, a
    device or a socket, on which SQLite fails with a misleading "disk I/O
    error")."""
    from capsule.journal.location import NotAJournal, journal_at
    from capsule.journal.schema import default_journal

    if options.journal is not None and not options.journal:
        raise UsageError("--journal needs a path (or give --no-journal)")
    try:
        path = journal_at(options.journal) if options.journal else default_journal(program)
    except NotAJournal as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(path, Path):
        return path  # a database: its own errors say what is wrong with it
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return path  # missing (or unreachable): the journal's own errors say so
    if stat.S_ISDIR(mode):
        raise UsageError(
            f"the journal {path} is a directory; pass the journal's file (--journal PATH)"
        )
    if not stat.S_ISREG(mode):
        raise UsageError(
            f"the journal {path} is not a regular file (a FIFO, a device or a socket); "
            f"pass --journal PATH for a journal file"
        )
    return path


#: What reading or showing a damaged journal record may raise.
_UNREADABLE_RECORD = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    OverflowError,
    RecursionError,
)


def _read_journal(journal: Journal, read: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``read(*args)`` (a reader of capsule.journal.reader); a JournalError also
    if the journal holds a record this Capsule cannot make sense of (a damaged
    or forged journal is input like any other)."""
    import anyio

    from capsule.journal.schema import JournalError

    try:
        return anyio.run(read, *args)
    except _UNREADABLE_RECORD as exc:
        raise JournalError(_unreadable(journal, exc)) from None


def _unreadable(journal: Journal, exc: BaseException) -> str:
    return (
        f"the journal {journal} holds a record this Capsule cannot read "
        f"({type(exc).__name__}: {exc}); it may be damaged"
    )


def _one_run_given(options: argparse.Namespace) -> bool:
    if (options.run_id is None) == (not options.last):
        _error("give a RUN_ID or --last (`capsule runs` lists the runs)")
        return False
    return True


def _resume_command(options: argparse.Namespace) -> int:
    if not _one_run_given(options):
        return EXIT_USAGE
    try:
        _check_events_option(options)
        journal = _journal_path(options)
        _check_secret_key()
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    _load_run_modules()
    from capsule.supervisor.options import OptionError

    try:
        overrides = _run_options(options, resuming=True)
    except OptionError as exc:
        return _refused_options(options, exc)

    def run(renderer: _Renderer) -> _Outcome:
        async def start(rt: Runtime) -> RunHandle:
            record = await rt.find(options.run_id)  # (a prefix of its id, or the newest)
            return await rt.start_resume(
                record.run_id,
                force=options.force,
                options=overrides,
                event_types=renderer.event_types,
            )

        return _run_through_host(journal, start, renderer.on_event, _HostedRun.wait)

    return _show_run(options, run, journaled=True)


def _runs_command(options: argparse.Namespace) -> int:
    from capsule.journal.reader import list_runs
    from capsule.journal.schema import JournalError

    try:
        journal = _journal_path(options)
        runs = _read_journal(journal, list_runs, journal)
        if options.json:
            text = _as_json([run.summary() for run in runs])
        elif not runs:
            text = "no runs journaled yet"
        else:
            text = "\n".join(
                [
                    f"{'RUN ID':12}  {'STATUS':11}  {'STARTED':19}  {'DURATION':>9}  PROGRAM",
                    *(_run_line(run) for run in runs),
                ]
            )
    except (UsageError, JournalError) as exc:
        _error(exc.worded(flag_of))
        return EXIT_USAGE
    except _UNREADABLE_RECORD as exc:
        _error(_unreadable(journal, exc))
        return EXIT_USAGE
    print(text)
    return EXIT_OK


def _run_line(run: Any) -> str:
    """A run in `capsule runs`: one line, whatever its journal says."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
    duration = "-" if run.duration_s is None else f"{run.duration_s:.2f}s"
    status = run.shown_status + (f" +{run.resumes}" if run.resumes else "")
    return (
        f"{_field(run.run_id):12}  {_field(status):11}  {started:19}  {duration:>9}  "
        f"{_field(run.program)}"
    )


def _field(value: Any) -> str:
    """A value from a journal or a guest, on one line, shown not acted on."""
    return visible(str(value), one_line=True)


def _message_command(options: argparse.Namespace) -> int:
    """`capsule send` and `capsule ask`: one message into a running run."""
    from capsule.sandbox.guest_data import ProtocolError, json_value
    from capsule.supervisor import inbox_client as client

    try:
        if not _is_text(options.body):
            raise UsageError("the message is not valid UTF-8")
        try:
            body = json_value(options.body, "the message")
        except ProtocolError as exc:
            raise UsageError(
                f"{exc}; give the message as JSON, e.g. '{{\"approved\": true}}'"
            ) from None
        if not options.target or not _is_text(options.target):
            raise UsageError(
                f"NAME {options.target!r} is not an actor's registered name or task id"
            )
        found = client.find_socket(options.run_id)
        if found is None:
            return _no_running_run(options)
        run_id, path = found
        asks = options.command == "ask"
        timeout = options.timeout if asks else client.SEND_TIMEOUT_S
        payload: dict[str, Any] = {"op": options.command, "to": options.target, "body": body}
        if asks:
            payload["timeout"] = timeout
        answer = client.request(path, payload, timeout + 10)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except client.InboxClientError as exc:
        _error(str(exc))
        return EXIT_USAGE if exc.kind == "usage" else client.EXIT_BY_KIND.get(exc.kind, 1)
    if not answer["ok"]:
        kind = str(answer.get("kind"))
        _error(f"run {run_id}: {_field(answer.get('message'))}")
        if kind in ("too_large", "bad_request"):
            return EXIT_USAGE
        return client.EXIT_BY_KIND.get(kind, EXIT_FAILED)
    if asks:
        print(_as_json(answer.get("reply")))
    return EXIT_OK


def _no_running_run(options: argparse.Namespace) -> int:
    """No running run has the id: the journal says whether it ran and ended."""
    from capsule.journal.reader import find_run
    from capsule.journal.schema import JournalError
    from capsule.supervisor.inbox_client import EXIT_NO_SUCH_RUN, EXIT_NOT_RUNNING

    try:
        journal = _journal_path(options)
        run = _read_journal(journal, find_run, journal, options.run_id)
    except (UsageError, JournalError):
        _error(
            f"no running run has the id {options.run_id!r} (`capsule runs` lists the runs "
            f"of a journal)"
        )
        return EXIT_NO_SUCH_RUN
    if run.shown_status == "running":
        holder = f" (its lease is held by {_field(run.lease_owner or '?')})"
        _error(
            f"run {_field(run.run_id)} is running on another machine or in another "
            f"container{holder}; `capsule send` and `capsule ask` reach a run from the "
            f"machine that runs it"
        )
        return EXIT_NOT_RUNNING
    _error(
        f"run {_field(run.run_id)} is not running ({_field(run.shown_status)}); only a "
        f"running run takes messages"
    )
    return EXIT_NOT_RUNNING


def _inspect_command(options: argparse.Namespace) -> int:
    from capsule.journal.reader import find_run, load_tasks
    from capsule.journal.schema import JournalError

    if not _one_run_given(options):
        return EXIT_USAGE
    try:
        journal = _journal_path(options)
        run = _read_journal(journal, find_run, journal, options.run_id)
        tasks = _read_journal(journal, load_tasks, journal, run.run_id)
        if options.json:
            text = _as_json(
                {**run.summary(), "error": run.error, "tasks": [t.as_dict() for t in tasks]}
            )
        else:
            text = "\n".join(_inspect_lines(run, tasks))
    except (UsageError, JournalError) as exc:
        _error(exc.worded(flag_of))
        return EXIT_USAGE
    except _UNREADABLE_RECORD as exc:
        _error(_unreadable(journal, exc))
        return EXIT_USAGE
    print(text)
    return EXIT_OK


#: Levels of the task tree `capsule inspect` indents (task calls nest up to 64).
_MAX_INDENT = 65


def _inspect_lines(run: Any, tasks: list[Any]) -> list[str]:
    """A run and its task tree, a line each, guest text shown not acted on."""
    duration = "" if run.duration_s is None else f" in {run.duration_s:.2f}s"
    resumed = f", resumed {run.resumes}x" if run.resumes else ""
    lines = [
        f"run {_field(run.run_id)}: {_field(run.shown_status)}{duration}{resumed}  "
        f"({_field(run.program)})"
    ]
    lines.extend(_run_error_lines(run))
    children: dict[str | None, list[Any]] = {}
    for task in tasks:
        children.setdefault(task.parent_id, []).append(task)

    # Walked with a stack, each record once: a damaged or forged journal may
    # hold a chain of any depth, or a task listed as its own child.
    stack = [(root, 1) for root in reversed(children.get(None, []))]
    shown: set[int] = set()
    while stack:
        task, depth = stack.pop()
        if id(task) in shown:
            continue
        shown.add(id(task))
        # Indented up to the deepest nesting a run can have (a forged chain must
        # not make the listing quadratic).
        lines.append(f"{'  ' * min(depth, _MAX_INDENT)}{_task_line(task)}")
        stack.extend((child, depth + 1) for child in reversed(children.get(task.task_id, [])))
    return lines


def _run_error_lines(run: Any) -> list[str]:
    """Why a run ended in error (nothing ran: a config or program error) or
    diverged on resume (and how it goes on): its task tree does not say."""
    error = run.error if isinstance(run.error, dict) else None
    if error is None or (run.status != "error" and error.get("kind") != "divergence"):
        return []
    kind, message = str(error.get("kind")), str(error.get("message"))
    text = message if message.startswith(f"{kind}:") else f"{kind}: {message}"
    lines = [f"  error: {_field(line)}" for line in text.splitlines()[:_MAX_ERROR_LINES]]
    if run.status == "diverged":
        lines.append(f"  {_field(_diverged_resume(run.run_id))}")
    return lines


def _diverged_resume(run_id: str) -> str:
    """How a run whose replay diverged goes on."""
    return (
        f"to resume it: `capsule resume {run_id}`, once the program is fixed (with "
        f"--force) or restored to the code the run ran with (without)"
    )


#: Lines of a run's error `capsule inspect` shows (a config error lists each problem).
_MAX_ERROR_LINES = 50


def _task_line(task: Any) -> str:
    outcome = ""
    if task.error is not None:
        kind, message = str(task.error.get("kind")), str(task.error.get("message"))
        outcome = f"  {message}" if message.startswith(f"{kind}:") else f"  {kind}: {message}"
    elif task.result_json is not None:
        text = str(task.result_json)
        outcome = f"  -> {text if len(text) <= 60 else text[:57] + '...'}"
    return (
        f"{_field(task.task_id)} {_field(task.name)}  [{_field(task.status)}]  "
        f"{_attempts_shown(task.attempt, task.max_attempts, task.restarts)}  "
        f"{task.duration_ms:.1f} ms  "
        f"fuel {task.fuel:,}{_field(outcome)}"
    )


def _attempts_shown(attempt: int, max_attempts: int, restarts: int) -> str:
    """The attempts shown ("attempt 2/3"); for a task its supervisor restarted,
    whose attempts go on counting across restarts, "attempt 5 (restart 3)"."""
    if restarts:
        return f"attempt {attempt} (restart {restarts})"
    return f"attempt {attempt}/{max_attempts}"


#: A line of text with its end, or the unfinished last one.
_LINES = re.compile(r"[^\n]*\n|[^\n]+")


class _Renderer:
    """Shows a run: guest output, --verbose lifecycle, the outcome. It never
    waits for a reader: all it writes goes through a StdioWriter.

    Guest output (what tasks print, and the result) is shown as it is, byte for
    byte, on a pipe or in a file; on a terminal, its control characters and
    escape sequences are shown as visible escapes. Capsule's own messages (the
    lifecycle, errors, tracebacks, which quote guest text) always show them
    visibly: a log of stderr can be read on a terminal later."""

    def __init__(
        self,
        out: StdioWriter,
        json_output: bool,
        verbose: bool,
        journaled: bool,
        string_args: bool = False,
    ) -> None:
        from capsule.diagnostics import FailureCauses

        self.out = out
        self.json_output = json_output
        self.verbose = verbose
        #: The run's arguments were ARGS, which arrive as strings (a hint's cue).
        self.string_args = string_args
        self.causes = FailureCauses()
        #: Whether the run is journaled (a notice of dropped output says so).
        self.journaled = journaled
        # With --json, stdout carries the envelope alone; guest output goes to stderr.
        self.guest_out: Stream = "stderr" if json_output else "stdout"
        #: Whether a result is shown on stdout when the run succeeds.
        self.prints_result = True
        #: The names tasks were registered under at spawn, by task id (--verbose).
        self.names: dict[str, str] = {}

    @property
    def event_types(self) -> frozenset[str]:
        """The events it shows (the run builds no others for it)."""
        from capsule.supervisor.events import TASK_EVENT_TYPES

        return TASK_EVENT_TYPES if self.verbose else frozenset({"output", "warning", "failed"})

    def on_event(self, event: Any) -> None:
        kind = event.type
        if kind == "warning":
            self.out.write("stderr", f"capsule: warning: {_field(event.text)}\n")
            return
        if kind == "failed":
            self.causes.on_failed(event)
        if kind == "output":
            stream: Stream = "stderr" if event.stream == "stderr" else self.guest_out
            text = visible(event.text) if self.out.is_terminal(stream) else event.text
            if self.verbose:
                prefix = f"[{_field(event.task_id)} {_field(_task_name(event, self.names))}] "
                text = "".join(prefix + line for line in _LINES.findall(text))
            self.out.write(stream, text)
            return
        if self.verbose:
            if kind == "pending" and event.actor_name is not None:
                self.names[event.task_id] = event.actor_name
            line = _lifecycle_line(event, self.names)
            if line is not None:
                self.out.write("stderr", f"capsule: {_field(line)}\n")

    def error(self, message: str) -> None:
        self.out.write("stderr", f"capsule: error: {visible(message)}\n", droppable=False)

    def finish(self, outcome: _Outcome) -> None:
        """Show how the run ended (its exit code is ``_exit_code``)."""
        from capsule.host.errors import JournalUnavailable

        if self.json_output and outcome.ended is not None:
            self.out.write("stdout", _as_json(outcome.ended.envelope) + "\n", droppable=False)
        error = outcome.error
        if isinstance(error, JournalUnavailable):  # (once the run began: it was stopped)
            self.error(f"the run was stopped: {error}")
            return
        if error is not None:  # nothing ran: a usage or program error, or Capsule's
            self.error(str(error))
            if error.traceback:
                self.out.write("stderr", visible(error.traceback), droppable=False)
            return
        result = outcome.result
        assert result is not None
        if self.json_output or outcome.interrupted:
            pass  # the envelope says it all; an interrupt is reported by the caller
        elif result.ok:
            if not self.prints_result:
                return
            value = result.value
            text = value if isinstance(value, str) else json.dumps(value)
            if self.out.is_terminal("stdout"):
                text = visible(text)
            self.out.write("stdout", text + "\n", droppable=False)
        elif result.status == "diverged":
            failure = result.error
            assert failure is not None
            self.error(f"run {result.run_id} diverged: {failure.message}")
            self.out.write(
                "stderr", f"capsule: {_diverged_resume(result.run_id)}\n", droppable=False
            )
        else:
            failure = result.error
            assert failure is not None
            self.error(
                f"task {failure.task!r} failed ({_kind(failure)}) after {result.attempts} "
                f"attempt(s): {failure.message}"
            )
            if failure.traceback and failure.kind in ("exception", "child_failed"):
                self.out.write("stderr", visible(failure.traceback), droppable=False)
            self._explain(failure)

    def ended_without_report(
        self, journal_error: str | None = None, interrupted: str | None = None
    ) -> None:
        """The run ended with no report: its journal could not be opened, or it
        was interrupted before it started or as it was torn down (those errors
        are shown by the caller)."""

    def _explain(self, error: Any) -> None:
        """Where a failure began (the guest traceback of the task it came
        from), and a hint if it looks like a common mistake."""
        from capsule.diagnostics import args_hint

        origin = self.causes.origin(error)
        if origin is not None:
            task, traceback = origin
            self.out.write(
                "stderr",
                f"capsule: the failure began in task {_field(repr(task))}:\n{visible(traceback)}",
                droppable=False,
            )
        hint = args_hint(error) if self.string_args else None
        if hint is not None:
            self.out.write("stderr", f"capsule: hint: {hint}\n", droppable=False)

    def end(self, code: int, interrupted: bool = False) -> int:
        """Write what is still queued, while its readers take some (a shorter
        while after an interrupt: the user asked to stop); then the exit code.
        A signal meanwhile ends the wait: exit 130."""
        kept = "; the journal keeps it" if self.journaled else ""
        for stream in STREAMS:
            dropped = self.out.dropped(stream)
            if dropped:
                self.out.write(
                    "stderr",
                    f"capsule: {dropped:,} bytes of output to {stream} were not shown: "
                    f"it was not read fast enough{kept}\n",
                    droppable=False,
                )
        stall = DRAIN_STALL_AFTER_INTERRUPT_SECONDS if interrupted else DRAIN_STALL_SECONDS
        try:
            written = self.out.drain(stall)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        if not written:
            self.out.close()
            _say_now(
                f"capsule: output left unwritten: its reader took nothing for {stall:g}s{kept}\n"
            )
        return code


class _EventLines(_Renderer):
    """Shows a run as its events (``--events jsonl``, docs/events.md): each one
    JSON line on stdout, guest output among them, the last one ``run_ended``
    with the outcome. Capsule's own errors and warnings still go to stderr, and
    with --verbose the lifecycle too. The lines are ASCII (guest text in them is
    escaped by the JSON encoder), so they are written as they are, even to a
    terminal."""

    def __init__(self, out: StdioWriter, verbose: bool, journaled: bool) -> None:
        super().__init__(out, json_output=False, verbose=verbose, journaled=journaled)
        self.prints_result = False
        #: The run's id, from its run_started (a report may have none).
        self.run_id: str | None = None

    @property
    def event_types(self) -> frozenset[str]:
        from capsule.supervisor.events import EVENT_TYPES

        return EVENT_TYPES

    def on_event(self, event: Any) -> None:
        from capsule.supervisor.events import TASK_EVENT_TYPES, event_json

        self.out.write("stdout", event_json(event) + "\n")
        if event.type == "run_started":
            self.run_id = event.run_id
        elif event.type != "output" and event.type in TASK_EVENT_TYPES:
            super().on_event(event)  # warnings, failure causes, --verbose lines

    def finish(self, outcome: _Outcome) -> None:
        from capsule.supervisor.events import event_json

        ended = outcome.ended
        if ended is not None:
            # A run that never got as far as its run_started has no id here.
            run_id = self.run_id if outcome.streamed else ended.run_id
            ended = ended.model_copy(update={"run_id": run_id})
            self.out.write("stdout", event_json(ended) + "\n", droppable=False)
        super().finish(outcome)

    def ended_without_report(
        self, journal_error: str | None = None, interrupted: str | None = None
    ) -> None:
        from capsule.supervisor.events import event_json
        from capsule.supervisor.program import RunReport

        report = (
            RunReport(journal_error=journal_error)
            if interrupted is None
            else RunReport(interrupted=True, runtime_error=interrupted)
        )
        ended = report.ended_event(self.run_id)
        self.out.write("stdout", event_json(ended) + "\n", droppable=False)


def _kind(error: Any) -> str:
    """A failure's kind, saying when it was not retried because no retry could
    fix it (a kind that is never retried, such as cancelled, goes without)."""
    from capsule.supervisor.retry import NOT_RETRYABLE

    if error.retryable or error.kind in NOT_RETRYABLE:
        return str(error.kind)
    return f"{error.kind}, not retryable"


def _task_name(event: Any, names: dict[str, str]) -> str:
    """A task's name as --verbose shows it, with the name it was registered
    under (``spawn(name=...)``), if any, quoted."""
    name = str(event.task)
    registered = names.get(event.task_id)
    if registered is not None:
        name += f" {json.dumps(registered, ensure_ascii=False)}"
    return name


def _lifecycle_line(event: Any, names: dict[str, str] | None = None) -> str | None:
    """The --verbose line of a lifecycle event (None: not shown)."""
    kind = event.type
    name = _task_name(event, names or {})
    label = f"{event.task_id} ({name})" if event.task_id != name else name
    if kind == "started":
        return (
            f"started {label}, {_attempts_shown(event.attempt, event.max_attempts, event.restart)}"
        )
    if kind == "completed":
        return (
            f"completed {label} in {event.duration_ms:.1f} ms, "
            f"fuel {event.fuel_consumed:,} (attempt {event.attempt})"
        )
    if kind == "retrying":
        return (
            f"retrying {label}: attempt {event.attempt} failed "
            f"({event.error.kind}: {event.error.message}); next in {event.backoff_s:.2f}s"
        )
    if kind == "failed":
        return (
            f"failed {label} ({_kind(event.error)}) after {event.attempt} attempt(s): "
            f"{event.error.message}"
        )
    if kind == "cancelled":
        return f"cancelled {label}: {event.error.message}"
    if kind == "restarting":
        number = f" (restart {event.restart})" if event.restart else ""
        return f"restarting {label}{number}: {event.reason}"
    if kind == "hibernated":
        return (
            f"hibernated {label}: gave back {event.released_bytes / 2**20:.1f} MB "
            f"of memory it had only read"
        )
    if kind == "messages_returned":
        return (
            f"{len(event.message_ids)} message(s) {label} had taken and not received went "
            f"back to its mailbox as attempt {event.attempt} ended"
        )
    if kind == "http":
        outcome = event.status if event.error_kind is None else event.error_kind
        return (
            f"http {label}: {event.method} {event.url} -> {outcome} "
            f"in {event.duration_ms:.0f} ms ({event.response_bytes:,} bytes)"
        )
    if kind == "message_sent":
        asks = ", asking for a reply" if event.expects_reply else ""
        return (
            f"message {event.message_id} sent by {label} to {event.target_id} "
            f"({event.size:,} bytes{asks})"
        )
    if kind == "message_received":
        return f"message {event.message_id} received by {label} from {event.sender_id}"
    if kind == "replayed" and event.outcome is not None:
        return f"replayed {label}: {event.outcome} (from the journal, not run again)"
    if kind == "replayed":
        return (
            f"replaying {label}, attempt {event.attempt}: its first {event.steps} host "
            f"call(s) answered from the journal, then live"
        )
    return None


if __name__ == "__main__":  # pragma: no cover
    main()
