"""The ``capsule`` command.

Exit codes: 0 the workflow succeeded; 1 the workflow failed (its ``main`` task
failed after its retries); 2 usage, config, program or journal error (nothing
ran, or the journal could not be written); 3 the sandbox runtime could not be
built or loaded; 130 interrupted (Ctrl-C, or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input; reported with exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsule",
        description="Run multi-agent Python workflows with every task in its own WebAssembly sandbox.",
    )
    from capsule import __version__

    parser.add_argument("--version", action="version", version=f"capsule {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run",
        help="run a program's main task",
        description="Run the task named 'main' in FILE, passing ARGS as positional string arguments.",
        epilog=_EXIT_CODES,
    )
    run.add_argument("file", metavar="FILE", help="the Python program (a .py file)")
    run.add_argument("args", nargs="*", metavar="ARGS", help="string arguments for main")
    run.add_argument(
        "--args-json",
        metavar="JSON",
        help="arguments for main as a JSON list (typed values), instead of ARGS",
    )
    run.add_argument("--json", action="store_true", help="print one JSON envelope with the outcome")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="print each task's lifecycle on stderr"
    )
    run.add_argument(
        "--max-fuel", metavar="FUEL", help="cap on any task's fuel (LOW/MEDIUM/HIGH or an int)"
    )
    run.add_argument("--max-ram", metavar="SIZE", help='cap on any task\'s memory (e.g. "256MB")')
    run.add_argument(
        "--max-timeout", metavar="DURATION", help='cap on any task\'s timeout (e.g. "30s")'
    )
    run.add_argument(
        "--cpu-slots",
        metavar="N",
        type=int,
        help="instances running wasm at once, shared round-robin (default: CPU cores)",
    )
    run.add_argument(
        "--max-live-tasks", metavar="N", type=int, help="tasks alive at once in the run (512)"
    )
    run.add_argument(
        "--max-children", metavar="N", type=int, help="running children per task (256)"
    )
    run.add_argument(
        "--mailbox-capacity",
        metavar="N",
        type=int,
        help="messages a mailbox holds before send waits (1000)",
    )
    run.add_argument(
        "--max-message-size", metavar="SIZE", help='largest message, as JSON (default "1MB")'
    )
    run.add_argument(
        "--max-queued-size",
        metavar="SIZE",
        help='messages sent and not yet received, in all (default "256MB"); a send over it fails',
    )
    run.add_argument(
        "--max-total-ram",
        metavar="SIZE",
        help="memory of the whole run: over it, the task holding the most is stopped "
        '(default: half the machine\'s memory; "off": no bound)',
    )
    run.add_argument(
        "--max-task-output",
        metavar="SIZE",
        help="what one attempt of a task may make the host record: output, messages, "
        'random bytes, HTTP exchanges (default "64MB"); past it the task fails '
        "(kind output_limit)",
    )
    run.add_argument(
        "--max-run-journal",
        metavar="SIZE",
        help='what the run may write to its journal (default "1GB"); past it the run stops, '
        "resumable with a larger limit",
    )
    run.add_argument(
        "--hibernate-after",
        metavar="DURATION",
        help="a task blocked this long gives back the memory pages it only read "
        '(default 1s; "500ms", "2m"; "off": never)',
    )
    run.add_argument(
        "--retry-backoff",
        metavar="SECONDS",
        type=float,
        default=None,
        help="delay before the first retry, doubled for each further one (default 0.05)",
    )
    _journal_option(run)
    run.add_argument(
        "--no-journal", action="store_true", help="do not journal the run (it cannot be resumed)"
    )
    run.add_argument(
        "--tui", action="store_true", help="watch the run in the terminal UI (q quits)"
    )

    tui = commands.add_parser(
        "tui",
        help="open a journaled run in the terminal UI",
        description="Watch a run from its journal: live while another process runs it, "
        "or browse it once it ended. Without RUN_ID, pick one from a list.",
    )
    tui.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (or a prefix)")
    _journal_option(tui)

    resume = commands.add_parser(
        "resume",
        help="resume a run that stopped before it ended",
        description="Run main of a journaled run again: tasks that ended return their "
        "journaled results without running, tasks in flight replay their journaled host "
        "calls and go on live. The run keeps its id.",
        epilog=_EXIT_CODES,
    )
    resume.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (or a prefix)")
    resume.add_argument("--last", action="store_true", help="resume the newest run")
    resume.add_argument(
        "--force", action="store_true", help="resume even if the program's code changed"
    )
    resume.add_argument("--json", action="store_true", help="print one JSON envelope")
    resume.add_argument(
        "--max-run-journal",
        metavar="SIZE",
        help="a new limit on what the run may write to its journal (one it stopped at)",
    )
    resume.add_argument(
        "--max-task-output",
        metavar="SIZE",
        help="a new limit on what one attempt of a task may make the host record",
    )
    resume.add_argument("-v", "--verbose", action="store_true", help="print the lifecycle")
    _journal_option(resume)

    runs = commands.add_parser("runs", help="list journaled runs, newest first")
    runs.add_argument("--json", action="store_true", help="print JSON")
    _journal_option(runs)

    inspect = commands.add_parser("inspect", help="show a run's task tree and outcomes")
    inspect.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run (or a prefix)")
    inspect.add_argument("--last", action="store_true", help="show the newest run")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    _journal_option(inspect)
    return parser


_EXIT_CODES = (
    "exit codes: 0 success, 1 the workflow failed, 2 usage, config, program or journal "
    "error, 3 the sandbox runtime could not be built or loaded, 130 interrupted (Ctrl-C, "
    "SIGTERM)"
)


def _journal_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--journal",
        metavar="PATH",
        help="the journal file (default: $CAPSULE_JOURNAL, else .capsule/journal.db beside "
        "the program, or in the current directory for commands without a program)",
    )


def main(argv: list[str] | None = None) -> NoReturn:
    parser = _parser()
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
    }
    code = commands[options.command](options)
    if argv is None:
        # Invoked as the `capsule` program: every instance and thread of the run
        # is closed by now, so skip the interpreter's teardown of wasmtime, pydantic
        # and asyncio modules (about 0.1 s) once the output is flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _error(message: str) -> None:
    sys.stderr.write(f"capsule: error: {message}\n")


def _parse_args_json(raw: str | None, plain: list[str]) -> list[Any]:
    if raw is None:
        return list(plain)
    if plain:
        raise UsageError("give either ARGS or --args-json, not both")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"--args-json is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise UsageError(
            f"--args-json must be a JSON list of arguments, got {type(value).__name__}"
        )
    return value


def _run_command(options: argparse.Namespace) -> int:
    try:
        args = _parse_args_json(options.args_json, options.args)
        if options.retry_backoff is not None and options.retry_backoff < 0:
            raise UsageError("--retry-backoff must be >= 0")
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    path = Path(options.file)
    if path.is_dir():
        _error(f"{path} is a directory; give the program's .py file")
        return EXIT_USAGE
    if not path.is_file():
        _error(f"no such program file: {path}")
        return EXIT_USAGE
    # Heavy imports (wasmtime, pydantic) only once there is work to do. Our models
    # are internal: skip pydantic's scan of every installed distribution for plugins.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    from capsule.supervisor.program import RunRequest, run_program

    if options.no_journal and options.journal:
        _error("give either --journal or --no-journal, not both")
        return EXIT_USAGE
    request = RunRequest(
        path=path,
        args=args,
        max_fuel=options.max_fuel,
        max_ram=options.max_ram,
        max_timeout=options.max_timeout,
        retry_backoff=options.retry_backoff,
        max_live_tasks=options.max_live_tasks,
        max_children=options.max_children,
        mailbox_capacity=options.mailbox_capacity,
        max_message_size=options.max_message_size,
        max_queued_size=options.max_queued_size,
        hibernate_after=options.hibernate_after,
        cpu_slots=options.cpu_slots,
        max_total_ram=options.max_total_ram,
        max_task_output=options.max_task_output,
        max_run_journal=options.max_run_journal,
    )
    renderer = _Renderer(json_output=options.json, verbose=options.verbose)
    started = time.monotonic()
    if options.tui:
        if not _in_terminal("--tui"):
            return EXIT_USAGE
        return _run_with_tui(request, options, renderer, path)
    _stop_on_sigterm()
    try:
        if options.no_journal:
            report = run_program(request, renderer.on_event, event_types=renderer.event_types)
        else:
            from capsule.journal.schema import JournalError, default_journal
            from capsule.journal.session import run_journaled

            journal = Path(options.journal) if options.journal else default_journal(path)
            try:
                report = run_journaled(
                    request, journal, renderer.on_event, event_types=renderer.event_types
                )
            except JournalError as exc:
                _error(str(exc))
                return EXIT_USAGE
    except KeyboardInterrupt:  # before the run started, or while it was cleaning up
        _error(f"interrupted after {time.monotonic() - started:.1f}s")
        return EXIT_INTERRUPTED
    return _report(renderer, report, started, resumable=not options.no_journal)


def _report(renderer: _Renderer, report: Any, started: float, resumable: bool) -> int:
    renderer.finish(report)
    if report.interrupted:
        hint = f"; resume with `capsule resume {report.run_id}`" if resumable else ""
        _error(
            f"interrupted after {time.monotonic() - started:.1f}s; every task was cancelled{hint}"
        )
    return _exit_code(report)


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `docker stop`, systemd) stops a run as Ctrl-C does: every
    task cancelled, the journal written, exit 130, resumable. By default Python
    would die at once, like kill -9 (resumable too, but with the last moments of
    the journal and of the output lost)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _print_out(text: str) -> None:
    """The run's outcome on stdout. If stdout was closed (`capsule run ... | head`),
    it is not shown; what follows on stderr and the exit code still are."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would also fail flushing stdout at exit: /dev/null from here.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _exit_code(report: Any) -> int:
    """The exit code of a run (see the module docstring)."""
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.journal_error is not None or report.usage_error is not None:
        return EXIT_USAGE
    if report.result is None:
        return EXIT_RUNTIME
    return EXIT_OK if report.result.ok else EXIT_FAILED


