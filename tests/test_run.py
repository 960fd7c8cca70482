"""Real runs in real wasm instances: results, task calls, failures, retries, limits."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest

from capsule.sandbox.engine import live_instances
from tests.conftest import EXAMPLES, ProgramRunner


def test_hello(run_program: ProgramRunner) -> None:
    outcome = run_program((EXAMPLES / "hello.py").read_text())
    assert outcome.value == "Hello from Capsule!"
    assert outcome.result.attempts == 1
    assert outcome.result.fuel_consumed > 0


def test_a_run_on_task_threads_loads_no_event_loop() -> None:
    """The run's event loop and its continuation driver (anyio, asyncio) are
    made for the async core only: a run on task threads never loads them."""
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from capsule.supervisor.options import RunOptions\n"
        "from capsule.supervisor.program import RunRequest, run_program\n"
        f"request = RunRequest(Path({str(EXAMPLES / 'hello.py')!r}), [], "
        "options=RunOptions(core='threads'))\n"
        "report = run_program(request, lambda event: None)\n"
        "print(report.result.value())\n"
        "loaded = ('asyncio', 'anyio', 'capsule.supervisor.run_loop',\n"
        "          'capsule.supervisor.continuations')\n"
        "print(sorted(name for name in loaded if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.splitlines() == ["Hello from Capsule!", "[]"], done.stderr


def test_spec_analyze_example(run_program: ProgramRunner) -> None:
    outcome = run_program((EXAMPLES / "analyze.py").read_text())
    assert outcome.value == {"processed": 5, "status": "complete"}
    started = [event.task_id for event in outcome.of_type("started")]
    assert started == ["main", "main/1"]


NESTED = """
    import capsule
    from capsule import task

    @task(compute="LOW")
    def leaf(x, *, scale=1, tag="t"):
        info = capsule.current()
        return {"value": x * scale, "tag": tag, "id": info.id, "name": info.name}

    @task
    def middle(x, scale=1):
        return [leaf(x, scale=scale, tag="a"), leaf(x + 1, scale=scale)]

    @task
    def top(n, *, scale):
        return {"middle": middle(n, scale=scale), "me": capsule.current().id}

    @task(name="main")
    def main(n):
        return top(int(n), scale=10)
"""


def test_nested_calls_three_deep_with_kwargs(run_program: ProgramRunner) -> None:
    outcome = run_program(NESTED, "4")
    assert outcome.value == {
        "middle": [
            {"value": 40, "tag": "a", "id": "main/1/1/1", "name": "leaf"},
            {"value": 50, "tag": "t", "id": "main/1/1/2", "name": "leaf"},
        ],
        "me": "main/1",
    }
    # Every invocation ran in its own instance with its own lifecycle.
    assert [e.task_id for e in outcome.of_type("completed")] == [
        "main/1/1/1",
        "main/1/1/2",
        "main/1/1",
        "main/1",
        "main",
    ]
    pending = {e.task_id: e.parent_id for e in outcome.of_type("pending")}
    assert pending == {
        "main": None,
        "main/1": "main",
        "main/1/1": "main/1",
        "main/1/1/1": "main/1/1",
        "main/1/1/2": "main/1/1",
    }


def test_instances_share_no_state(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import task
        COUNTER = []

        @task
        def bump():
            COUNTER.append(1)
            return len(COUNTER)

        @task(name="main")
        def main():
            return [bump(), bump(), bump(), len(COUNTER)]
        """
    )
    assert outcome.value == [1, 1, 1, 0]


FAILURES = """
    import sys
    from capsule import task

    @task(max_retries=0)
    def raises():
        raise ValueError("broken on purpose")

    @task(max_retries=0, timeout="300ms", compute="HIGH")
    def spins():
        while True:
            pass

    @task(max_retries=0, compute=50_000_000)
    def burns():
        total = 0
        while True:
            total += 1

    @task(max_retries=0, ram="32MB")
    def hoards():
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))

    @task(max_retries=0, ram="20MB", compute="HIGH")
    def hoards_strings():
        return "x" * (100 << 20)

    # Small pieces fill the heap to its last bytes: reporting the MemoryError
    # needs memory too (it trapped in the guest runtime, unexplained).
    @task(max_retries=0, ram="32MB", compute="HIGH")
    def hoards_crumbs():
        hoard = []
        while True:
            hoard.append("x" * 10_000)

    HOARD = []

    @task(max_retries=0, ram="32MB", compute="HIGH")
    def hoards_globally():  # what it holds stays held while the error is reported
        while True:
            HOARD.append("x" * 10_000)

    # Recursion through a C slot: each level takes wasm stack. (Python calling
    # Python takes none: its frames are on the heap, which runs out first.)
    class Down(dict):
        def __getitem__(self, key):
            return self[key + 1]

    @task(max_retries=0, compute="HIGH", ram="1GB")
    def overflows():
        sys.setrecursionlimit(10_000_000)
        return Down()[0]

    @task(name="main", max_retries=0)
    def main(which):
        return {"raises": raises, "spins": spins, "burns": burns, "hoards": hoards,
                "hoards_strings": hoards_strings, "hoards_crumbs": hoards_crumbs,
                "hoards_globally": hoards_globally, "overflows": overflows}[which]()
"""


