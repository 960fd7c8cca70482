"""One run of a program: load it, then run its tasks as a tree of invocations.

``main`` runs on a task thread owned by :meth:`Run.run_main`. Each attempt of an
invocation runs in a fresh sandbox instance. A task calling another task reaches
:meth:`Run.call_task` through a host import, on its own thread, which is blocked
in that call anyway: the child (with its retries) runs right there, in its own
instance, and its result is returned to the caller.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from capsule.sandbox.config import HostCaps, Limits, TaskConfig, validate_program
from capsule.sandbox.engine import (
    AttemptOutcome,
    ErrorInfo,
    Invocation,
    Prepared,
    PrepareError,
    Sandbox,
)
from capsule.supervisor.events import (
    ErrorDetail,
    EventStream,
    TaskCompleted,
    TaskFailed,
    TaskOutput,
    TaskPending,
    TaskRetrying,
    TaskStarted,
)

#: How deep task calls may nest before the call is refused.
MAX_DEPTH = 64
#: Largest JSON a task may pass as arguments or return as its result. The value
#: crosses the host, so the cap bounds what one task can make the host hold.
MAX_PAYLOAD_BYTES = 64 * 1024**2
#: Kinds that a retry cannot fix.
NOT_RETRYABLE = frozenset({"cancelled"})


class ProgramError(Exception):
    """The program cannot be run at all (missing file, import error, no main task).

    Distinct from a config error (exit code 2) only in how it is reported; both stop
    the run before any task starts.
    """

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


class RunInterrupted(Exception):
    """The run was interrupted (Ctrl-C); the tree was cancelled and has stopped."""

    def __init__(self, result: TaskResult) -> None:
        super().__init__("the run was interrupted")
        self.result = result


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: ``initial * factor ** (n - 1)``, capped."""

    initial_s: float = 0.05
    factor: float = 2.0
    max_s: float = 5.0

    def delay(self, failed_attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * self.factor ** (failed_attempt - 1)))


@dataclass
class TaskResult:
    """How a task invocation (all its attempts) ended."""

    task_id: str
    task: str
    attempts: int
    fuel_consumed: int
    duration_s: float
    result_json: str | None = None
    error: ErrorDetail | None = None
    peak_memory_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def value(self) -> Any:
        return None if self.result_json is None else json.loads(self.result_json)


@dataclass
class _Node:
    """A task invocation across its attempts: numbers the calls it makes, so that
    child ids are deterministic (the parent's id plus the call's sequence number;
    attempts continue the count, so ids stay unique across retries)."""

    task_id: str
    children: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_child_id(self) -> str:
        with self.lock:
            self.children += 1
            return f"{self.task_id}/{self.children}"


@dataclass(frozen=True)
class RunSettings:
    caps: HostCaps = field(default_factory=HostCaps)
    backoff: Backoff = field(default_factory=Backoff)
    #: Fresh instances kept ready with the program imported (0: prepare on demand).
    pool_size: int = 2


def new_run_id() -> str:
    """A fresh, short, unique run id."""
    return uuid.uuid4().hex[:12]


def program_module(path: Path) -> str:
    """The module name a program file is imported under in the guest."""
    if path.suffix != ".py":
        raise ProgramError(f"{path}: a Capsule program is a Python file ending in .py")
    if not path.stem.isidentifier():
        raise ProgramError(
            f"{path}: the file name must be a valid Python module name (letters, digits, _)"
        )
    return path.stem


