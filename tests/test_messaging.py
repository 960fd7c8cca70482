"""Messages between tasks: send, receive, ask/reply, named actors, mailbox
backpressure, size limits, timeouts, and cancellation of a blocked receiver."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capsule.actors.router import RoutingError
from capsule.sandbox import prefault
from tests.conftest import ProgramRunner

ACTORS = """
    import time
    import capsule
    from capsule import MessageError, ReceiveTimeout, SendTimeout, TaskError, ask, receive, send, task

    @task(compute="HIGH")
    def echo():
        while True:
            message = receive(timeout=10)
            if message.body == "stop":
                return "echo stopped"
            if message.expects_reply:
                message.reply({"echo": message.body, "from": message.sender})

    @task(compute="HIGH")
    def collect(n):
        return [receive().body for _ in range(n)]

    @task(compute="HIGH", max_retries=0)
    def mute():
        receive(timeout=30)
        return "got one, never replied"

    @task(compute="HIGH", max_retries=0)
    def slow_reader(n, pause):
        capsule.sleep(pause)
        return [receive().body for _ in range(n)]
"""


def test_ask_reply_round_trip_with_a_named_actor(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        actor = echo.spawn(name="echo")
        by_name = ask("echo", "hello")
        by_handle = ask(actor, [1, {"a": None}])
        by_id = ask(actor.id, 3.5)
        send("echo", "stop")
        return [by_name, by_handle, by_id, actor.result()]
    """
    )
    assert outcome.value == [
        {"echo": "hello", "from": "main"},
        {"echo": [1, {"a": None}], "from": "main"},
        {"echo": 3.5, "from": "main"},
        "echo stopped",
    ]
    sent = outcome.of_type("message_sent")
    assert [m.message_id for m in sent] == ["main#1", "main#2", "main#3", "main#4"]
    assert {m.target_id for m in sent} == {"main/1"}
    assert [m.expects_reply for m in sent] == [True, True, True, False]


def test_messages_arrive_in_order(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        collector = collect.spawn(50)
        for i in range(50):
            send(collector, i)
        return collector.result()
    """
    )
    assert outcome.value == list(range(50))


def test_strings_cross_the_boundary_unchanged(run_program: ProgramRunner) -> None:
    # The host lowers and lifts strings itself (one copy, GIL held): empty,
    # non-ASCII, NUL and large strings must come back exactly as sent.
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        bodies = ["", "héllo ✓ 日本 🎉", "a\\x00b", "x" * 300_000, {"ü": ["", None]}]
        actor = echo.spawn()
        echoed = [ask(actor, body)["echo"] for body in bodies]
        send(actor, "stop")
        actor.result()
        # JSON bodies cross as ASCII escapes; printed text crosses raw.
        print("héllo\\x00 ✓ 🎉", end="|", flush=True)
        print("", end="", flush=True)
        print("z" * 70_000, flush=True)
        return [echoed == bodies, [len(str(b)) for b in echoed]]
    """
    )
    assert outcome.value == [True, [0, 12, 3, 300_000, 17]]
    printed = "".join(e.text for e in outcome.of_type("output"))
    assert printed == "héllo\x00 ✓ 🎉|" + "z" * 70_000 + "\n"


