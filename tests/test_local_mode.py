"""Local mode: outside `capsule run` (in pytest), tasks run in-process with the
control flow of the real run: retries, TaskError, spawned children on threads,
mailboxes, cancellation, and no thread outliving the call."""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import capsule
from capsule import MessageError, ReceiveTimeout, TaskError, task
from capsule.sdk import task as task_module
from capsule.sdk.task import TaskDefinitionError
from tests.conftest import LocalServer, ProgramRunner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test declares its tasks afresh: names other tests took (the examples'
    ``main``, a test's ``driver``) are free."""
    monkeypatch.setattr(task_module, "registry", {})


@pytest.fixture(autouse=True)
def no_thread_outlives_the_test() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) - before == set()


def _import(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_runs_directly() -> None:
    module = _import(EXAMPLES / "analyze.py")
    assert module.main() == {"processed": 5, "status": "complete"}
    assert module.analyze_data([1, 2]) == {"processed": 2, "status": "complete"}


def test_agents_example_runs_locally_as_it_runs_for_real(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A critic actor answering asks, workers run with map (one fails on its
    # first attempt and is retried), the critic cancelled when main returns.
    module = _import(EXAMPLES / "agents" / "main.py")
    assert module.main() == {
        "sections": [
            {"topic": "isolation", "revisions": 1, "attempt": 1},
            {"topic": "durability", "revisions": 1, "attempt": 2},
            {"topic": "scheduling", "revisions": 1, "attempt": 1},
        ],
        "words": 48,
    }
    assert "durability: revision 1 -> accept" in capsys.readouterr().out


#: A program whose control flow local mode must reproduce exactly.
CONTROL_FLOW = """
import capsule
from capsule import MessageError, ReceiveTimeout, TaskError, receive, task


@task(max_retries=2)
def flaky():
    me = capsule.current()
    if me.attempt < 3:
        raise RuntimeError(f"attempt {me.attempt}")
    return [me.id, me.attempt, me.max_attempts]


@task(max_retries=1)
def broken(x):
    raise ValueError(f"no {x}")


@task(max_retries=0)
def middle():
    broken(1)


@task(max_retries=0)
def echo():
    while True:
        message = receive()
        message.reply([message.body, message.sender])


@task(max_retries=0)
def mute():
    receive()


def fields(error):
    return [error.kind, error.task, error.message, error.attempts, error.cause]


@task(name="main", max_retries=0)
def main():
    seen = {"flaky": flaky()}
    try:
        broken(2)
    except TaskError as error:
        seen["broken"] = fields(error)
        seen["traceback"] = error.traceback.endswith("ValueError: no 2\\n")
    try:
        middle()
    except TaskError as error:
        seen["middle"] = fields(error)
    actor = echo.spawn(name="echo")
    seen["ask"] = capsule.ask("echo", {"n": (1, 2)})
    try:
        capsule.send("nobody", 1)
    except MessageError as error:
        seen["nobody"] = [error.kind, str(error)]
    try:
        capsule.ask(mute.spawn(), "?")
    except MessageError as error:
        seen["mute"] = [error.kind, str(error)]
    try:
        receive(timeout=0.01)
    except ReceiveTimeout as error:
        seen["timeout"] = str(error)
    failed, succeeded = capsule.gather(broken.spawn(3), flaky.spawn(), return_exceptions=True)
    seen["gathered"] = [fields(failed), succeeded]
    actor.cancel()
    try:
        actor.result()
    except TaskError as error:
        seen["cancelled"] = fields(error)
    return seen
"""


def test_a_program_runs_locally_as_it_runs_under_capsule_run(
    run_program: ProgramRunner, tmp_path: Path
) -> None:
    real = run_program(CONTROL_FLOW, retry_backoff=0.01).value
    local = _import(tmp_path / "prog.py").main()
    assert local == real
    # (What they agree on, spelled out.)
    assert real["flaky"] == ["main/1", 3, 3]
    assert real["middle"][2] == (
        "unhandled TaskError: task 'broken' failed (exception): ValueError: no 1"
    )
    assert real["cancelled"] == ["cancelled", "echo", "cancelled by its parent", 1, None]


def test_ids_names_and_attempts_are_those_of_the_real_run() -> None:
    @task
    def local_leaf(x: int, *, times: int = 1) -> dict[str, object]:
        info = capsule.current()
        return {"value": x * times, "name": info.name, "id": info.id}

    @task(name="local_parent", max_retries=3)
    def parent() -> list[object]:
        me = capsule.current()
        return [local_leaf(2, times=3), local_leaf.spawn(1).result(), me.attempt, me.max_attempts]

    assert local_leaf.name == "local_leaf"
    assert local_leaf.__name__ == "local_leaf"
    # Children are numbered in the order their parent calls or spawns them.
    assert parent() == [
        {"value": 6, "name": "local_leaf", "id": "local_parent/1"},
        {"value": 1, "name": "local_leaf", "id": "local_parent/2"},
        1,
        4,
    ]


def test_current_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="outside a running task"):
        capsule.current()


def test_duplicate_task_names_are_refused() -> None:
    @task(name="dup_local")
    def first() -> None: ...

    with pytest.raises(TaskDefinitionError, match="two tasks are named 'dup_local'"):

        @task(name="dup_local")
        def second() -> None: ...


def test_a_failing_task_is_retried_up_to_max_retries() -> None:
    attempts: list[int] = []

    @task(max_retries=2)
    def flaky_local() -> dict[str, int]:
        me = capsule.current()
        attempts.append(me.attempt)
        if me.attempt < 3:
            raise RuntimeError(f"attempt {me.attempt} failed")
        return {"attempt": me.attempt, "max_attempts": me.max_attempts}

    assert flaky_local() == {"attempt": 3, "max_attempts": 3}
    assert attempts == [1, 2, 3]


def test_a_failing_child_raises_task_error_in_its_caller() -> None:
    @task(max_retries=1)
    def broken_child(x: int) -> int:
        raise ValueError(f"no {x}")

    @task(max_retries=0)
    def catches() -> dict[str, object]:
        try:
            broken_child(3)
        except TaskError as error:
            assert error.traceback is not None and "raise ValueError" in error.traceback
            return {
                "kind": error.kind,
                "task": error.task,
                "message": error.message,
                "attempts": error.attempts,
                "cause": error.cause,
            }
        return {}

    assert catches() == {
        "kind": "exception",
        "task": "broken_child",
        "message": "ValueError: no 3",
        "attempts": 2,
        "cause": None,
    }


def test_a_failing_task_called_from_the_test_raises_task_error() -> None:
    @task
    def fails_locally() -> None:
        raise KeyError("x")

    with pytest.raises(TaskError) as raised:
        fails_locally()
    error = raised.value
    assert (error.kind, error.task, error.message, error.attempts) == (
        "exception",
        "fails_locally",
        "KeyError: 'x'",
        2,  # max_retries defaults to 1, as in the real run
    )
    # The original exception is chained, for pytest's report.
    assert isinstance(error.__cause__, KeyError)


def test_an_unhandled_task_error_propagates_with_its_cause() -> None:
    @task(max_retries=0)
    def root_cause() -> None:
        raise OSError("disk on fire")

    @task(max_retries=0)
    def middle() -> None:
        root_cause()

    @task(max_retries=0)
    def upper() -> None:
        middle()

    with pytest.raises(TaskError) as raised:
        upper()
    error = raised.value
    assert error.task == "upper"
    assert error.kind == "exception"
    assert error.cause == {
        "task": "root_cause",
        "kind": "exception",
        "message": "OSError: disk on fire",
        "via": ["middle"],
    }
    assert error.message == (
        "unhandled TaskError: task 'root_cause' failed (exception) (through 'middle'): "
        "OSError: disk on fire"
    )


def test_arguments_that_do_not_fit_fail_with_bad_arguments_and_no_retry() -> None:
    @task(max_retries=3)
    def takes_one(x: int) -> int:
        return x

    with pytest.raises(TaskError) as raised:
        takes_one(1, 2)  # type: ignore[call-arg]
    assert raised.value.kind == "bad_arguments"
    assert raised.value.attempts == 1
    assert raised.value.message.startswith("task 'takes_one' cannot take these arguments:")


def test_arguments_results_and_messages_cross_as_json() -> None:
    @task
    def echo(value: Any) -> Any:
        return value

    @task
    def returns_a_set() -> Any:
        return {1}

    assert echo((1, 2)) == [1, 2]  # tuples arrive as lists, as in the real run
    with pytest.raises(TypeError, match="arguments to task 'echo' are not JSON-serializable"):
        echo(object())
    with pytest.raises(TypeError, match="arguments to task 'echo'"):
        echo(math.nan)  # strict JSON: no NaN
    with pytest.raises(TaskError, match="returned a value that is not JSON-serializable"):
        returns_a_set()

    @task
    def sends_a_set() -> None:
        capsule.send(capsule.current().id, {1})

    with pytest.raises(TaskError, match="is not JSON-serializable"):
        sends_a_set()


def test_invalid_options_local_mode_needs_are_definition_errors() -> None:
    @task(max_retries=-1)
    def bad_retries() -> None: ...

    @task(timeout="soon")
    def bad_timeout() -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"'bad_retries'.*max_retries=-1.*from 0 to"):
        bad_retries()
    with pytest.raises(TaskDefinitionError, match=r"'bad_timeout'.*timeout='soon'.*\"30s\""):
        bad_timeout()


def test_spawn_map_gather_and_result() -> None:
    @task
    def double_local(x: int) -> int:
        return x * 2

    @task(max_retries=0)
    def broken_local(x: int) -> int:
        raise ValueError(f"no {x}")

    @task
    def waits_forever() -> None:
        capsule.receive()

    @task
    def driver() -> dict[str, Any]:
        results = capsule.gather(
            double_local.spawn(1), broken_local.spawn(2), return_exceptions=True
        )
        try:
            broken_local.spawn(3).result()
        except TaskError as error:
            failed = error.message
        try:
            waits_forever.spawn().result(timeout=0.01)
        except TimeoutError:
            timed_out = True
        capsule.sleep(0)
        return {
            "map": double_local.map([1, 2, 3]),
            "single": double_local.spawn(4).result(),
            "gathered": [results[0], results[1].kind, results[1].message],
            "failed": failed,
            "timed_out": timed_out,
        }

    assert driver() == {
        "map": [2, 4, 6],
        "single": 8,
        "gathered": [2, "exception", "ValueError: no 2"],
        "failed": "ValueError: no 3",
        "timed_out": True,
    }


def test_planner_and_critic_talk_through_mailboxes() -> None:
    @task
    def critic() -> None:
        while True:
            message = capsule.receive()
            if message.body == "stop":
                return
            verdict = "accept" if len(message.body["draft"]) > 10 else "rework"
            if message.expects_reply:
                message.reply({"verdict": verdict, "from": message.sender})
            else:
                capsule.send(message.sender, {"noted": message.body["draft"]})

    @task
    def planner() -> dict[str, Any]:
        handle = critic.spawn(name="critic")
        first = capsule.ask("critic", {"draft": "short"}, timeout=10)
        second = capsule.ask(handle, {"draft": "long enough now"}, timeout=10)
        capsule.send("critic", {"draft": "told"})
        noted = capsule.receive(timeout=10)
        capsule.send(handle, "stop")
        handle.result()
        return {
            "first": first,
            "second": second,
            "noted": [noted.body, noted.sender == handle.id],
        }

    assert planner() == {
        "first": {"verdict": "rework", "from": "planner"},
        "second": {"verdict": "accept", "from": "planner"},
        "noted": [{"noted": "told"}, True],
    }


def test_message_errors_are_those_of_the_real_run() -> None:
    @task(max_retries=0)
    def replies_twice() -> None:
        message = capsule.receive()
        message.reply(1)
        message.reply(2)

    @task(max_retries=0)
    def ends_without_replying() -> None:
        capsule.receive()

    @task
    def messenger() -> list[str]:
        kinds = []
        try:
            capsule.send("nobody", 1)
        except MessageError as error:
            kinds.append(error.kind)
        try:
            capsule.receive(timeout=0.01)
        except ReceiveTimeout as error:
            kinds.append(str(error))
        twice = replies_twice.spawn()
        kinds.append(capsule.ask(twice, "?"))
        try:
            twice.result()
        except TaskError as error:
            kinds.append(error.message)
        try:
            capsule.ask(ends_without_replying.spawn(), "?")
        except MessageError as error:
            kinds.append(error.kind)
        return kinds

    assert messenger() == [
        "no_such_actor",
        "no message arrived within 0.01s",
        1,
        "MessageError: message messenger#2 was already replied to",
        "actor_ended",
    ]


def test_a_full_mailbox_makes_send_wait_and_a_plain_message_takes_no_reply() -> None:
    from capsule import SendTimeout

    @task
    def never_reads() -> None:
        capsule.sleep(3600)

    @task
    def replies_to_a_send() -> str:
        try:
            capsule.receive().reply("unasked")
        except MessageError as error:
            return error.kind
        return "replied"

    @task
    def floods() -> list[str]:
        slow = never_reads.spawn()
        for number in range(1000):  # a mailbox's capacity
            capsule.send(slow, number)
        try:
            capsule.send(slow, "one too many", timeout=0)
        except SendTimeout as error:
            full = str(error)
        replier = replies_to_a_send.spawn()
        capsule.send(replier, "no reply wanted")
        return [full, replier.result()]

    assert floods() == [
        "the mailbox of 'floods/1' stayed full (1000 messages) for 0s",
        "no_reply_expected",
    ]


def test_a_registered_name_is_taken_until_its_task_ends() -> None:
    @task
    def named() -> None:
        capsule.receive()

    @task
    def registers_twice() -> str:
        named.spawn(name="only")
        try:
            named.spawn(name="only")
        except TaskError as error:
            return error.message
        return "registered twice"

    assert registers_twice() == "the name 'only' is already registered to task registers_twice/1"


def test_cancel_stops_a_child_blocked_in_receive_or_sleep() -> None:
    @task
    def stubborn() -> str:
        capsule.send("canceller", "ready")
        try:
            capsule.receive()
        except Exception:  # cancellation is not an exception a task can swallow
            return "swallowed"
        return "received"

    @task
    def sleeper() -> None:
        capsule.send("canceller", "ready")
        capsule.sleep(3600)

    @task
    def canceller() -> list[Any]:
        outcomes = []
        for child in (stubborn, sleeper):
            handle = child.spawn()
            assert capsule.receive(timeout=10).body == "ready"
            handle.cancel()
            try:
                handle.result()
            except TaskError as error:
                outcomes.append([error.kind, error.message, error.attempts])
        return outcomes

    # (Registered under its own name by a driver, so children can find it.)
    @task
    def driver() -> list[Any]:
        return canceller.spawn(name="canceller").result()

    assert driver() == [
        ["cancelled", "cancelled by its parent", 1],
        ["cancelled", "cancelled by its parent", 1],
    ]


def test_a_task_past_its_timeout_fails_with_kind_timeout() -> None:
    @task(timeout="50ms", max_retries=1)
    def waits_too_long() -> None:
        capsule.receive()

    with pytest.raises(TaskError) as raised:
        waits_too_long()
    assert raised.value.kind == "timeout"
    assert raised.value.message == "deadline of 0.05s exceeded"
    assert raised.value.attempts == 2


def test_a_child_failure_never_collected_fails_its_parent_when_it_returns() -> None:
    @task(max_retries=0)
    def fails_when_asked() -> None:
        capsule.receive()
        raise RuntimeError("boom")

    @task(max_retries=0, restart="temporary")
    def temporary_failure() -> None:
        capsule.receive()
        raise RuntimeError("does not matter")

    @task(max_retries=0)
    def careless(child_name: str) -> str:
        child = fails_when_asked if child_name == "linked" else temporary_failure
        try:
            # The child fails on receiving this: the ask ends with it.
            capsule.ask(child.spawn(), "go")
        except MessageError as error:
            assert error.kind == "actor_ended"
        return "returned"

    with pytest.raises(TaskError) as raised:
        careless("linked")
    assert raised.value.kind == "child_failed"
    assert "'fails_when_asked' (careless/1) failed (exception)" in raised.value.message
    assert raised.value.message.endswith("RuntimeError: boom")
    # A temporary child's failure never fails its parent.
    assert careless("temporary") == "returned"


def test_a_temporary_child_keeps_its_retries_and_never_fails_its_parent() -> None:
    @task(restart="temporary", max_retries=1)
    def temporary_task() -> None:
        raise RuntimeError("no")

    @task
    def collects() -> str:
        try:
            temporary_task.spawn().result()
        except TaskError as error:
            return f"{error.kind} after {error.attempts}"
        return "succeeded"

    @task(max_retries=0)
    def ignores() -> str:
        temporary_task.spawn()
        return "fine"

    assert collects() == "exception after 2"
    assert ignores() == "fine"


def test_a_linked_child_failure_fails_its_parent_at_once() -> None:
    @task(max_retries=0)
    def breaks() -> None:
        raise RuntimeError("broken")

    @task(max_retries=0)
    def parent() -> str:
        breaks.spawn(link=True)
        capsule.receive(timeout=60)  # stopped by the linked failure, not the timeout
        return "never"

    with pytest.raises(TaskError) as raised:
        parent()
    assert raised.value.kind == "child_failed"
    assert "linked child 'breaks'" in raised.value.message


def test_children_left_running_are_cancelled_and_joined_when_a_task_ends() -> None:
    started = threading.Barrier(4)

    @task
    def lingering() -> None:
        started.wait(timeout=10)
        capsule.receive()

    @task(max_retries=0)
    def leaves_children(fail: bool) -> str:
        for _ in range(3):
            lingering.spawn()
        started.wait(timeout=10)
        if fail:
            raise RuntimeError("leaving")
        return "left"

    before = threading.active_count()
    assert leaves_children(False) == "left"
    assert threading.active_count() == before
    with pytest.raises(TaskError):
        leaves_children(True)
    assert threading.active_count() == before


def test_spawn_and_messages_need_a_running_task() -> None:
    @task
    def spawned_from_a_test() -> None: ...

    with pytest.raises(
        RuntimeError, match=r"spawned_from_a_test.spawn\(\) .* outside a running task"
    ):
        spawned_from_a_test.spawn()
    with pytest.raises(RuntimeError, match=r"capsule.send\(\) .* outside a running task"):
        capsule.send("anyone", 1)


def test_http_works_as_a_plain_function(http_server: LocalServer) -> None:
    from capsule.http import ConnectionFailed, get, post

    @task(allowed_hosts=["127.0.0.1"])
    def fetch(base: str) -> list[Any]:
        echoed = post(base + "/echo", json={"x": 1}).json()
        return [get(base + "/status/404").status_code, echoed["method"]]

    assert fetch(http_server.url) == [404, "POST"]
    with pytest.raises(ConnectionFailed):
        get("http://127.0.0.1:1/", timeout=2)


def test_wait_as_completed_and_map_with_exceptions_work_locally() -> None:
    @task(name="local_maybe", max_retries=0)
    def maybe(x: int) -> int:
        if x < 0:
            raise ValueError(f"negative {x}")
        return x

    @task
    def collects() -> list:
        results = maybe.map([1, -2], return_exceptions=True)
        seen = [results[0], type(results[1]).__name__]
        handles = [maybe.spawn(3), maybe.spawn(-4)]
        done, pending = capsule.wait(handles, return_when=capsule.FIRST_EXCEPTION)
        # (it returns at the failure, or once both ended: the failed one is done)
        seen.append(handles[1] in done and all(h.done() for h in done) and len(pending) <= 1)
        seen.append(sorted(h.name for h in capsule.as_completed(handles)))
        seen.append(capsule.gather(*handles, return_exceptions=True)[0])
        return seen

    assert collects() == [1, "TaskError", True, ["local_maybe"] * 2, 3]
