"""Writing to stdout and stderr without ever making the writer wait.

A reader that stops reading (``capsule run p.py | sleep 60``, a terminal held
with Ctrl-S) makes every write to its pipe block. A run must not block with it:
its deadlines, cancellations and signals go on. So text is queued here, in a
bounded buffer per stream, and written by one thread this writer owns. That
thread waits until a descriptor is writable (or a wake-up pipe of its own says
there is more to do, or it must stop) and writes at most what the descriptor
takes at once, so stopping it never waits on the reader. Past the bound,
droppable text is dropped, and said so on stderr once per stretch of dropping.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import Literal

Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr")

#: Droppable text a stream may hold unwritten before more is dropped.
BUFFER_LIMIT_BYTES = 8 * 1024**2
#: Most bytes written at once to a pipe, a socket or a terminal: a pipe that
#: select() calls writable takes this much without blocking (Linux gives a
#: writer a free page), so the writing thread stays stoppable.
_CHUNK_BYTES = select.PIPE_BUF if hasattr(select, "PIPE_BUF") else 512
#: Most bytes written at once to a regular file (which never blocks for long).
_FILE_CHUNK_BYTES = 64 * 1024


class _Queue:
    """One stream's text not yet written."""

    def __init__(self, name: Stream, fd: int, encoding: str) -> None:
        self.name = name
        self.fd = fd
        self.encoding = encoding
        #: (order queued, counts against the bound, bytes), oldest first.
        self.chunks: deque[tuple[int, bool, bytes]] = deque()
        #: Bytes of the oldest chunk already written.
        self.written = 0
        #: Bytes queued that count against the bound (droppable ones).
        self.droppable = 0
        self.dropping = False
        self.dropped = 0
        #: The stream cannot be written any more (closed pipe, closed terminal).
        self.dead = False
        #: When its oldest text started waiting, or its reader last took some.
        self.progress_at = time.monotonic()
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular, self.dead = False, True
        self.chunk_bytes = _FILE_CHUNK_BYTES if regular else _CHUNK_BYTES
        try:
            self.terminal = os.isatty(fd)
        except OSError:
            self.terminal = False