def test_message_events_are_built_only_when_someone_takes_them(
    program: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsule.supervisor import messages
    from capsule.supervisor.events import EVENT_TYPES, MESSAGE_EVENT_TYPES
    from capsule.supervisor.program import RunRequest, run_program

    path = program(
        ACTORS
        + """
    @task(name="main")
    def main():
        collector = collect.spawn(3)
        for i in range(3):
            send(collector, i)
        return collector.result()
    """,
        "prog.py",
    )
    everything: list[Any] = []
    report = run_program(RunRequest(path=path, args=[]), everything.append)
    assert report.result is not None and report.result.value() == [0, 1, 2]
    kinds = [event.type for event in everything]
    assert kinds.count("message_sent") == 3 and kinds.count("message_received") == 3

    # Not merely filtered out on delivery: never built.
    built: list[str] = []
    for name in ("MessageSent", "MessageReceived"):
        model = getattr(messages, name)
        monkeypatch.setattr(
            messages, name, lambda *a, _model=model, **k: built.append(_model.__name__)
        )
    some: list[Any] = []
    wanted = EVENT_TYPES - MESSAGE_EVENT_TYPES
    report = run_program(RunRequest(path=path, args=[]), some.append, event_types=wanted)
    assert report.result is not None and report.result.value() == [0, 1, 2]
    assert built == []
    assert {event.type for event in some} <= wanted
    assert [e.type for e in some if e.type in ("started", "completed")] == [
        e.type for e in everything if e.type in ("started", "completed")
    ]


def test_only_waits_longer_than_the_grace_are_reported(run_program: ProgramRunner) -> None:
    # 40 asks to an echo: every ask waits for its reply and the echo waits for
    # every message, but for well under WAITING_GRACE_S; the sleeps are longer.
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        actor = echo.spawn()
        for i in range(40):
            ask(actor, i)
        send(actor, "stop")
        capsule.sleep(0.05)
        return actor.result()
    """
    )
    assert outcome.value == "echo stopped"
    waits = outcome.of_type("waiting")
    assert [e.on for e in waits].count("sleep") == 1
    assert len(waits) < 20, [e.on for e in waits]  # 81 waits were reported before
    resumed = outcome.of_type("resumed")
    assert len(resumed) == len(waits)


def test_receive_timeout(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        started = time.monotonic()
        try:
            receive(timeout=0.2)
        except ReceiveTimeout as error:
            return [type(error).__name__, isinstance(error, TimeoutError), str(error),
                    time.monotonic() - started]
    """
    )
    name, is_timeout, message, seconds = outcome.value
    assert (name, is_timeout, message) == ("ReceiveTimeout", True, "no message arrived within 0.2s")
    assert 0.2 <= seconds < 2.0


def test_full_mailbox_makes_send_wait_then_time_out(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        reader = slow_reader.spawn(6, 0.5)
        started = time.monotonic()
        for i in range(4):          # capacity 3: the 4th send waits for the reader
            send(reader, i)
        waited = time.monotonic() - started
        for i in range(4, 6):
            send(reader, i)
        blocked = slow_reader.spawn(1, 30)
        for i in range(3):
            send(blocked, i)
        try:
            send(blocked, 99, timeout=0.2)
        except SendTimeout as error:
            timed_out = str(error)
        blocked.cancel()
        return {"waited": waited, "got": reader.result(), "timed_out": timed_out}
    """,
        mailbox_capacity=3,
    )
    result = outcome.value
    assert result["got"] == [0, 1, 2, 3, 4, 5]
    assert result["waited"] >= 0.4  # the 4th send waited for the reader to start
    assert "stayed full (3 messages) for 0.2s" in result["timed_out"]
    assert any(e.type == "waiting" and e.on == "send" for e in outcome.events)


def test_the_runs_queued_messages_are_bounded_in_size_across_mailboxes(
    run_program: ProgramRunner,
) -> None:
    """Mailboxes that each have room can still not make the host hold more than
    --max-queued-size of undelivered messages: a send over it is refused at once,
    naming the mailbox that holds the most; once received, there is room again."""
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        chunk = "x" * 300_000
        hoarder = slow_reader.spawn(3, 0.5)
        other = slow_reader.spawn(1, 0.5)
        for _ in range(3):
            send(hoarder, chunk)     # 900 KB waiting, in a mailbox with room for 1000
        try:
            send(other, chunk)
        except MessageError as error:
            refused = [error.kind, str(error)]
        got = len("".join(hoarder.result()))
        send(other, chunk)           # received: room again
        return {"refused": refused, "got": got, "other": len(other.result()[0])}
    """,
        max_queued_size="1MB",
    )
    result = outcome.value
    assert result["got"] == 900_000 and result["other"] == 300_000
    kind, message = result["refused"]
    assert kind == "queue_full"
    assert (
        "a message of 300,002 bytes would take the run's messages not yet received over "
        "1,048,576 bytes (the run option max_queued_size); the most wait for task main/1 (900,006 bytes "
        "in its mailbox)"
    ) in message


def test_router_counts_queued_bytes_back_down() -> None:
    """Received, and dropped with a mailbox that closed: the count goes back to
    zero. Bodies are counted in bytes, not characters."""
    from capsule.actors.router import Message, Router

    class Sender:
        def wake(self) -> None:
            return None

    router = Router(mailbox_capacity=10, max_queued_bytes=10)
    sender = Sender()
    for task_id in ("a", "b"):
        router.open(task_id)
    assert router.try_send("a", Message("1", "s", "123456"), sender)
    with pytest.raises(RoutingError, match=r"the most wait for task a \(6 bytes"):
        router.try_send("b", Message("2", "s", "123456"), sender)  # 12 > 10
    assert len(router.try_receive("a", sender)) == 1 and router.queued_bytes() == 0
    assert router.try_send("b", Message("2", "s", '"ééé"'), sender)  # 8 bytes, 5 characters
    assert router.queued_bytes() == 8
    router.close("b")  # its message was never received: dropped
    assert router.queued_bytes() == 0
    assert router.try_send("a", Message("3", "s", "1234567890"), sender)


