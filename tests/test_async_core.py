"""The async core (core="async"): the same programs give the same results and
events as on task threads; a waiting task holds no thread; cancellation,
deadlines and a stopped run reach waiting tasks; nothing is left behind."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from capsule.sandbox.engine import live_instances
from tests.conftest import LocalServer, Outcome, ProgramRunner, private_bytes

if TYPE_CHECKING:
    from capsule.supervisor.program import RunReport
    from capsule.supervisor.run import Run

TASKS = """
    import capsule
    from capsule import TaskError, ask, gather, receive, send, task

    @task
    def leaf(x):
        return x + 1

    @task
    def middle(x):
        return leaf(x) * 10

    @task(compute="HIGH")
    def nap(seconds, tag):
        capsule.sleep(seconds)
        return tag

    @task(max_retries=2)
    def flaky(x):
        raise ValueError(f"bad {x}")

    @task(compute="HIGH", max_retries=0)
    def sleeper():
        capsule.sleep(60)

    @task(compute="HIGH", max_retries=0, timeout="300ms")
    def slow():
        capsule.sleep(60)

    @task(compute="LOW", max_retries=0)
    def spin():
        while True:
            pass

    @task(compute="HIGH")
    def echo():
        while True:
            message = receive()
            if message.body == "stop":
                return "stopped"
            if message.expects_reply:
                message.reply({"echo": message.body})

    @task(compute="HIGH")
    def collector(n):
        return [receive().body for _ in range(n)]
"""


def _error_kind_of(failing: str, *before: str) -> str:
    """A main (after TASKS) that runs ``before``, then ``failing``, and
    returns the kind of the TaskError that raises."""
    lines = "".join(f"        {line}\n" for line in before)
    return f"""
    @task(name="main")
    def main():
{lines}        try:
            {failing}
        except TaskError as exc:
            return exc.kind
    """


PROGRAMS: dict[str, str] = {
    "direct_call_chain": """
    @task(name="main")
    def main():
        return [middle(i) for i in range(3)]
    """,
    "spawn_result_gather_map": """
    @task(name="main")
    def main():
        handles = [nap.spawn(0.05, f"t{i}") for i in range(3)]
        first = [h.result() for h in handles]
        together = gather(nap.spawn(0, "a"), nap.spawn(0.02, "b"))
        mapped = leaf.map(range(4))
        return {"first": first, "together": together, "mapped": mapped}
    """,
    "messages": """
    @task(name="main")
    def main():
        actor = echo.spawn()
        sink = collector.spawn(3)
        for i in range(3):
            send(sink, i)
        answers = [ask(actor, i) for i in range(2)]
        send(actor, "stop")
        return {"answers": answers, "collected": sink.result(), "echo": actor.result()}
    """,
    "sleep": """
    @task(name="main")
    def main():
        capsule.sleep(0.05)
        return "rested"
    """,
    "retries": """
    @task(name="main")
    def main():
        try:
            flaky(1)
        except TaskError as exc:
            return {"kind": exc.kind, "attempts": exc.attempts}
    """,
    "timeout": _error_kind_of("slow()"),
    "fuel": _error_kind_of("spin()"),
    "cancel_waiting": _error_kind_of(
        "handle.result()", "handle = sleeper.spawn()", "handle.cancel()"
    ),
}

#: Events whose number depends on timing (reported waits).
TIMING = {"waiting", "resumed", "hibernated", "output"}


def by_task(events: list[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Each task's lifecycle events, in order, without timings or fuel."""
    lives: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for event in events:
        kind = event.type
        task_id = getattr(event, "task_id", None)
        if (
            task_id is None
            or kind in TIMING
            or kind.startswith("message")
            or kind.startswith("run")
        ):
            continue
        error = getattr(event, "error", None)
        lives[task_id].append(
            (kind, event.task, getattr(event, "attempt", None), error and error.kind)
        )
    return dict(lives)


