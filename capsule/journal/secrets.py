"""What the journal must not hold but a replay needs: the unredacted answers of
steps whose journaled form has secrets redacted (HTTP credentials and cookies,
granted env values).

By default they are kept per run in a file only the user can read, in Capsule's
home (``$CAPSULE_HOME`` or the user cache directory), not beside the journal: a
journal that is shared or committed carries no secret. With
``CAPSULE_SECRET_KEY`` set (the same key on every machine) they are kept in the
journal instead, encrypted (AES-GCM, each bound to its run, task, attempt and
step), so that a run resumes anywhere its journal and the key are. Either way
they go when the run ends.

A step whose answer was kept apart says so in the journal (STEP_KEPT_APART), so
that a resume lacking it fails, naming what is missing, rather than replay the
redacted form into live code.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from pathlib import Path

from capsule.journal.schema import JournalError
from capsule.sandbox.runtime import capsule_home

#: (task id, attempt, step)
StepKey = tuple[str, int, int]

#: The environment variable that holds the key.
SECRET_KEY_ENV = "CAPSULE_SECRET_KEY"
#: A key is this many random bytes (AES-256), written in base64.
KEY_BYTES = 32
#: How to make one, as the docs and errors say.
MAKE_A_KEY = (
    '`openssl rand -base64 32`, or `python -c "import secrets,base64;'
    'print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())"`'
)

#: What a journaled step holds after its five fields when its answer's
#: unredacted form was kept apart: ``[step, kind, request, ok, answer, null,
#: "secret"]``. (The sixth field was a step's time in schema 3, which the
#: ``steps`` view still reads: null there, the view shows its batch's time.)
STEP_KEPT_APART = "secret"

#: A sealed answer: this version byte, the 12-byte nonce, then AES-GCM's
#: ciphertext and tag.
_SEALED_VERSION = b"\x01"
_NONCE_BYTES = 12


def secrets_file(run_id: str) -> Path:
    return capsule_home() / "secrets" / f"{run_id}.jsonl"


class SecretKeyError(JournalError):
    """``CAPSULE_SECRET_KEY`` is set but is no key."""


def secret_key() -> bytes | None:
    """The key ``CAPSULE_SECRET_KEY`` holds (None: unset or empty);
    SecretKeyError if it is not one. Its value is never shown."""
    text = os.environ.get(SECRET_KEY_ENV, "").strip()
    if not text:
        return None
    # Either base64 alphabet, padded or not (`openssl rand -base64` writes the
    # standard one, Python's urlsafe_b64encode the other).
    unpadded = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        problem = "is not base64"
    else:
        if len(key) == KEY_BYTES:
            return key
        problem = f"holds {len(key)} bytes"
    raise SecretKeyError(
        f"{SECRET_KEY_ENV} {problem}; a key is {KEY_BYTES} random bytes in base64 "
        f"(44 characters). Make one with {MAKE_A_KEY}, and set the same key wherever "
        f"the run is resumed (or unset {SECRET_KEY_ENV} to keep secrets in a file "
        f"of Capsule's home)"
    )


class SecretAnswers:
    """Appends unredacted answers for one run to its file (thread-safe)."""

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
    """The answers in the run's file (none if there is no file). OSError if
    it is there but cannot be read."""
    path = secrets_file(run_id)
    answers: dict[StepKey, str] = {}
    if not path.is_file():
        return answers
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            answers[(entry["task_id"], int(entry["attempt"]), int(entry["step"]))] = entry["answer"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return answers


class Sealer:
    """Encrypts and decrypts one run's answers with the key (AES-GCM). Each
    is bound to its run, task, attempt and step (associated data): a row moved
    to another step, or another run, does not decrypt."""

    def __init__(self, key: bytes, run_id: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._cipher = AESGCM(key)
        self.run_id = run_id

    def _bound_to(self, task_id: str, attempt: int, step: int) -> bytes:
        return json.dumps(["capsule secret answer", self.run_id, task_id, attempt, step]).encode()

    def seal(self, task_id: str, attempt: int, step: int, answer: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        # (surrogatepass: an answer is text the host made; whatever it holds
        # comes back as it was.)
        sealed = self._cipher.encrypt(
            nonce,
            answer.encode("utf-8", "surrogatepass"),
            self._bound_to(task_id, attempt, step),
        )
        return _SEALED_VERSION + nonce + sealed

    def open(self, task_id: str, attempt: int, step: int, sealed: object) -> str | None:
        """The answer ``sealed`` holds; None if this key does not open it for
        this step (another key, or a row altered or moved)."""
        from cryptography.exceptions import InvalidTag

        if not isinstance(sealed, bytes) or not sealed.startswith(_SEALED_VERSION):
            return None
        nonce = sealed[1 : 1 + _NONCE_BYTES]
        try:
            plain = self._cipher.decrypt(
                nonce, sealed[1 + _NONCE_BYTES :], self._bound_to(task_id, attempt, step)
            )
        except (InvalidTag, ValueError):
            return None
        return plain.decode("utf-8", "surrogatepass")