def test_message_size_limit(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        actor = echo.spawn()
        try:
            send(actor, "x" * 2000)
        except MessageError as error:
            refused = [error.kind, str(error)]
        fits = ask(actor, "y" * 100)
        send(actor, "stop")
        return [refused, len(fits["echo"])]
    """,
        max_message_size="1KB",
    )
    refused, fitted = outcome.value
    assert refused[0] == "too_large"
    assert "a message of 2,002 bytes (as JSON) exceeds the limit of 1,024 bytes" in refused[1]
    assert fitted == 100


def test_unknown_target_taken_name_and_bad_replies(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task
    def double_reply():
        message = receive()
        message.reply(1)
        try:
            message.reply(2)
        except MessageError as error:
            return error.kind

    @task(name="main")
    def main():
        errors = {}
        try:
            send("nobody", 1)
        except MessageError as error:
            errors["unknown"] = [error.kind, str(error)]
        first = echo.spawn(name="dup")
        try:
            echo.spawn(name="dup")
        except TaskError as error:
            errors["taken"] = error.message
        replier = double_reply.spawn()
        errors["first_reply"] = ask(replier, "q")
        errors["second_reply"] = replier.result()
        send(first, "stop")
        return errors
    """
    )
    errors = outcome.value
    assert errors["unknown"] == [
        "no_such_actor",
        "no live task has the id or registered name 'nobody'",
    ]
    assert errors["taken"] == "the name 'dup' is already registered to task main/1"
    assert errors["first_reply"] == 1
    assert errors["second_reply"] == "already_replied"


def test_ask_an_actor_that_ends_without_replying(run_program: ProgramRunner) -> None:
    outcome = run_program(
        ACTORS
        + """
    @task(name="main")
    def main():
        actor = mute.spawn()
        try:
            ask(actor, "anyone?", timeout=20)
        except MessageError as error:
            return [error.kind, str(error), actor.result()]
    """
    )
    kind, message, result = outcome.value
    assert kind == "actor_ended"
    assert message == "main/1 ended without replying"
    assert result == "got one, never replied"


def test_after_a_resume_a_reply_may_come_before_the_ask_is_made_again() -> None:
    """A replayed replier can answer before the replayed asker asks again: the
    router keeps the reply for it (and the answers given before the resume)."""
    from capsule.actors.router import Router

    class Nobody:
        def wake(self) -> None:
            return None

    router = Router(mailbox_capacity=10, max_queued_bytes=2**28)
    router.allow_early_replies(
        {"main#1": "main/1", "main#2": "main/1"}, {"main#2": '"given before"'}
    )
    with pytest.raises(RoutingError):  # only the task asked may reply
        router.reply("main#1", "main/2", '"forged"')
    router.reply("main#1", "main/1", '"early"')  # before the ask: kept
    router.expect_reply("main#1", Nobody(), "main/1")
    assert router.take_reply("main#1") == ('"early"', None)
    router.expect_reply("main#2", Nobody(), "main/1")
    assert router.take_reply("main#2") == ('"given before"', None)
    with pytest.raises(RoutingError):  # any other message still needs its ask
        router.reply("main#3", "main/1", "1")


