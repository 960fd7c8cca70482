"""The sandbox in async mode (capsule.sandbox.async_sandbox): real programs'
task attempts as call futures on poll threads, the waiting imports served by a
small WaitingHost of the test's, direct calls as child futures, limits and
stops, and thousands of waiting attempts on a few threads."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox import wasm_async
from capsule.sandbox.async_sandbox import AsyncSandbox, Attempt
from capsule.sandbox.config import Limits
from capsule.sandbox.engine import (
    Answer,
    Envelope,
    ErrorInfo,
    Invocation,
    RefusingHost,
    live_instances,
    past_deadline,
)
from capsule.sandbox.guest_data import TaskCall
from capsule.sandbox.wasm_async import Pending, current_future
from tests.conftest import SPIN_TASK, assert_busy_calls_take_turns, os_threads, private_bytes

PROGRAM = (
    """
import time
import capsule

@capsule.task
def hello(name):
    print("hello", name)
    started = time.monotonic()
    return {"greeting": f"hi {name}", "clock_ok": time.monotonic() >= started}

@capsule.task
def echo():
    message = capsule.receive()
    print("got", message.body)
    return {"got": message.body, "from": message.sender}

@capsule.task
def relay(count):
    for _ in range(count):
        capsule.send("out", capsule.receive().body)
    return count

@capsule.task
def square(x):
    return x * x

@capsule.task
def parent(x):
    return {"child": square(x), "after": "child"}

@capsule.task
def nap(seconds):
    capsule.sleep(seconds)
    return "rested"