class StdioWriter:
    """Queues text for stdout and stderr, never blocking; a thread of its own
    writes it. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        *,
        limit: int = BUFFER_LIMIT_BYTES,
        notice_suffix: str = "",
    ) -> None:
        """``notice_suffix`` ends the notices it writes on stderr (where else
        the dropped text can be found, say)."""
        self._limit = limit
        self._notice_suffix = notice_suffix
        self._queues: dict[Stream, _Queue] = {
            "stdout": _Queue("stdout", 1, _encoding(sys.stdout)),
            "stderr": _Queue("stderr", 2, _encoding(sys.stderr)),
        }
        self._lock = threading.Lock()
        #: Notified whenever something was written (or a stream died).
        self._progress = threading.Condition(self._lock)
        self._sequence = 0
        self._stopping = False
        self._closed = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._thread = threading.Thread(target=self._pump, name="capsule-stdio", daemon=True)
        self._thread.start()

    def __enter__(self) -> StdioWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def is_terminal(self, stream: Stream) -> bool:
        return self._queues[stream].terminal

    def write(self, stream: Stream, text: str, *, droppable: bool = True) -> None:
        """Queue ``text``; returns at once. Droppable text past the bound is
        dropped (what a run prints); the rest is always queued (how it ended:
        its size is bounded by whoever writes it)."""
        queue = self._queues[stream]
        data = text.encode(queue.encoding, "backslashreplace")
        if not data:
            return
        notice: bytes | None = None
        with self._lock:
            if queue.dead or self._stopping:
                return
            if droppable:
                if queue.dropping and queue.droppable <= self._limit // 2:
                    queue.dropping = False  # the reader caught up: show again
                if queue.dropping or queue.droppable + len(data) > self._limit:
                    if not queue.dropping:
                        queue.dropping = True
                        notice = self._notice(
                            f"{stream} is not read fast enough: output to it is dropped until it is"
                        )
                    queue.dropped += len(data)
                    data = b""
                else:
                    queue.droppable += len(data)
            # The thread watches only the descriptors it had text for: a stream
            # that had none must wake it.
            wake = False
            if data:
                wake = self._append(queue, data, droppable)
            if notice is not None:
                wake = self._append(self._queues["stderr"], notice, droppable=False) or wake
        if wake:
            self._wake()

    def dropped(self, stream: Stream) -> int:
        """Bytes of ``stream`` dropped so far."""
        with self._lock:
            return self._queues[stream].dropped

    def drain(self, stall_seconds: float) -> bool:
        """Wait until everything queued is written, or until the reader of each
        stream still holding text took nothing for ``stall_seconds``; whether it
        was all written. A signal (Ctrl-C, SIGTERM) ends the wait as it does any."""
        with self._progress:
            while True:
                waiting = [q for q in self._queues.values() if q.chunks and not q.dead]
                if not waiting:
                    return True
                left = max(q.progress_at for q in waiting) + stall_seconds - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)

    def close(self) -> None:
        """Stop the writing thread (what is still queued is dropped) and join it.
        Prompt: the thread never blocks on a reader that does not read."""
        with self._lock:
            if self._closed:
                return
            self._stopping = self._closed = True
        self._wake()
        # Bounded even if a write blocks after all (a terminal whose room was
        # smaller than a chunk, and whose reader then stopped): the thread is a
        # daemon and the process exits without it.
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    # -- the writing thread ------------------------------------------------------

    def _append(self, queue: _Queue, data: bytes, droppable: bool) -> bool:
        """Queue ``data`` (under the lock); whether the stream had nothing queued."""
        was_empty = not queue.chunks
        if was_empty:
            queue.progress_at = time.monotonic()  # its oldest text starts waiting now
        self._sequence += 1
        queue.chunks.append((self._sequence, droppable, data))
        return was_empty

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the writer is closing)

    def _pump(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                pending = [q for q in self._queues.values() if q.chunks and not q.dead]
            try:
                readable, writable, _ = select.select(
                    [self._wake_read], [q.fd for q in pending], []
                )
            except InterruptedError:
                continue
            except (OSError, ValueError):  # a descriptor became invalid
                self._kill([q for q in pending if not _valid(q.fd)] or pending)
                continue
            if readable:
                try:
                    while os.read(self._wake_read, 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            ready = [q for q in pending if q.fd in writable]
            if ready:
                self._write_oldest(ready)

    def _write_oldest(self, ready: list[_Queue]) -> None:
        """Write from the queue whose head was queued first: when both streams
        flow, stdout and stderr keep the order they were written in."""
        with self._lock:
            queue = min(ready, key=lambda q: q.chunks[0][0])
            _, counted, data = queue.chunks[0]
            start = queue.written
        try:
            written = os.write(queue.fd, memoryview(data)[start : start + queue.chunk_bytes])
        except (BlockingIOError, InterruptedError):
            return  # someone made the descriptor non-blocking; select again
        except OSError as exc:  # EPIPE (`| head`), EIO (the terminal closed), ENOSPC, ...
            self._kill([queue])
            if queue is not self._queues["stderr"]:
                with self._lock:
                    notice = self._notice(
                        f"output can no longer be shown ({exc!r} writing {queue.name})"
                    )
                    self._append(self._queues["stderr"], notice, droppable=False)
            return
        with self._progress:
            if queue.dead:
                return  # killed meanwhile: its counts were reset
            queue.written += written
            if queue.written == len(data):
                queue.chunks.popleft()
                queue.written = 0
            if counted:
                queue.droppable -= written
            queue.progress_at = time.monotonic()
            self._progress.notify_all()

    def _notice(self, text: str) -> bytes:
        line = f"capsule: {text}{self._notice_suffix}\n"
        return line.encode(self._queues["stderr"].encoding, "backslashreplace")

    def _kill(self, queues: list[_Queue]) -> None:
        """These streams cannot be written any more: what they hold is dropped."""
        with self._progress:
            for queue in queues:
                queue.dead = True
                queue.chunks.clear()
                queue.written = queue.droppable = 0
            self._progress.notify_all()


def _encoding(stream: object) -> str:
    return getattr(stream, "encoding", None) or "utf-8"


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
