"""Run a program file end to end: build or load the runtime, import the program in
the sandbox, validate its tasks, run ``main``, and report the outcome."""

from __future__ import annotations

import traceback as tb
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule.sandbox.budget import MIN_BUDGET_BYTES, can_read_memory, default_budget
from capsule.sandbox.config import (
    RAM_FORMS,
    TIMEOUT_FORMS,
    ConfigError,
    HostCaps,
    TaskConfig,
    parse_ram,
    parse_timeout,
)
from capsule.sandbox.engine import LOAD_TASK_ID, GuestComponent, Invocation, Sandbox
from capsule.sandbox.grants import Grants, program_environment, resolve_grants
from capsule.sandbox.modules import site_package_dirs
from capsule.sandbox.prefault import can_measure_memory
from capsule.sandbox.project import load_project
from capsule.sandbox.runtime import RuntimeBuildError
from capsule.supervisor.events import (
    EventStream,
    RunEnded,
    RunStarted,
    RunStatus,
    RunWarning,
    TaskOutput,
)
from capsule.supervisor.inbox import InboxError, RunInbox
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
from capsule.supervisor.totals import TOTALS_EVENT_TYPES, RunTotals
from capsule.supervisor.tree import TaskResult


@dataclass
class RunRequest:
    path: Path
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The task run as the root of the tree (``capsule run FILE:TASK``, --entry).
    entry: str = "main"
    max_fuel: str | None = None
    max_ram: str | None = None
    max_timeout: str | None = None
    retry_backoff: float | None = None
    max_live_tasks: int | None = None
    max_children: int | None = None
    mailbox_capacity: int | None = None
    max_message_size: str | int | None = None
    max_queued_size: str | int | None = None
    #: Seconds blocked before a task hibernates, or "off" (default: RunSettings').
    hibernate_after: str | float | None = None
    #: Instances running wasm at once (default: CPU cores).
    cpu_slots: int | None = None
    #: Memory of the whole run (a size, or "off"; default: half the machine's).
    max_total_ram: str | int | None = None
    #: What one attempt may make the host record (a size; default: RunSettings').
    max_task_output: str | int | None = None
    #: What the run may write to its journal (a size; default: JournalLimit's).
    max_run_journal: str | int | None = None


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
    #: What the run did in all (None: nothing ran).
    totals: dict[str, Any] | None = None

    @property
    def status(self) -> RunStatus:
        """How the run ended: completed, failed, interrupted, or error (nothing ran)."""
        if self.interrupted:
            return "interrupted"
        if self.result is None:
            return "error"
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
    guest: GuestComponent | None = None,
) -> RunReport:
    """Run the entry task (``main`` unless ``request.entry`` names another) of
    the program at ``request.path``; blocks until the run ends.
    ``on_event`` receives the run's events of ``event_types`` (None: all), from
    ``events`` if given (a stream with subscribers of its own: the journal).

    With ``steps`` the run is journaled there; with ``history`` it resumes the
    run ``run_id`` journaled earlier (same ``seed``). ``on_run`` receives the
    run once it starts (to watch it, cancel tasks, or stop it). ``guest``: the
    engine and compiled runtime to run on (default: the run loads its own)."""
    totals = RunTotals()  # (its duration counts the load too)
    path = request.path.resolve()
    if not isinstance(request.entry, str):  # (a damaged journal's, on resume)
        return RunReport(usage_error=f"the entry task {request.entry!r} is not a task name")
    try:
        module = program_module(path)
        project = load_project(path.parent)
        environment = program_environment(path.parent)
        caps = HostCaps.parse(request.max_fuel, request.max_ram, request.max_timeout)
        caps = caps.tightened(project.caps)
    except (ProgramError, ConfigError) as exc:
        return RunReport(usage_error=str(exc))
    backoff = (
        Backoff() if request.retry_backoff is None else Backoff(initial_s=request.retry_backoff)
    )
    try:
        limits = _run_limits(request)
        for setting, policy in (
            ("max_task_output_bytes", project.max_task_output_bytes),
            ("max_run_journal_bytes", project.max_run_journal_bytes),
        ):
            if policy is not None:  # a cap: the stricter of it and the flag
                limits[setting] = min(policy, limits.get(setting, policy))
        settings = RunSettings(
            caps=caps,
            backoff=backoff,
            max_response_bytes=project.max_response_bytes,
            **limits,
        )
        memory_budget = _memory_budget(request.max_total_ram)
    except ConfigError as exc:
        return RunReport(usage_error=str(exc))
    events = events or EventStream()
    events.subscribe(on_event, event_types)
    try:
        sandbox = Sandbox(
            [path.parent, *site_package_dirs()],
            cpu_slots=request.cpu_slots,
            memory_budget=memory_budget,
            guest=guest,
        )
    except RuntimeBuildError as exc:
        return RunReport(runtime_error=str(exc))
    run_id = run_id or new_run_id()
    events.emit(
        RunStarted(
            run_id=run_id, program=str(path), entry=request.entry, resumed=history is not None
        )
    )
    with sandbox:
        if steps is not None:
            sandbox.finder.watch(steps.program_file)

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
            return RunReport(usage_error=f"{path}: invalid task config:\n{exc}")
        try:
            grants = {
                name: resolve_grants(config, path.parent, environment, project.allowed_hosts)
                for name, config in configs.items()
            }
        except (ConfigError, OSError) as exc:  # OSError: a granted path the OS refuses
            first.store.close()
            return RunReport(usage_error=f"{path}: invalid task config:\n{exc}")
        # The program's import ran before the grants were known: what it got
        # from a directory granted to a task is refused now, and from now on.
        problems = sandbox.finder.forbid_below(_granted_directories(grants))
        if problems:
            first.store.close()
            return RunReport(usage_error=f"{path}: " + "\n".join(problems))
        for task, variable in _unset_variables(configs, environment):
            events.emit(
                RunWarning(
                    run_id=run_id,
                    task_id=LOAD_TASK_ID,
                    task=task,
                    text=f"task {task!r} declares env={variable!r}, which is not set (in "
                    f"the environment of `capsule run` or in .env beside the program); "
                    f"the task will not see it",
                )
            )
        run = Run(sandbox, module, configs, events, settings, run_id, steps, history, seed, grants)
        if on_run is not None:
            on_run(run)
        events.subscribe(totals.on_event, TOTALS_EVENT_TYPES)
        try:
            with _inbox(run, events):
                result = run.run_main(request.args, request.kwargs, first, request.entry)
        except RunInterrupted as exc:
            totals.end()
            return RunReport(
                run_id=run.run_id, result=exc.result, interrupted=True, totals=totals.as_dict()
            )
        except JournalFailure as exc:
            return RunReport(run_id=run.run_id, journal_error=str(exc))
        except ProgramError as exc:
            return RunReport(run_id=run.run_id, usage_error=f"{path}: {exc}")
        except Exception:  # a host bug: report it, never lose the traceback
            return RunReport(
                run_id=run.run_id, runtime_error="internal error", traceback=tb.format_exc()
            )
        totals.end()
        return RunReport(run_id=run.run_id, result=result, totals=totals.as_dict())


