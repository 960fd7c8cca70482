"""Restart intensity: how many supervisor restarts a parent allows within a
window before it gives up and fails itself (OTP's MaxR within MaxT).

Counted: a permanent child restarted after it returned, and siblings restarted
by one_for_all or rest_for_one. Not counted: a child's own retries after its
failures (``max_retries``), as in OTP, where a worker's internal retry is no
supervisor restart.
"""

from __future__ import annotations

from capsule.sandbox.config import TaskConfig
from capsule.sandbox.engine import ErrorInfo, Invocation


def restart_intensity_error(parent: Invocation, config: TaskConfig, last: str) -> ErrorInfo:
    """The failure of ``parent`` once one more restart of its children would
    exceed its intensity; ``last`` says what asked for that restart."""
    window = f"{config.restart_window_s:g}s"
    return ErrorInfo(
        "restart_intensity",
        f"more than {config.max_restarts} restarts of its children within {window}, which "
        f"task {parent.task!r} ({parent.task_id}) allows with max_restarts="
        f"{config.max_restarts}, restart_window={window!r}; the last: {last}. If these "
        f"restarts are expected, raise max_restarts (or shorten restart_window) in the "
        f"@task(...) of {parent.task!r}; otherwise, find why its children keep ending",
    )
