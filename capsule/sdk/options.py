"""The ``@task`` options read both by the host and by local mode: the retry count
and the timeout. One set of rules, so that a value local mode runs with is one
``capsule run`` accepts. Pure Python (the host's other options need pydantic)."""

from __future__ import annotations

import math
import re
from typing import Any

DEFAULT_MAX_RETRIES = 1
MAX_RETRIES_LIMIT = 1000
RETRIES_FORMS = f"an integer from 0 to {MAX_RETRIES_LIMIT}"
TIMEOUT_FORMS = 'a duration such as "500ms", "30s", "5m", "1h", or a positive number of seconds'

_TIME_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_timeout(value: Any) -> float:
    """Seconds for a timeout option such as ``"30s"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(TIMEOUT_FORMS)
    if isinstance(value, int | float):
        try:
            seconds = float(value)  # (an int too large for a float: OverflowError)
        except OverflowError:
            raise ValueError(TIMEOUT_FORMS) from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(TIMEOUT_FORMS)
        return seconds
    if isinstance(value, str):
        match = _TIME_RE.match(value)
        if match:
            seconds = float(match.group(1)) * _TIME_UNITS[match.group(2) or "s"]
            if seconds > 0 and math.isfinite(seconds):
                return seconds
    raise ValueError(TIMEOUT_FORMS)


def parse_max_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(RETRIES_FORMS)
    if not 0 <= value <= MAX_RETRIES_LIMIT:
        raise ValueError(RETRIES_FORMS)
    return value
