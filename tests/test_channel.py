"""The message channel (capsule/sandbox/channel.py): sends on reserved room
written to the sender's own memory and taken by the host, batches of received
messages, what goes back to a mailbox when an attempt ends, and guests that
write garbage to it."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from capsule.actors.router import RESERVED_MESSAGE_BYTES, Message, Router, RoutingError
from tests.conftest import ProgramRunner, capsule_cli, kill_at_marker

TASKS = """
    import time

    import capsule
    from capsule import MessageError, current, receive, send, task

    @task(compute="HIGH")
    def collect(n):
        return [receive(timeout=20).body for _ in range(n)]

    @task(compute="HIGH")
    def stamp(n):
        # Each message, with when it came (the run's clock, the same in all tasks).
        got = []
        for _ in range(n):
            message = receive(timeout=20)
            got.append([message.body, time.monotonic()])
        return got

    def spin(rounds):
        # CPU only: no host call (time.monotonic would be one).
        total = 0
        for i in range(rounds):
            total += i * i
        return total
"""


def test_a_stream_goes_mostly_through_the_channel_and_arrives_in_order(
    run_program: ProgramRunner, monkeypatch: pytest.MonkeyPatch, mappings_by: str
) -> None:
    """Sends after the first to a target are written to the sender's channel
    and taken by the host in bulk; large ones, and those to a target without
    credit, still go through the host; each target gets its messages in order.
    (The channel is found either way the host can ask about its mappings.)"""
    from capsule.supervisor.host_calls import RunHostCalls

    taken: list[int] = []
    original = RunHostCalls.gathered

    def counting(self: RunHostCalls, caller: Any, records: list[tuple[str, str]]) -> None:
        taken.append(len(records))
        original(self, caller, records)

    monkeypatch.setattr(RunHostCalls, "gathered", counting)
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
    # A quarter of the run's queued size, 4 places' worth, may be reserved.
    router = Router(mailbox_capacity=8, max_queued_bytes=16 * RESERVED_MESSAGE_BYTES + 100)
    router.open("a")
    router.open("b")
    assert router.reserve("a", 32) == 4
    assert router.reserve("b", 32) == 0  # the quarter is taken
    for number in "123":
        assert router.try_send("a", Message(number, "s", "12"), sender)
    assert router.try_send("a", Message("4", "s", "12"), sender)  # 4 + 4 reserved: full
    assert not router.try_send("a", Message("5", "s", "12"), sender)
    # Room merely reserved refuses no send: these 60,000 bytes fit beside it.
    assert router.try_send("b", Message("6", "s", "x" * 60_000), sender)
    with pytest.raises(RoutingError, match="not yet received over"):
        router.try_send("b", Message("8", "s", "x" * 6_000), sender)
    assert [m.id for m in router.try_receive("b", sender)] == ["6"]
    router.deliver_reserved("a", Message("7", "s", "34"))
    assert router.depth("a") == 5 and router.queued_bytes() == 10
    router.release("a", 3)  # the rest given back: the blocked sender may try again
    assert Sender.woken == 1
    assert router.try_send("a", Message("5", "s", "12"), sender)
    taken = router.try_receive("a", sender, most=10)
    assert [m.id for m in taken] == ["1", "2", "3", "4", "7", "5"]
    router.put_back("a", taken[4:])
    assert [m.id for m in router.try_receive("a", sender, most=1)] == ["7"]
    assert router.reserve("b", 32) == 4  # half its mailbox, a quarter of the run
    router.close("b")  # its reservations go with it
    assert router.reserve("a", 32) == 4


def test_sends_on_credit_keep_the_message_size_limit(run_program: ProgramRunner) -> None:
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        sink = collect.spawn(2)
        kinds = []
        for body in ["x" * 10, "y" * 3000, "z" * 3000, "w"]:
            try:
                send(sink, body)
                kinds.append("sent")
            except MessageError as error:
                kinds.append(error.kind)
        return [kinds, sink.result()]
    """,
        max_message_size="1KB",
    )
    assert outcome.value == [["sent", "too_large", "too_large", "sent"], ["x" * 10, "w"]]


def test_room_reserved_by_a_waiting_sender_is_given_back(run_program: ProgramRunner) -> None:
    """Reserved places count against the mailbox and the run's queued size only
    while their holder runs: one waiting in receive holds none."""
    outcome = run_program(
        TASKS
        + """
    @task
    def late_reader(n):
        capsule.sleep(2)  # nothing received meanwhile
        return len([receive(timeout=20) for _ in range(n)])

    @task
    def other(target):
        capsule.sleep(0.5)  # main holds its credit, then waits in receive
        for i in range(10):
            send(target, i, timeout=1)
        send("main", "all 10 sent")

    @task(name="main", max_retries=0)
    def main():
        reader = late_reader.spawn(11)
        other.spawn(reader.id)
        send(reader, "hello")  # room reserved for main's next ones to it
        return receive(timeout=20).body
    """,
        mailbox_capacity=40,
    )
    assert outcome.value == "all 10 sent"