def _run_with_tui(
    request: Any, options: argparse.Namespace, renderer: _Renderer, path: Path
) -> int:
    """The run on a thread this function owns; the TUI on the main thread. Quitting
    the TUI while the run goes on stops the run (resumable); the exit code is the
    run's."""
    import threading

    from capsule.journal.schema import JournalError, default_journal
    from capsule.journal.session import run_journaled
    from capsule.supervisor.program import RunReport, run_program
    from capsule.tui.app import CapsuleApp
    from capsule.tui.sources import LiveSource

    source = LiveSource(str(path.resolve()))
    reports: list[Any] = []

    def run() -> None:
        try:
            if options.no_journal:
                report = run_program(request, source.on_event, on_run=source.on_run)
            else:
                journal = Path(options.journal) if options.journal else default_journal(path)
                report = run_journaled(request, journal, source.on_event, on_run=source.on_run)
        except JournalError as exc:
            report = RunReport(journal_error=str(exc))
        reports.append(report)
        source.ended(report.status, _exit_code(report))

    thread = threading.Thread(target=run, name="capsule-run")
    thread.start()
    try:
        CapsuleApp(source).run()
    finally:
        source.stop()
        thread.join()
    report = reports[0]
    renderer.finish(report)  # the outcome stays on the terminal once the TUI is gone
    return _exit_code(report)


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
    import anyio

    from capsule.journal.reader import find_run, list_runs
    from capsule.journal.schema import JournalError
    from capsule.tui.app import CapsuleApp
    from capsule.tui.sources import JournalSource

    journal = _journal_path(options)
    try:
        if options.run_id is not None:
            record = anyio.run(find_run, journal, options.run_id)
            app = CapsuleApp(JournalSource(journal, record))
        else:
            runs = anyio.run(list_runs, journal)
            if not runs:
                raise JournalError(f"the journal {journal} holds no runs yet")
            by_id = {run.run_id: run for run in runs}
            app = CapsuleApp(picker=(runs, lambda run_id: JournalSource(journal, by_id[run_id])))
    except JournalError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if not _in_terminal("capsule tui"):
        return EXIT_USAGE
    app.run()
    return EXIT_OK


