"""A child's outcome belongs to its handle: ``capsule.wait``, ``as_completed``,
``map(return_exceptions=True)`` and ``done()`` deliver it whenever they are
called, and children failing at any moment never fail their parent through a
collecting call."""

from __future__ import annotations

import pytest

from tests.conftest import ProgramRunner

CHILDREN = """
    import random
    import capsule
    from capsule import MessageError, TaskError, gather, receive, send, task

    @task(max_retries=0)
    def value(x):
        return x

    @task(max_retries=0)
    def fails(x):
        raise ValueError(f"bad {x}")

    @task(max_retries=0)
    def blocks():
        receive()  # until it is cancelled, or told to return
        return "told"

    def until_ended(handle):
        # Its mailbox closes as it ends: a send then fails (without collecting it).
        while True:
            try:
                send(handle.id, 0)
            except MessageError:
                return
            capsule.sleep(0.01)

    def shown(outcome):
        return outcome if not isinstance(outcome, TaskError) else f"{outcome.kind}: {outcome.message}"
"""


def test_map_with_return_exceptions_keeps_every_result(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(max_retries=0)
    def odd_fails(i):
        if i % 2:
            raise ValueError(f"odd {i}")
        return i

    @task(name="main")
    def main():
        return [shown(x) for x in odd_fails.map(range(5), return_exceptions=True)]
    """
    )
    assert outcome.value == [
        0,
        "exception: ValueError: odd 1",
        2,
        "exception: ValueError: odd 3",
        4,
    ]


def test_wait_first_completed_then_all_completed(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        quick, slow = value.spawn("quick"), blocks.spawn()
        done, pending = capsule.wait([quick, slow], return_when=capsule.FIRST_COMPLETED)
        first = [[h.name for h in done], [h.name for h in pending], quick.done()]
        timed = capsule.wait({quick, slow}, timeout=0.1)  # ALL_COMPLETED, but not in time
        partial = [sorted(h.name for h in timed.done), [h.name for h in timed.pending]]
        send(slow, "return now")
        done, pending = capsule.wait([quick, slow])
        return [first, partial, sorted(h.result() for h in done), len(pending)]
    """
    )
    assert outcome.value == [
        [["value"], ["blocks"], True],
        [["value"], ["blocks"]],
        ["quick", "told"],
        0,
    ]


def test_wait_first_exception_returns_at_the_first_failure(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        ok, bad, running = value.spawn(1), fails.spawn(2), blocks.spawn()
        done, pending = capsule.wait([ok, bad, running], return_when=capsule.FIRST_EXCEPTION)
        try:
            bad.result()
        except TaskError as error:
            raised = error.message
        running.cancel()
        return [running in pending, bad in done, raised]
    """
    )
    assert outcome.value == [True, True, "ValueError: bad 2"]


def test_as_completed_yields_each_handle_as_its_child_ends(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        slow = blocks.spawn()
        early = [value.spawn("a"), fails.spawn("b")]
        for handle in early:
            until_ended(handle)
        seen = []
        for handle in capsule.as_completed([slow, *early]):
            seen.append(handle.name)
            if len(seen) == 2:
                send(slow, "now you")
        try:
            next(iter(capsule.as_completed([blocks.spawn()], timeout=0.05)))
        except TimeoutError as error:
            timed_out = str(error)
        return [sorted(seen[:2]), seen[2], timed_out]
    """
    )
    assert outcome.value == [
        ["fails", "value"],
        "blocks",
        "1 of 1 children had not ended after 0.05s",
    ]


def test_wait_refuses_what_is_not_a_handle_or_a_mode(run_program: ProgramRunner) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(name="main")
    def main():
        errors = []
        for call in (
            lambda: capsule.wait([value.spawn(1)], return_when="SOMETIMES"),
            lambda: capsule.wait(["main/1"]),
        ):
            try:
                call()
            except (TypeError, ValueError) as error:
                errors.append(f"{type(error).__name__}: {error}")
        return errors
    """
    )
    assert outcome.value == [
        "ValueError: return_when must be capsule.FIRST_COMPLETED, FIRST_EXCEPTION or "
        "ALL_COMPLETED, not 'SOMETIMES'",
        "TypeError: capsule.wait takes TaskHandles (from some_task.spawn()), not str",
    ]


def test_a_temporary_childs_failure_is_retried_and_never_fails_its_parent(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        CHILDREN
        + """
    @task(restart="temporary", max_retries=2)
    def gone():
        raise RuntimeError("gone")

    @task(name="main")
    def main():
        until_ended(gone.spawn())  # never collected
        return "main is fine"
    """,
        retry_backoff=0.01,
    )
    assert outcome.value == "main is fine"
    assert [e.attempt for e in outcome.of_type("started") if e.task == "gone"] == [1, 2, 3]


#: One program per way of collecting outcomes, each run 1,000 times in one run,
#: its children failing (or not) at random moments: before the parent reaches
#: its collecting call, while it waits there, or not at all.
PATTERNS = {
    "spawn_map_result": """
        handle = child.spawn(plan())
        maybe_pause()
        try:
            child.map([plan()])
        except TaskError:
            pass
        try:
            handle.result()
        except TaskError:
            pass
    """,
    "gather_return_exceptions": """
        handles = [child.spawn(plan()), child.spawn(plan())]
        maybe_pause()
        gather(*handles, return_exceptions=True)
    """,
    "map_return_exceptions": """
        child.map([plan(), plan()], return_exceptions=True)
    """,
    "wait_first_exception": """
        handles = [child.spawn(plan()), child.spawn(plan())]
        maybe_pause()
        done, pending = capsule.wait(handles, return_when=capsule.FIRST_EXCEPTION)
        gather(*pending, return_exceptions=True)
    """,
    "as_completed": """
        handles = [child.spawn(plan()), child.spawn(plan())]
        maybe_pause()
        for handle in capsule.as_completed(handles):
            try:
                handle.result()
            except TaskError:
                pass
    """,
}

STRESS = """
    import random
    import capsule
    from capsule import TaskError, gather, task

    @task(max_retries=0)
    def child(how):
        fail, pause = how
        if pause:
            capsule.sleep(pause)
        if fail:
            raise ValueError("failed on purpose")
        return 1

    rng = random.Random(7)

    def plan():
        # Half fail; a third pause a moment first (so that some end while the
        # parent waits, others before it gets there).
        return [rng.random() < 0.5, rng.choice([0, 0, 0.002])]

    def maybe_pause():
        if rng.random() < 0.5:
            capsule.sleep(0.003)  # children may end, and fail, meanwhile

    @task(name="main", max_retries=0, timeout="10m")
    def main():
        for _ in range(1000):
            PATTERN
        return "no child_failed"
"""


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_children_failing_at_random_moments_never_fail_a_collecting_parent(
    run_program: ProgramRunner, pattern: str
) -> None:
    import textwrap

    body = textwrap.indent(textwrap.dedent(PATTERNS[pattern]).strip(), " " * 12).strip()
    outcome = run_program(STRESS.replace("PATTERN", body))
    assert outcome.value == "no child_failed"
    failed = [e for e in outcome.of_type("failed") if e.task == "child"]
    assert len(failed) > 500  # children did fail, all along