def both(run_program: ProgramRunner, source: str, **options: Any) -> tuple[Outcome, Outcome]:
    threads = run_program(source, **options)
    before = threading.active_count()
    on_core = run_program(source, core="async", **options)
    assert live_instances() == 0
    # Its poll, ticker and loop threads are gone with the run.
    assert threading.active_count() <= before
    return threads, on_core


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_same_program_gives_the_same_results_and_events(
    run_program: ProgramRunner, name: str
) -> None:
    threads, on_core = both(run_program, TASKS + PROGRAMS[name])
    assert threads.report.status == "completed", threads.report
    assert on_core.report.result.result_json == threads.report.result.result_json
    assert by_task(on_core.events) == by_task(threads.events)


def test_the_expected_answers_on_the_async_core(run_program: ProgramRunner) -> None:
    # (What the parity above compares is itself right.)
    expected = {
        "direct_call_chain": [10, 20, 30],
        "retries": {"kind": "exception", "attempts": 3},
        "timeout": "timeout",
        "fuel": "fuel_exhausted",
        "cancel_waiting": "cancelled",
        "sleep": "rested",
    }
    for name, value in expected.items():
        outcome = run_program(TASKS + PROGRAMS[name], core="async")
        assert outcome.report.result.value() == value, name


def run_on_async_core(
    path: Path,
    on_event: Callable[[Any], None],
    *args: Any,
    on_run: Callable[[Run], None] | None = None,
    **options: Any,
) -> RunReport:
    """Run ``path``'s main on the async core, in process (``options``: the
    run's other options), with the run's events and the run itself given
    to the test."""
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program

    request = RunRequest(path=path, args=list(args), options=RunOptions(core="async", **options))
    return run_program(request, on_event, on_run=on_run)


def test_a_stopped_run_ends_its_waiting_tasks(program: Any) -> None:
    path: Path = program(
        TASKS
        + """
    @task(name="main")
    def main():
        return sleeper.spawn().result()
    """
    )
    runs: list[Run] = []
    events: list[Any] = []

    def on_event(event: Any) -> None:
        events.append(event)
        if event.type == "started" and event.task == "sleeper":
            runs[0].stop()

    report = run_on_async_core(path, on_event, on_run=runs.append)
    assert report.interrupted
    assert report.result is not None and report.result.error is not None
    assert report.result.error.kind == "cancelled"
    ended = [e for e in events if e.type == "cancelled"]
    assert {e.task for e in ended} == {"sleeper", "main"}
    assert live_instances() == 0


def test_the_runs_event_loop_is_a_thread_of_its_own_stopped_with_the_run(program: Any) -> None:
    path: Path = program(
        TASKS
        + """
    @task(name="main")
    def main():
        return [nap.spawn(0, "a").result(), leaf(1)]
    """
    )
    ended_on: list[str] = []

    def on_event(event: Any) -> None:
        if event.type == "completed":
            ended_on.append(threading.current_thread().name)

    report = run_on_async_core(path, on_event)
    assert report.result is not None and report.result.value() == ["a", 2], report
    # What follows each attempt was decided by its invocation's task, on the
    # run's loop.
    assert len(ended_on) == 3
    assert {name.split(" ")[0] for name in ended_on} == {"capsule-loop"}, ended_on
    assert [t.name for t in threading.enumerate() if t.name.startswith("capsule-loop")] == []


@pytest.fixture
def hour_long_backoffs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry's backoff lasts as long as retry_backoff says, up to an hour:
    only a stop ends it early (a missed stop hangs the test)."""
    from capsule.supervisor import program as program_module
    from capsule.supervisor.run import Backoff

    monkeypatch.setattr(program_module, "Backoff", partial(Backoff, max_s=3600.0))


BACKING_OFF = """
    import capsule
    from capsule import TaskError, receive, task

    @task(max_retries=1)
    def failing():
        raise ValueError("again")

    @task
    def boss():
        failing.spawn()
        receive()

    @task(name="main")
    def main(which):
        handle = (failing if which == "failing" else boss).spawn()
        receive()  # the go, once failing waits in its backoff
        handle.cancel()
        try:
            return handle.result()
        except TaskError as exc:
            return exc.kind
