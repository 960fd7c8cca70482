"""Host calls that wait, run by continuation: a wait is checked at once, then
again at each wake-up of its attempt and when its timers fire (its timeout,
its attempt's deadline), awaited on the run's event loop (RunLoop); it ends
once, with its
answer handed to a callback, as an async import's Pending would take it.
The same waits are run with real wasm: a run whose host calls' waits go
through the continuation driver while its task threads wait for the answer."""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox import after_import
from capsule.sandbox.config import Limits
from capsule.sandbox.engine import Invocation, RefusingHost
from capsule.supervisor.continuations import Continuations
from capsule.supervisor.events import EventStream
from capsule.supervisor.journaled import JournaledSteps
from capsule.supervisor.live import LiveTree
from capsule.supervisor.options import RunOptions
from capsule.supervisor.program import RunRequest, run_program
from capsule.supervisor.run import Run
from capsule.supervisor.run_loop import RunLoop
from capsule.supervisor.steps import NoStepLog, Request, Step
from capsule.supervisor.tree import Attempt, Child, Node, Scope
from capsule.supervisor.waits import Answer, Wait, Waiting, never
from tests.conftest import LocalServer

#: How long a test waits for what must happen (a bound against hanging, not a
#: figure it asserts).
PATIENCE_S = 30.0


class FakePoller:
    """Stands in for the async core: takes each host call's answer as an async
    import's Pending would (its resolve), from whichever thread gives it."""

    def __init__(self) -> None:
        self.answers: list[Answer | BaseException] = []
        self.threads: list[int] = []
        self._arrived = threading.Condition()

    def resolve(self, answer: Answer | BaseException) -> None:
        with self._arrived:
            self.answers.append(answer)
            self.threads.append(threading.get_ident())
            self._arrived.notify_all()

    def wait_for(self, count: int) -> list[Answer | BaseException]:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.answers) >= count, PATIENCE_S)
            return list(self.answers)


@pytest.fixture
def timers() -> Iterator[RunLoop]:
    service = RunLoop("capsule-loop test")
    service.start()
    yield service
    service.close()
    assert service.failures == []


@pytest.fixture
def events() -> tuple[EventStream, list[Any]]:
    stream = EventStream()
    seen: list[Any] = []
    stream.subscribe(seen.append)
    return stream, seen


@pytest.fixture
def driver(timers: RunLoop, events: tuple[EventStream, list[Any]]) -> Continuations:
    return Continuations(timers, events[0], "run", lambda task_id: None)


def make_attempt(
    tree: LiveTree | None = None, timeout_s: float | None = None, task_id: str = "main"
) -> Attempt:
    """A running attempt as the tree sees it (no instance: the waits here
    need none)."""
    root = tree.root if tree is not None else Scope(None, task_id="")
    scope = Scope(root, task_id)
    invocation = Invocation(
        task_id=task_id,
        task="worker",
        attempt=1,
        max_attempts=1,
        limits=Limits(fuel=1, ram_bytes=1, timeout_s=timeout_s),
        host=RefusingHost(),
        within=scope,
    )
    scope.invocation = invocation
    attempt = Attempt(invocation, Node(task_id), scope)
    if tree is not None:
        tree.attempts[invocation] = attempt
    return attempt


def assert_set(event: threading.Event) -> None:
    assert event.wait(PATIENCE_S)