@capsule.task
def hog(mb):
    held = [b"x" * (4 * 1024 * 1024) for _ in range(mb // 4)]
    message = capsule.receive()
    return {"held": len(held) * 4, "got": message.body}

@capsule.task
def forever():
    while True:
        pass
"""
    + SPIN_TASK
)

LIMITS = Limits(fuel=10**12, ram_bytes=256 * 1024**2, timeout_s=None)


class Host(RefusingHost):
    """The cheap host calls: output kept, the rest as an importing instance's."""

    def __init__(self) -> None:
        self.written: list[tuple[str, str, str]] = []

    def output_of(self, task_id: str) -> str:
        return "".join(text for who, _stream, text in self.written if who == task_id)

    def output(self, invocation: Invocation, stream: str, text: str) -> None:
        self.written.append((invocation.task_id, stream, text))


class Waits:
    """A WaitingHost: receive waits for deliver(); send answers at once and is
    kept; a direct call starts its child as an attempt of its own."""

    def __init__(self, sandbox: AsyncSandbox, host: Host) -> None:
        self.sandbox = sandbox
        self.host = host
        self.changed = threading.Condition()
        self.receiving: dict[str, Pending] = {}
        self.sent: dict[str, list[Any]] = {}
        self.sleeping: dict[str, tuple[float, Pending]] = {}
        #: The thread each receive was called on, and the attempt it was polled for.
        self.children: list[Attempt] = []

    # -- the protocol --

    def call_task(self, caller: Invocation, call: TaskCall) -> Answer | Pending:
        pending = Pending()

        def child_ended(child: Attempt) -> None:
            outcome = child.outcome
            assert outcome is not None
            if outcome.error is None:
                assert outcome.result_json is not None
                pending.resolve((True, outcome.result_json))
            else:
                error = {"kind": outcome.error.kind, "message": outcome.error.message}
                pending.resolve((False, json.dumps({**error, "task": call.name})))

        child = invocation(f"{caller.task_id}/{call.name}", call.name, self.host)
        self.children.append(self.sandbox.start(child, "prog", call.call_json, self, child_ended))
        return pending

    def wait(
        self, caller: Invocation, task_ids: list[str], timeout: float | None, any_ended: bool
    ) -> Answer | Pending:
        return False, json.dumps({"kind": "exception", "message": "not served here"})

    def sleep(self, caller: Invocation, seconds: float) -> Pending | None:
        if seconds == 0:
            return None
        if seconds >= 1000:
            raise RuntimeError("the host cannot sleep that long")
        pending = Pending()
        with self.changed:
            self.sleeping[caller.task_id] = (seconds, pending)
            self.changed.notify_all()
        return pending

    def send(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> Answer | Pending:
        with self.changed:
            self.sent.setdefault(caller.task_id, []).append(json.loads(body_json))
            self.changed.notify_all()
        return True, json.dumps({"id": f"{caller.task_id}#s", "to": target})

    def receive(
        self, caller: Invocation, timeout: float | None
    ) -> tuple[bool, Sequence[Envelope] | str] | Pending:
        assert current_future() is not None  # (on a poll, in the caller's call)
        pending = Pending()
        with self.changed:
            self.receiving[caller.task_id] = pending
            self.changed.notify_all()
        return pending

    def ask(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> Answer | Pending:
        return False, json.dumps({"kind": "no_such_actor", "message": "none here"})

    def http(self, caller: Invocation, request_json: str) -> Answer | Pending:
        return False, json.dumps({"kind": "host_not_allowed", "message": "none here"})

    def poll(self, caller: Invocation, timeout: float | None) -> Answer | Pending:
        return True, "[]"

    # -- the test's side --

    def wait_receiving(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.receiving) >= count, timeout=600)

    def deliver(self, task_id: str, body: Any, sender: str = "t0") -> None:
        with self.changed:
            pending = self.receiving.pop(task_id)
        pending.resolve((True, [(f"{sender}#1", sender, json.dumps(body), False)]))


def until(value: Callable[[], int]) -> int:
    """``value()`` once it is not 0 or False (looked at again until then)."""
    deadline = time.monotonic() + 60
    while not (found := value()) and time.monotonic() < deadline:
        time.sleep(0.001)
    return found


def invocation(
    task_id: str, task: str, host: Host, limits: Limits = LIMITS, **options: Any
) -> Invocation:
    return Invocation(task_id, task, 1, 1, limits, host, **options)


class Ended:
    """on_done for attempts: each attempt that ended, from the poll threads."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.changed = threading.Condition()

    def __call__(self, attempt: Attempt) -> None:
        assert attempt.outcome is not None
        with self.changed:
            self.attempts.append(attempt)
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.attempts) >= count, timeout=600)


def args(*values: Any) -> str:
    return json.dumps({"args": list(values), "kwargs": {}})


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[AsyncSandbox]:
    (tmp_path / "prog.py").write_text(PROGRAM)
    with AsyncSandbox([tmp_path], poll_threads=2) as opened:
        yield opened
    assert live_instances() == 0


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def waits(sandbox: AsyncSandbox, host: Host) -> Waits:
    return Waits(sandbox, host)


def run(
    sandbox: AsyncSandbox,
    waits: Waits,
    inv: Invocation,
    call: str,
    then: Callable[[], None] = lambda: None,
) -> Attempt:
    ended = Ended()
    attempt = sandbox.start(inv, "prog", call, waits, ended)
    then()
    ended.wait_for(1)
    return attempt


def waiting_in_receive(
    sandbox: AsyncSandbox, waits: Waits, inv: Invocation
) -> tuple[Attempt, Ended]:
    """An attempt of echo for ``inv``, once it waits in receive; and its on_done."""
    ended = Ended()
    attempt = sandbox.start(inv, "prog", args(), waits, ended)
    waits.wait_receiving(1)
    return attempt, ended


def value_of(attempt: Attempt) -> Any:
    """What ``attempt`` returned (it ended, succeeding)."""
    outcome = attempt.outcome
    assert outcome is not None and outcome.error is None, outcome
    return json.loads(outcome.result_json or "")


def error_of(attempt: Attempt) -> ErrorInfo:
    """How ``attempt`` failed (it ended, failing)."""
    outcome = attempt.outcome
    assert outcome is not None and outcome.error is not None, outcome
    return outcome.error


def assert_host_failed(attempt: Attempt, doing: str, cause: str) -> None:
    """``attempt`` failed as the host's failure (not the task's) while
    ``doing`` the task, ``cause`` in its traceback."""
    error = error_of(attempt)
    assert error.kind == "trap", error
    assert error.message == f"the host failed while {doing} the task"
    assert cause in (error.traceback or "")


# -- one attempt -----------------------------------------------------------------


def test_an_attempt_runs_as_a_future_with_output_and_cheap_imports(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    attempt = run(sandbox, waits, invocation("t1", "hello", host), args("ada"))
    assert value_of(attempt) == {"greeting": "hi ada", "clock_ok": True}
    assert attempt.outcome is not None and attempt.outcome.fuel_consumed > 0
    assert host.output_of("t1") == "hello ada\n"
    assert sandbox.running == 0


# -- waiting imports -------------------------------------------------------------


def test_an_attempt_waits_in_receive_until_another_thread_delivers(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    attempt, ended = waiting_in_receive(sandbox, waits, invocation("t2", "echo", host))
    assert attempt.future is not None and attempt.future.blocked
    assert not attempt.ended and sandbox.running == 1
    deliverer = threading.Thread(target=waits.deliver, args=("t2", [1, "two"], "t9"))
    deliverer.start()
    deliverer.join()
    ended.wait_for(1)
    assert value_of(attempt) == {"got": [1, "two"], "from": "t9"}
    assert host.output_of("t2") == "got [1, 'two']\n"


def test_an_attempt_takes_many_messages_in_turn(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    ended = Ended()
    sandbox.start(invocation("t3", "relay", host), "prog", args(4), waits, ended)
    for body in range(4):
        waits.wait_receiving(1)
        waits.deliver("t3", {"n": body})
    ended.wait_for(1)
    outcome = ended.attempts[0].outcome
    assert outcome is not None and json.loads(outcome.result_json or "") == 4
    assert waits.sent["t3"] == [{"n": n} for n in range(4)]


# -- direct task calls -------------------------------------------------------------


def test_a_direct_call_runs_its_child_as_a_future_of_its_own(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    attempt = run(sandbox, waits, invocation("p", "parent", host), args(7))
    assert value_of(attempt) == {"child": 49, "after": "child"}
    [child] = waits.children
    assert child.invocation.task_id == "p/square"
    assert child.future is not None and child.future is not attempt.future
    assert child.store is not attempt.store
    assert child.outcome is not None and child.outcome.result_json == "49"


@pytest.mark.parametrize(
    ("last_import_s", "imported_on"), [(0.001, "capsule-poll"), (5.0, "capsule-prepare")]
)
def test_a_child_s_program_is_imported_on_its_caller_s_poll_thread_only_if_that_is_quick(
    sandbox: AsyncSandbox,
    waits: Waits,
    host: Host,
    monkeypatch: pytest.MonkeyPatch,
    last_import_s: float,
    imported_on: str,
) -> None:
    """No instance ready for a child its caller started from a poll thread:
    a program whose last import was quick is imported there (a handover to
    another thread costs the caller more than the import), a slow one on a
    preparer thread (it must not hold up the tasks that poll thread serves)."""
    threads: list[str] = []
    instance_for = sandbox._instance_for

    def noted(invocation: Invocation, program: str) -> Any:
        threads.append(threading.current_thread().name)
        return instance_for(invocation, program)

    prepare = sandbox.prepare

    def taking(program: str, *args: Any, **options: Any) -> Any:
        prepared = prepare(program, *args, **options)
        sandbox.import_seconds[program] = last_import_s  # (as if it took that long)
        return prepared

    monkeypatch.setattr(sandbox, "_instance_for", noted)
    monkeypatch.setattr(sandbox, "prepare", taking)
    attempt = run(sandbox, waits, invocation("p", "parent", host), args(3))
    assert attempt.outcome is not None and attempt.outcome.error is None, attempt.outcome
    # (The parent's own, started by the test: a preparer's; then its child's.)
    assert len(threads) == 2 and threads[0].startswith("capsule-prepare"), threads
    assert threads[1].startswith(imported_on), threads


# -- limits and stops ------------------------------------------------------------------


class Scope:
    """Where an invocation runs: cancelled when the test says."""

    def __init__(self) -> None:
        self.cancelled = False

    def stop_reason(self, invocation: Invocation) -> str | None:
        if self.cancelled:
            return "cancelled"
        return past_deadline(invocation)

    def cancellation_message(self, invocation: Invocation) -> str:
        return "cancelled by the test"


def test_a_waiting_attempt_cancelled_ends_cancelled_and_leaves_nothing(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    scope = Scope()
    attempt, ended = waiting_in_receive(sandbox, waits, invocation("c", "echo", host, within=scope))
    assert sandbox.stop(attempt) is False  # (nothing says it must stop yet)
    assert live_instances() == 1
    scope.cancelled = True
    assert sandbox.stop(attempt) is True
    ended.wait_for(1)
    error = error_of(attempt)
    assert (error.kind, error.message) == ("cancelled", "cancelled by the test")
    assert attempt.future is not None and attempt.future.cancelled
    assert sandbox.stop(attempt) is False  # (ended)
    # Its answer, given late, reaches nobody; its instance is gone.
    assert waits.receiving["c"].resolve((True, [])) is False
    assert live_instances() == 0 and sandbox.running == 0
    assert not wasm_async._PENDING_BY_KEY


def test_a_waiting_attempt_past_its_deadline_ends_with_a_timeout(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    limits = replace(LIMITS, timeout_s=0.2)
    attempt = run(sandbox, waits, invocation("d", "echo", host, limits), args())
    error = error_of(attempt)
    assert error.kind == "timeout", error
    assert "deadline of 0.2s exceeded" in error.message
    assert "d" in waits.receiving  # it did wait, and nobody answered
    assert live_instances() == 0 and not wasm_async._PENDING_BY_KEY


@pytest.mark.parametrize(
    ("limits", "kind"),
    [
        (replace(LIMITS, fuel=50_000_000), "fuel_exhausted"),
        (replace(LIMITS, timeout_s=0.3), "timeout"),
    ],
    ids=["its fuel", "its deadline"],
)
def test_a_busy_attempt_is_stopped_by(
    sandbox: AsyncSandbox, waits: Waits, host: Host, limits: Limits, kind: str
) -> None:
    attempt = run(sandbox, waits, invocation("f", "forever", host, limits), args())
    assert error_of(attempt).kind == kind, error_of(attempt)
    assert attempt.outcome is not None
    if kind == "fuel_exhausted":
        assert attempt.outcome.fuel_consumed == limits.fuel  # (all of it)
    else:
        assert 0 < attempt.outcome.fuel_consumed < limits.fuel


@pytest.mark.parametrize("by", ["its next tick", "stop"])
def test_a_busy_attempt_cancelled_ends_cancelled(
    sandbox: AsyncSandbox, waits: Waits, host: Host, by: str
) -> None:
    scope, ended = Scope(), Ended()
    busy = invocation("h", "spin", host, within=scope)
    attempt = sandbox.start(busy, "prog", args(10**6, 10**5), waits, ended)
    with waits.changed:  # (it runs: it reported progress)
        assert waits.changed.wait_for(lambda: "h" in waits.sent, timeout=600)
    scope.cancelled = True
    if by == "stop":
        assert sandbox.stop(attempt) is True
    # (Else the epoch callback, at its next tick, sees it must stop.)
    ended.wait_for(1)
    assert error_of(attempt).kind == "cancelled"
    assert attempt.future is not None and attempt.future.cancelled is (by == "stop")
    assert live_instances() == 0


def race(tmp_path: Path, host: Host, fuel_yield_interval: int) -> dict[str, int]:
    """Four busy attempts on one poll thread: how far each had got when the first ended."""
    (tmp_path / "prog.py").write_text(PROGRAM)
    calls, chunks, steps = 4, 8, 100_000
    first: dict[str, int] = {}
    with AsyncSandbox(
        [tmp_path], poll_threads=1, fuel_yield_interval=fuel_yield_interval
    ) as sandbox:
        waits, ended = Waits(sandbox, host), Ended()

        def on_done(attempt: Attempt) -> None:
            if not first:
                first.update({key: len(waits.sent.get(key, [])) for key in map(str, range(calls))})
            ended(attempt)

        # (The first start finds the pool empty and starts its filler: the
        # later ones take what it prepared, or prepare their own.)
        sandbox.start_pool("prog", calls)
        attempts = [
            sandbox.start(
                invocation(str(key), "spin", host), "prog", args(chunks, steps), waits, on_done
            )
            for key in range(calls)
        ]
        ended.wait_for(calls)
    for attempt in attempts:
        assert value_of(attempt) == chunks * steps * (steps - 1) // 2
    assert live_instances() == 0
    return first


def test_busy_attempts_take_turns_on_one_poll_thread(tmp_path: Path, host: Host) -> None:
    # (A sandbox always yields: without, practically, is once in 10**15.)
    assert_busy_calls_take_turns(partial(race, tmp_path, host), without_yields=10**15)


# -- many waiting attempts on few threads ----------------------------------------------


def test_a_thousand_attempts_waiting_in_receive_hold_no_thread_each(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    count = 1_000
    ended = Ended()
    run(sandbox, waits, invocation("warm", "hello", host), args("warm"))  # (warm: the image)
    gc.collect()
    threads_before, private_before = os_threads(), private_bytes()
    # (The poll threads not started yet may start.)
    assert sandbox._poller is not None
    may_start = sandbox.slots.size - sandbox._poller.threads
    started = time.perf_counter()
    attempts = [
        sandbox.start(invocation(f"a{key}", "echo", host), "prog", args(), waits, ended)
        for key in range(count)
    ]
    waits.wait_receiving(count)
    elapsed = time.perf_counter() - started
    threads, private = os_threads(), private_bytes()
    per_attempt = (private - private_before) / count
    print(
        f"\n{count} attempts started and waiting in receive in {elapsed:.2f} s; "
        f"{per_attempt / 1024**2:.2f} MB private each; threads {threads_before} -> {threads}"
    )
    assert threads <= threads_before + may_start + 1, (
        threads_before,
        threads,
    )  # (+1: a helper's own)
    assert sandbox.running == count and live_instances() == count
    assert all(attempt.future is not None and attempt.future.blocked for attempt in attempts)

    # Half woken with a message of their own, half cancelled.
    for key in range(0, count, 2):
        waits.deliver(f"a{key}", {"n": key}, sender=f"s{key}")
    for key in range(1, count, 2):
        attempts[key].invocation.aborted = ErrorInfo("cancelled", "stopped by the test")
        assert sandbox.stop(attempts[key])
    ended.wait_for(count)
    for key, attempt in enumerate(attempts):
        if key % 2:
            assert error_of(attempt).message == "stopped by the test"
        else:
            assert value_of(attempt) == {"got": {"n": key}, "from": f"s{key}"}
    assert sandbox.running == 0 and live_instances() == 0
    assert not wasm_async._PENDING_BY_KEY


def test_a_sleep_waits_for_the_host_and_frees_its_poll_thread(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    ended = Ended()
    sleeper = sandbox.start(invocation("s", "nap", host), "prog", args(30), waits, ended)
    with waits.changed:
        assert waits.changed.wait_for(lambda: "s" in waits.sleeping, timeout=600)
    # Both poll threads are free meanwhile: another attempt runs to its end.
    assert run(sandbox, waits, invocation("t", "hello", host), args("x")).outcome is not None
    assert not sleeper.ended
    seconds, pending = waits.sleeping.pop("s")
    assert seconds == 30
    pending.resolve(None)
    ended.wait_for(1)
    assert sleeper.outcome is not None and sleeper.outcome.result_json == '"rested"'


def test_a_failure_of_the_waiting_host_fails_the_attempt_not_the_host(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    attempt = run(sandbox, waits, invocation("e", "nap", host), args(5000))
    assert_host_failed(attempt, "serving", "the host cannot sleep that long")


def test_an_answer_given_late_to_an_attempt_that_must_stop_ends_it(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    # Cancelled while it waited, without stop(): the failed answer it then
    # gets ends it as cancelled (as a blocking call returning would).
    scope = Scope()
    attempt, ended = waiting_in_receive(sandbox, waits, invocation("l", "echo", host, within=scope))
    scope.cancelled = True
    waits.receiving.pop("l").resolve((False, "{}"))
    ended.wait_for(1)
    assert error_of(attempt).kind == "cancelled", error_of(attempt)


def test_a_late_answer_of_the_wrong_shape_fails_the_attempt_as_the_host_s(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    attempt, ended = waiting_in_receive(sandbox, waits, invocation("b", "echo", host))
    waits.receiving.pop("b").resolve((True, [("only", "two fields")]))
    ended.wait_for(1)
    assert_host_failed(attempt, "serving", "TypeError")


def test_an_attempt_that_cannot_start_ends_at_once(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    ended = Ended()
    small = replace(LIMITS, ram_bytes=1024**2)
    attempt = sandbox.start(invocation("r", "hello", host, small), "prog", args("x"), waits, ended)
    assert attempt.ended and ended.attempts == [attempt]  # (on this thread)
    assert error_of(attempt).kind == "memory_limit"
    missing = sandbox.start(invocation("m", "hello", host), "no_such", args("x"), waits, ended)
    ended.wait_for(2)  # (found missing as it is imported: on a preparer thread)
    assert "cannot load 'no_such'" in error_of(missing).message
    assert sandbox.running == 0


def test_an_attempt_the_host_fails_to_start_leaves_no_instance(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    """Its instance taken, the call cannot be made (arguments that cannot be
    handed to the guest: a lone surrogate is no UTF-8): the instance is closed,
    and the attempt ends at once as the host's failure."""
    ended = Ended()
    unlowerable = '{"args": ["\ud800"], "kwargs": {}}'
    attempt = sandbox.start(invocation("u", "hello", host), "prog", unlowerable, waits, ended)
    ended.wait_for(1)
    assert ended.attempts == [attempt]
    assert_host_failed(attempt, "starting", "UnicodeEncodeError")
    assert sandbox.running == 0
    gc.collect()
    assert live_instances() == 0
    after = run(sandbox, waits, invocation("v", "hello", host), args("x"))
    value_of(after)  # (it succeeded)


#: A program whose import never ends (module-level code that naps forever;
#: its import's own time limit is far beyond a test's).
STUCK = """
import time
import capsule

@capsule.task
def never():
    return 1

while True:
    time.sleep(0.01)
"""


def test_an_import_that_never_ends_holds_no_thread_that_starts_an_attempt(
    sandbox: AsyncSandbox, waits: Waits, host: Host, tmp_path: Path
) -> None:
    """No instance ready: the program is imported for the attempt on a
    thread of the sandbox's, not on the starter's (a poll thread serving a
    task call, or the run's loop: a slow import there stalls every task)."""
    (tmp_path / "stuck.py").write_text(STUCK)
    ended, scope = Ended(), Scope()
    stuck = invocation("s", "never", host, within=scope)
    attempt = sandbox.start(stuck, "stuck", args(), waits, ended)
    assert not attempt.ended and ended.attempts == []  # (returned while it imports)
    after = run(sandbox, waits, invocation("h", "hello", host), args("x"))
    value_of(after)  # (it succeeded)
    scope.cancelled = True
    ended.wait_for(1)
    assert error_of(attempt).kind == "cancelled", error_of(attempt)
    assert sandbox.running == 0


def test_closing_the_sandbox_ends_an_attempt_whose_import_is_under_way(
    tmp_path: Path, host: Host
) -> None:
    (tmp_path / "stuck.py").write_text(STUCK)
    ended = Ended()
    with AsyncSandbox([tmp_path], poll_threads=1) as sandbox:
        waits = Waits(sandbox, host)
        attempt = sandbox.start(invocation("s", "never", host), "stuck", args(), waits, ended)
        assert not attempt.ended
    assert ended.attempts == [attempt]
    assert error_of(attempt).kind == "cancelled", error_of(attempt)
    assert not any(thread.name.startswith("capsule-prepare") for thread in threading.enumerate())
    gc.collect()
    assert live_instances() == 0


def test_closing_the_sandbox_ends_the_attempts_left(tmp_path: Path, host: Host) -> None:
    (tmp_path / "prog.py").write_text(PROGRAM)
    ended = Ended()
    with AsyncSandbox([tmp_path], poll_threads=1) as sandbox:
        waits = Waits(sandbox, host)
        attempts = [
            sandbox.start(invocation(f"w{key}", "echo", host), "prog", args(), waits, ended)
            for key in range(3)
        ]
        waits.wait_receiving(3)
    assert ended.attempts and len(ended.attempts) == 3
    for attempt in attempts:
        assert error_of(attempt).kind == "cancelled"
    assert live_instances() == 0 and not wasm_async._PENDING_BY_KEY
    with pytest.raises(RuntimeError, match="not open"):
        sandbox.start(invocation("late", "echo", host), "prog", args(), waits, ended)


def test_the_thread_mode_call_is_refused(sandbox: AsyncSandbox, host: Host) -> None:
    with pytest.raises(TypeError, match="use start"):
        sandbox.invoke(invocation("x", "hello", host), "prog", args("x"))


def test_a_waiting_attempt_hibernates_then_goes_on(
    mappings_by: str, sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    ended = Ended()
    attempt = sandbox.start(invocation("z", "relay", host), "prog", args(2), waits, ended)
    waits.wait_receiving(1)
    waits.deliver("z", "before")
    waits.wait_receiving(1)
    # (Once its poll has returned: 0 until then.)
    released = until(lambda: sandbox.hibernate_waiting(attempt))
    assert released > 1024**2, released  # (most of the image it only read)
    waits.deliver("z", "after")
    ended.wait_for(1)
    assert attempt.outcome is not None and attempt.outcome.result_json == "2"
    assert waits.sent["z"] == ["before", "after"]
    assert sandbox.hibernate_waiting(attempt) == 0  # (ended)


def test_an_attempt_held_while_its_answer_comes_runs_after(
    sandbox: AsyncSandbox, waits: Waits, host: Host
) -> None:
    poller = sandbox._poller
    assert poller is not None
    attempt, ended = waiting_in_receive(sandbox, waits, invocation("y", "echo", host))
    future = attempt.future
    assert future is not None
    until(lambda: poller.waiting(future))
    with poller.held(future) as waiting:
        assert waiting
        waits.deliver("y", "held")
        assert not poller.waiting(future)
        with poller.held(future) as again:
            assert not again  # (held once)
        assert not attempt.ended and not future.done  # (not polled)
    ended.wait_for(1)
    assert value_of(attempt)["got"] == "held"


def test_a_failure_while_ending_an_attempt_still_ends_it(
    sandbox: AsyncSandbox, waits: Waits, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> int:
        raise RuntimeError("no fuel reading")

    monkeypatch.setattr(sandbox, "_used", broken)
    attempt = run(sandbox, waits, invocation("k", "hello", host), args("x"))
    assert_host_failed(attempt, "ending", "no fuel reading")
    assert live_instances() == 0 and sandbox.running == 0


def test_the_memory_budget_stops_the_largest_attempt_waiting_or_running(
    tmp_path: Path, host: Host
) -> None:
    (tmp_path / "prog.py").write_text(PROGRAM)
    ended = Ended()
    mb = 1024**2
    with AsyncSandbox([tmp_path], poll_threads=2, memory_budget=1 << 50) as sandbox:
        budget, waits = sandbox.budget, Waits(sandbox, host)
        assert budget is not None
        run(sandbox, waits, invocation("warm", "hello", host), args("warm"))
        budget.sample()
        # Room for one hog of 80 MB waiting, not two.
        budget.limit_bytes = budget.resident + 120 * mb
        big = replace(LIMITS, ram_bytes=512 * mb)
        first = sandbox.start(invocation("h1", "hog", host, big), "prog", args(80), waits, ended)
        waits.wait_receiving(1)
        second = sandbox.start(invocation("h2", "hog", host, big), "prog", args(80), waits, ended)
        ended.wait_for(1)  # (one of them stopped: they wait, or the second still runs)
        [stopped] = ended.attempts
        assert error_of(stopped).kind == "memory_limit", error_of(stopped)
        assert "went over its budget" in error_of(stopped).message
        other = second if stopped is first else first
        with waits.changed:
            assert waits.changed.wait_for(
                lambda: other.invocation.task_id in waits.receiving, timeout=600
            )
        waits.deliver(other.invocation.task_id, "still here")
        ended.wait_for(2)
        assert value_of(other) == {"held": 80, "got": "still here"}
        assert budget.stopped == 1
    assert live_instances() == 0


def poll_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("capsule-poll")}


def test_sandboxes_on_a_warm_one_share_its_poll_threads_and_end_their_own_calls(
    tmp_path: Path,
) -> None:
    """A host application's runs' sandboxes use its warm sandbox's poll
    threads (and linker); one closing with a call left ends that call there,
    with its on_done, and the poll threads go on until the warm one closes."""
    from capsule.sandbox.guests import SharedGuests

    (tmp_path / "prog.py").write_text(PROGRAM)
    guest = SharedGuests().for_core("async")
    before = poll_threads()
    warm = AsyncSandbox([], guest=guest).open_warm()
    try:
        host = Host()
        with (
            AsyncSandbox([tmp_path], guest=guest, warm=warm) as first,
            AsyncSandbox([tmp_path], guest=guest, warm=warm) as second,
        ):
            assert first._poller is second._poller is warm._warm_poller
            assert first.linker is second.linker is warm.linker
            for sandbox, name in ((first, "ada"), (second, "bob")):
                attempt = run(
                    sandbox, Waits(sandbox, host), invocation(name, "hello", host), args(name)
                )
                assert value_of(attempt)["greeting"] == f"hi {name}"
        shared = poll_threads() - before
        assert 1 <= len(shared) <= warm.slots.size  # (started as its calls needed them)
        ended = Ended()
        with AsyncSandbox([tmp_path], guest=guest, warm=warm) as sandbox:
            waits = Waits(sandbox, host)
            left = sandbox.start(invocation("e", "echo", host), "prog", args(), waits, ended)
            waits.wait_receiving(1)
        assert ended.attempts == [left]
        assert error_of(left).kind == "cancelled", error_of(left)
        still = poll_threads() - before
        assert shared <= still and len(still) <= warm.slots.size
        other_size = warm.slots.size + 1
        with AsyncSandbox([tmp_path], guest=guest, warm=warm, poll_threads=other_size) as other:
            assert other._poller is not warm._warm_poller
    finally:
        warm.close_warm()
    assert poll_threads() == before
    assert live_instances() == 0