@pytest.mark.parametrize(
    ("which", "kind", "message"),
    [
        ("raises", "exception", "ValueError: broken on purpose"),
        ("spins", "timeout", "deadline of 0.3s exceeded"),
        ("burns", "fuel_exhausted", "50,000,000 fuel"),
        ("hoards", "memory_limit", "MemoryError"),
        ("hoards_strings", "memory_limit", "MemoryError"),
        ("hoards_crumbs", "memory_limit", "MemoryError"),
        ("hoards_globally", "memory_limit", "MemoryError"),
        ("overflows", "trap", "trapped: its call stack overflowed (recursion too deep?)"),
    ],
)
def test_each_failure_kind(run_program: ProgramRunner, which: str, kind: str, message: str) -> None:
    outcome = run_program(FAILURES, which)
    failed = {e.task: e for e in outcome.of_type("failed")}
    assert failed[which].error.kind == kind
    assert message in failed[which].error.message
    # The parent got a TaskError it did not catch: it fails with an exception.
    error = outcome.error
    assert error.task == "main" and error.kind == "exception"
    assert "TaskError" in error.message and f"task {which!r} failed ({kind})" in error.message


def test_exception_carries_guest_traceback(run_program: ProgramRunner) -> None:
    outcome = run_program(FAILURES, "raises")
    failed = next(e for e in outcome.of_type("failed") if e.task == "raises")
    assert failed.error.traceback is not None
    assert 'raise ValueError("broken on purpose")' in failed.error.traceback
    assert "prog.py" in failed.error.traceback


def test_timeout_stops_cpu_loop_promptly(run_program: ProgramRunner) -> None:
    outcome = run_program(FAILURES, "spins")
    failed = next(e for e in outcome.of_type("failed") if e.task == "spins")
    # The deadline is 300 ms; epoch interruption stops the loop a tick later.
    # (The 50 ms bound is measured in benchmarks/; this only guards against a
    # timeout that does not interrupt at all.)
    assert 300 <= failed.duration_ms < 2000


RETRY = """
    import capsule
    from capsule import TaskError, task

    @task(max_retries=2)
    def flaky():
        attempt = capsule.current().attempt
        if attempt == 1:
            raise RuntimeError("first attempt fails")
        return attempt

    @task(max_retries=0)
    def always_fails():
        raise KeyError("nope")

    @task(name="main", max_retries=0)
    def main():
        try:
            always_fails()
        except TaskError as error:
            caught = {"kind": error.kind, "task": error.task, "message": error.message,
                      "has_traceback": "KeyError" in (error.traceback or "")}
        return {"flaky": flaky(), "caught": caught}
"""


def test_retry_then_success_and_caught_task_error(run_program: ProgramRunner) -> None:
    outcome = run_program(RETRY, retry_backoff=0.01)
    assert outcome.value == {
        "flaky": 2,
        "caught": {
            "kind": "exception",
            "task": "always_fails",
            "message": "KeyError: 'nope'",
            "has_traceback": True,
        },
    }
    retrying = outcome.of_type("retrying")
    assert [(e.task, e.attempt, e.error.kind) for e in retrying] == [("flaky", 1, "exception")]
    assert "first attempt fails" in retrying[0].error.message
    flaky_starts = [e.attempt for e in outcome.of_type("started") if e.task == "flaky"]
    assert flaky_starts == [1, 2]


def test_main_is_retried_and_attempts_reported(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        import capsule
        from capsule import task

        @task(name="main", max_retries=3)
        def main():
            attempt = capsule.current().attempt
            if attempt < 3:
                raise RuntimeError(f"attempt {attempt}")
            return attempt
        """,
        retry_backoff=0.01,
    )
    assert outcome.value == 3
    assert outcome.result.attempts == 3


def test_retries_exhausted_reports_all_attempts(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import task

        @task(name="main", max_retries=2)
        def main():
            raise RuntimeError("always")
        """,
        retry_backoff=0.001,
    )
    assert outcome.error.kind == "exception"
    assert outcome.result.attempts == 3
    backoffs = [e.backoff_s for e in outcome.of_type("retrying")]
    assert backoffs == [0.001, 0.002]