def test_a_run_with_little_queued_is_not_full_of_reservations(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        TASKS
        + """
    @task
    def late_collect(n):
        capsule.sleep(1)  # its mailbox holds what main sent, and main's reservations
        return [receive(timeout=20).body for _ in range(n)]

    @task(name="main", max_retries=0)
    def main():
        sinks = [late_collect.spawn(1) for _ in range(9)]
        for sink in sinks[:8]:
            send(sink, "hi")  # each also reserves room for 32 more
        try:
            send(sinks[8], "x" * 10_000)
            outcome = "sent"
        except MessageError as error:
            outcome = str(error)
        for sink in sinks[:8]:
            sink.result()
        return [outcome, sinks[8].result()[0] == "x" * 10_000]
    """,
        max_queued_size="1MB",
    )
    assert outcome.value == ["sent", True]


def test_a_trace_function_in_the_task_loses_and_doubles_no_message(
    run_program: ProgramRunner,
) -> None:
    """A trace function runs between the lines of the guest's own code; these
    make a host call there (the host then takes the channel's records and starts
    them again): at every line, or just after a record was made ready."""
    outcome = run_program(
        TASKS
        + """
    import sys, time

    def at_every_line(frame):
        return True

    def after_a_record(frame):
        at = frame.f_locals.get("at")
        return bool(at) and at > 1 and sys.modules["capsule_guest"]._channel[at] == 1

    def tracer_calling(when):
        def each_line(frame, event, arg):
            if event == "line" and when(frame):
                time.time()  # a host call (a wall-clock step)
            return each_line

        def tracer(frame, event, arg):
            return each_line if "capsule_guest" in frame.f_code.co_filename else None

        return tracer

    @task(name="main")
    def main():
        sink = collect.spawn(16)
        for when in (at_every_line, after_a_record):
            send(sink, [when.__name__, 0])  # credit for the next ones
            sys.settrace(tracer_calling(when))
            for i in range(1, 8):
                send(sink, [when.__name__, i])
            sys.settrace(None)
        return sink.result()
    """
    )
    assert outcome.value == [
        [when, i] for when in ("at_every_line", "after_a_record") for i in range(8)
    ]


def test_time_sleep_is_a_host_sleep_and_lets_gathered_messages_go(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        receiver = stamp.spawn(2)
        capsule.sleep(0.2)
        started = time.monotonic()  # (a host call: it would take the channel's messages)
        send(receiver, "through the host")
        send(receiver, "through the channel")
        time.sleep(2)
        return [started, time.monotonic(), receiver.result()]
    """
    )
    started, finished, got = outcome.value
    assert finished - started >= 2
    assert got[1][0] == "through the channel"
    assert got[1][1] < started + 1, (started, got)
    assert any(e.type == "waiting" and e.on == "sleep" and e.task == "main" for e in outcome.events)


INTERRUPTED_READER = """
from capsule import receive, send, sleep, task

@task(max_retries=0)
def reader(n):
    sleep(1.0)  # the messages pile up: the next receive takes them all
    got = [receive(timeout=20).body]
    print("MARK got", got, flush=True)
    sleep(5)  # stopped here (a resume sleeps it again: it was not over)
    return got + [receive(timeout=5).body for _ in range(n - 1)]

@task(name="main", max_retries=0)
def main():
    reader_task = reader.spawn(5)
    for i in range(5):
        send(reader_task, i)
    return reader_task.result()
"""


def test_an_attempt_stopped_with_a_batch_in_hand_is_replayed_on_resume(tmp_path: Path) -> None:
    """Ctrl-C while a task holds messages it took in a batch: the messages go
    back as the attempt ends, but the attempt did not end for good: a resume
    replays it (its batch from the journal), and nothing is lost or redone."""
    program = tmp_path / "reader.py"
    program.write_text(INTERRUPTED_READER)
    printed, code = kill_at_marker(["run", str(program)], "MARK got", tmp_path, 0.5, signal.SIGINT)
    assert code == 130, printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    envelope = json.loads(resumed.stdout)
    assert envelope["result"] == [0, 1, 2, 3, 4], envelope


def test_a_replayed_batch_without_a_channel_loses_no_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed where an instance's memory cannot be read (no /proc/self/pagemap),
    a replayed batch's messages all go back if the attempt fails: the ones its
    code had taken may come again, none is lost."""
    from capsule.journal.session import resume_journaled
    from capsule.sandbox import prefault

    source = (
        TASKS
        + FLAKY_READER
        + """
    @task(name="main", max_retries=0)
    def main():
        reader = flaky_reader.spawn(4, "raise")
        for i in range(5):
            send(reader, i)
        return reader.result()
    """
    ).replace(
        'raise ValueError(f"failed after taking {first.body}")',
        'print("MARK took", flush=True)\n                capsule.sleep(5)\n'
        '                raise ValueError(f"failed after taking {first.body}")',
    )
    program = tmp_path / "reader.py"
    program.write_text("\n".join(line[4:] for line in source.splitlines()))
    printed, code = kill_at_marker(["run", str(program)], "MARK took", tmp_path, 0.5)
    assert code < 0, printed
    monkeypatch.setattr(prefault, "_kernel_can_release", lambda: False)
    monkeypatch.setattr(prefault, "_supported", lambda: False)
    events: list[Any] = []
    # (The replayed attempt sleeps its 5 s again: the sleep was not over.)
    report = resume_journaled(tmp_path / ".capsule" / "journal.db", None, False, events.append)
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == [0, 1, 2, 3]  # 0 came again


def _resumed(program: Path, source: str, *kills: tuple[str, signal.Signals]) -> Any:
    """Run ``source``, stop it at each (marker, signal) in turn (the first run,
    then resumes), then resume it to the end: its result."""
    program.write_text(textwrap.dedent(source))
    for number, (marker, sig) in enumerate(kills):
        args = ["run", str(program)] if number == 0 else ["resume", "--last"]
        printed, code = kill_at_marker(args, marker, program.parent, 0.5, sig)
        assert code in (130, -signal.SIGKILL), printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=program.parent)
    assert resumed.returncode == 0, resumed.stderr
    return json.loads(resumed.stdout)["result"]