class Finishes:
    """A wait's finish that records how it was called."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, ready: bool) -> Answer:
        self.calls.append(ready)
        return (True, '"ready"') if ready else (False, '"over"')


def test_a_wait_ready_at_once_is_answered_on_the_calling_thread(
    driver: Continuations, timers: RunLoop, events: tuple[EventStream, list[Any]]
) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    finish = Finishes()
    driver.run(Wait(attempt, "receive", lambda: True, finish, timeout=5), poller.resolve)
    # Given before run returned, on this thread, with no timer set and nothing reported.
    assert poller.answers == [(True, '"ready"')]
    assert poller.threads == [threading.get_ident()]
    assert finish.calls == [True]
    assert attempt.waker is None
    assert events[1] == []


def test_an_answer_that_needs_no_wait_goes_straight_through(driver: Continuations) -> None:
    poller = FakePoller()
    driver.run((False, '{"kind": "refused"}'), poller.resolve)
    assert poller.answers == [(False, '{"kind": "refused"}')]


def test_a_wait_ends_once_a_wake_up_finds_it_ready(
    driver: Continuations, events: tuple[EventStream, list[Any]]
) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    finish = Finishes()
    arrived: list[str] = []
    driver.run(Wait(attempt, "receive", lambda: bool(arrived), finish), poller.resolve)
    assert poller.answers == [] and attempt.waker is not None
    attempt.wake()  # a wake-up that changes nothing: it waits on
    arrived.append("a message")
    attempt.wake()
    assert poller.wait_for(1) == [(True, '"ready"')]
    assert finish.calls == [True]
    assert attempt.waker is None  # unhooked: later wake-ups go nowhere
    attempt.wake()
    # Reported (if it lasted long enough to be) as waiting, then resumed: in pairs.
    kinds = [event.type for event in events[1]]
    assert kinds in ([], ["waiting", "resumed"])


def test_a_wait_times_out_reported_waiting_on_what_it_waited_for(
    driver: Continuations, events: tuple[EventStream, list[Any]]
) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    finish = Finishes()
    driver.run(Wait(attempt, "sleep", never, finish, timeout=0.05), poller.resolve)
    assert poller.wait_for(1) == [(False, '"over"')]
    assert finish.calls == [False]
    # Reported waiting first (its report falls due before its timeout), then resumed.
    assert [event.type for event in events[1]] == ["waiting", "resumed"]
    assert events[1][0].on == "sleep" and events[1][0].task_id == "main"
    assert attempt.invocation.check_stop() is None  # it timed out; it need not stop


def test_a_stopped_task_ends_its_wait(driver: Continuations) -> None:
    tree = LiveTree()
    attempt = make_attempt(tree)
    poller = FakePoller()
    finish = Finishes()
    driver.run(Wait(attempt, "receive", never, finish), poller.resolve)
    tree.cancel(tree.root, "cancelled: the run was stopped")  # wakes those that must stop
    assert poller.wait_for(1) == [(False, '"over"')]
    assert finish.calls == [False]
    assert attempt.invocation.check_stop() == "cancelled"


def test_cancelling_an_attempts_children_tells_each_watcher_once() -> None:
    # (One round of wake-ups for all of them: one round each went through
    # every watcher again, the square of their number for thousands of actors.)
    tree = LiveTree()
    parent = make_attempt(tree)
    told: Counter[int] = Counter()
    for number in range(50):
        scope = Scope(parent.scope, "main")
        child = Child(f"main/{number}", "worker", scope, link=False, parent_attempt=parent)
        parent.children[child.task_id] = child
        tree.watch(child, scope, lambda number=number: told.update([number]))  # type: ignore[misc]
    parent.children["main/0"].done.set()  # ended: not cancelled
    tree.cancel_children(parent, "cancelled: its parent ended")
    assert told == Counter(range(1, 50))
    assert not parent.children["main/0"].scope.cancelled
    assert parent.children["main/7"].scope.cancel_message == "cancelled: its parent ended"


def test_a_deadline_ends_a_wait_without_a_timeout(driver: Continuations) -> None:
    attempt = make_attempt(timeout_s=0.05)
    poller = FakePoller()
    finish = Finishes()
    driver.run(Wait(attempt, "result", never, finish), poller.resolve)
    assert poller.wait_for(1) == [(False, '"over"')]
    assert attempt.invocation.check_stop() == "timeout"


def test_a_parents_deadline_ends_its_childs_wait(driver: Continuations) -> None:
    parent = make_attempt(timeout_s=0.05)
    child_scope = Scope(parent.scope, "main")
    invocation = Invocation(
        task_id="main/1",
        task="worker",
        attempt=1,
        max_attempts=1,
        limits=Limits(fuel=1, ram_bytes=1, timeout_s=None),
        host=RefusingHost(),
        within=child_scope,
    )
    child = Attempt(invocation, Node("main/1"), Scope(child_scope, "main/1", invocation))
    poller = FakePoller()
    driver.run(Wait(child, "receive", never, Finishes()), poller.resolve)
    assert poller.wait_for(1) == [(False, '"over"')]
    assert invocation.check_stop() == "cancelled"


def test_a_wait_until_ready_outlasts_its_tasks_stop_and_starts_what_it_waits_for(
    driver: Continuations,
) -> None:
    tree = LiveTree()
    attempt = make_attempt(tree)
    poller = FakePoller()
    finish = Finishes()
    started: list[threading.Thread] = []
    ended = threading.Event()

    def start() -> None:  # as a direct call starts its child, ending with a wake
        def child() -> None:
            assert ended.wait(PATIENCE_S)
            attempt.wake()

        started.append(threading.Thread(target=child))
        started[0].start()

    wait = Wait(attempt, "result", ended.is_set, finish, until_ready=True, start=start)
    driver.run(wait, poller.resolve)
    assert len(started) == 1
    tree.cancel(tree.root, "cancelled")
    # Its task must stop, but what it waits for still runs: it waits on, and
    # its deadline or stop never ends it (only a wake-up that finds it ready).
    checked = threading.Event()
    driver.timers.soon(checked.set)  # (after the check the cancellation queued)
    assert checked.wait(PATIENCE_S)
    assert poller.answers == []
    ended.set()
    assert poller.wait_for(1) == [(True, '"ready"')]
    started[0].join()


@contextmanager
def _serving() -> Iterator[None]:
    """As a poll thread serves one import: the work deferred in the block
    runs after it (after_import.begin and end)."""
    queue = after_import.begin()
    try:
        yield
    finally:
        if queue is not None:
            after_import.end(queue)


def test_a_wait_woken_by_a_thread_serving_no_import_is_checked_on_the_runs_loop(
    driver: Continuations,
) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    arrived: list[bool] = []
    checked_on_loop: list[bool] = []

    def ready() -> bool:
        if arrived:
            checked_on_loop.append(driver.timers.on_loop())
        return bool(arrived)

    driver.run(Wait(attempt, "receive", ready, Finishes(), timeout=60), poller.resolve)
    arrived.append(True)
    attempt.wake()
    assert poller.wait_for(1) == [(True, '"ready"')]
    assert checked_on_loop == [True]


def test_a_wait_woken_by_an_import_is_checked_on_its_thread_once_the_import_returned(
    driver: Continuations,
) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    router = threading.Lock()
    arrived: list[bool] = []
    checked: list[tuple[int, bool]] = []

    def ready() -> bool:
        if arrived:
            checked.append((threading.get_ident(), router.locked()))
        return bool(arrived)

    driver.run(Wait(attempt, "receive", ready, Finishes(), timeout=60), poller.resolve)
    with _serving():
        with router:  # (as a send wakes its receiver: holding the router's lock)
            arrived.append(True)
            attempt.wake()
        assert checked == []
    assert poller.answers == [(True, '"ready"')]
    assert checked == [(threading.get_ident(), False)]


def test_a_wait_answered_before_its_lazy_start_gets_no_task_on_the_loop(
    driver: Continuations, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    start_soon = driver.timers.start_soon

    def recorded(task: Callable[[], Any], name: str) -> None:
        started.append(name)
        start_soon(task, name)

    monkeypatch.setattr(driver.timers, "start_soon", recorded)
    # (The loop is held meanwhile: however slow this thread, no sweep comes first.)
    go = threading.Event()
    driver.timers.soon(lambda: assert_set(go))
    quick, slow = make_attempt(task_id="quick"), make_attempt(task_id="slow")
    poller = FakePoller()
    arrived: list[bool] = []
    driver.run(Wait(quick, "receive", lambda: bool(arrived), Finishes()), poller.resolve)
    driver.run(Wait(slow, "receive", never, Finishes(), timeout=60), poller.resolve)
    with _serving():
        arrived.append(True)
        quick.wake()
    assert poller.answers == [(True, '"ready"')]
    go.set()
    swept = threading.Event()
    driver.later(swept.set)  # (after the waits' own: they run in the order they came)
    assert swept.wait(PATIENCE_S)
    assert started == ["capsule-wait slow"]


def test_a_finish_may_make_the_next_wait_of_the_same_call(driver: Continuations) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    room: list[bool] = []
    replied: list[bool] = []

    def sent(ready: bool) -> Waiting:  # as an ask: room in the mailbox, then its reply
        assert ready
        return Wait(attempt, "receive", lambda: bool(replied), lambda r: (r, '"reply"'))

    driver.run(Wait(attempt, "send", lambda: bool(room), sent), poller.resolve)
    room.append(True)
    attempt.wake()
    replied.append(True)
    attempt.wake()
    assert poller.wait_for(1) == [(True, '"reply"')]


def test_what_a_check_raises_fails_the_call_not_the_loop(
    driver: Continuations, timers: RunLoop
) -> None:
    attempt = make_attempt()
    poller = FakePoller()
    broken: list[bool] = []

    def ready() -> bool:
        if broken:
            raise ValueError("a bug in ready")
        return False

    driver.run(Wait(attempt, "receive", ready, Finishes()), poller.resolve)
    broken.append(True)
    attempt.wake()
    (answer,) = poller.wait_for(1)
    assert isinstance(answer, ValueError)
    assert attempt.waker is None
    assert timers.failures == []


def test_many_waits_share_the_runs_one_loop_thread(driver: Continuations, timers: RunLoop) -> None:
    poller = FakePoller()
    timed: list[Attempt] = []
    woken: list[tuple[Attempt, list[bool]]] = []
    for index in range(300):
        attempt = make_attempt(task_id=f"main/{index}")
        if index % 2:
            driver.run(
                Wait(attempt, "sleep", never, Finishes(), timeout=0.001 * (index % 40)),
                poller.resolve,
            )
            timed.append(attempt)
        else:
            flag: list[bool] = []
            driver.run(Wait(attempt, "receive", lambda f=flag: bool(f), Finishes()), poller.resolve)
            woken.append((attempt, flag))
    for attempt, flag in woken:
        flag.append(True)
        attempt.wake()
    answers = poller.wait_for(300)
    assert sorted(answers) == [(False, '"over"')] * 150 + [(True, '"ready"')] * 150
    # Those that waited were answered on the loop's one thread
    # (a timeout of 0 is over at once, on the caller's).
    assert len(set(poller.threads) - {threading.get_ident()}) == 1
    assert all(attempt.waker is None for attempt in timed)


def test_concurrent_wake_ups_never_lose_a_wait_nor_finish_one_twice(
    driver: Continuations,
) -> None:
    """Waits that take what they wait for (as a receive takes a message), each
    woken from many threads at once while what they wait for comes: each ends
    exactly once, its ready() never runs on two threads at once nor after it
    held, and no wake-up is lost (every wait ends)."""
    waits = 200
    poller = FakePoller()
    overlaps: list[str] = []
    finished: dict[str, list[bool]] = {}
    tokens: dict[str, list[int]] = {}
    attempts: list[Attempt] = []

    for index in range(waits):
        attempt = make_attempt(task_id=f"main/{index}")
        task_id = attempt.invocation.task_id
        tokens[task_id] = []
        finished[task_id] = []
        checking = threading.Lock()
        held: list[bool] = []

        def ready(
            task_id: str = task_id, checking: threading.Lock = checking, held: list[bool] = held
        ) -> bool:
            if not checking.acquire(blocking=False):
                overlaps.append(f"{task_id}: checked on two threads at once")
                return False
            try:
                if held:
                    overlaps.append(f"{task_id}: checked after it held")
                if tokens[task_id]:
                    tokens[task_id].pop()  # (takes it, as a receive takes a message)
                    held.append(True)
                    return True
                return False
            finally:
                checking.release()

        def finish(ok: bool, task_id: str = task_id) -> Answer:
            finished[task_id].append(ok)
            return True, task_id

        driver.run(Wait(attempt, "receive", ready, finish), poller.resolve)
        attempts.append(attempt)

    go = threading.Barrier(8)

    def wake_randomly(seed: int) -> None:
        chooser = random.Random(seed)
        go.wait()
        for _ in range(3000):
            chooser.choice(attempts).wake()

    def deliver() -> None:
        go.wait()
        for attempt in attempts:
            tokens[attempt.invocation.task_id].append(1)
            attempt.wake()

    threads = [threading.Thread(target=wake_randomly, args=(seed,)) for seed in range(7)]
    threads.append(threading.Thread(target=deliver))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers = poller.wait_for(waits)
    assert overlaps == []
    assert sorted(answers) == sorted((True, a.invocation.task_id) for a in attempts)
    assert all(calls == [True] for calls in finished.values())
    assert all(a.waker is None for a in attempts)


def test_the_loop_runs_callbacks_in_time_order_and_stops(timers: RunLoop) -> None:
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    timers.at(now + 0.03, lambda: ran.append("third"))
    cancelled = timers.at(now + 0.02, lambda: ran.append("cancelled"))
    timers.at(now + 0.01, lambda: ran.append("second"))
    timers.soon(lambda: ran.append("first"))
    timers.at(now + 0.04, done.set)
    cancelled.cancel()
    assert done.wait(PATIENCE_S)
    assert ran == ["first", "second", "third"]
    timers.close()
    with pytest.raises(RuntimeError, match="stopped"):
        timers.soon(lambda: None)


class RecordingLog(NoStepLog):
    """A journal that keeps the steps it is given."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, str, bool, str]] = []

    def step(
        self,
        task_id: str,
        attempt: int,
        number: int,
        kind: str,
        request: Request,
        ok: bool,
        answer: str,
        durable: bool = False,
        unredacted: str | None = None,
    ) -> None:
        self.steps.append((task_id, number, kind, ok, answer))


