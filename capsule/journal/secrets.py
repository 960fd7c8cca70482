"""What the journal must not hold but a replay needs: the unredacted answers of
steps whose journaled form has secrets redacted (HTTP credentials and cookies).

They are kept per run in a file only the user can read, in Capsule's home
(``$CAPSULE_HOME`` or the user cache directory), not beside the journal: a
journal that is shared or committed carries no secret. A resume on a machine
without the file replays the redacted form. The file goes when the run ends.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from capsule.sandbox.runtime import capsule_home

StepKey = tuple[str, int, int]


def secrets_file(run_id: str) -> Path:
    return capsule_home() / "secrets" / f"{run_id}.jsonl"


class SecretAnswers:
    """Appends unredacted answers for one run (thread-safe)."""

    def __init__(self, run_id: str) -> None:
        self.path = secrets_file(run_id)
        self._lock = threading.Lock()

    def add(self, task_id: str, attempt: int, step: int, answer: str) -> None:
        line = json.dumps({"task_id": task_id, "attempt": attempt, "step": step, "answer": answer})
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, (line + "\n").encode())
            finally:
                os.close(descriptor)

    def discard(self) -> None:
        with self._lock:
            self.path.unlink(missing_ok=True)


def load_secret_answers(run_id: str) -> dict[StepKey, str]:
    path = secrets_file(run_id)
    answers: dict[StepKey, str] = {}
    if not path.is_file():
        return answers
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            answers[(entry["task_id"], int(entry["attempt"]), int(entry["step"]))] = entry["answer"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return answers