@contextmanager
def _inbox(run: Run, events: EventStream) -> Iterator[None]:
    """While the run runs, `capsule send` and `capsule ask` reach it (or a
    warning says why they cannot; the run goes on)."""
    inbox = RunInbox(run.run_id, run.external)
    try:
        inbox.start()
    except InboxError as exc:
        events.emit(
            RunWarning(run_id=run.run_id, task_id=LOAD_TASK_ID, task=LOAD_TASK_ID, text=str(exc))
        )
        yield
        return
    try:
        yield
    finally:
        inbox.close()


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


def _run_limits(request: RunRequest) -> dict[str, Any]:
    """The per-run limits the request overrides, validated."""
    limits: dict[str, Any] = {}
    if request.cpu_slots is not None and (
        isinstance(request.cpu_slots, bool)
        or not isinstance(request.cpu_slots, int)
        or request.cpu_slots < 1
    ):
        raise ConfigError(
            f"--cpu-slots {request.cpu_slots!r} is invalid; expected a positive integer"
        )
    for field_name, flag in (
        ("max_live_tasks", "--max-live-tasks"),
        ("max_children", "--max-children"),
        ("mailbox_capacity", "--mailbox-capacity"),
    ):
        value = getattr(request, field_name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} {value!r} is invalid; expected a positive integer")
        limits[field_name] = value
    for field_name, flag, setting in (
        ("max_message_size", "--max-message-size", "max_message_bytes"),
        ("max_queued_size", "--max-queued-size", "max_queued_bytes"),
        ("max_task_output", "--max-task-output", "max_task_output_bytes"),
        ("max_run_journal", "--max-run-journal", "max_run_journal_bytes"),
    ):
        value = getattr(request, field_name)
        if value is None:
            continue
        try:
            limits[setting] = parse_ram(value)
        except ValueError:
            raise ConfigError(f"{flag} {value!r} is invalid; expected {RAM_FORMS}") from None
    queued = limits.get("max_queued_bytes", RunSettings.max_queued_bytes)
    largest = limits.get("max_message_bytes", RunSettings.max_message_bytes)
    if queued < largest:
        raise ConfigError(
            f"--max-queued-size ({queued:,} bytes) is below the largest message "
            f"(--max-message-size, {largest:,} bytes): such a message could never be sent"
        )
    if request.hibernate_after is not None:
        limits["hibernate_after"] = _hibernate_after(request.hibernate_after)
    return limits


def _memory_budget(value: str | int | None) -> int | None:
    """The run's memory budget in bytes (None: "off", or not given where it
    cannot be kept: it needs Linux's /proc)."""
    can_keep = can_read_memory() and can_measure_memory()
    if value is None:
        return default_budget() if can_keep else None
    if value == "off":
        return None
    if not can_keep:
        raise ConfigError(
            "--max-total-ram needs Linux's /proc/self/statm, pagemap and mem, which "
            "this system does not have; leave it out (or 'off')"
        )
    try:
        budget = parse_ram(value)
    except ValueError:
        raise ConfigError(
            f"--max-total-ram {value!r} is invalid; expected {RAM_FORMS}, or 'off'"
        ) from None
    if budget < MIN_BUDGET_BYTES:
        raise ConfigError(
            f"--max-total-ram {value!r} is below {MIN_BUDGET_BYTES // 1024**2} MB, "
            "the least Capsule itself needs with a few tasks running"
        )
    return budget


def _hibernate_after(value: str | float) -> float | None:
    if value == "off":
        return None
    try:
        return parse_timeout(value)
    except ValueError:
        # Not 0: every wait that blocks would then hibernate, ~2 ms of CPU each.
        raise ConfigError(
            f"--hibernate-after {value!r} is invalid; expected {TIMEOUT_FORMS}, or 'off'"
        ) from None
