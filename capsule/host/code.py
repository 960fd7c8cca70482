"""Untrusted code as a run: a fixed runner program, imported once in a warm
sandbox the Runtime keeps (its instance pool prepared ahead), that executes
the source it is given as its one task, under the caller's limits and grants."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from capsule.host.errors import InvalidRequest, RuntimeFailure
from capsule.sandbox.config import (
    COMPUTE_FORMS,
    ENV_FORMS,
    HOSTS_FORMS,
    RAM_FORMS,
    TIMEOUT_FORMS,
    ConfigError,
    parse_compute,
    parse_host_pattern,
    parse_ram,
    parse_timeout,
)
from capsule.sandbox.engine import LOAD_TASK_ID, GuestComponent, Invocation, Sandbox
from capsule.sandbox.grants import Grants, HostRule
from capsule.sandbox.modules import site_package_dirs
from capsule.sandbox.project import Project
from capsule.supervisor.events import EventStream, RunStarted, TaskOutput
from capsule.supervisor.option_specs import DEFAULT_MAX_MESSAGE_BYTES
from capsule.supervisor.options import RunOptions
from capsule.supervisor.program import RunReport, RunRequest, report_of, resolve_settings
from capsule.supervisor.run import Run
from capsule.supervisor.steps import History, StepLog
from capsule.supervisor.totals import RunTotals

#: The runner program (its directory is the sandbox's only program root).
RUNNER = Path(__file__).resolve().parent / "runner" / "capsule_code.py"
RUNNER_MODULE = RUNNER.stem
#: Fresh runner instances kept ready between calls.
POOL_SIZE = 2
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The longest environment value a grant may hand over.
MAX_ENV_VALUE_CHARS = 64 * 1024


class _Checked(BaseModel):
    """A model whose invalid values are an InvalidRequest naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{type(self).__name__}.{'.'.join(str(p) for p in error['loc']) or '?'}: "
                f"{error['msg']}"
                for error in exc.errors()
            )
            raise InvalidRequest(problems) from None


class CodeLimits(_Checked):
    """What one ``run_code`` may use. Forms as a task's (``compute``,
    ``ram``, ``timeout``); ``max_output``: what it may print (and make the
    host record) before it fails with kind ``output_limit``."""

    fuel: str | int = "MEDIUM"
    ram: str | int = "256MB"
    timeout: str | float = "30s"
    max_output: str | int = "1MB"

    @field_validator("fuel", mode="before")
    @classmethod
    def _fuel(cls, value: str | int) -> str | int:
        _checked(value, parse_compute, COMPUTE_FORMS)
        return value

    @field_validator("ram", "max_output", mode="before")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        _checked(value, parse_ram, RAM_FORMS)
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: str | float) -> str | float:
        _checked(value, parse_timeout, TIMEOUT_FORMS)
        return value


class CodeGrants(_Checked):
    """What one ``run_code`` may reach: ``hosts`` for HTTP (patterns as a
    task's ``allowed_hosts``) and ``env``, environment variables with the
    values the code sees. Nothing by default."""

    hosts: tuple[str, ...] = ()
    env: dict[str, str] = {}

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of {HOSTS_FORMS}")
        return tuple(_checked(item, parse_host_pattern, HOSTS_FORMS) for item in value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r:.80} is not a variable name ({ENV_FORMS})")
            if len(text) > MAX_ENV_VALUE_CHARS or "\0" in text:
                raise ValueError(
                    f"the value of {name} is over {MAX_ENV_VALUE_CHARS:,} characters or holds NUL"
                )
        return value

    def resolved(self) -> Grants:
        return Grants(hosts=tuple(HostRule.parse(p) for p in self.hosts), env=dict(self.env))


def _checked(value: Any, parse: Callable[[Any], Any], forms: str) -> Any:
    # (Checked as given: pydantic would take True as 1 and b"5" as "5".)
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int, float))
        or (isinstance(value, str) and not value.isascii())
    ):
        raise ValueError(f"{value!r:.80} is invalid; expected {forms}")
    try:
        parse(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r:.80} is invalid; expected {forms}") from None
    return value