CAPS = """
    from capsule import task

    @task(name="main", compute="HIGH", ram="2GB", timeout="1h", max_retries=0)
    def main(which):
        if which == "spin":
            while True:
                pass
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))
"""


def test_host_fuel_cap_wins_over_declared(run_program: ProgramRunner) -> None:
    outcome = run_program(CAPS, "spin", max_fuel="LOW")
    assert outcome.error.kind == "fuel_exhausted"
    assert "100,000,000 fuel" in outcome.error.message
    assert outcome.result.fuel_consumed == 100_000_000


def test_host_timeout_cap_wins_over_declared(run_program: ProgramRunner) -> None:
    outcome = run_program(CAPS, "spin", max_timeout="250ms")
    assert outcome.error.kind == "timeout"


def test_host_ram_cap_wins_over_declared(run_program: ProgramRunner) -> None:
    outcome = run_program(CAPS, "hoard", max_ram="40MB")
    assert outcome.error.kind == "memory_limit"


def test_ram_below_runtime_minimum_is_memory_limit(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import task

        @task(name="main", ram="64KB", max_retries=0)
        def main():
            return 1
        """
    )
    assert outcome.error.kind == "memory_limit"
    assert "below the 16 MiB" in outcome.error.message


SERIALIZATION = """
    from capsule import TaskError, task

    @task(max_retries=0)
    def gives_set():
        return {1, 2}

    @task(max_retries=0)
    def takes(x):
        return x

    @task(name="main", max_retries=0)
    def main(which):
        if which == "result":
            try:
                gives_set()
            except TaskError as error:
                return [error.task, error.message]
        if which == "args":
            try:
                takes(object())
            except TypeError as error:
                return ["TypeError", str(error)]
        return object()
"""


def test_non_serializable_result_names_the_task(run_program: ProgramRunner) -> None:
    task, message = run_program(SERIALIZATION, "result").value
    assert task == "gives_set"
    assert "task 'gives_set' returned a value that is not JSON-serializable (set)" in message


def test_non_serializable_arguments_name_the_task(run_program: ProgramRunner) -> None:
    kind, message = run_program(SERIALIZATION, "args").value
    assert kind == "TypeError"
    assert "arguments to task 'takes' are not JSON-serializable" in message


def test_non_serializable_main_result(run_program: ProgramRunner) -> None:
    outcome = run_program(SERIALIZATION, "main")
    assert (
        "task 'main' returned a value that is not JSON-serializable (object)"
        in outcome.error.message
    )


def test_unknown_task_call_is_a_clear_error(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import task
        from capsule.sdk.task import registry

        @task(name="main", max_retries=0)
        def main():
            return registry["main"].__class__(lambda: 1, {"name": "ghost"})()
        """
    )
    assert "declares no such task" in outcome.error.message


def test_guest_output_is_tagged_with_its_task(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        import sys
        from capsule import task

        print("imported")  # module level: shown once, at load

        @task
        def child():
            print("from child")
            print("warning", file=sys.stderr)
            return 1

        @task(name="main")
        def main():
            print("from main")
            return child()
        """
    )
    assert outcome.value == 1
    output = [(e.task, e.stream, e.text) for e in outcome.of_type("output")]
    assert ("<load>", "stdout", "imported\n") in output
    assert ("child", "stdout", "from child\n") in output
    assert ("child", "stderr", "warning\n") in output
    assert ("main", "stdout", "from main\n") in output
    assert sum(1 for _, _, text in output if text == "imported\n") == 1


def test_no_threads_or_instances_left_after_failed_run(run_program: ProgramRunner) -> None:
    before_threads = {t.ident for t in threading.enumerate()}
    outcome = run_program(FAILURES, "spins")
    assert outcome.error.kind == "exception"
    outcome = run_program(FAILURES, "hoards")
    assert outcome.error.kind == "exception"
    leftover = [t for t in threading.enumerate() if t.ident not in before_threads and t.is_alive()]
    # anyio keeps idle worker threads for reuse only within a run; none may survive it.
    assert [t.name for t in leftover if t.name.startswith("capsule")] == []
    assert live_instances() == 0


@pytest.mark.parametrize("core", ["threads", "async"])
def test_a_run_refused_before_main_starts_leaves_no_instance(
    run_program: ProgramRunner, core: str
) -> None:
    """The program is imported in an instance main would have run in: a run
    that ends before main starts (arguments that are not JSON, an entry task
    the program does not declare) closes it."""
    hello = (EXAMPLES / "hello.py").read_text()
    outcome = run_program(hello, float("nan"), core=core)
    assert "not strict JSON" in outcome.report.usage_error
    assert live_instances() == 0
    outcome = run_program(hello, entry="nothing_here", core=core)
    assert "nothing_here" in outcome.report.usage_error
    assert live_instances() == 0


def test_child_never_outlives_its_callers_deadline(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import task

        @task(compute="HIGH", max_retries=3)
        def spin_forever():
            while True:
                pass

        @task(name="main", timeout="300ms", max_retries=0)
        def main():
            return spin_forever()
        """
    )
    assert outcome.error.kind == "timeout"
    child = next(e for e in outcome.of_type("cancelled") if e.task == "spin_forever")
    assert child.error.kind == "cancelled"
    # A cancelled child is not retried: its caller is gone.
    assert [e.attempt for e in outcome.of_type("started") if e.task == "spin_forever"] == [1]
    assert outcome.result.duration_s < 2.0


