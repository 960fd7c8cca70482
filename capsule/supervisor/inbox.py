"""The endpoint of a running run for `capsule send` and `capsule ask`: a Unix
domain socket that only the run's owner can reach (mode 0600, in a 0700
directory of Capsule's per-user state, the peer's uid checked too), open while
the run runs and removed when it ends.

One request per connection: a JSON object of at most the run's largest message
and a little more, read within READ_TIMEOUT_S; then one JSON line answers it.
What a client sends is input like a guest's: bounded, and checked once here
(capsule.sandbox.guest_data); a client that sends nothing, or never reads its
answer, holds a task on the inbox's loop for a few seconds, never a thread
nor the run. (asyncio is imported where it is used: a run on task threads
that no client reaches never loads it.)"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import socket
import stat
import struct
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsule.actors.external import ExternalError, ExternalMessages
from capsule.logs import logger
from capsule.sandbox import guest_data
from capsule.sandbox.runtime import capsule_home

if TYPE_CHECKING:
    import asyncio

    from capsule.supervisor.run_loop import RunLoop

_log = logger("supervisor")

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
    the socket). It serves on an event loop: the run's (``loop``, on the async
    core: no thread of its own), else one on a thread of its own, made once
    the first client comes (see _serve_alone). One task
    listens, one per request handles it: an ask waits for its reply there,
    holding no thread; only the durable journal write of a delivery runs on
    the loop's executor (it may wait for the disk)."""

    def __init__(
        self, run_id: str, external: ExternalMessages, loop: RunLoop | None = None
    ) -> None:
        self.path = socket_path(run_id)
        self.external = external
        self._max_request = external.max_message_bytes + REQUEST_OVERHEAD_BYTES
        self._run_loop = loop
        self._socket: socket.socket | None = None
        #: The (device, inode) of the socket file this run made.
        self._bound: tuple[int, int] | None = None
        #: Whether it serves on the run's loop (once started).
        self._started = False
        #: Its own loop's thread, if the run has no loop, and the pipe that
        #: wakes it before its loop runs (see _serve_alone).
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        #: Set once its listener and every request it took ended (or never began).
        self._served = threading.Event()
        # (On the loop's thread only, from here on.)
        self._stopping = False
        self._listener: asyncio.Task[None] | None = None
        self._handling = 0
        #: The connections whose request is still being read (shut on close: a
        #: silent client's read ends at once). One whose request was read is
        #: answered, also while the run closes: a message delivered just before
        #: the run ends still gets its answer.
        self._reading: set[socket.socket] = set()

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
                listening.setblocking(False)
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
        run_loop = self._run_loop
        if run_loop is not None:
            try:
                run_loop.soon(
                    lambda: run_loop.start_soon(self._serve, f"capsule-inbox {self.path}")
                )
            except RuntimeError as exc:  # its run's loop has ended
                raise InboxError(
                    f"`capsule send` and `capsule ask` cannot reach this run: {exc}"
                ) from None
            self._started = True
            return
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._serve_alone, name="capsule-inbox")
        self._thread.start()

    def close(self) -> None:
        """Stop listening, end the asks still waiting (run_ended) and the reads
        of silent clients, answer the requests already read, and remove the
        socket. Returns once all that is done."""
        self.external.close()  # asks waiting end now
        listening, run_loop, wake = self._socket, self._run_loop, self._wake
        if self._thread is not None and wake is not None:
            os.write(wake[1], b"x")  # (to its loop, or its wait for one: see _serve_alone)
            self._thread.join()
            for fd in wake:
                os.close(fd)
        elif run_loop is not None and self._started:
            with contextlib.suppress(RuntimeError):  # (its loop stopped: so did its tasks)
                run_loop.soon(self._stop)
            while not self._served.wait(0.5) and run_loop.running:
                pass  # (a run's loop that ended took the inbox's tasks with it)
        if listening is not None:
            listening.close()
            # Only the socket this run made: another run of the same id may
            # have made its own since (this one's was a crashed run's, to it).
            if self._bound is not None and _identity(self.path) == self._bound:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    def __enter__(self) -> RunInbox:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _serve_alone(self) -> None:
        """On its own thread: serve on a loop of its own once a client comes,
        until close wakes it; or nothing, if close comes first. Most runs get
        no message: their inbox makes no loop, and its thread waits in
        select(), not holding the GIL the run starts up with. (Plain asyncio:
        importing anyio's backend would cost a run on the thread core more
        start-up than the whole inbox.)"""
        assert self._socket is not None and self._wake is not None
        woken = self._wake[0]
        came, _, _ = select.select([self._socket.fileno(), woken], [], [])
        if woken in came:
            return
        import asyncio

        loop = asyncio.new_event_loop()

        def stop() -> None:
            loop.remove_reader(woken)  # (once: the pipe stays readable)
            self._stop()

        try:
            loop.add_reader(woken, stop)
            loop.run_until_complete(self._serve())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    # -- on its loop ---------------------------------------------------------

    def _stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.cancel()
        for connection in self._reading:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    async def _serve(self) -> None:
        """Listen until close, each request handled in a task of its own;
        ends once the last one it took is answered."""
        import asyncio

        try:
            async with asyncio.TaskGroup() as tasks:
                self._listener = tasks.create_task(self._listen(tasks))
                if self._stopping:  # (closed before it began)
                    self._listener.cancel()
        finally:
            self._served.set()

    async def _listen(self, tasks: asyncio.TaskGroup) -> None:
        import asyncio

        assert self._socket is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(self._socket)
            except OSError:
                return  # (its socket failed: `capsule send` cannot reach the run now)
            if self._handling >= MAX_CONNECTIONS:
                with connection:
                    # (A short line: the socket's buffer takes it at once.)
                    with contextlib.suppress(OSError):
                        connection.send(
                            _line(_error("busy", "the run is handling too many requests"))
                        )
                continue
            self._handling += 1
            self._reading.add(connection)
            tasks.create_task(self._handle(connection))

    async def _handle(self, connection: socket.socket) -> None:
        import asyncio

        try:
            with connection:
                if not _same_user(connection):
                    return
                loop = asyncio.get_running_loop()
                deadline = loop.time() + READ_TIMEOUT_S
                try:
                    answer = await self._answer(connection, deadline)
                except Exception:  # a bug: on the run's loop, it must not end the run
                    _log.exception("the inbox of %s failed answering a request", self.path)
                    answer = _error("internal", "the run failed answering (a bug in Capsule)")
                with contextlib.suppress(OSError, TimeoutError):  # the client left: nothing to tell
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        await loop.sock_sendall(connection, _line(answer))
                    if answer.get("kind") == "too_large":
                        # Read to its end (not kept): closed with data unread, the
                        # connection would be reset before the client reads why.
                        async with asyncio.timeout_at(deadline):
                            while await loop.sock_recv(connection, 1 << 16):
                                pass
        finally:
            self._handling -= 1
            self._reading.discard(connection)

    async def _answer(self, connection: socket.socket, deadline: float) -> dict[str, Any]:
        import asyncio

        try:
            async with asyncio.timeout_at(deadline):
                raw = await _read_request(connection, self._max_request)
        except TimeoutError:
            return _error("bad_request", f"no whole request came within {READ_TIMEOUT_S:g}s")
        except OSError as exc:
            return _error("bad_request", f"the request could not be read: {exc}")
        if self._stopping:
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
        loop = asyncio.get_running_loop()
        try:
            if op == "send":
                send = partial(self.external.send, target, body_json)
                delivered = await loop.run_in_executor(None, send)
                return {"ok": True, "id": delivered.message_id, "to": delivered.target_id}
            reply_json = await self._ask(target, body_json, timeout)
        except ExternalError as exc:
            return _error(exc.kind, str(exc))
        # (A reply was checked as strict JSON when its task gave it.)
        return {"ok": True, "reply": json.loads(reply_json)}

    async def _ask(self, target: str, body_json: str, timeout: float) -> str:
        """The reply to an ask, waited for on the loop (no thread held)."""
        import asyncio

        loop = asyncio.get_running_loop()
        waker = _LoopWaker(loop)
        begin = partial(self.external.begin_ask, target, body_json, waker)
        delivered = await loop.run_in_executor(None, begin)
        answered = False
        try:
            async with asyncio.timeout(timeout):
                while (reply := self.external.reply_to(delivered, target)) is None:
                    await waker.woken.wait()
                    waker.woken.clear()
        except TimeoutError:
            raise ExternalError(
                "timeout", f"no reply from {target!r} within {timeout:g}s"
            ) from None
        else:
            answered = True
            return reply
        finally:
            self.external.end_ask(delivered, waker, answered)


class _LoopWaker:
    """Wakes an ask waiting on a loop (the router wakes it from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        self._loop = loop
        self.woken = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # (its loop has stopped: no one waits)
            self._loop.call_soon_threadsafe(self.woken.set)


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


async def _read_request(connection: socket.socket, limit: int) -> bytes | None:
    """The request (what comes before the client shuts its side), or None if
    it is over ``limit`` bytes."""
    import asyncio

    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await loop.sock_recv(connection, min(1 << 16, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def _line(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


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
