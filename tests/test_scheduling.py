"""Fair CPU scheduling: at most N instances run wasm at once, handed round at
every epoch tick; blocking host calls free the slot."""

from __future__ import annotations

import pytest

from tests.conftest import ProgramRunner

BURNERS = """
    import time
    import capsule
    from capsule import task

    @task(compute="HIGH")
    def burn(n):
        started = time.monotonic()
        total = 0
        for i in range(n):
            total += i
        return [started, time.monotonic()]

    @task(compute="HIGH")
    def nap_then_burn(n):
        capsule.sleep(0.3)
        return burn(n)
"""


def test_one_slot_is_shared_round_robin(run_program: ProgramRunner) -> None:
    outcome = run_program(
        BURNERS
        + """
    @task(name="main", compute="HIGH")
    def main():
        return burn.map([400_000, 400_000, 400_000])
    """,
        cpu_slots=1,
    )
    spans = outcome.value
    # With one slot and no time slicing the second would start only after the
    # first ended; handed round every tick, all three are under way together.
    latest_start = max(start for start, _ in spans)
    earliest_end = min(end for _, end in spans)
    assert latest_start < earliest_end


def test_blocked_tasks_free_their_slot(run_program: ProgramRunner) -> None:
    outcome = run_program(
        BURNERS
        + """
    @task(compute="HIGH")
    def blocked():
        capsule.send("main", "about to block")
        capsule.receive()  # until main has burned
        return "released"

    @task(name="main", compute="HIGH", timeout="30s", max_retries=0)
    def main():
        handles = [blocked.spawn() for _ in range(3)]
        for _ in handles:
            capsule.receive()
        # Three children wait in receive: were they holding the only slot,
        # main would never run again (its deadline is a hang guard).
        burn(10)
        for handle in handles:
            capsule.send(handle, "go")
        return capsule.gather(*handles)
    """,
        cpu_slots=1,
    )
    assert outcome.value == ["released"] * 3


def test_cpu_slots_must_be_positive() -> None:
    from capsule.supervisor.options import OptionError, RunOptions

    with pytest.raises(OptionError) as raised:
        RunOptions(cpu_slots=0)
    assert str(raised.value) == (
        "cpu_slots 0 is invalid; expected a whole number from 1 to 1,000,000,000"
    )


@pytest.mark.parametrize("core", ["threads", "async"])
def test_fuel_is_accounted_while_a_task_runs(program, core: str) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    from capsule.sandbox.async_sandbox import AsyncSandbox
    from capsule.sandbox.engine import Sandbox
    from capsule.sandbox.modules import site_package_dirs
    from capsule.supervisor.events import EventStream
    from capsule.supervisor.run import Run, RunSettings

    path = program(
        """
        from capsule import task

        @task(name="main", compute="HIGH", timeout="1s", max_retries=0)
        def main():
            def step(i):
                return i + 1
            i = 0
            while True:
                i = step(i)
        """
    )
    readings: list[int] = []
    sandbox_type = AsyncSandbox if core == "async" else Sandbox
    with sandbox_type([path.parent, *site_package_dirs()]) as sandbox:
        configs, first = Run.load(sandbox, "prog", lambda *a: None)
        run = Run(sandbox, "prog", configs, EventStream(), RunSettings(core=core), first=first)
        thread = threading.Thread(target=run.run_main, args=([], {}))
        thread.start()
        for _ in range(6):
            time.sleep(0.1)
            readings += [t.fuel_used for t in run.snapshot() if t.task == "main"]
        thread.join()
    assert len(readings) >= 4
    assert readings == sorted(readings) and readings[-1] > readings[0] > 0


def test_one_slot_never_deadlocks_an_inline_call_ending_with_children(
    run_program: ProgramRunner,
) -> None:
    # The inline callee's thread still holds main's slot when it cancels and joins
    # the children it spawned; they need a slot to notice.
    outcome = run_program(
        BURNERS
        + """
    @task(max_retries=0)
    def spawns_and_returns():
        for _ in range(3):
            burn.spawn(50_000_000)
        return "returned"

    @task(name="main", compute="HIGH")
    def main():
        return spawns_and_returns()
    """,
        cpu_slots=1,
    )
    assert outcome.value == "returned"
    assert len(outcome.of_type("cancelled")) == 3


def test_sandboxes_sharing_an_engine_share_one_epoch_ticker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Runs of one Runtime share its engine: they tick it from one thread, so
    a tick (a CPU slot's turn, a deadline's grain) lasts as long however many
    runs are open, and an engine nobody uses ticks no more."""
    import threading

    from capsule.sandbox.engine import GuestComponent, Sandbox

    def tickers() -> int:
        return sum(thread.name == "capsule-epoch" for thread in threading.enumerate())

    guest = GuestComponent()
    before = tickers()
    sandboxes = [Sandbox([tmp_path], guest=guest) for _ in range(3)]
    for sandbox in sandboxes:
        sandbox.__enter__()
    try:
        assert tickers() == before + 1
        sandboxes.pop().__exit__(None, None, None)
        assert tickers() == before + 1
    finally:
        for sandbox in sandboxes:
            sandbox.__exit__(None, None, None)
    assert tickers() == before