def test_deep_call_chain_is_bounded_and_reports_the_root_cause(run_program: ProgramRunner) -> None:
    # Each level recurses in Python before calling the next, so nested wasm
    # activations pile up on one native stack; the host must refuse the call at
    # the depth limit, never crash.
    outcome = run_program(
        """
        import sys
        from capsule import TaskError, task

        @task(compute="HIGH", max_retries=0)
        def chain(n):
            sys.setrecursionlimit(10_000)
            def down(k):
                return chain(n + 1) if k == 0 else down(k - 1)
            return down(300)

        @task(name="main", max_retries=0)
        def main():
            try:
                return chain(1)
            except TaskError as error:
                return {"message": error.message, "cause": error.cause}
        """
    )
    result = outcome.value
    assert result["cause"]["message"] == "task calls are nested 64 deep; the limit is 64"
    assert result["cause"]["task"] == "chain"
    assert result["cause"]["kind"] == "limit"
    assert result["message"].startswith("unhandled TaskError: task 'chain' failed (limit)")
    assert result["message"].endswith("task calls are nested 64 deep; the limit is 64")
    assert len(result["message"]) < 400  # not one wrapper per level


def test_lifecycle_events_are_typed_and_ordered(run_program: ProgramRunner) -> None:
    from pydantic import BaseModel

    from capsule.supervisor.events import TaskEvent

    outcome = run_program(RETRY, retry_backoff=0.01)
    flaky = [e for e in outcome.events if e.task == "flaky"]
    assert [e.type for e in flaky] == ["pending", "started", "retrying", "started", "completed"]
    assert all(isinstance(e, BaseModel) for e in outcome.events)
    # Events round-trip through their JSON form (what the journal will store).
    from pydantic import TypeAdapter

    adapter = TypeAdapter(TaskEvent)
    for event in outcome.events:
        assert adapter.validate_json(event.model_dump_json()) == event
    run_ids = {e.run_id for e in outcome.events}
    assert run_ids == {outcome.report.run_id}


def test_limits_come_from_the_host_not_from_the_caller(run_program: ProgramRunner) -> None:
    # The caller rewrites the child's declared options and the SDK registry at run
    # time; the host enforces what it validated when the program was loaded.
    outcome = run_program(
        """
        from capsule import TaskError, task
        from capsule.sdk.task import registry

        @task(compute="LOW", ram="32MB", max_retries=0)
        def greedy():
            while True:
                pass

        @task(name="main", compute="HIGH")
        def main():
            greedy.options.update(compute="HIGH", ram="4GB", max_retries=5)
            registry["greedy"].options["compute"] = 10**15
            try:
                greedy()
            except TaskError as error:
                return [error.kind, error.message]
        """
    )
    assert outcome.value == ["fuel_exhausted", "used all of its 100,000,000 fuel"]
    assert [e.attempt for e in outcome.of_type("started") if e.task == "greedy"] == [1]


