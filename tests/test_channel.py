"""The message channel (capsule/sandbox/channel.py): sends on reserved room
written to the sender's own memory and taken by the host, batches of received
messages, what goes back to a mailbox when an attempt ends, and guests that
write garbage to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from capsule.actors.router import RESERVED_MESSAGE_BYTES, Message, Router, RoutingError
from tests.conftest import ProgramRunner, capsule_cli, kill_at_marker

TASKS = """
    import capsule
    from capsule import MessageError, current, receive, send, task

    @task(compute="HIGH")
    def collect(n):
        return [receive(timeout=20).body for _ in range(n)]

    def spin(rounds):
        # CPU only: no host call (time.monotonic would be one).
        total = 0
        for i in range(rounds):
            total += i * i
        return total
"""


def test_a_stream_goes_mostly_through_the_channel_and_arrives_in_order(
    run_program: ProgramRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends after the first to a target are written to the sender's channel
    and taken by the host in bulk; large ones, and those to a target without
    credit, still go through the host; each target gets its messages in order."""
    from capsule.supervisor.run import Run

    taken: list[int] = []
    original = Run.gathered

    def counting(self: Run, caller: Any, records: list[tuple[str, str]]) -> None:
        taken.append(len(records))
        original(self, caller, records)

    monkeypatch.setattr(Run, "gathered", counting)
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        first, second = collect.spawn(300), collect.spawn(300, name="second")
        for i in range(300):
            body = i if i % 25 else {"big": "x" * 6000, "i": i}  # over the reserved size
            send(first, body)
            send("second", -i)
        return [first.result(), second.result()]
    """
    )
    first, second = outcome.value
    assert [m if isinstance(m, int) else m["i"] for m in first] == list(range(300))
    assert second == [-i for i in range(300)]
    assert sum(taken) > 400, taken  # of 600: most went through the channels
    sent = outcome.of_type("message_sent")
    assert len(sent) == 600
    assert [m.message_id for m in sent] == [f"main#{n}" for n in range(1, 601)]


def test_a_sender_that_computes_after_sending_does_not_hold_its_messages(
    run_program: ProgramRunner,
) -> None:
    """A message written to the channel reaches its target at the sender's next
    epoch tick, not only at its next host call."""
    outcome = run_program(
        TASKS
        + """
    import time

    @task(compute="HIGH")
    def stamp(n):
        got = []
        for _ in range(n):
            message = receive(timeout=20)
            got.append([message.body, time.monotonic()])
        return got

    @task(name="main", compute="HIGH", timeout="60s")
    def main():
        receiver = stamp.spawn(2)
        capsule.sleep(0.2)
        started = time.monotonic()
        send(receiver, "through the host")
        send(receiver, "through the channel")
        spin(20_000_000)  # seconds of CPU, and no host call
        finished = time.monotonic()
        return {"started": started, "finished": finished, "got": receiver.result()}
    """
    )
    result = outcome.value
    (first, _), (second, arrived) = result["got"]
    assert [first, second] == ["through the host", "through the channel"]
    spun = result["finished"] - result["started"]
    assert spun > 0.5, spun
    assert arrived < result["finished"] - spun / 2, result


def test_after_a_wait_a_send_to_a_task_that_ended_is_refused_again(
    run_program: ProgramRunner,
) -> None:
    """Credit ends with any call that may tell the sender more about its
    targets: once it saw the target end, a send to it fails as it always did."""
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        target = collect.spawn(3)
        for i in range(3):
            send(target, i)
        got = target.result()
        try:
            send(target, "late")
        except MessageError as error:
            return [got, error.kind]
        return [got, "sent"]
    """
    )
    assert outcome.value == [[0, 1, 2], "no_such_actor"]


FLAKY_READER = """
    @task(max_retries=1)
    def flaky_reader(n, how):
        capsule.sleep(0.5)  # the sender's messages all wait in the mailbox meanwhile
        first = receive(timeout=20)  # takes them all in one batch
        if current().attempt == 1:
            if how == "raise":
                raise ValueError(f"failed after taking {first.body}")
            spin(10**12)  # ended by its deadline: a trap
        return [first.body] + [receive(timeout=20).body for _ in range(n - 1)]
"""


