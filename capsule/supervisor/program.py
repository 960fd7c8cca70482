"""Run a program file end to end: build or load the runtime, import the program in
the sandbox, validate its tasks, run ``main``, and report the outcome."""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from capsule.sandbox.budget import can_read_memory, default_budget
from capsule.sandbox.config import ConfigError, HostCaps, TaskConfig
from capsule.sandbox.engine import LOAD_TASK_ID, Invocation, Sandbox
from capsule.sandbox.grants import Grants, program_environment, resolve_grants
from capsule.sandbox.modules import site_package_dirs
from capsule.sandbox.prefault import can_measure_memory
from capsule.sandbox.project import Project, load_project
from capsule.sandbox.runtime import RuntimeBuildError
from capsule.supervisor.events import (
    EventStream,
    RunEnded,
    RunStarted,
    RunStatus,
    RunWarning,
    TaskOutput,
)
from capsule.supervisor.inbox import InboxError
from capsule.supervisor.journaled import Divergence
from capsule.supervisor.loading import program_language
from capsule.supervisor.options import OptionError, RunOptions
from capsule.supervisor.polyglot import (
    Guests,
    ProgramFile,
    add_others,
    other_programs,
    prepare_others,
)
from capsule.supervisor.run import (
    Backoff,
    ProgramError,
    Run,
    RunInterrupted,
    RunSettings,
    new_run_id,
    program_module,
)
from capsule.supervisor.steps import History, JournalFailure, StepLog

if TYPE_CHECKING:
    from capsule.supervisor.shared import SharedRuns
from capsule.supervisor.totals import TOTALS_EVENT_TYPES, RunTotals
from capsule.supervisor.tree import TaskResult


@dataclass
class RunRequest:
    path: Path
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The task run as the root of the tree (``capsule run FILE:TASK``, --entry).
    entry: str = "main"
    #: The run's settings (limits, sizes, backoff), validated.
    options: RunOptions = field(default_factory=RunOptions)


@dataclass
class RunReport:
    """The outcome of ``capsule run``: a task result, or why nothing ran."""

    run_id: str | None = None
    result: TaskResult | None = None
    usage_error: str | None = None
    runtime_error: str | None = None
    traceback: str | None = None
    #: The run was interrupted (Ctrl-C) and its tasks cancelled.
    interrupted: bool = False
    #: The journal could not be written, so the run was stopped.
    journal_error: str | None = None
    #: Why, as an error whose message can name its fix as flags
    #: (``journal_error`` names it as the host API takes it).
    journal_failure: JournalFailure | None = None
    #: What the run did in all (None: nothing ran).
    totals: dict[str, Any] | None = None
    #: The run option that could not be used, if that is why nothing ran
    #: (``usage_error`` says so naming the option).
    option_error: OptionError | None = None
    #: Where its replay diverged from its journal, if that stopped the run
    #: (its result's error says so: kind ``divergence``).
    divergence: Divergence | None = None

    @property
    def status(self) -> RunStatus:
        """How the run ended: completed, failed, interrupted, diverged, or
        error (nothing ran)."""
        if self.interrupted:
            return "interrupted"
        if self.result is None:
            return "error"
        if self.divergence is not None:
            return "diverged"
        return "completed" if self.result.ok else "failed"

    def envelope(self) -> dict[str, Any]:
        """The ``--json`` envelope."""
        result = self.result
        if result is None:
            kind = (
                "config"
                if self.usage_error is not None
                else "journal"
                if self.journal_error is not None
                else "runtime"
            )
            return {
                "success": False,
                "result": None,
                "error": {
                    "kind": kind,
                    "message": self.usage_error or self.journal_error or self.runtime_error,
                    "task": None,
                    "traceback": self.traceback,
                },
                "execution": None,
                "totals": None,
            }
        error = result.error
        return {
            "success": result.ok,
            "result": result.value() if result.ok else None,
            "error": None
            if error is None
            else {
                "kind": error.kind,
                "message": error.message,
                "task": error.task,
                "traceback": error.traceback,
                "retryable": error.retryable,
            },
            "execution": {
                "run_id": self.run_id,
                "task": result.task,
                "duration_ms": round(result.duration_s * 1000, 3),
                "attempts": result.attempts,
                "fuel_consumed": result.fuel_consumed,
                "peak_memory_bytes": result.peak_memory_bytes,
            },
            "totals": self.totals,
        }

    def ended_event(self, run_id: str | None = None) -> RunEnded:
        """The run's last event (``run_id``: the run's, where the report has
        none: its program failed to load)."""
        return RunEnded(run_id=self.run_id or run_id, status=self.status, envelope=self.envelope())