def code_request(source: str, args: list[Any], limits: CodeLimits) -> RunRequest:
    """The run of ``source`` with ``args`` under ``limits``, as its one task:
    what it may make the host hold (its output, and the messages it sends
    itself, journaled or not) is bounded by ``max_output``. (Its options are
    journaled: a resume keeps them.)"""
    if not isinstance(source, str):
        raise InvalidRequest(f"source must be a str of Python code, not {type(source).__name__}")
    max_output = parse_ram(limits.max_output)
    options = RunOptions(
        # The code is the run's one task: it starts no other (each would get
        # limits of its own: the run's fuel and memory, a multiple of these).
        max_live_tasks=0,
        # The warm sandbox (CodeRunner) is a thread core's: with one task a
        # thread per task costs nothing. (A resume runs on it too.)
        core="threads",
        max_fuel=limits.fuel,
        max_ram=limits.ram,
        max_timeout=limits.timeout,
        max_task_output=max_output,
        max_message_size=min(max_output, DEFAULT_MAX_MESSAGE_BYTES),
        max_queued_size=max_output,
    )
    return RunRequest(path=RUNNER, args=[source, args], options=options)


class OutputCapture:
    """What a run_code printed, from its output events: at most ``limit``
    characters in all (its ``max_output``; a journaled run fails past it, and
    without a journal what comes past it is dropped, and the cut is marked)."""

    def __init__(self, forward: Callable[[Any], None], limit: int) -> None:
        self._forward = forward
        self._limit = limit
        self._kept = 0
        self._cut = False
        self._lock = threading.Lock()
        self._streams: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def on_event(self, event: Any) -> None:
        if isinstance(event, TaskOutput) and event.task_id != LOAD_TASK_ID:
            with self._lock:
                room = self._limit - self._kept
                text = event.text if len(event.text) <= room else event.text[: max(room, 0)]
                self._cut = self._cut or len(text) < len(event.text)
                self._kept += len(text)
                self._streams[event.stream].append(text)
        self._forward(event)

    def texts(self) -> tuple[str, str]:
        with self._lock:
            cut = f"\n[output cut at {self._limit:,} characters]\n" if self._cut else ""
            return "".join(self._streams["stdout"]) + cut, "".join(self._streams["stderr"])


class CodeRunner:
    """The warm sandbox of ``run_code``: the runner imported once, fresh
    instances of it prepared ahead; each call is a run of its own on it
    (thread-safe: runs at once share the pool), on the thread core (``guest``:
    the thread core's). ``close`` when done."""

    def __init__(self, guest: GuestComponent) -> None:
        self.sandbox = Sandbox([RUNNER.parent, *site_package_dirs()], guest=guest)
        self.sandbox.__enter__()
        try:
            configs, first = Run.load(self.sandbox, RUNNER_MODULE, _drop_output)
            self.configs = configs
            self.sandbox.start_pool(RUNNER_MODULE, POOL_SIZE, first)
        except BaseException as exc:
            self.sandbox.__exit__(None, None, None)
            raise RuntimeFailure(f"the code runner failed to load: {exc}") from None

    def close(self) -> None:
        self.sandbox.__exit__(None, None, None)

    def run(
        self,
        request: RunRequest,
        on_event: Callable[[Any], None],
        *,
        grants: CodeGrants,
        run_id: str,
        steps: StepLog | None = None,
        history: History | None = None,
        seed: bytes = b"",
        on_run: Callable[[Run], None] | None = None,
        event_types: Any = None,
        events: EventStream | None = None,
    ) -> RunReport:
        """As run_program, on the warm sandbox (a ProgramRunner)."""
        totals = RunTotals()
        try:
            settings, _ = resolve_settings(request.options, Project())
        except ConfigError as exc:
            return RunReport(usage_error=str(exc))
        settings = replace(settings, pool_size=POOL_SIZE)
        events = events or EventStream()
        events.subscribe(on_event, event_types)
        events.emit(
            RunStarted(
                run_id=run_id, program=str(RUNNER), entry="main", resumed=history is not None
            )
        )
        run = Run(
            self.sandbox,
            RUNNER_MODULE,
            self.configs,
            events,
            settings,
            run_id,
            steps,
            history,
            seed,
            {"main": grants.resolved()},
        )
        return report_of(
            run, lambda: run.run_main(request.args, request.kwargs), totals, RUNNER, on_run
        )


def _drop_output(invocation: Invocation, stream: str, text: str) -> None:
    """The runner's own import prints nothing worth keeping."""