@pytest.mark.parametrize("how", ["raise", "trap"])
def test_messages_an_attempt_took_but_never_received_go_back_to_its_mailbox(
    run_program: ProgramRunner, how: str
) -> None:
    outcome = run_program(
        TASKS
        + FLAKY_READER.replace("@task(max_retries=1)", '@task(max_retries=1, timeout="2s")')
        + """
    @task(name="main", max_retries=0)
    def main(how):
        reader = flaky_reader.spawn(4, how)
        for i in range(5):
            send(reader, i)
        return reader.result()
    """,
        how,
        retry_backoff=0.01,
    )
    assert outcome.value == [1, 2, 3, 4]  # the first attempt received 0
    (returned,) = outcome.of_type("messages_returned")
    assert returned.attempt == 1
    assert returned.message_ids == ["main#2", "main#3", "main#4", "main#5"]


def test_messages_put_back_before_a_kill_are_owed_again_after_resume(tmp_path: Path) -> None:
    """The journal records the put-back: a resumed run delivers those messages
    again (they were journaled as received in the failed attempt's batch)."""
    source = (
        TASKS
        + FLAKY_READER
        + """
    @task(name="main", max_retries=0)  # (a retry of main would hide a lost message)
    def main():
        reader = flaky_reader.spawn(4, "raise")
        for i in range(5):
            send(reader, i)
        print("MARK sent", flush=True)
        return reader.result()
    """
    )
    program = tmp_path / "reader.py"
    program.write_text("\n".join(line[4:] for line in source.splitlines()))
    # Killed during the retry's 30 s backoff: the put-back is journaled by then.
    printed, code = kill_at_marker(
        ["run", str(program), "--retry-backoff", "30"], "MARK sent", tmp_path, 2.0
    )
    assert code < 0, printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    envelope = json.loads(resumed.stdout)
    assert envelope["result"] == [1, 2, 3, 4], envelope


GARBAGE = {
    "without credit": """
        guest = sys.modules["capsule_guest"]
        guest._channel_put("main", "1", guest._RECORDS)
    """,
    "a record past the end": """
        guest = sys.modules["capsule_guest"]
        guest._channel[guest._RECORDS + 1 : guest._RECORDS + 7] = array.array(
            "B", struct.pack("<HI", 4, 10**6)
        )
        guest._channel[guest._RECORDS] = 1
    """,
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_garbage_in_the_channel_ends_that_task_with_a_clear_error(
    run_program: ProgramRunner, garbage: str
) -> None:
    import textwrap

    writes = textwrap.indent(textwrap.dedent(GARBAGE[garbage]).strip(), " " * 8)
    outcome = run_program(
        TASKS
        + f"""
    import array, struct, sys

    @task(max_retries=0)
    def vandal(target):
        send(target, "first")  # (its credit is for this target)
{writes}
        print("then a host call", flush=True)  # the host takes the records first
        return "not reached"

    @task(name="main")
    def main():
        sink = collect.spawn(1)
        try:
            vandal(sink.id)
        except capsule.TaskError as error:
            return [error.kind, str(error), sink.result()]
    """
    )
    kind, message, received = outcome.value
    assert kind == "trap"
    expected = "without room reserved" if garbage == "without credit" else "channel is corrupt"
    assert expected in message
    assert received == ["first"]


def test_reserved_places_count_against_the_mailbox_and_the_runs_size() -> None:
    class Sender:
        woken = 0

        def wake(self) -> None:
            Sender.woken += 1

    sender = Sender()
    router = Router(mailbox_capacity=4, max_queued_bytes=3 * RESERVED_MESSAGE_BYTES + 10)
    router.open("a")
    router.open("b")
    assert router.reserve("a", 32) == 3  # bounded by the run's queued size
    assert router.reserve("b", 32) == 0
    assert router.try_send("a", Message("1", "s", "12"), sender)  # 3 reserved + 1 = full
    assert not router.try_send("a", Message("2", "s", "12"), sender)
    with pytest.raises(RoutingError, match="not yet received over"):
        router.try_send("b", Message("3", "s", "x" * 20), sender)
    router.deliver_reserved("a", Message("4", "s", "34"))
    assert router.depth("a") == 2 and router.queued_bytes() == 4
    router.release("a", 2)  # the rest given back: the blocked sender may retry
    assert Sender.woken == 1
    assert router.try_send("a", Message("2", "s", "12"), sender)
    assert [m.id for m in router.try_receive("a", sender, most=10)] == ["1", "4", "2"]
    router.put_back("a", [Message("4", "s", "34"), Message("2", "s", "12")])
    assert [m.id for m in router.try_receive("a", sender, most=1)] == ["4"]
    assert router.reserve("b", 32) == 3
    router.close("b")  # its reservations go with it
    assert router.reserve("a", 32) == 3
