"""The endpoint of a running run for `capsule send` and `capsule ask`: a Unix
domain socket that only the run's owner can reach (mode 0600, in a 0700
directory of Capsule's per-user state, the peer's uid checked too), open while
the run runs and removed when it ends.

One request per connection: a JSON object of at most the run's largest message
and a little more, read within READ_TIMEOUT_S; then one JSON line answers it.
What a client sends is input like a guest's: bounded, and checked once here
(capsule.sandbox.guest_data); a client that sends nothing, or never reads its
answer, holds a thread of its own for a few seconds, never the run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

from capsule.actors.external import ExternalError, ExternalMessages
from capsule.sandbox import guest_data
from capsule.sandbox.runtime import capsule_home

#: How long a client may take to send its request, and to take its answer.
READ_TIMEOUT_S = 5.0
#: What a request holds besides the message's body, at most.
REQUEST_OVERHEAD_BYTES = 64 * 1024
#: Requests handled at once (an ask waits for its reply); more are refused.
MAX_CONNECTIONS = 32
#: The longest an ask may wait for its reply, in seconds.
MAX_ASK_TIMEOUT_S = 7 * 24 * 3600.0
#: The longest socket path bind() takes on every system (sun_path is 104 or
#: 108 bytes, with its NUL): a longer one is reached through its directory's
#: descriptor (/proc/self/fd/N/NAME).
MAX_SOCKET_PATH = 100


def runs_directory() -> Path:
    """Where running runs have their sockets (per user: Capsule's state)."""
    return capsule_home() / "runs"


def socket_path(run_id: str) -> Path:
    return runs_directory() / f"{run_id}.sock"


class InboxError(Exception):
    """The run's socket cannot be made (the run goes on without one)."""


class RunInbox:
    """Listens for messages from outside the run while it runs: ``start``,
    then ``close`` (which stops the listener, ends what it handles and removes
    the socket). Owns its threads: the listener and one per request."""

    def __init__(self, run_id: str, external: ExternalMessages) -> None:
        self.path = socket_path(run_id)
        self.external = external
        self._max_request = external.max_message_bytes + REQUEST_OVERHEAD_BYTES
        self._socket: socket.socket | None = None
        #: The (device, inode) of the socket file this run made.
        self._bound: tuple[int, int] | None = None
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        self._handlers: set[threading.Thread] = set()
        #: The connections whose request is still being read (shut on close: a
        #: silent client's read ends at once). One whose request was read is
        #: answered, also while the run closes: a message delivered just before
        #: the run ends still gets its answer.
        self._reading: set[socket.socket] = set()
        self._closing = False

    def start(self) -> None:
        """Make the socket and listen on it; InboxError if it cannot be made."""
        try:
            directory = _private_directory(self.path.parent)
            if _listened_on(self.path, directory):
                # A run of the same id is running (a caller-chosen id, in
                # another journal or Runtime): it keeps its socket.
                raise InboxError(
                    f"`capsule send` and `capsule ask` cannot reach this run: another "
                    f"running run has its id and socket {self.path}; they reach that one"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by a run of this id that crashed
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with _reachable(self.path, directory) as address:
                    listening.bind(address)
                os.chmod(self.path, 0o600)
                self._bound = _identity(self.path)
                listening.listen(MAX_CONNECTIONS)
            except BaseException:
                listening.close()
                raise
        except OSError as exc:
            raise InboxError(
                f"`capsule send` and `capsule ask` cannot reach this run: its socket "
                f"{self.path} cannot be made ({exc.strerror or exc})"
            ) from None
        self._socket = listening
        self._listener = threading.Thread(target=self._listen, name="capsule-inbox")
        self._listener.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self.external.close()  # asks waiting end now
        listening = self._socket
        if listening is not None:
            with contextlib.suppress(OSError):
                listening.shutdown(socket.SHUT_RDWR)  # wakes accept()
        if self._listener is not None:
            self._listener.join()
        if listening is not None:
            listening.close()
            # Only the socket this run made: another run of the same id may
            # have made its own since (this one's was a crashed run's, to it).
            if self._bound is not None and _identity(self.path) == self._bound:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        with self._lock:
            handlers = list(self._handlers)
            connections = list(self._reading)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for handler in handlers:
            handler.join()

    def __enter__(self) -> RunInbox:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _listen(self) -> None:
        assert self._socket is not None
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closing:
                    connection.close()
                    return
                if len(self._handlers) >= MAX_CONNECTIONS:
                    busy = True
                else:
                    busy = False
                    handler = threading.Thread(
                        target=self._handle, args=(connection,), name="capsule-inbox-request"
                    )
                    self._handlers.add(handler)
                    self._reading.add(connection)
            if busy:
                _answer(connection, _error("busy", "the run is handling too many requests"))
                connection.close()
            else:
                handler.start()

    def _handle(self, connection: socket.socket) -> None:
        try:
            with connection:
                connection.settimeout(READ_TIMEOUT_S)
                if not _same_user(connection):
                    return
                deadline = time.monotonic() + READ_TIMEOUT_S
                answer = self._answer(connection, deadline)
                _answer(connection, answer)
                if answer.get("kind") == "too_large":
                    # Read to its end (not kept): closed with data unread, the
                    # connection would be reset before the client reads why.
                    _discard(connection, deadline)
        finally:
            with self._lock:
                self._handlers.discard(threading.current_thread())
                self._reading.discard(connection)

    def _answer(self, connection: socket.socket, deadline: float) -> dict[str, Any]:
        try:
            raw = _read_request(connection, self._max_request, deadline)
        except TimeoutError:
            return _error("bad_request", f"no whole request came within {READ_TIMEOUT_S:g}s")
        except OSError as exc:
            return _error("bad_request", f"the request could not be read: {exc}")
        with self._lock:
            if self._closing:
                return _error("run_ended", "the run is ending")
            self._reading.discard(connection)
        if raw is None:
            return _error(
                "too_large",
                f"the request is over {self._max_request:,} bytes; the run's messages are "
                f"at most {self.external.max_message_bytes:,} bytes (the run option max_message_size)",
            )
        try:
            op, target, body_json, timeout = parse_request(raw)
        except guest_data.ProtocolError as exc:
            return _error("bad_request", str(exc))
        try:
            if op == "send":
                delivered = self.external.send(target, body_json)
                return {"ok": True, "id": delivered.message_id, "to": delivered.target_id}
            reply_json = self.external.ask(target, body_json, timeout)
        except ExternalError as exc:
            return _error(exc.kind, str(exc))
        # (A reply was checked as strict JSON when its task gave it.)
        return {"ok": True, "reply": json.loads(reply_json)}


def parse_request(raw: bytes) -> tuple[str, str, str, float]:
    """(op, target, body as JSON text, timeout) of a request, or ProtocolError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise guest_data.ProtocolError("the request is not UTF-8 text") from None
    request = guest_data.json_value(text, "the request")
    if not isinstance(request, dict) or not {"op", "to", "body"} <= set(request) <= {
        "op",
        "to",
        "body",
        "timeout",
    }:
        raise guest_data.ProtocolError(
            'the request must be a JSON object {"op", "to", "body"[, "timeout"]}'
        )
    op, target, timeout = request["op"], request["to"], request.get("timeout", 60.0)
    if op not in ("send", "ask"):
        raise guest_data.ProtocolError(f"the request's op must be send or ask, not {op!r:.40}")
    if not isinstance(target, str) or not target:
        raise guest_data.ProtocolError("the request's target must be an actor name or task id")
    guest_data.name(target, "the request's target")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not (math.isfinite(timeout) and 0 < timeout <= MAX_ASK_TIMEOUT_S)
    ):
        raise guest_data.ProtocolError(
            f"the request's timeout must be seconds from 0 to {MAX_ASK_TIMEOUT_S:g}"
        )
    body_json = json.dumps(request["body"], ensure_ascii=False, allow_nan=False)
    return op, target, body_json, float(timeout)


def _read_request(connection: socket.socket, limit: int, deadline: float) -> bytes | None:
    """The request (what comes before the client shuts its side), or None if
    it is over ``limit`` bytes; TimeoutError if it is not whole by ``deadline``
    (however slowly it trickles in)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        connection.settimeout(left)
        chunk = connection.recv(min(1 << 16, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def _discard(connection: socket.socket, deadline: float) -> None:
    """Read what the client still sends, until it is done or ``deadline``."""
    with contextlib.suppress(OSError):
        while (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            if not connection.recv(1 << 16):
                return


def _answer(connection: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the client left: nothing to tell
        connection.sendall(json.dumps(answer).encode() + b"\n")


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "message": message}


def _same_user(connection: socket.socket) -> bool:
    """Whether the peer runs as this process's user (the directory's mode
    says so already; this holds if its mode is ever widened)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return False
    uid: int = struct.unpack("3i", credentials)[1]
    return uid == os.getuid()


def _private_directory(path: Path) -> Path:
    """``path``, a directory only this user can reach (made so if missing);
    OSError if it is anything else (a symlink, another user's, open to others)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(0, f"{path} is not a directory of this user's")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def _reachable(path: Path, directory: Path) -> Any:
    """An address bind() and connect() take for ``path``: itself, or through
    its directory's descriptor if it is too long for sun_path."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _listened_on(path: Path, directory: Path) -> bool:
    """Whether a run listens on the socket at ``path`` now (a crashed run's
    socket file refuses connections)."""
    if not os.path.lexists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        with _reachable(path, directory) as address:
            probe.connect(address)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def connectable(path: Path) -> Any:
    """The address a client connects to (see _reachable)."""
    return _reachable(path, path.parent)