def run_program(
    request: RunRequest,
    on_event: Callable[[Any], None],
    *,
    run_id: str | None = None,
    steps: StepLog | None = None,
    history: History | None = None,
    seed: bytes = b"",
    on_run: Callable[[Run], None] | None = None,
    event_types: Collection[str] | None = None,
    events: EventStream | None = None,
    shared: SharedRuns | None = None,
) -> RunReport:
    """Run the entry task (``main`` unless ``request.entry`` names another) of
    the program at ``request.path``; blocks until the run ends.
    ``on_event`` receives the run's events of ``event_types`` (None: all), from
    ``events`` if given (a stream with subscribers of its own: the journal).

    With ``steps`` the run is journaled there; with ``history`` it resumes the
    run ``run_id`` journaled earlier (same ``seed``). ``on_run`` receives the
    run once it starts (to watch it, cancel tasks, or stop it). ``shared``:
    what it shares with the other runs of its host application (the engines
    and compiled runtimes to run on; on the async core, the event loop and
    the warm sandbox's linker and poll threads); by default the run loads
    its own, and starts a loop and poll threads of its own."""
    totals = RunTotals()  # (its duration counts the load too)
    path = request.path.resolve()
    if not isinstance(request.entry, str):  # (a damaged journal's, on resume)
        return RunReport(usage_error=f"the entry task {request.entry!r} is not a task name")
    try:
        module = program_module(path)
        project = load_project(path.parent)
        environment = program_environment(path.parent)
    except (ProgramError, ConfigError) as exc:
        return RunReport(usage_error=str(exc))
    try:
        settings, memory_budget = resolve_settings(request.options, project)
    except OptionError as exc:
        return RunReport(usage_error=str(exc), option_error=exc)
    events = events or EventStream()
    events.subscribe(on_event, event_types)
    roots = [path.parent, *site_package_dirs()]
    sandbox: Sandbox
    try:
        main = ProgramFile(path, module, program_language(path))
        others = other_programs(main, project)
        finder = None if main.language == "python" else main.finder()
        shared_guests = shared.guests if shared is not None else None
        guests = Guests(settings.core, shared_guests)
        # (A run of a Python program alone, with no shared guests, leaves its
        # guest to the sandbox, which makes it as it always has.)
        alone = not others and main.language == "python" and shared_guests is None
        guest = None if alone else guests.of(main.language)
        loaded_others = prepare_others(others, guests)
        # (A warm sandbox's linker serves one program of the Python runtime.)
        warm = shared is not None and not others and main.language == "python"
        if settings.core == "async":
            from capsule.sandbox.async_sandbox import AsyncSandbox  # (only for a run on it)

            sandbox = AsyncSandbox(
                roots,
                poll_threads=request.options.cpu_slots,
                memory_budget=memory_budget,
                guest=guest,
                warm=shared.async_sandbox() if shared is not None and warm else None,
                finder=finder,
            )
        else:
            sandbox = Sandbox(
                roots,
                cpu_slots=request.options.cpu_slots,
                memory_budget=memory_budget,
                guest=guest,
                finder=finder,
            )
    except RuntimeBuildError as exc:
        return RunReport(runtime_error=str(exc))
    except ProgramError as exc:
        return RunReport(usage_error=str(exc))
    run_id = run_id or new_run_id()
    if events.wants("run_started"):  # (an event nobody takes is not built)
        events.emit(
            RunStarted(
                run_id=run_id, program=str(path), entry=request.entry, resumed=history is not None
            )
        )
    with sandbox:
        try:
            add_others(sandbox, loaded_others)
        except OSError as exc:  # (a runtime's files gone meanwhile, no descriptors left)
            return RunReport(runtime_error=f"cannot run the program's modules: {exc}")
        if steps is not None:
            for each in sandbox.finders():
                each.watch(steps.program_file)

        def load_output(invocation: Invocation, stream: str, text: str) -> None:
            events.emit(
                TaskOutput(
                    run_id=run_id,
                    task_id=LOAD_TASK_ID,
                    task=LOAD_TASK_ID,
                    stream="stderr" if stream == "stderr" else "stdout",
                    text=text,
                )
            )

        try:
            configs, first = Run.load(sandbox, module, load_output, project.task_defaults)
        except ProgramError as exc:
            return RunReport(usage_error=f"{path}: {exc}", traceback=exc.traceback)
        except ConfigError as exc:
            return RunReport(usage_error=f"{path}: invalid task config:\n{main.options(exc)}")
        programs: dict[str, str] = {}
        for other in others:
            try:
                declared, imported = Run.load(
                    sandbox, other.module, load_output, project.task_defaults
                )
                imported.store.close()  # (its tasks start in fresh instances)
            except ProgramError as exc:
                first.store.close()
                return RunReport(usage_error=f"{other.path}: {exc}", traceback=exc.traceback)
            except ConfigError as exc:
                first.store.close()
                return RunReport(
                    usage_error=f"{other.path}: invalid task config:\n{other.options(exc)}"
                )
            twice = sorted(set(declared) & set(configs))
            if twice:
                first.store.close()
                return RunReport(
                    usage_error=f"{other.path} declares the task {twice[0]!r}, which "
                    f"{_declared_by(twice[0], programs, others, path)} declares too: task "
                    f"names are one namespace for the programs of a run"
                )
            configs.update(declared)
            programs.update(dict.fromkeys(declared, other.module))
        # The instance the program was loaded in is this call's to close until
        # the run is made: the run's from then on (see Run), whatever happens.
        with ExitStack() as loaded:
            loaded.callback(first.store.close)
            # (Each task's files are granted from its own file's directory.)
            file_of = {other.module: other for other in others}
            grants = {}
            for name, config in configs.items():
                declared_by = file_of.get(programs.get(name, ""), main)
                try:
                    grants[name] = resolve_grants(
                        config, declared_by.path.parent, environment, project.allowed_hosts
                    )
                except (ConfigError, OSError) as exc:  # OSError: a granted path the OS refuses
                    return RunReport(
                        usage_error=f"{declared_by.path}: invalid task config:\n"
                        f"{declared_by.options(exc)}"
                    )
            # The program's import ran before the grants were known: what it got
            # from a directory granted to a task is refused now, and from now on.
            granted = _granted_directories(grants)
            problems = [line for each in sandbox.finders() for line in each.forbid_below(granted)]
            if problems:
                return RunReport(usage_error=f"{path}: " + "\n".join(problems))
            for task, variable in _unset_variables(configs, environment):
                events.emit(
                    RunWarning(
                        run_id=run_id,
                        task_id=LOAD_TASK_ID,
                        task=task,
                        text=f"task {task!r} declares env={variable!r}, which is not set (in "
                        f"the environment of this process, or in .env beside the program); "
                        f"the task will not see it",
                    )
                )
            # (A loop thread is started for a run on the async core only.)
            loop = shared.loop() if shared is not None and settings.core == "async" else None
            loaded.pop_all()
        run = Run(
            sandbox,
            module,
            configs,
            events,
            settings,
            run_id,
            steps,
            history,
            seed,
            grants,
            loop,
            first=first,
            programs=programs,
        )

        def run_main() -> TaskResult:
            _listen(run, events)
            return run.run_main(request.args, request.kwargs, request.entry)

        return report_of(run, run_main, totals, path, on_run)


