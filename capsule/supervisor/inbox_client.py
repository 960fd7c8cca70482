"""The client side of a run's inbox (capsule.supervisor.inbox): `capsule send`
and `capsule ask` find the running run's socket, make one request and read
its one answer (bounded, and checked as strict JSON)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

from capsule.sandbox import guest_data
from capsule.supervisor.inbox import connectable, runs_directory

#: Exit codes of `capsule send` and `capsule ask` beyond the common ones (0
#: done, 2 usage): why the message was not delivered or answered.
EXIT_NO_SUCH_RUN = 4
EXIT_NOT_RUNNING = 5
EXIT_NO_SUCH_ACTOR = 6
EXIT_MAILBOX_FULL = 7
EXIT_TIMEOUT = 8
#: The exit code for each kind of failure the run answers with.
EXIT_BY_KIND = {
    "no_such_actor": EXIT_NO_SUCH_ACTOR,
    "actor_ended": EXIT_NO_SUCH_ACTOR,
    "mailbox_full": EXIT_MAILBOX_FULL,
    "queue_full": EXIT_MAILBOX_FULL,
    "busy": EXIT_MAILBOX_FULL,
    "timeout": EXIT_TIMEOUT,
    "run_ended": EXIT_NOT_RUNNING,
    "not_running": EXIT_NOT_RUNNING,
    "no_such_run": EXIT_NO_SUCH_RUN,
}
#: What a run id (or a prefix of one) may hold: it names a file.
RUN_ID_FORM = re.compile(r"[0-9A-Za-z_-]{1,64}")
#: The largest answer read (a reply is at most the run's largest message).
MAX_ANSWER_BYTES = 1 << 30
#: How long to wait for the run to answer a send (it answers at once).
SEND_TIMEOUT_S = 30.0


class InboxClientError(Exception):
    """The message could not be delivered or answered; ``kind`` says why
    (a key of EXIT_BY_KIND, or ``usage``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def find_socket(run_id: str) -> tuple[str, Path] | None:
    """(run id, socket) of the running run ``run_id`` names (a prefix will
    do), or None if no running run has such an id. InboxClientError (usage)
    if it is malformed or names more than one."""
    if not RUN_ID_FORM.fullmatch(run_id):
        raise InboxClientError(
            "usage", f"{run_id!r} is not a run id (`capsule runs` lists the runs)"
        )
    try:
        names = [entry.name for entry in runs_directory().iterdir()]
    except OSError:
        return None
    found = sorted(
        name[: -len(".sock")]
        for name in names
        if name.endswith(".sock") and name.startswith(run_id)
    )
    if run_id in found:
        found = [run_id]
    if len(found) > 1:
        shown = ", ".join(found[:5])
        raise InboxClientError(
            "usage", f"{run_id!r} is the start of more than one running run's id: {shown}"
        )
    return (found[0], runs_directory() / f"{found[0]}.sock") if found else None


def request(path: Path, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the run listening at ``path``; its answer, a JSON
    object with "ok". InboxClientError if the run cannot be reached or its
    answer does not come within ``timeout`` seconds."""
    data = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(timeout)
        try:
            with connectable(path) as address:
                client.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            raise InboxClientError(
                "not_running", f"the run is not running (its socket {path} is left over)"
            ) from None
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the run refused it before the end: its answer says why
        chunks: list[bytes] = []
        size = 0
        while chunk := client.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise InboxClientError("protocol", "the run's answer is too large")
    except TimeoutError:
        raise InboxClientError("timeout", f"the run did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise InboxClientError("not_running", f"the run cannot be reached: {exc}") from None
    finally:
        client.close()
    return _answer(b"".join(chunks))


def _answer(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InboxClientError("run_ended", "the run ended before it answered")
    try:
        answer = guest_data.json_value(raw.decode("utf-8"), "the run's answer")
    except (UnicodeDecodeError, guest_data.ProtocolError) as exc:
        raise InboxClientError("protocol", f"the run's answer is not JSON: {exc}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise InboxClientError("protocol", "the run's answer is not of the expected form")
    return answer