"""


@pytest.mark.parametrize("which", ["failing", "boss"])
@pytest.mark.usefixtures("hour_long_backoffs")
def test_a_stop_ends_a_retrys_backoff_and_a_wait_for_children(program: Any, which: str) -> None:
    """``failing`` is cancelled in its backoff; or ``boss``, whose attempt
    then waits for its child ``failing``, in its backoff, to end: the stop
    ends the backoff, which would last an hour."""
    path: Path = program(BACKING_OFF)
    runs: list[Run] = []
    events: list[Any] = []

    def go() -> None:
        runs[0].external.send("main", '"go"')

    def on_event(event: Any) -> None:
        events.append(event)
        if event.type == "retrying":
            # (On the loop, once the invocation's task awaits its backoff.)
            asyncio.get_running_loop().call_soon(go)

    report = run_on_async_core(path, on_event, which, on_run=runs.append, retry_backoff=3600)
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == ("cancelled" if which == "boss" else "exception")
    lives = by_task(events)
    failing = next(task_id for task_id, life in lives.items() if life[0][1] == "failing")
    # Its retry was never made: the backoff ended with the stop.
    assert [kind for kind, *_ in lives[failing]] == ["pending", "started", "retrying", "failed"]
    assert live_instances() == 0


def test_an_attempt_ends_after_the_children_it_spawned_before_its_task_ran(
    run_program: ProgramRunner,
) -> None:
    """A child's call starts where it is spawned, before its task opened its
    task group: what it spawns at once still runs in that group, so the child
    counts as ended only once its own child, cancelled with it, has."""
    outcome = run_program(
        """
    from capsule import receive, task

    @task
    def grandchild():
        receive()

    @task
    def child():
        grandchild.spawn()
        return "child done"

    @task(name="main")
    def main():
        return [child.spawn().result() for _ in range(5)]
    """,
        core="async",
    )
    assert outcome.report.result.value() == ["child done"] * 5, outcome.report
    ends = [(e.type, e.task_id) for e in outcome.events if e.type in ("completed", "cancelled")]
    for index in range(1, 6):
        child, grandchild = f"main/{index}", f"main/{index}/1"
        assert ends.index(("cancelled", grandchild)) < ends.index(("completed", child)), ends
    assert live_instances() == 0


def test_a_host_bug_in_the_driver_fails_the_invocation_not_the_loop(
    run_program: ProgramRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsule.supervisor.supervision import Supervision

    concluded = Supervision.concluded
    broken: list[str] = []

    def bug_once(self: Supervision, attempt: Any, outcome: Any) -> Any:
        if attempt.invocation.task == "leaf" and not broken:
            broken.append(attempt.invocation.task_id)
            raise RuntimeError("a bug in the host")
        return concluded(self, attempt, outcome)

    monkeypatch.setattr(Supervision, "concluded", bug_once)
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        try:
            leaf(1)
        except TaskError as exc:
            first = [exc.kind, str(exc)]
        return [first, leaf(2), nap.spawn(0, "after").result()]
    """,
        core="async",
    )
    assert outcome.report.result.ok, outcome.report
    first, second, spawned = outcome.report.result.value()
    assert first[0] == "trap" and "the host failed while running the task" in first[1], first
    assert [second, spawned] == [3, "after"]
    failed = [e for e in outcome.events if e.type == "failed"]
    assert [e.task_id for e in failed] == broken
    assert "a bug in the host" in failed[0].error.traceback
    assert live_instances() == 0


RESUMED = """
from capsule import sleep, task

@task
def child(n: int) -> int:
    print(f"MARK child {n} ran")
    return n + 1

@task(name="main", timeout="5m")
def main() -> list:
    done = [child(1), child.spawn(2).result()]
    print("MARK waiting")
    sleep(2)
    return done + [child(3)]
"""


