"""The async core's event loop (RunLoop): a run's task group on an anyio loop
on one thread (its own, or its Runtime's LoopThread), which runs callbacks
from any thread, timers, and tasks, and is gone once closed. (Its use by the continuation driver is tested
in test_waits.py; the invocations on it in test_async_core.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import pytest

from capsule.supervisor.loop_thread import LoopThread
from capsule.supervisor.run_loop import RunLoop

#: A bound against hanging, not a figure a test asserts.
PATIENCE_S = 30.0


@pytest.fixture
def loop() -> Iterator[RunLoop]:
    service = RunLoop("capsule-loop test")
    service.start()
    yield service
    service.close()


def loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("capsule-loop")]


def test_callbacks_run_on_its_thread_and_close_ends_it() -> None:
    loop = RunLoop("capsule-loop test")
    with pytest.raises(RuntimeError, match="not started"):
        loop.soon(lambda: None)
    loop.start()
    ran_on: list[str] = []
    done = threading.Event()
    loop.soon(lambda: ran_on.append(threading.current_thread().name))
    loop.soon(done.set)
    assert done.wait(PATIENCE_S)
    assert ran_on == ["capsule-loop test"]
    assert loop.running
    loop.close()
    assert not loop.running
    assert loop_threads() == []
    with pytest.raises(RuntimeError, match="stopped: its run has ended"):
        loop.soon(lambda: None)
    with pytest.raises(RuntimeError, match="started already"):
        loop.start()


def test_a_callback_that_raises_is_kept_and_the_loop_runs_on(loop: RunLoop) -> None:
    done = threading.Event()

    def bug() -> None:
        raise ValueError("a bug in a callback")

    loop.soon(bug)
    loop.at(time.monotonic(), bug)
    loop.soon(lambda: loop.at(time.monotonic() + 0.01, done.set))  # (after the other)
    assert done.wait(PATIENCE_S)
    assert [str(exc) for exc in loop.failures] == ["a bug in a callback"] * 2
    loop.failures.clear()


def test_a_timer_cancelled_from_another_thread_never_runs(loop: RunLoop) -> None:
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    cancelled = loop.at(now + 0.01, lambda: ran.append("cancelled"))
    cancelled.cancel()
    loop.at(now + 0.02, lambda: ran.append("kept"))
    loop.at(now + 0.03, done.set)
    assert done.wait(PATIENCE_S)
    assert ran == ["kept"]
    assert loop.failures == []


def test_close_cancels_the_tasks_left_in_its_task_group() -> None:
    loop = RunLoop("capsule-loop test")
    loop.start()
    waiting = threading.Event()
    cancelled = threading.Event()

    async def task() -> None:
        try:
            waiting.set()
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    loop.soon(lambda: loop.start_soon(task, "a task"))
    assert waiting.wait(PATIENCE_S)
    loop.close()
    assert cancelled.is_set()
    assert loop_threads() == []


def test_callbacks_from_many_threads_all_run_each_threads_in_order(loop: RunLoop) -> None:
    ran: dict[int, list[int]] = {thread: [] for thread in range(4)}
    done = threading.Event()
    total = 4 * 500

    def record(thread: int, index: int) -> None:
        ran[thread].append(index)
        if sum(len(indices) for indices in ran.values()) == total:
            done.set()

    def give(thread: int) -> None:
        for index in range(500):
            loop.soon(lambda thread=thread, index=index: record(thread, index))

    givers = [threading.Thread(target=give, args=(thread,)) for thread in range(4)]
    for giver in givers:
        giver.start()
    for giver in givers:
        giver.join()
    assert done.wait(PATIENCE_S)
    assert ran == {thread: list(range(500)) for thread in range(4)}
    assert loop.failures == []


def test_runs_on_one_loop_thread_close_only_their_own_tasks_and_timers() -> None:
    """Two runs' RunLoops on one LoopThread: closing one cancels its tasks
    and its timers (they never run), and leaves the other's running; the
    thread stops with the LoopThread."""
    shared = LoopThread("capsule-loop shared")
    shared.start()
    first, second = RunLoop("capsule-loop first", shared), RunLoop("capsule-loop second", shared)
    first.start()
    second.start()
    started: list[str] = []
    both_started = threading.Event()
    cancelled: list[str] = []
    fired: list[str] = []

    def task(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def waits() -> None:
            try:
                started.append(name)
                if len(started) == 2:
                    both_started.set()
                await anyio.sleep_forever()
            finally:
                cancelled.append(name)

        return waits

    first.soon(lambda: first.start_soon(task("first"), "a task of first"))
    second.soon(lambda: second.start_soon(task("second"), "a task of second"))
    assert both_started.wait(PATIENCE_S)
    first.at(time.monotonic() + 0.05, lambda: fired.append("first"))
    first.close()
    assert cancelled == ["first"]
    assert not first.running and second.running
    with pytest.raises(RuntimeError, match="stopped: its run has ended"):
        first.soon(lambda: None)
    done = threading.Event()
    second.at(time.monotonic() + 0.1, done.set)  # (after first's timer was due)
    assert done.wait(PATIENCE_S)
    assert fired == []
    assert shared.running and loop_threads() == ["capsule-loop shared"]
    second.close()
    assert cancelled == ["first", "second"]
    shared.close()
    assert loop_threads() == []
    assert first.failures == second.failures == shared.failures == []


def test_a_task_that_raises_ends_its_run_s_group_not_the_loop_other_runs_share() -> None:
    """A host bug in one run's task (it raises out of the run's task group):
    that group ends, the error kept, and what waits for the run's end is
    told; the other run on the same LoopThread, and the thread, go on."""
    shared = LoopThread("capsule-loop shared")
    shared.start()
    broken, other = RunLoop("capsule-loop broken", shared), RunLoop("capsule-loop other", shared)
    broken.start()
    other.start()
    ended = threading.Event()
    broken.when_ended(ended.set)

    async def bug() -> None:
        raise RuntimeError("a bug in a task of the run")

    broken.soon(lambda: broken.start_soon(bug, "a buggy task"))
    assert ended.wait(PATIENCE_S)
    assert not broken.running
    assert "a bug in a task of the run" in repr(broken.failures)
    assert other.running and shared.running
    done = threading.Event()
    other.soon(done.set)
    assert done.wait(PATIENCE_S)
    told: list[str] = []
    broken.when_ended(lambda: told.append("at once"))  # (after it ended: now)
    assert told == ["at once"]
    other.close()
    broken.close()
    shared.close()
    assert shared.failures == [] and other.failures == []
    assert loop_threads() == []