def _journal_path(options: argparse.Namespace) -> Path:
    from capsule.journal.schema import default_journal

    return Path(options.journal) if options.journal else default_journal()


def _one_run_given(options: argparse.Namespace) -> bool:
    if (options.run_id is None) == (not options.last):
        _error("give a RUN_ID or --last (`capsule runs` lists the runs)")
        return False
    return True


def _resume_command(options: argparse.Namespace) -> int:
    if not _one_run_given(options):
        return EXIT_USAGE
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")
    from capsule.journal.schema import JournalError
    from capsule.journal.session import resume_journaled

    renderer = _Renderer(json_output=options.json, verbose=options.verbose)
    started = time.monotonic()
    _stop_on_sigterm()
    try:
        report = resume_journaled(
            _journal_path(options),
            options.run_id,
            options.force,
            renderer.on_event,
            event_types=renderer.event_types,
            overrides={
                name: value
                for name, value in (
                    ("max_run_journal", options.max_run_journal),
                    ("max_task_output", options.max_task_output),
                )
                if value is not None
            },
        )
    except JournalError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error(f"interrupted after {time.monotonic() - started:.1f}s")
        return EXIT_INTERRUPTED
    return _report(renderer, report, started, resumable=True)


def _runs_command(options: argparse.Namespace) -> int:
    import anyio

    from capsule.journal.reader import list_runs
    from capsule.journal.schema import JournalError

    try:
        runs = anyio.run(list_runs, _journal_path(options))
    except JournalError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if options.json:
        print(json.dumps([run.summary() for run in runs], indent=2))
        return EXIT_OK
    if not runs:
        print("no runs journaled yet")
        return EXIT_OK
    print(f"{'RUN ID':12}  {'STATUS':11}  {'STARTED':19}  {'DURATION':>9}  PROGRAM")
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
        duration = "-" if run.duration_s is None else f"{run.duration_s:.2f}s"
        status = run.shown_status + (f" +{run.resumes}" if run.resumes else "")
        print(f"{run.run_id:12}  {status:11}  {started:19}  {duration:>9}  {run.program}")
    return EXIT_OK


