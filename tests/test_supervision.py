"""Supervision, OTP style: restart types, strategies, restart intensity and
escalation, as lifecycle events and outcomes of real runs."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from tests.conftest import ProgramRunner, capsule_cli

COMMON = """
    import capsule
    from capsule import TaskError, receive, send, task

    def report(tag):
        # Tell main which attempt of which child is running.
        send("main", [tag, capsule.current().attempt])

    @task(compute="HIGH", max_retries=3)
    def waits_forever(tag):
        report(tag)
        receive()

    @task(compute="HIGH", max_retries=3)
    def fails_once(tag):
        report(tag)
        if capsule.current().attempt == 1:
            capsule.sleep(0.3)  # the siblings spawned after it are running by now
            raise RuntimeError(f"{tag} crashed")
        receive()
"""


def restarts(outcome, task_id: str) -> list[str]:
    return [e.reason for e in outcome.of_type("restarting") if e.task_id == task_id]


def test_transient_child_is_restarted_after_a_failure(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(max_retries=2)
    def flaky():
        if capsule.current().attempt == 1:
            raise RuntimeError("first try")
        return capsule.current().attempt

    @task(name="main")
    def main():
        return flaky.spawn().result()
    """,
        retry_backoff=0.01,
    )
    assert outcome.value == 2


def test_temporary_child_is_never_restarted_and_never_fails_its_parent(
    run_program: ProgramRunner,
) -> None:
    # Each step waits for the last one's report: a sibling's failure restarts
    # the running children it finds, so which are running when is set here.
    outcome = run_program(
        COMMON
        + """
    @task(restart="temporary", max_retries=1)
    def one_shot():
        report("one_shot")
        receive()  # until main says
        if capsule.current().attempt == 1:
            raise RuntimeError("gone")
        return "returned"

    @task(compute="HIGH", max_retries=3)
    def crashes_when_told(tag):
        report(tag)
        receive()
        if capsule.current().attempt == 1:
            raise RuntimeError(f"{tag} crashed")
        receive()

    @task(name="main", strategy="one_for_all")
    def main():
        one = one_shot.spawn()
        seen = [receive(timeout=10).body]
        send(one, "fail")  # retried by its own max_retries: no sibling runs yet
        seen.append(receive(timeout=10).body)
        b = crashes_when_told.spawn("b")
        seen.append(receive(timeout=10).body)
        send(b, "crash")  # restarts its running siblings, but not a temporary one
        seen.append(receive(timeout=10).body)
        send(one, "return")
        return [seen, one.result(timeout=10)]
    """,
        retry_backoff=0.01,
    )
    seen, returned = outcome.value
    assert seen == [["one_shot", 1], ["one_shot", 2], ["b", 1], ["b", 2]]
    assert returned == "returned"
    # Retried after its failure (its own max_retries); not restarted when a
    # sibling failed, nor when it returned.
    assert [e.attempt for e in outcome.of_type("started") if e.task == "one_shot"] == [1, 2]
    assert [e for e in outcome.of_type("restarting") if e.task == "one_shot"] == []
    assert [e.attempt for e in outcome.of_type("started") if e.task == "crashes_when_told"] == [
        1,
        2,
    ]


def test_permanent_child_is_restarted_after_returning(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(restart="permanent")
    def beat():
        report("beat")
        return "done for now"

    @task(name="main", max_restarts=5)
    def main():
        beat.spawn()
        return [receive(timeout=10).body for _ in range(3)]
    """
    )
    assert outcome.value == [["beat", 1], ["beat", 2], ["beat", 3]]
    assert restarts(outcome, "main/1")[:2] == ["it returned, and it is permanent"] * 2


def test_one_for_one_restarts_only_the_failed_child(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(name="main")
    def main():
        waits_forever.spawn("a")
        fails_once.spawn("b")
        return sorted(receive(timeout=10).body for _ in range(3))
    """,
        retry_backoff=0.01,
    )
    assert outcome.value == [["a", 1], ["b", 1], ["b", 2]]
    assert restarts(outcome, "main/1") == []


