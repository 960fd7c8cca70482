"""How the benchmark scripts print their figures: the machine first, then each
row's figures (numbers aligned; lists of lines indented under their label)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any


def print_machine() -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )


def print_figures(title: str, figures: Mapping[str, Any], width: int = 36) -> None:
    print(f"\n{title}", flush=True)
    for label, value in figures.items():
        if isinstance(value, float):
            print(f"  {label:{width}s} {value:10.3f}", flush=True)
        else:
            print(f"  {label}:", flush=True)
            for line in value:
                print(f"    {line}", flush=True)
