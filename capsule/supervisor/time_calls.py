"""The host calls about time and chance: the clocks, random bytes and sleep,
journaled so that a replay sees the same."""

from __future__ import annotations

import os
import time
from typing import Any

from capsule.sandbox.engine import Invocation
from capsule.supervisor.journaled import JournaledSteps, StepDriver
from capsule.supervisor.live import LiveTree
from capsule.supervisor.waits import Answer, Wait, never


class TimeCalls:
    """Clocks, randomness and sleeping for a run's tasks."""

    def __init__(
        self,
        journal: JournaledSteps,
        tree: LiveTree,
        monotonic_offset: int,
        drive: StepDriver,
    ) -> None:
        self.journal = journal
        self.tree = tree
        #: Runs the steps that may wait (a sleep), as the run's core does.
        self.drive = drive
        #: Added to the monotonic clock: guests never see it go back, also across
        #: a resume.
        self.monotonic_offset = monotonic_offset

    def wall_clock_ns(self, caller: Invocation) -> int:
        ok, answer = self.journal.step(
            caller, "wall_clock", "", lambda: (True, str(time.time_ns()))
        )
        return int(answer) if ok else 0

    def monotonic_ns(self, caller: Invocation) -> int:
        def now() -> tuple[bool, str]:
            return True, str(time.monotonic_ns() + self.monotonic_offset)

        ok, answer = self.journal.step(caller, "monotonic", "", now)
        return int(answer) if ok else 0

    def random_bytes(self, caller: Invocation, count: int) -> bytes:
        ok, answer = self.journal.step(
            caller, "random", str(count), lambda: (True, os.urandom(count).hex())
        )
        return bytes.fromhex(answer) if ok else bytes(count)

    def sleep(self, caller: Invocation, seconds: float) -> Any:
        """Sleep: None once slept, or (the async core) a Pending of None."""
        # A replayed sleep has been slept.
        return self.drive(
            caller, "sleep", repr(seconds), lambda: self.sleeping(caller, seconds), then=_nothing
        )

    def sleeping(self, caller: Invocation, seconds: float) -> Wait:
        """The wait of a sleep of ``seconds``."""

        def slept(_: bool) -> Answer:
            if caller.check_stop() is not None:
                return False, "{}"  # cut short: the sandbox ends the caller
            return True, ""

        return Wait(self.tree.attempts[caller], "sleep", never, slept, max(0.0, seconds))


def _nothing(_: Answer) -> None:
    """What a sleep gives its guest (it is ended if it must stop)."""
    return None
