"""Admission of new tasks: a task call or spawn is refused when the program
declares no such task, calls nest too deep, the run has as many live tasks as
it may, or the caller as many running children."""

from __future__ import annotations

from capsule.sandbox.config import TaskConfig
from capsule.sandbox.engine import refusal
from capsule.supervisor.live import LiveTree
from capsule.supervisor.tree import Attempt

#: How deep task calls may nest before the call is refused.
MAX_DEPTH = 64


class Admission:
    """Counts a run's live tasks against its limits."""

    def __init__(
        self,
        configs: dict[str, TaskConfig],
        tree: LiveTree,
        max_live_tasks: int,
        max_children: int,
    ) -> None:
        self.configs = configs
        self.tree = tree
        self.max_live_tasks = max_live_tasks
        self.max_children = max_children

    def admit(self, caller: Attempt, name: str, spawned: bool) -> tuple[bool, str] | None:
        """The refusal (as a host-call reply) of a new task under ``caller``, or
        None: admitted, and counted as live until ``release``."""
        if name not in self.configs:
            return refusal(
                name,
                f"{caller.invocation.task!r} called a task named {name!r}, "
                f"but the program declares no such task",
            )
        depth = caller.node.task_id.count("/") + 1
        if depth >= MAX_DEPTH:
            return refusal(
                name, f"task calls are nested {depth} deep; the limit is {MAX_DEPTH}", "limit"
            )
        tree = self.tree
        with tree.lock:
            if self.max_live_tasks == 0:  # (run_code's: one task, the entry)
                return refusal(
                    name,
                    f"the run may start no task besides its entry task (max_live_tasks 0); "
                    f"{caller.invocation.task!r} cannot start {name!r}",
                    "limit",
                )
            if tree.live_tasks >= self.max_live_tasks:
                return refusal(
                    name,
                    f"the run already has {tree.live_tasks} live tasks, its limit "
                    f"(max_live_tasks); {caller.invocation.task!r} cannot start {name!r}",
                    "limit",
                )
            if spawned:
                # (Counted as they come and go: going through its children on
                # each spawn took the square of their number.)
                alive = caller.running_children
                if alive >= self.max_children:
                    return refusal(
                        name,
                        f"{caller.invocation.task!r} already has {alive} running children, "
                        f"its limit; it cannot spawn {name!r}",
                        "limit",
                    )
                caller.running_children += 1
            tree.live_tasks += 1
        return None

    def release(self, spawned_by: Attempt | None = None) -> None:
        """A task admitted ended (or never started); ``spawned_by``: the
        attempt that spawned it."""
        with self.tree.lock:
            self.tree.live_tasks -= 1
            if spawned_by is not None:
                spawned_by.running_children -= 1
