"""Guest code is hostile by assumption: it reaches nothing it was not given."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ProgramRunner

PROBES = """
    import os
    from capsule import task

    def attempt(action):
        try:
            return ["allowed", repr(action())[:80]]
        except BaseException as error:
            return ["denied", type(error).__name__]

    @task(name="main", compute="HIGH")
    def main(secret_path):
        import socket
        return {
            "read_secret": attempt(lambda: open(secret_path).read()),
            "read_etc": attempt(lambda: open("/etc/passwd").read()),
            "list_root": attempt(lambda: os.listdir("/")),
            "write_file": attempt(lambda: open("/tmp/capsule-escape", "w").write("x")),
            "env": dict(os.environ),
            "socket": attempt(lambda: socket.create_connection(("127.0.0.1", 80), timeout=1)),
            "argv": __import__("sys").argv,
        }
"""


def test_no_files_env_or_sockets(run_program: ProgramRunner, tmp_path: os.PathLike[str]) -> None:
    secret = os.path.join(str(tmp_path), "secret.txt")
    with open(secret, "w") as handle:
        handle.write("top secret")
    os.environ["CAPSULE_TEST_SECRET"] = "leak-me"
    try:
        outcome = run_program(PROBES, secret)
    finally:
        del os.environ["CAPSULE_TEST_SECRET"]
    probes = outcome.value
    assert probes["read_secret"][0] == "denied"
    assert probes["read_etc"][0] == "denied"
    assert probes["list_root"][0] == "denied"
    assert probes["write_file"][0] == "denied"
    assert probes["socket"][0] == "denied"
    assert probes["env"] == {}
    assert not os.path.exists("/tmp/capsule-escape")


def test_common_stdlib_is_available(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        import importlib
        from capsule import task

        REQUIRED = (
            "json re math random datetime time collections itertools functools dataclasses "
            "enum typing statistics decimal fractions string textwrap hashlib base64 uuid "
            "urllib.parse html csv io copy heapq bisect operator traceback logging "
            "contextlib abc"
        ).split()

        @task(name="main")
        def main():
            missing = []
            for name in REQUIRED:
                try:
                    importlib.import_module(name)
                except ImportError as error:
                    missing.append(f"{name}: {error}")
            import hashlib, statistics, uuid, decimal
            return {
                "missing": missing,
                "sha": hashlib.sha256(b"capsule").hexdigest()[:12],
                "mean": statistics.mean([1, 2, 3, 4]),
                "uuid_len": len(str(uuid.uuid4())),
                "decimal": str(decimal.Decimal("1.1") + decimal.Decimal("2.2")),
            }
        """
    )
    assert outcome.value == {
        "missing": [],
        "sha": hashlib.sha256(b"capsule").hexdigest()[:12],
        "mean": 2.5,
        "uuid_len": 36,
        "decimal": "3.3",
    }


def test_a_failure_of_the_host_ends_only_the_instance_it_served(
    program: Callable[[str, str], Path],
) -> None:
    """Host code that raises while serving an import (here: the output call,
    and an answer the binding cannot lower) ends that instance as a trap that
    carries the host traceback; the sandbox goes on serving the next one."""
    from capsule.sandbox.engine import Invocation, Limits, RefusingHost, Sandbox

    class BrokenOutput(RefusingHost):
        def output(self, invocation: Invocation, stream: str, text: str) -> None:
            raise RuntimeError("the host's output broke")

    class MalformedAnswer(RefusingHost):
        def receive(self, caller: Invocation, timeout: float | None) -> tuple[bool, str]:
            return "not an (ok, payload) pair"  # type: ignore[return-value]

    path = program(
        """
        from capsule import receive, task

        @task(name="main")
        def main(mode):
            if mode == "print":
                print("hello")
            else:
                receive()
            return mode
        """
    )
    limits = Limits(fuel=10**10, ram_bytes=256 * 1024**2, timeout_s=30.0)
    hosts = [("print", BrokenOutput()), ("receive", MalformedAnswer()), ("print", RefusingHost())]
    with Sandbox([path.parent]) as sandbox:
        outcomes = [
            sandbox.invoke(
                Invocation(f"t{n}", "main", 1, 1, limits, host=host),
                "prog",
                json.dumps({"args": [mode], "kwargs": {}}),
            )
            for n, (mode, host) in enumerate(hosts)
        ]
    expected = ["RuntimeError: the host's output broke", "Error"]
    tracebacks = []
    for outcome, error_line in zip(outcomes[:2], expected, strict=True):
        assert outcome.error is not None and outcome.error.kind == "trap", outcome
        assert outcome.error.message == "the host failed while serving the task"
        tracebacks.append(outcome.error.traceback or "")
        assert error_line in tracebacks[-1], tracebacks[-1]
    assert "hostcall.py" in tracebacks[1]  # it failed in the binding's lowering
    assert outcomes[2].error is None and outcomes[2].result_json == '"print"'