def _inspect_command(options: argparse.Namespace) -> int:
    import anyio

    from capsule.journal.reader import find_run, load_tasks
    from capsule.journal.schema import JournalError

    if not _one_run_given(options):
        return EXIT_USAGE
    journal = _journal_path(options)
    try:
        run = anyio.run(find_run, journal, options.run_id)
        tasks = anyio.run(load_tasks, journal, run.run_id)
    except JournalError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if options.json:
        print(json.dumps({**run.summary(), "tasks": [t.as_dict() for t in tasks]}, indent=2))
        return EXIT_OK
    duration = "" if run.duration_s is None else f" in {run.duration_s:.2f}s"
    resumed = f", resumed {run.resumes}x" if run.resumes else ""
    print(f"run {run.run_id}: {run.shown_status}{duration}{resumed}  ({run.program})")
    children: dict[str | None, list[Any]] = {}
    for task in tasks:
        children.setdefault(task.parent_id, []).append(task)

    def show(task: Any, depth: int) -> None:
        outcome = ""
        if task.error is not None:
            kind, message = task.error.get("kind"), str(task.error.get("message"))
            outcome = f"  {message}" if message.startswith(f"{kind}:") else f"  {kind}: {message}"
        elif task.result_json is not None:
            text = (
                task.result_json if len(task.result_json) <= 60 else task.result_json[:57] + "..."
            )
            outcome = f"  -> {text}"
        print(
            f"{'  ' * depth}{task.task_id} {task.name}  [{task.status}]  "
            f"attempt {task.attempt}/{task.max_attempts}  {task.duration_ms:.1f} ms  "
            f"fuel {task.fuel:,}{outcome}"
        )
        for child in children.get(task.task_id, []):
            show(child, depth + 1)

    for root in children.get(None, []):
        show(root, 1)
    return EXIT_OK


