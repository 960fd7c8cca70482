"""The run's live tree: its running attempts, how many tasks are alive, and
cancelling parts of it (a scope, a task, the whole run) with the wake-ups that
make blocked tasks see it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from capsule.sandbox.engine import Invocation
from capsule.supervisor.tree import Attempt, Scope


class LiveTree:
    """The attempts of a run that are running now, by invocation, under one root
    scope; its lock also guards what the supervisor changes across threads
    (children's wait marks, restart counts, the run's totals)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[Invocation, Attempt] = {}
        #: Above ``main``: cancelling it stops the whole run.
        self.root = Scope(None, task_id="")
        #: Tasks alive in the run (admitted and not yet ended).
        self.live_tasks = 0
        #: What else a stop must reach, by its owner: the async core's
        #: invocations, in a retry's backoff or awaiting their attempt's call
        #: (the scope whose stop they watch, and what tells them).
        self._watchers: dict[object, tuple[Scope, Callable[[], None]]] = {}

    def running(self) -> list[Attempt]:
        with self.lock:
            return list(self.attempts.values())

    def cancel(self, scope: Scope, message: str) -> None:
        """Cancel everything under ``scope``: instances running wasm trap at their
        next epoch tick; tasks blocked in a host call are woken now."""
        self.cancel_all([scope], message)

    def cancel_all(self, scopes: list[Scope], message: str) -> None:
        """Cancel everything under each of ``scopes``, with one round of
        wake-ups (a round goes through every running task: one a scope, for
        an attempt's thousands of children, would take the square of their
        number)."""
        for scope in scopes:
            scope.cancel_message = message
            scope.cancelled = True
        self.wake_all()

    def cancel_children(self, attempt: Attempt, message: str) -> None:
        """Cancel ``attempt``'s running children."""
        children = list(attempt.children.values())
        scopes = [child.scope for child in children if not child.done.is_set()]
        if scopes:
            self.cancel_all(scopes, message)

    def cancel_task(self, task_id: str, reason: str) -> bool:
        """Cancel a running task (and everything under it), as its parent would;
        False if no such task is running."""
        attempts = self.running()
        for attempt in attempts:
            child = attempt.children.get(task_id)
            if child is not None and not child.done.is_set():
                self.cancel(child.scope, reason)  # as its parent would
                return True
        for attempt in attempts:
            if attempt.invocation.task_id == task_id:  # a direct call: its caller sees the error
                self.cancel(attempt.scope, reason)
                return True
        return False

    def watch(self, owner: object, scope: Scope, stopped: Callable[[], None]) -> None:
        """Call ``stopped`` (on the thread that stops it, maybe holding the
        router's lock) when what runs in ``scope`` must stop, until
        :meth:`unwatch`: ``owner`` watches one scope at a time."""
        with self.lock:
            self._watchers[owner] = (scope, stopped)

    def unwatch(self, owner: object) -> None:
        with self.lock:
            self._watchers.pop(owner, None)

    def wake_all(self) -> None:
        """Wake every blocked task that must now stop."""
        for attempt in self.running():
            if attempt.invocation.check_stop() is not None:
                attempt.wake()
        if self._watchers:
            with self.lock:
                watchers = list(self._watchers.values())
            for scope, stopped in watchers:
                if scope.check_stop() is not None:
                    stopped()