def test_random_is_per_instance_without_host_draws_while_an_instance_starts(
    program: Callable[[str, str], Path],
) -> None:
    """componentize-py reseeds `random` from WASI randomness as an instance
    starts (ten host calls); the guest seeds it from the bytes the host hands
    its load instead. Module-level code still sees its own random numbers in
    every instance, and a task's `random.seed()` still draws from the host."""
    import json

    from capsule.sandbox.engine import Invocation, Limits, RefusingHost, Sandbox

    class CountingDraws(RefusingHost):
        def __init__(self) -> None:
            self.draws = 0

        def random_bytes(self, caller: Invocation, count: int) -> bytes:
            self.draws += 1
            return super().random_bytes(caller, count)

    path = program(
        """
        import random
        from capsule import task

        AT_IMPORT = random.random()

        @task(name="main")
        def main():
            random.seed()  # from the host's randomness
            return [AT_IMPORT, random.random()]
        """,
        "prog.py",
    )
    limits = Limits(fuel=10**10, ram_bytes=256 * 1024**2, timeout_s=30.0)
    with Sandbox([path.parent]) as sandbox:
        starting = CountingDraws()
        sandbox.prepare("prog", starting).store.close()
        running = CountingDraws()
        outcomes = [
            sandbox.invoke(
                Invocation(f"t{n}", "main", 1, 1, limits, running),
                "prog",
                '{"args": [], "kwargs": {}}',
            )
            for n in range(3)
        ]
    assert starting.draws == 0
    values = [json.loads(outcome.result_json or "null") for outcome in outcomes]
    assert all(value is not None for value in values), [o.error for o in outcomes]
    assert len({at_import for at_import, _ in values}) == 3, values
    assert len({drawn for _, drawn in values}) == 3, values
    assert running.draws >= 3  # each task's random.seed() asked the host


LIARS = """
    import sys
    from componentize_py_types import Err
    from wit_world.exports.runner import Failure
    from capsule import TaskError, task

    class Forged(Exception):
        # Reporting it hands the host a failure report of the task's making.
        def __str__(self):
            if isinstance(self.args[0], str):
                raise Err(self.args[0])  # (not even a failure record)
            kind, message = self.args[0]
            raise Err(
                Failure(
                    kind=kind, message=message, type=None, traceback=None, cause=None,
                    retryable=True,
                )
            )

    class Exiting(Exception):
        def __str__(self):
            raise SystemExit(3)

    class BrokenStream:
        def write(self, text):
            return len(text)

        def flush(self):
            raise KeyboardInterrupt

    @task(max_retries=0)
    def liar(report):
        raise Forged(report)

    @task(max_retries=0)
    def exits_while_reported():
        raise Exiting()

    @task(max_retries=0)
    def breaks_its_stdout():
        sys.stdout = BrokenStream()
        return "done"

    @task(max_retries=0)
    def afterwards():
        return "works"

    @task(name="main", max_retries=0)
    def main(reports):
        outcomes = []
        calls = [lambda report=report: liar(report) for report in reports]
        for call in [*calls, exits_while_reported, breaks_its_stdout]:
            try:
                outcomes.append(["ok", call()])
            except TaskError as error:
                outcomes.append([error.kind, error.message])
        return [outcomes, afterwards()]
"""


def test_a_guests_report_of_its_own_failure_is_only_a_claim(run_program: ProgramRunner) -> None:
    """A guest can hand the host any failure report (here through an exception
    whose str() raises the runtime's Err). A kind that is the host's to find
    is a protocol failure; a report that is not a failure record cannot cross
    (the attempt traps). A failure while the shim reports a failure is
    reported too, not a trap that says nothing."""
    reports = [
        ["cancelled", "said to be cancelled"],
        ["timeout", "said to be late"],
        ["memory_limit", "said to be out of memory"],
        "not a failure record",
    ]
    outcomes, afterwards = run_program(LIARS, reports).value
    assert outcomes[:3] == [
        ["protocol", "the task reported a failure of kind 'cancelled'; a task may report "
         "only bad_arguments, exception, memory_limit"],
        ["protocol", "the task reported a failure of kind 'timeout'; a task may report "
         "only bad_arguments, exception, memory_limit"],
        ["memory_limit", "said to be out of memory"],  # (its own to give up)
    ]  # fmt: skip
    assert outcomes[3][0] == "trap", outcomes[3]
    assert outcomes[4:] == [
        ["exception", "SystemExit while reporting the task's outcome"],
        ["exception", "KeyboardInterrupt while reporting the task's outcome"],
    ]
    assert afterwards == "works"
