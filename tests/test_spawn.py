"""Concurrent children: spawn, handles, map, gather, sleep, cancellation, who a
child's outcome belongs to (its handle; link=True), structured concurrency and
the limits that stop a spawn bomb."""

from __future__ import annotations

import threading

import pytest

from capsule.sandbox.engine import live_instances
from tests.conftest import ProgramRunner

CHILDREN = """
    import time
    import capsule
    from capsule import MessageError, TaskError, gather, send, task

    def until_ended(handle):
        # Its mailbox closes as it ends: a send then fails (without collecting it).
        while True:
            try:
                send(handle.id, 0)
            except MessageError:
                return
            capsule.sleep(0.01)

    @task(compute="HIGH")
    def nap(seconds, tag):
        capsule.sleep(seconds)
        return tag

    @task(max_retries=0)
    def fails(x):
        raise ValueError(f"bad {x}")

    @task(compute="HIGH", max_retries=0)
    def spin():
        while True:
            pass

    @task(compute="HIGH", max_retries=0)
    def sleeper():
        capsule.sleep(60)
"""


def test_spawn_returns_at_once_and_children_overlap(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        handles = [nap.spawn(0.3, f"t{i}") for i in range(3)]
        ids = [(h.id, h.name) for h in handles]
        return {"ids": ids, "values": [h.result() for h in handles]}
    """
    )
    assert outcome.value == {
        "ids": [["main/1", "nap"], ["main/2", "nap"], ["main/3", "nap"]],
        "values": ["t0", "t1", "t2"],
    }
    order = [(e.type, e.task_id) for e in outcome.events if e.type in ("started", "completed")]
    starts = [i for i, (kind, tid) in enumerate(order) if kind == "started" and tid != "main"]
    first_completion = next(i for i, (kind, _) in enumerate(order) if kind == "completed")
    assert max(starts) < first_completion  # all three ran at the same time


def test_map_keeps_input_order(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task
    def slower_first(i):
        capsule.sleep(0.25 * (4 - i))  # apart by more than a slow spawn takes
        return i * 10

    @task(name="main")
    def main():
        return slower_first.map(range(5))
    """
    )
    assert outcome.value == [0, 10, 20, 30, 40]
    completed = [e.task_id for e in outcome.of_type("completed") if e.task == "slower_first"]
    assert completed[0] == "main/5" and completed[-1] == "main/1"  # finished in reverse


def test_gather_with_and_without_return_exceptions(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        mixed = gather(nap.spawn(0, "ok"), fails.spawn(1), return_exceptions=True)
        try:
            gather(nap.spawn(0, "ok"), fails.spawn(2))
            raised = None
        except TaskError as error:
            raised = [error.task, error.kind, error.message]
        return {"mixed": [x if isinstance(x, str) else [type(x).__name__, x.message] for x in mixed],
                "raised": raised}
    """
    )
    assert outcome.value == {
        "mixed": ["ok", ["TaskError", "ValueError: bad 1"]],
        "raised": ["fails", "exception", "ValueError: bad 2"],
    }


def test_result_timeout_then_cancel(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        handle = spin.spawn()
        try:
            handle.result(timeout=0.2)
        except TimeoutError as error:
            timed_out = str(error)
        handle.cancel()
        try:
            handle.result()
        except TaskError as error:
            return [timed_out, error.kind, error.message]
    """
    )
    timed_out, kind, message = outcome.value
    assert "had not ended after 0.2s" in timed_out
    assert (kind, message) == ("cancelled", "cancelled by its parent")


def test_a_failure_before_the_parent_collects_it_is_delivered_later(
    run_program: ProgramRunner,
) -> None:
    # The pattern of the README: spawn, map, then the spawned child's result.
    outcome = run_program(
        CHILDREN
        + """
    @task
    def twice(x):
        return 2 * x

    @task(name="main", max_retries=0)
    def main():
        handle = fails.spawn(5)
        until_ended(handle)  # it has failed, and nobody waits on it
        more = twice.map([1, 2])
        try:
            handle.result()
        except TaskError as error:
            return [more, error.kind, error.message, handle.done()]
    """
    )
    assert outcome.value == [[2, 4], "exception", "ValueError: bad 5", True]


def test_a_failure_never_collected_fails_the_parent_when_it_returns(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main", max_retries=0)
    def main():
        until_ended(fails.spawn(7))
        return "returned"
    """
    )
    error = outcome.error
    assert error.kind == "child_failed"
    assert error.message == (
        "task 'main' (main) returned, but its child 'fails' (main/1) failed (exception) "
        "and that failure was never collected: ValueError: bad 7. To handle it, call "
        'handle.result(), gather() or capsule.wait() on it, or spawn it with restart="temporary"'
    )


def test_a_linked_child_failure_fails_the_parent_at_once(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main", max_retries=0)
    def main():
        fails.spawn(7, link=True)
        capsule.sleep(30)
        return "not reached"
    """
    )
    error = outcome.error
    assert error.kind == "child_failed"
    assert "child 'fails' (main/1) failed (exception); it was spawned with link=True" in (
        error.message
    )
    assert "ValueError: bad 7" in error.message
    assert outcome.result.duration_s < 10


def test_a_linked_child_failure_stops_a_parent_running_wasm(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main", compute="HIGH", max_retries=0)
    def main():
        fails.spawn(8, link=True)
        while True:
            pass
    """
    )
    assert outcome.error.kind == "child_failed"


def test_children_do_not_outlive_their_parent(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(max_retries=0)
    def parent():
        spin.spawn()
        sleeper.spawn()
        return "parent done"

    @task(name="main")
    def main():
        return parent()
    """
    )
    assert outcome.value == "parent done"
    cancelled = {e.task: e.error.message for e in outcome.of_type("cancelled")}
    assert cancelled == {
        "spin": "cancelled: its parent ended",
        "sleeper": "cancelled: its parent ended",
    }
    assert outcome.result.duration_s < 10


