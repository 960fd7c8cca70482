"""A task running now, as a handle reads it (:meth:`RunHandle.live_tasks`):
what the journal does not hold, as it happens."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class LiveTask(BaseModel):
    """One running attempt of a task."""

    model_config = ConfigDict(frozen=True)

    #: The task's id in the run's tree (``main``, ``main/2``, ...).
    task_id: str
    #: The task's name (its ``@task`` name).
    task: str
    #: Which attempt this is (1 for the first; retries and restarts count up).
    attempt: int
    #: Fuel this attempt has burned so far: read at every epoch tick, so it
    #: lags a loop that calls no function until it next calls one, or ends.
    fuel_used: int
    #: The fuel each attempt of the task may burn.
    fuel_budget: int
    #: Messages waiting in its mailbox, not yet received.
    mailbox_depth: int
