"""The settings of one run, declared once: what `capsule run`'s flags, the host
API's ``RunOptions(...)`` and a resume (which takes over the run's settings)
all set. ``None`` everywhere means the default."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RunOptions(BaseModel):
    """Every setting of a run. Limits cap what tasks declare (a task never gets
    more than these allow); the rest size the run's shared resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_fuel: str | int | None = Field(
        None, description="cap on any task's fuel (LOW/MEDIUM/HIGH or an int)"
    )
    max_ram: str | int | None = Field(None, description='cap on any task\'s memory (e.g. "256MB")')
    max_timeout: str | float | None = Field(
        None, description='cap on any task\'s timeout (e.g. "30s")'
    )
    cpu_slots: int | None = Field(
        None,
        description="instances running wasm at once, shared round-robin (default: CPU cores)",
    )
    max_live_tasks: int | None = Field(None, description="tasks alive at once in the run (512)")
    max_children: int | None = Field(None, description="running children per task (256)")
    mailbox_capacity: int | None = Field(
        None, description="messages a mailbox holds before send waits (1000)"
    )
    max_message_size: str | int | None = Field(
        None, description='largest message, as JSON (default "1MB")'
    )
    max_queued_size: str | int | None = Field(
        None,
        description='messages sent and not yet received, in all (default "256MB"); '
        "a send over it fails",
    )
    max_total_ram: str | int | None = Field(
        None,
        description="memory of the whole run: over it, the task holding the most is stopped "
        '(default: half the machine\'s memory; "off": no bound)',
    )
    max_task_output: str | int | None = Field(
        None,
        description="what one attempt of a task may make the host record: output, messages, "
        'random bytes, HTTP exchanges (default "64MB"); past it the task fails '
        "(kind output_limit)",
    )
    max_run_journal: str | int | None = Field(
        None,
        description='what the run may write to its journal (default "1GB"); past it the run '
        "stops, resumable with a larger limit",
    )
    hibernate_after: str | float | None = Field(
        None,
        description="a task blocked this long gives back the memory pages it only read "
        '(default 1s; "500ms", "2m"; "off": never)',
    )
    retry_backoff: float | None = Field(
        None,
        description="delay in seconds before the first retry, doubled for each further one "
        "(default 0.05)",
    )

    def given(self) -> dict[str, Any]:
        """The settings given (not left to their default), by name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}