def test_sleep_sleeps(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        started = time.monotonic()
        capsule.sleep(0.25)
        return time.monotonic() - started
    """
    )
    assert 0.25 <= outcome.value < 2.0
    assert [e.on for e in outcome.of_type("waiting")] == ["sleep"]
    assert len(outcome.of_type("resumed")) == 1


def test_spawn_bomb_is_stopped_and_the_host_stays_up(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(max_retries=0)
    def bomb():
        count = 0
        try:
            while True:
                sleeper.spawn()
                count += 1
        except TaskError as error:
            return [count, error.kind, error.message]

    @task(name="main", max_retries=0)
    def main():
        first = bomb()
        # Another branch after the bomb: the run is healthy.
        return {"bomb": first, "after": nap(0, "still fine")}
    """
    )
    count, kind, message = outcome.value["bomb"]
    assert kind == "limit"
    assert count == 256
    assert "already has 256 running children, its limit" in message
    assert outcome.value["after"] == "still fine"


def test_children_that_ended_or_were_refused_give_back_their_places(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main", max_retries=0)
    def main():
        refused = 0
        for _ in range(6):  # admitted, then refused: that name is a task id's
            try:
                nap.spawn(0, "x", name="main/99")
            except Exception:
                refused += 1
        first = gather(*[nap.spawn(0, n) for n in range(4)])
        second = gather(*[nap.spawn(0, n) for n in range(4)])
        try:
            sleepers = [sleeper.spawn() for _ in range(5)]
        except TaskError as error:
            return [refused, first, second, error.kind]
        return [refused, first, second, len(sleepers)]
    """,
        max_children=4,
    )
    assert outcome.value == [6, [0, 1, 2, 3], [0, 1, 2, 3], "limit"]


def test_live_task_limit_across_the_tree(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(max_retries=0)
    def fan(n):
        return [sleeper.spawn().id for _ in range(n)]

    @task(name="main", max_retries=0)
    def main():
        try:
            for _ in range(10):
                fan.spawn(100, link=True)
            capsule.sleep(30)
        except TaskError as error:
            return [error.kind, error.message]
    """
    )
    # A fan child hit the run's live-task limit (512) and failed; it was
    # linked, so main fails with child_failed naming that cause.
    assert outcome.error.kind == "child_failed"
    assert "live tasks, its limit" in outcome.error.message


def test_no_threads_or_instances_left_after_cancellations(run_program: ProgramRunner) -> None:
    before = {t.ident for t in threading.enumerate()}
    run_program(
        CHILDREN
        + """
    @task(name="main", max_retries=0)
    def main():
        for _ in range(5):
            spin.spawn()
            sleeper.spawn()
        fails.spawn(1, link=True)
        capsule.sleep(30)
    """
    )
    leftover = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert [name for name in leftover if name.startswith("capsule")] == []
    assert live_instances() == 0


def test_handles_keep_outcomes_after_the_host_forgets_the_child(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        first = nap.spawn(0, "a")
        once = first.result()
        again = first.result()
        later = nap.spawn(0, "b")
        failing = fails.spawn(3)
        both = gather(first, failing, later, return_exceptions=True)
        # Many short children, each collected: the parent does not accumulate them.
        total = sum(len(nap.spawn(0, "x").result()) for _ in range(60))
        return [once, again, [x if isinstance(x, str) else x.kind for x in both], total]
    """
    )
    assert outcome.value == ["a", "a", ["a", "exception", "b"], 60]


BLOCKED = {
    "sleep": "sleeps",
    "result": "waits_on_grandchild",
    "receive": "receives",
}


@pytest.mark.parametrize("blocked_in", sorted(BLOCKED))
def test_cancel_reaches_a_blocked_child_at_once(
    run_program: ProgramRunner, blocked_in: str
) -> None:
    # Each child tells main it is about to block; main then gives it 0.2 s to be
    # blocked for longer than a wait takes to be reported. (Sleeping 0.2 s from
    # the spawn was not always enough for a child to get there, in whole-suite
    # runs on a busy machine.)
    outcome = run_program(
        CHILDREN
        + f"""
    @task(compute="HIGH", max_retries=0)
    def sleeps(parent):
        capsule.send(parent, "blocking")
        capsule.sleep(60)

    @task(compute="HIGH", max_retries=0)
    def waits_on_grandchild(parent):
        grandchild = sleeper.spawn()
        capsule.send(parent, "blocking")
        return grandchild.result()

    @task(compute="HIGH", max_retries=0)
    def receives(parent):
        capsule.send(parent, "blocking")
        capsule.receive()

    @task(name="main")
    def main():
        handle = {BLOCKED[blocked_in]}.spawn(capsule.current().id)
        capsule.receive(timeout=60)
        capsule.sleep(0.2)
        started = time.monotonic()
        handle.cancel()
        try:
            handle.result()
        except TaskError as error:
            return [error.kind, time.monotonic() - started]
    """
    )
    began = outcome.events[0].at if outcome.events else 0.0
    timeline = "\n".join(
        f"{e.at - began:+.3f} {e.type} {e.task} {getattr(e, 'on', '') or ''}"
        for e in outcome.events
    )
    kind, seconds = outcome.value
    assert kind == "cancelled", timeline
    assert seconds < 1.0, timeline  # not the 60 s sleep, nor forever
    child = BLOCKED[blocked_in]
    waits = [e.on for e in outcome.of_type("waiting") if e.task == child]
    assert waits == [blocked_in], timeline
    assert child in {e.task for e in outcome.of_type("cancelled")}, timeline
