"""What a run did in all, counted from its lifecycle events: the ``totals`` of
the ``--json`` envelope."""

from __future__ import annotations

import threading
import time
from typing import Any

#: The events the counts come from.
TOTALS_EVENT_TYPES = frozenset(
    {"pending", "replayed", "retrying", "restarting", "completed", "failed", "cancelled"}
)


class RunTotals:
    """Subscribe ``on_event`` to a run's stream (TOTALS_EVENT_TYPES); ``as_dict``
    once it ended. Tasks a resume took from the journal count as tasks; the fuel
    is what attempts burned in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._ended: float | None = None
        self.tasks = 0
        self.failed = 0
        self.retried = 0
        self.fuel_consumed = 0

    def on_event(self, event: Any) -> None:
        kind = event.type
        with self._lock:
            if kind == "pending" or (kind == "replayed" and event.outcome is not None):
                self.tasks += 1
            elif kind == "retrying":
                self.retried += 1
                self.fuel_consumed += event.fuel_consumed
            elif kind in ("completed", "failed", "cancelled"):
                self.fuel_consumed += event.fuel_consumed
                self.failed += kind == "failed"
            elif kind == "restarting":
                self.fuel_consumed += event.fuel_consumed

    def end(self) -> None:
        self._ended = time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        ended = time.monotonic() if self._ended is None else self._ended
        with self._lock:
            return {
                "tasks": self.tasks,
                "failed": self.failed,
                "retried": self.retried,
                "fuel_consumed": self.fuel_consumed,
                "duration_ms": round((ended - self._started) * 1000, 3),
            }