def test_one_for_all_restarts_every_running_child(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(name="main", strategy="one_for_all")
    def main():
        waits_forever.spawn("a")
        capsule.sleep(0.2)
        fails_once.spawn("b")
        waits_forever.spawn("c")
        return sorted(receive(timeout=10).body for _ in range(6))
    """,
        retry_backoff=0.2,
    )
    # b failed once; a and c (running) were restarted with it.
    assert outcome.value == [["a", 1], ["a", 2], ["b", 1], ["b", 2], ["c", 1], ["c", 2]]
    reason = "its sibling 'fails_once' (main/2) failed (one_for_all)"
    assert restarts(outcome, "main/1") == [reason]
    assert restarts(outcome, "main/3") == [reason]


def test_rest_for_one_restarts_the_children_started_after(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(name="main", strategy="rest_for_one")
    def main():
        waits_forever.spawn("a")
        capsule.sleep(0.1)
        waits_forever.spawn("c")
        capsule.sleep(0.1)
        fails_once.spawn("b")
        waits_forever.spawn("d")
        return sorted(receive(timeout=10).body for _ in range(6))
    """,
        retry_backoff=0.2,
    )
    # b failed: d, spawned after it, restarts; a and c, spawned before, do not.
    assert outcome.value == [["a", 1], ["b", 1], ["b", 2], ["c", 1], ["d", 1], ["d", 2]]
    assert restarts(outcome, "main/1") == [] and restarts(outcome, "main/2") == []
    assert len(restarts(outcome, "main/4")) == 1


def test_restart_intensity_escalates_to_the_grandparent(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(restart="permanent")
    def returns():
        return "again"

    @task(max_restarts=2, restart_window="30s", max_retries=0)
    def supervisor():
        returns.spawn()
        capsule.sleep(30)

    @task(name="main")
    def main():
        try:
            supervisor.spawn().result()
        except TaskError as error:
            return [error.task, error.kind, error.message]
    """
    )
    task, kind, message = outcome.value
    assert (task, kind) == ("supervisor", "restart_intensity")
    assert message == (
        "more than 2 restarts of its children within 30s, which task 'supervisor' (main/1) "
        "allows with max_restarts=2, restart_window='30s'; the last: 'returns' (main/1/1) "
        "returned. If these restarts are expected, raise max_restarts (or shorten "
        "restart_window) in the @task(...) of 'supervisor'; otherwise, find why its "
        "children keep ending"
    )
    # Two restarts allowed (attempts 1-3), the third refused.
    assert [e.attempt for e in outcome.of_type("started") if e.task == "returns"] == [1, 2, 3]


def test_a_childs_own_retries_are_not_restarts(run_program: ProgramRunner) -> None:
    # 200 children, one in ten failing once: 20 retries within a second, far
    # past the default intensity (3 in 5 s), which counts restarts only.
    outcome = run_program(
        COMMON
        + """
    @task(max_retries=2)
    def flaky(i):
        if i % 10 == 0 and capsule.current().attempt == 1:
            raise RuntimeError(f"transient {i}")
        return i

    @task(name="main")
    def main():
        return sum(flaky.map(range(200)))
    """,
        retry_backoff=0.01,
    )
    assert outcome.value == sum(range(200))
    assert len(outcome.of_type("retrying")) == 20


def test_sibling_restarts_count_against_the_intensity(run_program: ProgramRunner) -> None:
    outcome = run_program(
        COMMON
        + """
    @task(compute="HIGH", max_retries=5)
    def crashes(parent):
        send(parent, capsule.current().attempt)
        receive()  # until its parent has seen this attempt
        raise RuntimeError("crashed")

    @task(strategy="one_for_all", max_restarts=1, restart_window="1m", max_retries=0)
    def supervisor(parent):
        waits_forever.spawn("a")
        crasher = crashes.spawn(capsule.current().id)
        while True:
            receive(timeout=10)
            send(crasher, "go on")

    @task(name="main")
    def main():
        try:
            supervisor.spawn(capsule.current().id).result()
        except TaskError as error:
            return [error.kind, error.message]
    """,
        retry_backoff=0.01,
    )
    kind, message = outcome.value
    assert kind == "restart_intensity"
    assert "more than 1 restarts of its children within 60s" in message
    assert "the last: 'crashes' (main/1/2) failed (exception) under one_for_all" in message
    # Its first failure restarted its sibling (1 allowed); its second could not.
    assert len([e for e in outcome.of_type("restarting") if e.task == "waits_forever"]) == 1


def test_bad_supervision_options_are_config_errors(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
    from capsule import task

    @task(name="main", strategy="all_for_one", restart="sometimes", max_restarts=-1)
    def main():
        return 1
    """
    )
    error = outcome.report.usage_error
    assert "option strategy='all_for_one' is invalid" in error
    assert "option restart='sometimes' is invalid" in error
    assert "option max_restarts=-1 is invalid" in error