def _declared_by(task: str, programs: dict[str, str], others: list[ProgramFile], main: Path) -> str:
    """The file of the program that declared ``task``."""
    module = programs.get(task)
    return next((str(other.path) for other in others if other.module == module), str(main))


def report_of(
    run: Run,
    run_main: Callable[[], TaskResult],
    totals: RunTotals,
    path: Path,
    on_run: Callable[[Run], None] | None = None,
) -> RunReport:
    """The report of ``run``, once ``run_main`` (its entry task, run) ended:
    its result, or how the run ended without one. ``on_run`` is given the
    run first; the run is closed as this returns, whatever happens."""
    with run:
        if on_run is not None:
            on_run(run)
        run.events.subscribe(totals.on_event, TOTALS_EVENT_TYPES)
        return _report(run, run_main, totals, path)


def _report(
    run: Run, run_main: Callable[[], TaskResult], totals: RunTotals, path: Path
) -> RunReport:
    try:
        result = run_main()
    except RunInterrupted as exc:
        totals.end()
        return RunReport(
            run_id=run.run_id, result=exc.result, interrupted=True, totals=totals.as_dict()
        )
    except JournalFailure as exc:
        return RunReport(run_id=run.run_id, journal_error=str(exc), journal_failure=exc)
    except ProgramError as exc:
        return RunReport(run_id=run.run_id, usage_error=f"{path}: {exc}")
    except Exception:  # a host bug: report it, never lose the traceback
        return RunReport(
            run_id=run.run_id, runtime_error="internal error", traceback=tb.format_exc()
        )
    totals.end()
    return RunReport(
        run_id=run.run_id, result=result, totals=totals.as_dict(), divergence=run.divergence
    )