@pytest.mark.parametrize(
    ("ran_on", "resumed_on"), [("async", None), ("async", "threads"), ("threads", "async")]
)
def test_a_journaled_run_is_resumed_on_its_core_or_on_the_one_given(
    tmp_path: Path, ran_on: str, resumed_on: str | None
) -> None:
    """The journal is the same on both cores: a run killed on one resumes on
    the core it recorded, or on the one the resume gives, alike."""
    from capsule.journal.session import resume_journaled
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program
    from tests.conftest import kill_at_marker

    path = tmp_path / "prog.py"
    path.write_text(RESUMED, encoding="utf-8")
    printed, code = kill_at_marker(
        ["run", str(path), "--core", ran_on], "MARK waiting", tmp_path, 0.1
    )
    assert code == -signal.SIGKILL, printed
    assert sorted(line for line in printed.splitlines() if "child" in line) == [
        "MARK child 1 ran",
        "MARK child 2 ran",
    ]
    cores: list[str | None] = []

    def runner(request: RunRequest, *args: Any, **kwargs: Any) -> RunReport:
        cores.append(request.options.core)
        return run_program(request, *args, **kwargs)

    events: list[Any] = []
    report = resume_journaled(
        tmp_path / ".capsule" / "journal.db",
        None,
        False,
        events.append,
        overrides=None if resumed_on is None else RunOptions(core=resumed_on),
        runner=runner,
    )
    assert cores == [resumed_on or ran_on]
    assert report.result is not None and report.result.value() == [2, 3, 4]
    # The children that ended were not run again; main replayed its steps.
    started = [e.task_id for e in events if e.type == "started"]
    assert started == ["main", "main/3"], started
    printed_again = [e.text for e in events if e.type == "output"]
    assert printed_again == ["MARK child 3 ran\n"], printed_again


def test_an_unknown_core_is_refused_naming_the_option(tmp_path: Path) -> None:
    from tests.conftest import capsule_cli

    path = tmp_path / "prog.py"
    path.write_text("import capsule\n\n@capsule.task\ndef main():\n    return 1\n")
    ran = capsule_cli("run", str(path), "--core", "async", "--json")
    assert ran.returncode == 0, ran.stderr
    assert ran.json()["result"] == 1
    bad = capsule_cli("run", str(path), "--core", "fibers", "--no-journal")
    assert bad.returncode == 2
    assert "--core 'fibers' is invalid; expected 'threads' or 'async'" in bad.stderr


def test_http_and_asyncio_operations_run_on_the_async_core(
    run_program: ProgramRunner, http_server: LocalServer
) -> None:
    outcome = run_program(
        """
    import asyncio
    import capsule
    from capsule import task
    from capsule.http import get, get_async

    @task
    def echo():
        message = capsule.receive(timeout=30)
        message.reply(message.body * 2)

    @task
    async def leaf(n):
        return n + 1

    @task(name="main", allowed_hosts=["127.0.0.1"])
    async def main(base):
        blocking = get(base + "/status/201").status_code
        statuses = await asyncio.gather(*(get_async(f"{base}/status/{s}") for s in (200, 404)))
        children = await asyncio.gather(leaf(1), leaf(2))
        answer = await capsule.ask_async(echo.spawn(), 21, timeout=30)
        return [blocking, [r.status_code for r in statuses], children, answer]
    """,
        http_server.url,
        core="async",
    )
    assert outcome.value == [201, [200, 404], [2, 3], 42]
    assert len(outcome.of_type("http")) == 3


ACTORS = 2000