def test_bodies_cross_as_json_dumps_writes_them_and_bad_ones_are_refused(
    run_program: ProgramRunner,
) -> None:
    """The guest encodes and decodes messages without json's Python layers: the
    text must be json.dumps' own, every value must come back equal, and a body
    json cannot write (or the host would refuse: NaN, Infinity, a lone
    surrogate) must fail as json.dumps does, naming the target."""
    outcome = run_program(
        ACTORS
        + """
    import json
    import capsule_guest

    VALUES = [
        0, -7, 2**70, 1.5, -0.0, 1e300, True, False, None, "", "plain",
        "quote \\" backslash \\\\ newline \\n nul \\x00 é 漢 😀", [], {}, [1, [2, [3]]],
        {"a": {"b": [None, 1.25, "x"]}, "k": [True, {"": 0}]}, (1, "tuple"),
    ]

    @task(name="main")
    def main():
        differ = [
            repr(v) for v in VALUES if capsule_guest._dumps(v) != json.dumps(v, allow_nan=False)
        ]
        texts = [json.dumps(v) for v in VALUES] + ['{"id": "x#1", "body": [1, {"a": null}]}']
        misread = [t for t in texts if capsule_guest._loads(t) != json.loads(t)]
        actor = echo.spawn(name="echo")
        echoed = [ask(actor, value)["echo"] for value in VALUES]
        refusals = []
        loop = []
        loop.append(loop)
        for bad in ({1, 2}, loop, object(), float("nan"), [float("-inf")], {"k": "\\ud800"}):
            try:
                send(actor, bad)
            except (TypeError, ValueError) as exc:
                refusals.append(f"{type(exc).__name__}: {exc}")
        # A refusal deep inside containers must not poison later messages (the
        # guest keeps one encoder, whose cycle markers such a failure leaves).
        mended = [{"k": [1]}, {3}]
        try:
            send(actor, mended)
        except TypeError:
            mended.pop()  # now it can be sent, and is not a cycle
        later = [ask(actor, mended)["echo"] for _ in range(2)]
        send(actor, "stop")
        return {
            "differ": differ, "misread": misread, "echoed": echoed, "refusals": refusals,
            "later": later,
        }
    """
    )
    value = outcome.value
    assert value["differ"] == [] and value["misread"] == []
    expected = [
        0, -7, 2**70, 1.5, -0.0, 1e300, True, False, None, "", "plain",
        "quote \" backslash \\ newline \n nul \x00 é 漢 😀", [], {}, [1, [2, [3]]],
        {"a": {"b": [None, 1.25, "x"]}, "k": [True, {"": 0}]}, [1, "tuple"],
    ]  # fmt: skip
    assert value["echoed"] == expected
    assert [type(v) for v in value["echoed"]] == [type(v) for v in expected]
    assert len(value["refusals"]) == 6
    assert all("not JSON-serializable" in text for text in value["refusals"]), value
    assert "Circular reference" in value["refusals"][1]
    assert "Out of range float values" in value["refusals"][3]
    assert "lone surrogate" in value["refusals"][5]
    assert value["later"] == [[{"k": [1]}]] * 2


def test_a_wakeup_that_comes_before_the_wait_is_kept_and_wakeups_do_not_pile_up() -> None:
    """A receiver checks its mailbox, then waits: a message arriving between the
    two must end the wait at once (a lost wake-up would stall the receiver)."""
    import threading
    import time

    from capsule.sandbox.engine import Invocation, Limits, RefusingHost
    from capsule.supervisor.tree import Attempt, Node, Scope

    limits = Limits(fuel=1, ram_bytes=1, timeout_s=None)
    invocation = Invocation("t", "t", 1, 1, limits, host=RefusingHost())
    attempt = Attempt(invocation=invocation, node=Node("t"), scope=Scope(None, "t", invocation))

    def waited(timeout: float) -> float:
        started = time.monotonic()
        attempt.wait_for_wakeup(timeout)
        return time.monotonic() - started

    attempt.wake()  # before the wait: pending
    assert waited(5.0) < 1.0
    attempt.wake()
    attempt.wake()  # two wake-ups before one wait: one pending, not two
    assert waited(5.0) < 1.0
    assert waited(0.1) >= 0.09  # nothing pending: the wait runs its course
    waker = threading.Timer(0.05, attempt.wake)
    waker.start()
    assert waited(5.0) < 1.0  # woken while waiting
    waker.join()


def test_output_without_a_newline_is_shown_before_a_receive_waits(
    run_program: ProgramRunner,
) -> None:
    """Output still buffered in the guest (no newline yet) reaches the host
    before the task waits for a message, on both streams; a stream the program
    put in place of stdout is flushed too, not skipped."""
    outcome = run_program(
        ACTORS
        + """
    import contextlib
    import io
    import sys

    class Counting(io.StringIO):
        flushes = 0

        def flush(self):
            Counting.flushes += 1

    @task(name="main")
    def main():
        print("partial out", end="")
        print("partial err", end="", file=sys.stderr)
        try:
            receive(timeout=0.2)
        except ReceiveTimeout:
            pass
        with contextlib.redirect_stdout(Counting()):
            try:
                receive(timeout=0.01)
            except ReceiveTimeout:
                pass
        return Counting.flushes
    """
    )
    assert outcome.value >= 1
    seen = [(e.type, getattr(e, "text", getattr(e, "on", None))) for e in outcome.events]
    waited = seen.index(("waiting", "receive"))
    assert ("output", "partial out") in seen[:waited]
    assert ("output", "partial err") in seen[:waited]