def _listen(run: Run, events: EventStream) -> None:
    """While the run runs, `capsule send` and `capsule ask` reach it (or a
    warning says why they cannot; the run goes on)."""
    try:
        run.listen()
    except InboxError as exc:
        events.emit(
            RunWarning(run_id=run.run_id, task_id=LOAD_TASK_ID, task=LOAD_TASK_ID, text=str(exc))
        )


def _unset_variables(
    configs: dict[str, TaskConfig], environment: dict[str, str]
) -> list[tuple[str, str]]:
    """(task, variable) for each environment variable a task declares that is
    not set: a warning, not an error (a task may do without it)."""
    return [
        (name, variable)
        for name, config in configs.items()
        for variable in config.env
        if variable not in environment
    ]


def _granted_directories(grants: dict[str, Grants]) -> dict[Path, str]:
    """Each directory granted to some task, and a task granted it (one that
    may write it, if any does)."""
    granted: dict[Path, str] = {}
    for writable_first in (True, False):
        for name, task_grants in grants.items():
            for grant in task_grants.files:
                if grant.writable == writable_first:
                    granted.setdefault(
                        grant.host_path, f"task {name!r} (allowed_files {grant.declared!r})"
                    )
    return granted


def resolve_settings(options: RunOptions, project: Project) -> tuple[RunSettings, int | None]:
    """The run's settings from its options and its capsule.toml's [policy] (the
    stricter of each cap they both set), with the run's memory budget in bytes
    (None: no budget). OptionError if an option cannot be kept here."""
    # (RunOptions holds each value in its canonical form: fuel and sizes as
    # ints, durations as seconds.)
    caps = HostCaps(
        cast(int | None, options.max_fuel),
        cast(int | None, options.max_ram),
        cast(float | None, options.max_timeout),
    )
    limits: dict[str, Any] = {
        setting: value
        for setting, value in (
            ("max_live_tasks", options.max_live_tasks),
            ("max_children", options.max_children),
            ("mailbox_capacity", options.mailbox_capacity),
            ("max_message_bytes", options.max_message_size),
            ("max_queued_bytes", options.max_queued_size),
            ("max_task_output_bytes", options.max_task_output),
            ("max_run_journal_bytes", options.max_run_journal),
        )
        if value is not None
    }
    for setting, policy in (
        ("max_task_output_bytes", project.max_task_output_bytes),
        ("max_run_journal_bytes", project.max_run_journal_bytes),
    ):
        if policy is not None:  # a cap: the stricter of it and the option
            limits[setting] = min(policy, limits.get(setting, policy))
    if options.core is not None:
        limits["core"] = options.core
    if options.hibernate_after is not None:
        limits["hibernate_after"] = (
            None if options.hibernate_after == "off" else options.hibernate_after
        )
    settings = RunSettings(
        caps=caps.tightened(project.caps),
        backoff=Backoff() if options.retry_backoff is None else Backoff(options.retry_backoff),
        max_response_bytes=project.max_response_bytes,
        **limits,
    )
    return settings, _memory_budget(options.max_total_ram)


def _memory_budget(value: str | int | None) -> int | None:
    """The run's memory budget in bytes (None: "off", or not given where it
    cannot be kept: it needs Linux's /proc)."""
    can_keep = can_read_memory() and can_measure_memory()
    if value is None:
        return default_budget() if can_keep else None
    if value == "off":
        return None
    if not can_keep:
        raise OptionError(
            "max_total_ram",
            value,
            lambda name: (
                f"{name('max_total_ram')} needs Linux's /proc/self/statm, pagemap "
                "and mem, which this system does not have; leave it out (or 'off')"
            ),
        )
    return cast(int, value)  # (RunOptions holds a size in bytes)