def test_idle_actors_hold_no_thread(program: Any) -> None:
    path: Path = program(
        """
    import capsule
    from capsule import receive, send, task

    @task(compute="HIGH", ram="64MB")
    def actor():
        return receive().body * 2

    @task(name="main", compute="HIGH", timeout="10m")
    def main(n):
        actors = [actor.spawn() for _ in range(n)]
        receive()  # the go from outside, once every actor waits
        for i, handle in enumerate(actors):
            send(handle, i)
        return sum(handle.result() for handle in actors)
    """
    )
    runs: list[Run] = []
    waiting: set[str] = set()
    all_waiting = threading.Event()
    measured: dict[str, float] = {}
    started = time.monotonic()

    def on_event(event: Any) -> None:
        if event.type == "waiting":
            waiting.add(event.task_id)
            if len(waiting) == ACTORS + 1 and not all_waiting.is_set():
                measured["spawned_s"] = time.monotonic() - started
                all_waiting.set()

    baseline = threading.active_count()
    private_before = private_bytes() / 1024

    def go() -> None:
        all_waiting.wait()
        measured["threads"] = threading.active_count()
        measured["private_kb"] = private_bytes() / 1024
        runs[0].external.send("main", '"go"')

    goer = threading.Thread(target=go)
    goer.start()
    try:
        report = run_on_async_core(
            path,
            on_event,
            ACTORS,
            on_run=runs.append,
            max_live_tasks=ACTORS + 10,
            max_children=ACTORS + 10,
        )
    finally:
        all_waiting.set()
        goer.join()
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == 2 * sum(range(ACTORS))
    # Poll threads (one per core), the ticker, the pool's preparer, the timer
    # service, the inbox: a constant, however many tasks wait.
    assert measured["threads"] - baseline <= 16, measured
    assert live_instances() == 0
    per_actor_kb = (measured["private_kb"] - private_before) / ACTORS
    print(f"\n{ACTORS} actors waiting: {measured}, private per actor: {per_actor_kb:.0f} KB")


#: Tests of the thread core (those taking only run_program) that hold on the
#: async core too: each runs again on it.
ON_BOTH_CORES = [
    "test_supervision:test_transient_child_is_restarted_after_a_failure",
    "test_supervision:test_temporary_child_is_never_restarted_and_never_fails_its_parent",
    "test_supervision:test_permanent_child_is_restarted_after_returning",
    "test_supervision:test_one_for_one_restarts_only_the_failed_child",
    "test_supervision:test_one_for_all_restarts_every_running_child",
    "test_supervision:test_rest_for_one_restarts_the_children_started_after",
    "test_supervision:test_restart_intensity_escalates_to_the_grandparent",
    "test_supervision:test_a_childs_own_retries_are_not_restarts",
    "test_supervision:test_sibling_restarts_count_against_the_intensity",
    "test_supervision:test_bad_supervision_options_are_config_errors",
    "test_supervision:test_agents_example",
    "test_outcomes:test_map_with_return_exceptions_keeps_every_result",
    "test_outcomes:test_wait_first_completed_then_all_completed",
    "test_outcomes:test_wait_first_exception_returns_at_the_first_failure",
    "test_outcomes:test_as_completed_yields_each_handle_as_its_child_ends",
    "test_outcomes:test_wait_refuses_what_is_not_a_handle_or_a_mode",
    "test_outcomes:test_a_temporary_childs_failure_is_retried_and_never_fails_its_parent",
    "test_retry:test_retry_on_must_name_exception_classes",
    "test_spawn:test_spawn_returns_at_once_and_children_overlap",
    "test_spawn:test_map_keeps_input_order",
    "test_spawn:test_gather_with_and_without_return_exceptions",
    "test_spawn:test_result_timeout_then_cancel",
    "test_spawn:test_a_failure_before_the_parent_collects_it_is_delivered_later",
    "test_spawn:test_a_failure_never_collected_fails_the_parent_when_it_returns",
    "test_spawn:test_a_linked_child_failure_fails_the_parent_at_once",
    "test_spawn:test_a_linked_child_failure_stops_a_parent_running_wasm",
    "test_spawn:test_children_do_not_outlive_their_parent",
    "test_spawn:test_sleep_sleeps",
    "test_spawn:test_spawn_bomb_is_stopped_and_the_host_stays_up",
    "test_spawn:test_live_task_limit_across_the_tree",
    "test_spawn:test_no_threads_or_instances_left_after_cancellations",
    "test_spawn:test_handles_keep_outcomes_after_the_host_forgets_the_child",
    "test_messaging:test_ask_reply_round_trip_with_a_named_actor",
    "test_messaging:test_messages_arrive_in_order",
    "test_messaging:test_strings_cross_the_boundary_unchanged",
    "test_messaging:test_only_waits_longer_than_the_grace_are_reported",
    "test_messaging:test_receive_timeout",
    "test_messaging:test_full_mailbox_makes_send_wait_then_time_out",
    "test_messaging:test_the_runs_queued_messages_are_bounded_in_size_across_mailboxes",
    "test_messaging:test_message_size_limit",
    "test_messaging:test_unknown_target_taken_name_and_bad_replies",
    "test_messaging:test_ask_an_actor_that_ends_without_replying",
    "test_messaging:test_bodies_cross_as_json_dumps_writes_them_and_bad_ones_are_refused",
    "test_messaging:test_output_without_a_newline_is_shown_before_a_receive_waits",
    "test_run:test_hello",
    "test_run:test_spec_analyze_example",
    "test_run:test_nested_calls_three_deep_with_kwargs",
    "test_run:test_instances_share_no_state",
    "test_run:test_exception_carries_guest_traceback",
    "test_run:test_timeout_stops_cpu_loop_promptly",
    "test_run:test_retry_then_success_and_caught_task_error",
    "test_run:test_main_is_retried_and_attempts_reported",
    "test_run:test_retries_exhausted_reports_all_attempts",
    "test_run:test_host_fuel_cap_wins_over_declared",
    "test_run:test_host_timeout_cap_wins_over_declared",
    "test_run:test_host_ram_cap_wins_over_declared",
    "test_run:test_ram_below_runtime_minimum_is_memory_limit",
    "test_run:test_non_serializable_result_names_the_task",
    "test_run:test_non_serializable_arguments_name_the_task",
    "test_run:test_non_serializable_main_result",
    "test_run:test_unknown_task_call_is_a_clear_error",
    "test_run:test_guest_output_is_tagged_with_its_task",
    "test_run:test_no_threads_or_instances_left_after_failed_run",
    "test_run:test_child_never_outlives_its_callers_deadline",
    "test_run:test_deep_call_chain_is_bounded_and_reports_the_root_cause",
    "test_run:test_lifecycle_events_are_typed_and_ordered",
    "test_run:test_limits_come_from_the_host_not_from_the_caller",
    "test_run:test_oversized_results_and_arguments_are_refused",
]