def journaled_steps(tree: LiveTree, log: RecordingLog) -> JournaledSteps:
    return JournaledSteps(tree, log, True, "run", 1 << 20, 1 << 30, recorded=0)


def test_a_step_whose_wait_runs_by_continuation_is_journaled_before_it_is_answered(
    driver: Continuations,
) -> None:
    tree = LiveTree()
    attempt = make_attempt(tree)
    log = RecordingLog()
    journal = journaled_steps(tree, log)
    journaled_when_answered: list[int] = []
    poller = FakePoller()

    def answered(answer: Answer | BaseException) -> None:
        journaled_when_answered.append(len(log.steps))
        poller.resolve(answer)

    arrived: list[str] = []

    def receive() -> Waiting:
        return Wait(attempt, "receive", lambda: bool(arrived), lambda ok: (ok, f'"{arrived[0]}"'))

    journal.step_later(attempt.invocation, "receive", "", receive, driver.run, answered)
    assert poller.answers == [] and log.steps == []
    arrived.append("hello")
    attempt.wake()
    assert poller.wait_for(1) == [(True, '"hello"')]
    assert log.steps == [("main", 1, "receive", True, '"hello"')]
    assert journaled_when_answered == [1]


def test_a_replayed_step_is_answered_from_the_journal_without_waiting(
    driver: Continuations,
) -> None:
    tree = LiveTree()
    attempt = make_attempt(tree)
    attempt.replay.append(Step("receive", "", True, '"from the journal"'))
    log = RecordingLog()
    poller = FakePoller()

    def live() -> Waiting:
        raise AssertionError("a replayed step is not performed")

    journaled_steps(tree, log).step_later(
        attempt.invocation, "receive", "", live, driver.run, poller.resolve
    )
    assert poller.answers == [(True, '"from the journal"')]
    assert log.steps == []


