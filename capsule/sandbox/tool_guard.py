"""Run a build tool so that it dies with the Capsule process that started it.

``python -I tool_guard.py PARENT_PID COMMAND...`` runs COMMAND in
its own process group (which runtime.run_tool made for this guard) and waits
for it; if PARENT_PID stops being its parent (Capsule died, even of kill -9),
it kills the whole group: the tool and whatever the tool started (node's
wizer, npm's scripts), which would otherwise build on for nothing. It exits
with the tool's status. (Standard library only: it starts in milliseconds.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

#: How often the guard looks at its parent (seconds).
WATCH_EVERY = 0.2


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -I tool_guard.py PARENT_PID COMMAND...", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[1:]
    try:
        tool = subprocess.Popen(command)  # (its output is the guard's: the pipes to Capsule)
    except OSError as exc:
        print(f"cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127
    while True:
        try:
            status = tool.wait(timeout=WATCH_EVERY)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)  # (the guard's group: the tool's, and the guard)
            continue
        return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
