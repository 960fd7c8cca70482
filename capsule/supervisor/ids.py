"""The identifiers every event about a task carries."""

from __future__ import annotations

from typing import TypedDict


class EventIds(TypedDict):
    run_id: str
    task_id: str
    task: str