def test_cancelled_timers_let_go_of_what_their_callbacks_hold(timers: RunLoop) -> None:
    """A wait with a long timeout that ended early holds nothing until then."""

    class Held:
        pass

    held = Held()
    alive = weakref.ref(held)
    later = time.monotonic() + 3600
    cancelled = [timers.at(later, lambda held=held: None) for _ in range(200)]
    del held
    for timer in cancelled:
        timer.cancel()
    assert alive() is None


# -- with real wasm: the thread core's host calls, their waits run by continuation --

WAITING = """
    import capsule
    from capsule import ReceiveTimeout, SendTimeout, TaskError, ask, receive, send, task

    @task(compute="HIGH")
    def echo():
        while True:
            message = receive(timeout=10)
            if message.body == "stop":
                return "echo stopped"
            message.reply({"echo": message.body})

    @task(compute="HIGH", max_retries=0)
    def slow_reader(n, pause):
        capsule.sleep(pause)
        return [receive().body for _ in range(n)]

    @task(compute="HIGH")
    def double(x):
        capsule.sleep(0.01)
        return 2 * x

    @task(compute="HIGH", timeout=0.3, max_retries=0)
    def stuck():
        receive()

    @task(compute="HIGH", max_retries=0)
    def forever():
        receive()

    @task(compute="HIGH", timeout=0.3, max_retries=0)
    def impatient():
        forever()   # a direct call: its wait outlasts the deadline until the child ended

    @task(name="main")
    def main():
        actor = echo.spawn(name="echo")
        replies = [ask("echo", i) for i in range(20)]
        send("echo", "stop")
        reader = slow_reader.spawn(5, 0.2)
        for i in range(5):          # capacity 2: the third send waits for the reader
            send(reader, i)
        try:
            receive(timeout=0.05)
            timed_out = None
        except ReceiveTimeout as error:
            timed_out = str(error)
        try:
            stuck()
            deadline = None
        except TaskError as error:
            deadline = error.kind
        try:
            impatient()
            callers_deadline = None
        except TaskError as error:
            callers_deadline = error.kind
        return {
            "replies": replies,
            "echo": actor.result(),
            "read": reader.result(),
            "called": double(21),
            "children": [h.result() for h in [double.spawn(i) for i in range(4)]],
            "timed_out": timed_out,
            "deadline": deadline,
            "callers_deadline": callers_deadline,
        }
"""