@pytest.mark.parametrize("name", ON_BOTH_CORES)
def test_on_the_async_core_too(run_program: ProgramRunner, name: str) -> None:
    import importlib
    import inspect

    module, function = name.split(":")
    test = getattr(importlib.import_module(f"tests.{module}"), function)

    def on_async_core(source: str, *args: Any, **options: Any) -> Outcome:
        return run_program(source, *args, core="async", **options)

    parameters = inspect.signature(test).parameters
    assert list(parameters) == ["run_program"], parameters
    test(on_async_core)


def test_a_host_bug_that_ends_the_run_s_loop_group_ends_the_run_as_failed_not_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task of the run's on its loop raises (a host bug, here in a wait
    that lasts): the run's task group ends, and its root is reported failed
    by the host, with the bug's traceback, instead of being waited for
    forever."""
    from capsule.supervisor import continuations

    async def broken(self: Any) -> None:
        raise RuntimeError("a bug in the wait's task")

    monkeypatch.setattr(continuations._Continuation, "_waiting", broken)
    path = tmp_path / "waits.py"
    path.write_text(
        "from capsule import receive, task\n\n"
        "@task(name='main')\n"
        "def main() -> str:\n"
        "    receive(timeout=5)\n"
        "    return 'never'\n"
    )
    report = run_on_async_core(path, lambda event: None)
    assert report.result is not None and report.result.error is not None
    assert report.result.error.kind == "trap", report.result.error
    assert "a bug in the wait's task" in (report.result.error.traceback or "")
