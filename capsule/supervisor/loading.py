"""Loading a program: import it in a sandbox instance (interruptibly) and
validate the tasks it declares; and why a program cannot be run at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsule.sandbox import guest_data, js
from capsule.sandbox.config import TaskConfig, validate_program
from capsule.sandbox.engine import Invocation, Prepared, PrepareError, RefusingHost, Sandbox
from capsule.sandbox.guest_data import ProtocolError
from capsule.supervisor.tree import Scope, run_interruptibly

if TYPE_CHECKING:
    from capsule.sandbox.js.bundle import ScriptFinder

#: Most tasks a program may declare.
MAX_DECLARED_TASKS = 10_000


class ProgramError(Exception):
    """The program cannot be run at all (missing file, import error, no main task).

    Distinct from a config error (exit code 2) only in how it is reported; both stop
    the run before any task starts.
    """

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


def program_language(path: Path) -> str:
    """The language of a program file, by its name: "python" or "javascript"."""
    if path.suffix == ".py":
        return "python"
    if path.suffix in js.SUFFIXES:
        return "javascript"
    raise ProgramError(
        f"{path}: a Capsule program is a Python file (.py), or a TypeScript or "
        f"JavaScript file ({', '.join(js.SUFFIXES)})"
    )


def program_module(path: Path) -> str:
    """The module name a program file is imported under in the guest."""
    if program_language(path) == "javascript":
        return path.stem  # (only a name the runtime is handed the bundle under)
    if not path.stem.isidentifier():
        raise ProgramError(
            f"{path}: the file name must be a valid Python module name (letters, digits, _)"
        )
    return path.stem


def script_finder(module: str, path: Path) -> ScriptFinder:
    """The code of the JS/TS program at ``path``: bundled (or taken from the
    bundle cache), served under ``module``. ProgramError if it cannot be
    bundled; RuntimeBuildError if the toolchain cannot be installed."""
    from capsule.sandbox.js.bundle import BundleError, ScriptFinder, bundle_program

    try:
        return ScriptFinder(module, path, bundle_program(path))
    except BundleError as exc:
        raise ProgramError(f"{path}: {exc}") from None


def load_program(
    sandbox: Sandbox,
    program: str,
    output: Callable[[Invocation, str, str], None],
    task_defaults: dict[str, Any] | None = None,
) -> tuple[dict[str, TaskConfig], Prepared]:
    """Import the program in a sandbox and validate the tasks it declares.

    Returns the configs and the instance the program was imported in, still
    unused by any task, so the first invocation can start in it."""

    class LoadHost(RefusingHost):
        def output(self, invocation: Invocation, stream: str, text: str) -> None:
            output(invocation, stream, text)

    # Off the main thread, which waits: Ctrl-C or SIGTERM there must not land
    # in a host call of the instance importing the program (it corrupted the
    # process), and stop the import instead (KeyboardInterrupt, once it has).
    scope = Scope(None, task_id="")

    def interrupt() -> None:
        scope.cancel_message = "cancelled: the run was interrupted while it loaded"
        scope.cancelled = True

    try:
        prepared, interrupted = run_interruptibly(
            lambda: sandbox.prepare(program, LoadHost(), describe=True, within=scope),
            interrupt,
            name="capsule-load",
        )
    except PrepareError as exc:
        if scope.cancelled:
            raise KeyboardInterrupt from None
        raise ProgramError(
            f"importing the program failed ({exc.error.kind}): {exc.error.message}",
            exc.error.traceback,
        ) from None
    if interrupted:
        prepared.store.close()
        raise KeyboardInterrupt
    try:
        return validate_program(_declared_tasks(prepared.declared), task_defaults), prepared
    except BaseException:
        prepared.store.close()
        raise


def no_entry(entry: str, names: list[str]) -> str:
    """Why a run cannot start at ``entry``: the tasks it could start at."""
    found = ", ".join(names) or "none"
    if entry == "main":
        return (
            f"the program has no task named 'main' (tasks found: {found}); declare the "
            f'entry point with @task(name="main"), or start the run at another task '
            f"(the entry: `capsule run FILE:TASK`, or entry= in the host API)"
        )
    return (
        f"the program has no task named {entry!r:.80} to run as the entry point (tasks "
        f"found: {found}); start the run at one of them (`capsule run FILE:TASK`, or "
        f"entry= in the host API)"
    )


def _declared_tasks(loaded: str) -> list[dict[str, Any]]:
    """The tasks the program declared, from what its import returned (the
    guest's word: module-level code may have replaced the SDK): a list of
    {"name", "function", "options"}; ProgramError if it is anything else."""
    try:
        value = guest_data.json_value(loaded, "the program's description of its tasks")
    except ProtocolError as exc:
        raise ProgramError(str(exc)) from None
    tasks = value.get("tasks") if isinstance(value, dict) else None
    if (
        not isinstance(tasks, list)
        or len(tasks) > MAX_DECLARED_TASKS
        or not all(
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("function"), str)
            and isinstance(entry.get("options", {}), dict)
            for entry in tasks
        )
    ):
        raise ProgramError(
            "the program's description of its tasks is malformed (its module-level code "
            f"replaced the SDK?); expected at most {MAX_DECLARED_TASKS:,} tasks, each "
            '{"name": text, "function": text, "options": {...}}'
        )
    return tasks