#: The tests below drive the waits of task threads (Run.wait_by_continuation):
#: the thread core's, pinned (the async core runs every wait by continuation).
ON_THREADS = "threads"


@pytest.mark.parametrize("driver", ["thread", "continuation"])
def test_a_run_answers_alike_whichever_driver_runs_its_waits(
    program: Callable[[str, str], Path], driver: str
) -> None:
    path = program(WAITING, "prog.py")
    runs: list[Run] = []
    events: list[Any] = []

    def started(run: Run) -> None:
        if driver == "continuation":
            run.wait_by_continuation()
        runs.append(run)

    report = run_program(
        RunRequest(path=path, args=[], options=RunOptions(mailbox_capacity=2, core=ON_THREADS)),
        events.append,
        on_run=started,
    )
    assert runs, report
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == {
        "replies": [{"echo": i} for i in range(20)],
        "echo": "echo stopped",
        "read": [0, 1, 2, 3, 4],
        "called": 42,
        "children": [0, 2, 4, 6],
        "timed_out": "no message arrived within 0.05s",
        "deadline": "timeout",
        "callers_deadline": "timeout",
    }
    waited_on = {event.on for event in events if event.type == "waiting"}
    assert {"send", "receive", "sleep"} <= waited_on
    resumed = [event for event in events if event.type == "resumed"]
    assert len(resumed) == len([event for event in events if event.type == "waiting"])