def test_agents_example(run_program: ProgramRunner) -> None:
    from tests.conftest import EXAMPLES

    outcome = run_program((EXAMPLES / "agents" / "main.py").read_text(), name="main.py")
    assert outcome.value == {
        "sections": [
            {"topic": "isolation", "revisions": 1, "attempt": 1},
            {"topic": "durability", "revisions": 1, "attempt": 2},
            {"topic": "scheduling", "revisions": 1, "attempt": 1},
        ],
        "words": 48,
    }
    retried = [e.task_id for e in outcome.of_type("retrying")]
    assert retried == ["main/3"]  # the flaky worker, restarted by the planner
    cancelled = [(e.task, e.error.message) for e in outcome.of_type("cancelled")]
    assert cancelled == [("critic", "cancelled: its parent ended")]
    asks = [m for m in outcome.of_type("message_sent") if m.expects_reply]
    assert len(asks) == 6 and {m.target_id for m in asks} == {"main/1"}


def test_restarts_are_numbered_apart_from_attempts(tmp_path: Path) -> None:
    # A permanent child restarted after returning: its attempts go on counting,
    # its restarts are shown as such (not "attempt 3/2"), live and in inspect.
    program = tmp_path / "beats.py"
    program.write_text(
        textwrap.dedent(
            """
            import capsule
            from capsule import receive, send, task

            @task(restart="permanent", max_retries=1)
            def beat():
                send("main", capsule.current().attempt)
                receive()  # until main has seen this attempt
                return "done for now"

            @task(name="main")
            def main():
                handle = beat.spawn()
                seen = []
                for _ in range(3):
                    seen.append(receive(timeout=10).body)
                    send(handle, "again")
                return seen
            """
        )
    )
    done = capsule_cli("run", str(program), "-v", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[1, 2, 3]\n"
    lines = done.stderr.splitlines()
    assert "capsule: started main/1 (beat), attempt 1/2" in lines
    assert (
        "capsule: restarting main/1 (beat) (restart 1): it returned, and it is permanent" in lines
    )
    assert "capsule: started main/1 (beat), attempt 3 (restart 2)" in lines
    assert not [line for line in lines if re.search(r"attempt [3-9]/2", line)]
    shown = capsule_cli("inspect", "--last", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    match = re.search(
        r"main/1 beat  \[(?:cancelled|completed)\]  attempt (\d+) \(restart (\d+)\)", shown.stdout
    )
    assert match is not None, shown.stdout
    attempt, restart = map(int, match.groups())
    assert restart == attempt - 1 >= 2
    tasks = json.loads(capsule_cli("inspect", "--last", "--json", cwd=tmp_path).stdout)["tasks"]
    assert {t["task_id"]: t["restarts"] for t in tasks} == {"main": 0, "main/1": restart}