@pytest.mark.parametrize("core", ["threads", "async"])
@pytest.mark.parametrize("hibernate_after", [0.05, "off"])
def test_an_idle_actor_hibernates_and_answers_from_its_state(
    program: Callable[..., Path], hibernate_after: float | str, core: str
) -> None:
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program
    from capsule.supervisor.run import Run

    path = program(
        """
        import capsule
        from capsule import ask, receive, task

        @task(compute="HIGH")
        def keeper(n):
            table = {i: i * i for i in range(n)}
            while True:
                message = receive()
                message.reply(sum(table[i] for i in message.body))

        @task(name="main")
        def main():
            handle = keeper.spawn(5000)
            first = ask(handle, [1, 2, 3])
            capsule.sleep(0.4)  # the keeper waits in receive meanwhile
            return [first, ask(handle, list(range(5000)))]
        """
    )
    hibernated: list[tuple[str, int]] = []

    def watch(run: Run) -> None:
        # Which task thread hibernated, and what it gave back (the real thing
        # runs). (The async core has no task threads: its events say which.)
        hibernate = run.sandbox.hibernate

        def hibernate_and_note() -> int:
            released = hibernate()
            hibernated.append((threading.current_thread().name, released))
            return released

        run.sandbox.hibernate = hibernate_and_note  # type: ignore[method-assign]

    events: list[Any] = []
    report = run_program(
        RunRequest(
            path=path, args=[], options=RunOptions(hibernate_after=hibernate_after, core=core)
        ),
        events.append,
        on_run=watch if core == "threads" else None,
    )
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == [14, sum(i * i for i in range(5000))]
    reported = [(e.task_id, e.released_bytes) for e in events if e.type == "hibernated"]
    if hibernate_after == "off":
        assert hibernated == [] and reported == []
    elif core == "threads":
        keeper = [released for thread, released in hibernated if thread.endswith("main/1")]
        assert keeper, hibernated  # it waited in receive for 0.4 s
        if prefault._kernel_can_release():
            assert keeper[0] > 1024**2, hibernated
            # Reported as a typed event, with what it gave back.
            assert ("main/1", keeper[0]) in reported, reported
    elif prefault._kernel_can_release():
        keeper = [released for task_id, released in reported if task_id == "main/1"]
        assert keeper and keeper[0] > 1024**2, reported  # it waited in receive for 0.4 s


def test_actors_hibernating_while_others_run_keep_their_state(
    program: Callable[..., Path], mappings_by: str
) -> None:
    # Many instances hibernating (at every wait over 0.03 s) while the others
    # write their memory: each actor's state must come through every release
    # intact (its sums are checked after each round), and each hibernates in
    # (nearly) every round. (Which mapping a release picks is checked in
    # test_prefault.py: a release of another instance's pages would only show
    # here if that one wrote a page in the microseconds between.)
    from capsule.supervisor.options import RunOptions
    from capsule.supervisor.program import RunRequest, run_program
    from capsule.supervisor.run import Run

    path = program(
        """
        import capsule
        from capsule import task

        @task(compute="HIGH")
        def keeper(job):
            seed, rounds = job
            table = {i: (i * seed) % 7919 for i in range(4000)}
            sums = []
            for r in range(rounds):
                capsule.sleep(0.05)  # hibernates after 0.03 s
                for i in range(0, 4000, 3):
                    table[i] = (table[i] + r + seed) % 7919
                sums.append(sum(table.values()))
            return sums

        def expected(seed, rounds):
            table = {i: (i * seed) % 7919 for i in range(4000)}
            sums = []
            for r in range(rounds):
                for i in range(0, 4000, 3):
                    table[i] = (table[i] + r + seed) % 7919
                sums.append(sum(table.values()))
            return sums

        @task(name="main", timeout="2m")
        def main(actors=16, rounds=8):
            got = keeper.map([[seed, rounds] for seed in range(1, actors + 1)])
            return [g == expected(seed, rounds) for seed, g in zip(range(1, actors + 1), got)]
        """
    )
    runs: list[Run] = []
    report = run_program(
        RunRequest(path=path, args=[], options=RunOptions(hibernate_after=0.03)),
        lambda _: None,
        on_run=runs.append,
    )
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == [True] * 16
    if prefault._kernel_can_release():
        assert runs[0].sandbox.prefaulter.released >= 64, runs[0].sandbox.prefaulter.released