HTTP_AND_ASYNC = """
import asyncio
import capsule
from capsule import receive, send, task
from capsule.http import get, get_async

@task(compute="HIGH")
async def late(x):
    await asyncio.sleep(0.05)
    return x + 1

@task(compute="HIGH")
def forward(to):
    send(to, receive().body * 2)

@task(compute="HIGH")
def replier():
    message = receive()
    message.reply(message.body * 3)

@task(name="main", allowed_hosts=["127.0.0.1"])
async def main(base):
    status = get(base + "/status/201").status_code
    responses = await asyncio.gather(*(get_async(f"{base}/echo?n={n}") for n in range(3)))
    children = await asyncio.gather(*(late.spawn(i) for i in range(3)))
    forwarder = forward.spawn(capsule.current().id)
    send(forwarder, 21)
    asked = await capsule.ask_async(replier.spawn(), 5, timeout=30)
    return {
        "status": status,
        "echoed": [r.json()["path"] for r in responses],
        "children": list(children),
        "forwarded": (await capsule.receive_async(timeout=30)).body,
        "asked": asked,
    }
"""


def test_http_and_operations_run_by_continuation(
    program: Callable[[str, str], Path], http_server: LocalServer
) -> None:
    path = program(HTTP_AND_ASYNC, "prog.py")
    events: list[Any] = []
    report = run_program(
        RunRequest(path=path, args=[http_server.url], options=RunOptions(core=ON_THREADS)),
        events.append,
        on_run=lambda run: run.wait_by_continuation(),
    )
    assert report.result is not None and report.result.ok, report
    value = report.result.value()
    assert value["status"] == 201
    assert value["children"] == [1, 2, 3]
    assert value["forwarded"] == 42
    assert value["asked"] == 15
    assert value["echoed"] == [f"/echo?n={n}" for n in range(3)]
    assert len([event for event in events if event.type == "http"]) == 4


