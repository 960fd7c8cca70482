"""A supervisor's restarts of its children: a permanent child that returned,
and the siblings its strategy restarts with a failed child (one_for_one:
none; one_for_all: all; rest_for_one: those spawned after it), each counted
against the parent's restart intensity."""

from __future__ import annotations

import time

from capsule.sandbox.config import TaskConfig
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.intensity import restart_intensity_error
from capsule.supervisor.live import LiveTree
from capsule.supervisor.tree import Child


class Restarts:
    """Decides the restarts of a run's children."""

    def __init__(self, configs: dict[str, TaskConfig], tree: LiveTree) -> None:
        self.configs = configs
        self.tree = tree

    def allow(self, child: Child, what: str) -> bool:
        """Count a supervisor restart (a permanent child that returned, or
        siblings restarted by one_for_all / rest_for_one) against the parent's
        intensity (``max_restarts`` within ``restart_window``). Over it, the
        parent fails instead, and its own supervisor takes over (escalation).
        A child's own retries (``max_retries``) never count."""
        parent = child.parent_attempt
        config = self.configs[parent.invocation.task]
        now = time.monotonic()
        with self.tree.lock:
            while parent.restarts and parent.restarts[0] <= now - config.restart_window_s:
                parent.restarts.popleft()
            if len(parent.restarts) >= config.max_restarts:
                if parent.invocation.aborted is None:
                    parent.invocation.aborted = restart_intensity_error(
                        parent.invocation, config, what
                    )
                allowed = False
            else:
                parent.restarts.append(now)
                allowed = True
        if not allowed:
            parent.wake()
        return allowed

    def restart_siblings(self, child: Child, error: ErrorDetail) -> None:
        """Apply the parent's strategy to a child that is about to be retried:
        restarting its running siblings is one restart of the parent's."""
        parent = child.parent_attempt
        strategy = self.configs[parent.invocation.task].strategy
        if strategy == "one_for_one":
            return
        siblings = list(parent.children.values())
        if strategy == "rest_for_one":
            siblings = siblings[siblings.index(child) + 1 :]
        restarted = [
            sibling
            for sibling in siblings
            if sibling is not child
            and not sibling.done.is_set()
            and sibling.current is not None
            and self.configs[sibling.name].restart != "temporary"  # (never restarted)
        ]
        what = f"{child.name!r} ({child.task_id}) failed ({error.kind}) under {strategy}"
        if not restarted or not self.allow(child, what):
            return
        reason = f"its sibling {child.name!r} ({child.task_id}) failed ({strategy})"
        for sibling in restarted:
            current = sibling.current
            assert current is not None
            sibling.restart_reason = reason
            current.scope.cancel_message = f"restarting: {reason}"
            current.scope.cancelled = True
        self.tree.wake_all()