class Run:
    """Runs the tasks of one loaded program in a sandbox."""

    def __init__(
        self,
        sandbox: Sandbox,
        program: str,
        configs: dict[str, TaskConfig],
        events: EventStream,
        settings: RunSettings | None = None,
        run_id: str | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.program = program
        self.configs = configs
        self.events = events
        self.settings = settings or RunSettings()
        self.run_id = run_id or new_run_id()
        self._nodes: dict[Invocation, _Node] = {}

    # -- loading -------------------------------------------------------------

    @staticmethod
    def load(
        sandbox: Sandbox, program: str, output: Callable[[Invocation, str, str], None]
    ) -> tuple[dict[str, TaskConfig], Prepared]:
        """Import the program in a sandbox and validate the tasks it declares.

        Returns the configs and the instance the program was imported in, still
        unused by any task, so the first invocation can start in it."""

        class LoadHost:
            def call_task(self, caller: Invocation, name: str, call_json: str) -> tuple[bool, str]:
                message = f"task {name!r} was called while the program was being imported"
                return False, json.dumps({"kind": "exception", "task": name, "message": message})

            def output(self, invocation: Invocation, stream: str, text: str) -> None:
                output(invocation, stream, text)

        try:
            prepared = sandbox.prepare(program, LoadHost(), describe=True)
        except PrepareError as exc:
            raise ProgramError(
                f"importing the program failed ({exc.error.kind}): {exc.error.message}",
                exc.error.traceback,
            ) from None
        try:
            return validate_program(json.loads(prepared.declared)["tasks"]), prepared
        except BaseException:
            prepared.store.close()
            raise

    # -- running -------------------------------------------------------------

    def run_main(
        self,
        args: list[Any],
        kwargs: dict[str, Any] | None = None,
        first: Prepared | None = None,
    ) -> TaskResult:
        """Run ``main`` to the end and return how it ended.

        The task tree runs on one thread this call owns (nested calls run inline
        on it, see :meth:`call_task`); it always joins that thread before
        returning. Interrupting the wait (Ctrl-C) cancels the whole tree: every
        instance traps at its next epoch tick, and the interrupt is re-raised
        once the tree has stopped.
        """
        if "main" not in self.configs:
            if first is not None:
                first.store.close()
            names = ", ".join(sorted(self.configs)) or "none"
            raise ProgramError(
                f"the program has no task named 'main' (tasks found: {names}); "
                f'declare the entry point with @task(name="main")'
            )
        self.sandbox.start_pool(self.program, self.settings.pool_size, first)
        root = _Root()
        outcome: list[TaskResult] = []
        failure: list[BaseException] = []

        finished = threading.Event()

        def body() -> None:
            try:
                outcome.append(self.run_task("main", "main", args, kwargs or {}, parent=root))
            except BaseException as exc:  # re-raised on the caller's thread
                failure.append(exc)
            finally:
                finished.set()

        thread = start_task_thread(body, name="capsule-main")
        interrupted = False
        # Wait on an Event, not on Thread.join: an interrupted join can mark a
        # thread finished while it still runs (CPython < 3.13).
        while not finished.is_set():
            try:
                finished.wait(0.1)  # a timed wait so that Ctrl-C is seen promptly
            except KeyboardInterrupt:
                root.cancel_message = "cancelled: the run was interrupted"
                interrupted = root.cancelled = True
        thread.join()
        if failure:
            raise failure[0]
        if interrupted:
            raise RunInterrupted(outcome[0])
        return outcome[0]

    def run_task(
        self,
        name: str,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        parent: Invocation,
    ) -> TaskResult:
        """Run one task invocation, with its retries, on the calling thread."""
        config = self.configs[name]
        node = _Node(task_id=task_id)
        limits = Limits.for_task(config, self.settings.caps)
        max_attempts = config.max_retries + 1
        emit = self.events.emit
        ids = _EventIds(run_id=self.run_id, task_id=task_id, task=name)
        parent_id = None if isinstance(parent, _Root) else parent.task_id
        emit(TaskPending(**ids, parent_id=parent_id, max_attempts=max_attempts))
        total_fuel = 0
        total_time = 0.0
        attempt = 0
        while True:
            attempt += 1
            invocation = Invocation(
                task_id=task_id,
                task=name,
                attempt=attempt,
                max_attempts=max_attempts,
                limits=limits,
                host=self,
                parent=parent,
            )
            if parent.check_stop() is not None:
                outcome = AttemptOutcome(
                    None, ErrorInfo("cancelled", "its caller stopped"), 0, None, 0.0
                )
            else:
                emit(TaskStarted(**ids, attempt=attempt, max_attempts=max_attempts))
                self._nodes[invocation] = node
                try:
                    outcome = self.sandbox.invoke(invocation, self.program, args, kwargs)
                finally:
                    del self._nodes[invocation]
                size = len(outcome.result_json or "")
                if size > MAX_PAYLOAD_BYTES:
                    outcome.result_json = None
                    outcome.error = ErrorInfo(
                        "exception",
                        f"task {name!r} returned {size:,} bytes of JSON; "
                        f"results are limited to {MAX_PAYLOAD_BYTES:,} bytes",
                    )
            total_fuel += outcome.fuel_consumed
            total_time += outcome.duration_s
            if outcome.error is None:
                emit(
                    TaskCompleted(
                        **ids,
                        attempt=attempt,
                        duration_ms=outcome.duration_s * 1000,
                        fuel_consumed=outcome.fuel_consumed,
                    )
                )
                return TaskResult(
                    task_id,
                    name,
                    attempt,
                    total_fuel,
                    total_time,
                    outcome.result_json,
                    peak_memory_bytes=outcome.peak_memory_bytes,
                )
            error = ErrorDetail(
                kind=outcome.error.kind,
                message=outcome.error.message,
                task=name,
                traceback=outcome.error.traceback,
                cause=outcome.error.cause,
            )
            if attempt < max_attempts and error.kind not in NOT_RETRYABLE:
                delay = self.settings.backoff.delay(attempt)
                emit(TaskRetrying(**ids, attempt=attempt, error=error, backoff_s=delay))
                if _sleep_unless_stopped(parent, delay):
                    continue
            emit(
                TaskFailed(
                    **ids,
                    attempt=attempt,
                    error=error,
                    duration_ms=outcome.duration_s * 1000,
                    fuel_consumed=outcome.fuel_consumed,
                )
            )
            return TaskResult(task_id, name, attempt, total_fuel, total_time, error=error)

    # -- host calls (on the calling task's thread) ----------------------------

    def call_task(self, caller: Invocation, name: str, call_json: str) -> tuple[bool, str]:
        """A task called another: run the child to the end, inline.

        The caller's thread is blocked in this host call anyway, so the child runs
        right here, in its own fresh instance: no thread or event-loop hop on the
        path of a call. The child sees its caller's deadline and cancellation
        through ``Invocation.parent``."""

        def refuse(message: str) -> tuple[bool, str]:
            return False, json.dumps({"kind": "exception", "task": name, "message": message})

        if name not in self.configs:
            return refuse(
                f"{caller.task!r} called a task named {name!r}, "
                f"but the program declares no such task"
            )
        node = self._nodes[caller]
        depth = node.task_id.count("/") + 1
        if depth >= MAX_DEPTH:
            return refuse(f"task calls are nested {depth} deep; the limit is {MAX_DEPTH}")
        if len(call_json) > MAX_PAYLOAD_BYTES:
            return refuse(
                f"the arguments to {name!r} are {len(call_json):,} bytes of JSON; "
                f"arguments are limited to {MAX_PAYLOAD_BYTES:,} bytes"
            )
        try:
            call = json.loads(call_json)
            args, kwargs = list(call["args"]), dict(call["kwargs"])
        except (ValueError, KeyError, TypeError) as exc:
            return refuse(f"malformed call from the guest: {exc}")
        result = self.run_task(name, node.next_child_id(), args, kwargs, parent=caller)
        if result.error is None:
            assert result.result_json is not None
            return True, result.result_json
        return False, json.dumps({**result.error.model_dump(), "attempts": result.attempts})

    def output(self, invocation: Invocation, stream: str, text: str) -> None:
        self.events.emit(
            TaskOutput(
                run_id=self.run_id,
                task_id=invocation.task_id,
                task=invocation.task,
                stream="stderr" if stream == "stderr" else "stdout",
                text=text,
            )
        )


class _EventIds(TypedDict):
    run_id: str
    task_id: str
    task: str


class _Root(Invocation):
    """The parent of ``main``: never times out; cancelled when the run is."""

    def __init__(self) -> None:
        super().__init__(
            task_id="",
            task="<run>",
            attempt=1,
            max_attempts=1,
            limits=Limits(fuel=0, ram_bytes=0, timeout_s=None),
            host=_NO_HOST,
        )


class _NoHost:
    def call_task(self, caller: Invocation, name: str, call_json: str) -> tuple[bool, str]:
        raise AssertionError("the run root makes no calls")

    def output(self, invocation: Invocation, stream: str, text: str) -> None:
        raise AssertionError("the run root prints nothing")


_NO_HOST = _NoHost()

#: Stack for threads that run task trees. Nested calls run inline, one wasm
#: activation above another on the same native stack, so it must hold
#: MAX_DEPTH of them (wasmtime lets each use 512 KiB) plus the host frames
#: between; reserved address space, committed only as used.
TASK_THREAD_STACK = 256 * 1024**2
_stack_lock = threading.Lock()


def start_task_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a thread with a stack deep enough for a tree of nested task calls."""
    with _stack_lock:
        previous = threading.stack_size(TASK_THREAD_STACK)
        try:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread


def _sleep_unless_stopped(parent: Invocation, seconds: float) -> bool:
    """Sleep ``seconds`` (a retry backoff); False if the parent stopped meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        if parent.check_stop() is not None:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, 0.01))