def test_stopping_a_run_ends_the_waits_it_runs_by_continuation(
    program: Callable[[str, str], Path],
) -> None:
    path = program(
        """
    from capsule import receive, task

    @task(compute="HIGH")
    def idle():
        receive()

    @task(name="main")
    def main():
        idle.spawn(name="idle")
        receive()
    """,
        "prog.py",
    )
    runs: list[Run] = []
    waiting: set[str] = set()

    def on_event(event: Any) -> None:
        if event.type == "waiting":
            waiting.add(event.task_id)
            if waiting == {"main", "main/1"}:
                runs[0].stop()  # (on the loop's thread, which reports waits)

    def by_continuation(run: Run) -> None:
        run.wait_by_continuation()
        runs.append(run)

    report = run_program(
        RunRequest(path=path, args=[], options=RunOptions(core=ON_THREADS)),
        on_event,
        on_run=by_continuation,
    )
    assert report.interrupted, report
    assert report.result.error.kind == "cancelled"


def test_a_wait_begun_once_its_loop_is_closed_is_answered_with_the_error() -> None:
    """A chained wait made as its run ends (its loop closed) is
    answered, with the failure, rather than left waiting for ever."""
    timers = RunLoop("capsule-loop test")
    timers.start()
    driver = Continuations(timers, EventStream(), "run", lambda task_id: None)
    timers.close()
    attempt = make_attempt()
    answers: list[Any] = []
    driver.run(Wait(attempt, "receive", never, Finishes(), timeout=60), answers.append)
    assert len(answers) == 1 and isinstance(answers[0], RuntimeError), answers
    assert attempt.waker is None