def test_oversized_results_and_arguments_are_refused(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import TaskError, task

        @task(ram="512MB", compute="HIGH", max_retries=0)
        def huge():
            return "x" * (65 * 1024 * 1024)

        @task(max_retries=0)
        def takes(blob):
            return len(blob)

        @task(name="main", ram="1GB", compute="HIGH")
        def main():
            found = []
            try:
                huge()
            except TaskError as error:
                found.append(error.message)
            try:
                takes("y" * (65 * 1024 * 1024))
            except TaskError as error:
                found.append(error.message)
            return found
        """
    )
    result, arguments = outcome.value
    assert "task 'huge' returned 68,157,442 bytes of JSON; results are limited to" in result
    assert (
        "the arguments to 'takes' are" in arguments and "limited to 67,108,864 bytes" in arguments
    )


def test_a_traps_message_is_its_cause_on_one_line() -> None:
    from capsule.sandbox.engine import _trap_cause

    backtrace = "error while executing at wasm backtrace:\n    0: 0x1f - libc.so!abort\n\n"
    assert _trap_cause(
        Exception(
            backtrace + "Caused by:\n    0: memory fault at wasm address 0xf423f in linear "
            "memory of size 0x10000\n    1: wasm trap: out of bounds memory access"
        )
    ) == (
        "wasm trap: out of bounds memory access: memory fault at wasm address 0xf423f "
        "in linear memory of size 0x10000"
    )
    assert _trap_cause(
        Exception(backtrace + "Caused by:\n    wasm trap: call stack exhausted")
    ) == ("its call stack overflowed (recursion too deep?): wasm trap: call stack exhausted")
    assert _trap_cause(Exception("one line, no backtrace")) == "one line, no backtrace"


def test_nothing_of_a_run_outlives_it() -> None:
    # wasmtime-py keeps host functions until their linker is gone, and ours
    # are bound methods of the sandbox: each run in a process (an embedding
    # program, these tests) kept its engine and compiled code (~11 MB).
    import gc
    import weakref
    from pathlib import Path

    from capsule.sandbox.budget import machine_memory
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    # A memory budget of its own (its thread must not keep the run either),
    # but one the test process itself never fills: the budget counts the
    # whole process, which the tests before this one may have grown.
    budget = f"{machine_memory() // 1024**2}MB"
    sandboxes: list[weakref.ref[Any]] = []
    for _ in range(2):
        report = run_program(
            RunRequest(
                path=Path(EXAMPLES / "hello.py"),
                args=[],
                options=RunOptions(max_total_ram=budget),
            ),
            lambda event: None,
            on_run=lambda run: sandboxes.append(weakref.ref(run.sandbox)),
        )
        assert report.result is not None and report.result.ok
    gc.collect()
    assert [ref() for ref in sandboxes] == [None, None]


GRANTED_A_HOST = """
from capsule import task

@task(name="main", allowed_hosts=["127.0.0.1"])
def main():
    return "never runs"
"""


def _capsule_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("capsule"))


@pytest.mark.parametrize("core", ["threads", "async"])
@pytest.mark.parametrize("fails_in", ["Run.__init__", "on_run"])
def test_a_run_failing_before_main_leaks_no_instance_nor_thread(
    program: Any, monkeypatch: pytest.MonkeyPatch, core: str, fails_in: str
) -> None:
    """A run that fails once its program's first instance is loaded and its
    HTTP client's warm-up started (its task is granted a host), as it is made
    or as its caller is told of it, closes that instance and joins that
    warm-up, on both cores."""
    from capsule.supervisor import run as run_module
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    class Broken(Exception):
        pass

    def broken(*_: Any) -> Any:
        raise Broken(fails_in)

    if fails_in == "Run.__init__":  # (made last: everything else was made before)
        monkeypatch.setattr(run_module, "ExternalMessages", broken)
    request = RunRequest(program(GRANTED_A_HOST), [], options=RunOptions(core=core))
    before = _capsule_threads()
    with pytest.raises(Broken):
        run_program(request, lambda event: None, on_run=broken if fails_in == "on_run" else None)
    assert _capsule_threads() == before
    assert live_instances() == 0


def test_a_run_on_the_wrong_core_leaks_no_instance_nor_thread(program: Any) -> None:
    """Run() refuses a sandbox of the other core (a host application's bug);
    the instance handed to it, and whatever it started, are closed."""
    from capsule.sandbox.engine import Sandbox
    from capsule.sandbox.grants import Grants, HostRule
    from capsule.supervisor.events import EventStream
    from capsule.supervisor.run import Run, RunSettings

    path = program(GRANTED_A_HOST)
    with Sandbox([path.parent]) as sandbox:
        configs, first = Run.load(sandbox, "prog", lambda *a: None)
        before = _capsule_threads()  # (the sandbox's own)
        grants = {"main": Grants(hosts=(HostRule.parse("127.0.0.1"),))}
        with pytest.raises(TypeError, match="core='async'"):
            Run(sandbox, "prog", configs, EventStream(), RunSettings(core="async"),
                grants=grants, first=first)  # fmt: skip
        assert live_instances() == 0
        assert _capsule_threads() == before