def test_what_an_attempt_restarted_by_a_sibling_put_back_is_owed_after_a_kill(
    tmp_path: Path,
) -> None:
    """An attempt restarted because its sibling failed (one_for_all) ends with
    no event of its own that says so: what it put back is still owed."""
    source = """
    from capsule import current, receive, send, sleep, task

    @task(max_retries=3)
    def actor(n):
        if current().attempt == 1:
            sleep(1.0)  # the messages pile up: one batch
            receive(timeout=20)
            sleep(60)  # restarted here: its sibling failed
        print("MARK attempt", current().attempt, flush=True)
        sleep(3)  # killed here
        return [receive(timeout=5).body for _ in range(n - 1)]

    @task(max_retries=1)
    def failer():
        if current().attempt == 1:
            sleep(2.0)
            raise RuntimeError("boom")
        return "ok"

    @task(name="main", strategy="one_for_all", max_retries=0)
    def main():
        actor_task, failing = actor.spawn(5), failer.spawn()
        for i in range(5):
            send(actor_task, i)
        return [actor_task.result(), failing.result()]
    """
    result = _resumed(tmp_path / "siblings.py", source, ("MARK attempt 2", signal.SIGKILL))
    assert result == [[1, 2, 3, 4], "ok"]


def test_a_put_back_said_again_after_a_resume_counts_once(tmp_path: Path) -> None:
    """Ctrl-C puts back what an attempt held; replayed after the resume, it
    takes some of them and puts back the rest as it ends: only that last word
    counts (a later resume does not deliver what it took again)."""
    source = """
    from capsule import current, receive, send, sleep, task

    @task(max_retries=3)
    def actor():
        if current().attempt == 1:
            sleep(1.0)  # the messages pile up: one batch
            got = [receive(timeout=20).body]
            print("MARK took the first", flush=True)
            sleep(5)  # Ctrl-C here
            got += [receive(timeout=20).body, receive(timeout=20).body]
            raise RuntimeError(f"failed after taking {got}")
        print("MARK attempt 2", flush=True)
        sleep(3)  # kill -9 here
        out = []
        while True:
            try:
                out.append(receive(timeout=2).body)
            except Exception:
                return out

    @task(name="main", max_retries=0)
    def main():
        actor_task = actor.spawn()
        for i in range(5):
            send(actor_task, i)
        return actor_task.result()
    """
    result = _resumed(
        tmp_path / "twice.py",
        source,
        ("MARK took the first", signal.SIGINT),
        ("MARK attempt 2", signal.SIGKILL),
    )
    assert result == [3, 4]


def test_a_large_message_is_not_refused_for_room_merely_reserved(
    run_program: ProgramRunner,
) -> None:
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        stream, single = collect.spawn(41), collect.spawn(1)
        for i in range(40):
            send(stream, i)  # its credit grows: up to 32 places held
        send(single, "x" * 1_000_000)  # nothing else is queued in the run
        send(stream, "last")
        return [stream.result()[-1], len(single.result()[0])]
    """,
        max_queued_size="1MB",
    )
    assert outcome.value == ["last", 1_000_000]


def test_a_bad_timeout_is_refused_alike_with_credit_or_without(
    run_program: ProgramRunner,
) -> None:
    """A send on credit waits for nothing, but its timeout is checked as the
    host's send checks it: a replay (which has no credit) must do the same."""
    outcome = run_program(
        TASKS
        + """
    @task(name="main")
    def main():
        sink = collect.spawn(2)
        send(sink, 0)  # credit for the next ones
        errors = []
        for attempt in range(2):
            try:
                send(sink, 1, timeout=-1)
            except ValueError as error:
                errors.append(str(error))
        send(sink, 1)
        return [errors, sink.result()]
    """
    )
    errors, received = outcome.value
    assert len(errors) == 2 and "timeout must be >= 0" in errors[0]
    assert received == [0, 1]