class _Renderer:
    """Shows a run on the terminal: guest output, --verbose lifecycle, the outcome."""

    def __init__(self, json_output: bool, verbose: bool) -> None:
        self.json_output = json_output
        self.verbose = verbose
        # With --json, stdout carries the envelope alone; guest output goes to stderr.
        self.guest_out = sys.stderr if json_output else sys.stdout

    @property
    def event_types(self) -> frozenset[str]:
        """The events it shows (the run builds no others for it)."""
        from capsule.supervisor.events import EVENT_TYPES, MESSAGE_EVENT_TYPES

        return EVENT_TYPES - MESSAGE_EVENT_TYPES if self.verbose else frozenset({"output"})

    def on_event(self, event: Any) -> None:
        kind = event.type
        if kind == "output":
            stream = sys.stderr if event.stream == "stderr" else self.guest_out
            if self.verbose:
                prefix = f"[{event.task_id} {event.task}] "
                lines = event.text.splitlines(keepends=True)
                stream.write("".join(prefix + line for line in lines))
            else:
                stream.write(event.text)
            stream.flush()
            return
        if not self.verbose:
            return
        label = f"{event.task_id} ({event.task})" if event.task_id != event.task else event.task
        if kind == "started":
            line = f"started {label}, attempt {event.attempt}/{event.max_attempts}"
        elif kind == "completed":
            line = (
                f"completed {label} in {event.duration_ms:.1f} ms, "
                f"fuel {event.fuel_consumed:,} (attempt {event.attempt})"
            )
        elif kind == "retrying":
            line = (
                f"retrying {label}: attempt {event.attempt} failed "
                f"({event.error.kind}: {event.error.message}); next in {event.backoff_s:.2f}s"
            )
        elif kind == "failed":
            line = (
                f"failed {label} ({event.error.kind}) after {event.attempt} attempt(s): "
                f"{event.error.message}"
            )
        elif kind == "cancelled":
            line = f"cancelled {label}: {event.error.message}"
        elif kind == "restarting":
            line = f"restarting {label}: {event.reason}"
        elif kind == "hibernated":
            line = (
                f"hibernated {label}: gave back {event.released_bytes / 2**20:.1f} MB "
                f"of memory it had only read"
            )
        elif kind == "messages_returned":
            line = (
                f"{len(event.message_ids)} message(s) {label} had taken and not received went "
                f"back to its mailbox as attempt {event.attempt} ended"
            )
        elif kind == "http":
            outcome = event.status if event.error_kind is None else event.error_kind
            line = (
                f"http {label}: {event.method} {event.url} -> {outcome} "
                f"in {event.duration_ms:.0f} ms ({event.response_bytes:,} bytes)"
            )
        elif kind == "replayed" and event.outcome is not None:
            line = f"replayed {label}: {event.outcome} (from the journal, not run again)"
        elif kind == "replayed":
            line = (
                f"replaying {label}, attempt {event.attempt}: its first {event.steps} host "
                f"call(s) answered from the journal, then live"
            )
        else:
            return
        sys.stderr.write(f"capsule: {line}\n")
        sys.stderr.flush()

    def finish(self, report: Any) -> None:
        """Show how the run ended (its exit code is ``_exit_code``)."""
        if self.json_output:
            _print_out(json.dumps(report.envelope(), indent=2))
        if report.journal_error is not None:
            _error(f"the run was stopped: {report.journal_error}")
            return
        nothing_ran = report.usage_error or report.runtime_error
        if nothing_ran is not None:
            _error(nothing_ran)
            if report.traceback:
                sys.stderr.write(report.traceback)
            return
        result = report.result
        if self.json_output or report.interrupted:
            pass  # the envelope says it all; an interrupt is reported by the caller
        elif result.ok:
            value = result.value()
            _print_out(value if isinstance(value, str) else json.dumps(value))
        else:
            error = result.error
            _error(
                f"task {error.task!r} failed ({error.kind}) after {result.attempts} attempt(s): "
                f"{error.message}"
            )
            if error.traceback and error.kind == "exception":
                sys.stderr.write(error.traceback)


if __name__ == "__main__":  # pragma: no cover
    main()
