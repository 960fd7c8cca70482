"""A run in progress, as the host application holds it: its events, its
result, and the ways to reach into it (cancel, send, ask)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

import anyio

from capsule.actors.external import Asking, Delivered, ExternalError, ExternalMessages
from capsule.host.errors import DeliveryError, InvalidRequest, RunError
from capsule.host.requests import json_text
from capsule.host.result import RunResult
from capsule.interrupts import StopRequest
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.inbox import MAX_ASK_TIMEOUT_S

if TYPE_CHECKING:
    from capsule.host.live import LiveTask
    from capsule.supervisor.run import Run

#: The most characters of output a handle's buffer holds: past it, its oldest
#: events go, as past ``event_buffer`` events (one larger output is kept alone).
MAX_HELD_TEXT_CHARS = 16 * 1024**2
#: Why a run's tasks end when the host application cancels them.
CANCELLED_BY_HOST = "cancelled by the host application"


def _scheduler() -> Callable[[Callable[[], None]], None]:
    """A function that has the current event loop call a function soon, from
    any thread, without waiting for it (a run's threads never wait on the loop)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio (anyio's other backend)
        import trio

        token = trio.lowlevel.current_trio_token()

        def on_trio(function: Callable[[], None]) -> None:
            token.run_sync_soon(function)

        return on_trio

    def on_asyncio(function: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(function)

    return on_asyncio


class RunHandle:
    """A run started by :meth:`Runtime.start`. Its events are kept in one
    buffer of at most ``event_buffer`` events (and MAX_HELD_TEXT_CHARS of
    output), whoever reads them: a consumer that falls further behind skips
    the oldest (counted in ``events_dropped``); the run never waits for one."""

    def __init__(
        self, run_id: str, event_buffer: int, limiter: anyio.CapacityLimiter | None = None
    ) -> None:
        self.run_id = run_id
        #: The threads sends and asks wait on (the Runtime's, not the application's).
        self._limiter = limiter
        #: Events a consumer of :meth:`events` skipped because it fell more
        #: than the buffer behind (summed over consumers).
        self.events_dropped = 0
        self._lock = threading.Lock()
        self._events: deque[tuple[int, Any]] = deque(maxlen=event_buffer)
        #: Characters of text the buffer holds (bounded too: see MAX_HELD_TEXT_CHARS).
        self._held_chars = 0
        self._emitted = 0
        self._schedule = _scheduler()
        self._changed = anyio.Event()
        self._wake_pending = False
        #: Set once the root task began (its mailbox is open), or the run ended.
        self._started = anyio.Event()
        self._root_began = False
        self._ended = anyio.Event()
        self._run: Run | None = None
        #: Why the run is to stop, if asked before it started.
        self._stop_reason: str | None = None
        #: What :meth:`interrupt` asks of the run's worker thread.
        self._interrupted = StopRequest()
        self._result: RunResult | None = None
        self._error: RunError | None = None

    # -- what the run's threads call ------------------------------------------

    def _on_event(self, event: Any) -> None:
        """A run's event (on one of its threads): kept, and consumers woken."""
        size = _text_size(event)
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self._forget_oldest()
            self._events.append((self._emitted, event))
            self._emitted += 1
            self._held_chars += size
            while self._held_chars > MAX_HELD_TEXT_CHARS and len(self._events) > 1:
                self._forget_oldest()
            # The root task's first event: its mailbox is open, messages reach it.
            root_began = not self._root_began and getattr(event, "task_id", None) == "main"
            self._root_began = self._root_began or root_began
            if self._wake_pending and not root_began:
                return
            self._wake_pending = True
        with suppress(RuntimeError):  # (the loop closed: nobody reads any more)
            self._schedule(self._wake)
            if root_began:
                self._schedule(self._started.set)

    def _soon(self, function: Callable[[], None]) -> None:
        """Have the loop call ``function`` soon (from a run's thread)."""
        with suppress(RuntimeError):  # (the loop closed: nobody waits any more)
            self._schedule(function)

    def _forget_oldest(self) -> None:
        _, event = self._events.popleft()
        self._held_chars -= _text_size(event)

    def _on_run(self, run: Run) -> None:
        """The run started (on its thread): cancels asked before now reach it."""
        with self._lock:
            self._run = run
            reason = self._stop_reason
        if reason is not None:
            run.stop(reason)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
            changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _end(self, result: RunResult | None, error: RunError | None) -> None:
        """The run ended (on the loop): with its result, or the call's error."""
        self._result, self._error = result, error
        self._ended.set()
        self._started.set()
        self._wake()

    def _stop(self, reason: str) -> None:
        """Stop the whole run (thread-safe; now, or as soon as it starts)."""
        with self._lock:
            run = self._run
            if run is None:
                self._stop_reason = reason
        if run is not None:
            run.stop(reason)

    # -- the public face ---------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        return self._ended.is_set()

    async def events(self) -> AsyncIterator[Any]:
        """The run's events (capsule.supervisor.events; all but the per-message
        ones), in the order they happened, from the oldest the handle still
        holds; the iteration ends after the run's last event."""
        position = 0
        while True:
            with self._lock:
                ended = self._ended.is_set()
                changed = self._changed
                oldest = self._events[0][0] if self._events else self._emitted
                if oldest > position:
                    self.events_dropped += oldest - position
                    position = oldest
                # (The newest, taken from the end: the numbers held run without
                # a gap up to _emitted. Going through all the handle holds, a
                # run of thousands of actors took the square of its events.)
                new = self._emitted - position
                batch = [event for _, event in islice(reversed(self._events), new)]
                batch.reverse()
                position = self._emitted
            for event in batch:
                yield event
            if not batch:
                if ended:
                    return
                await changed.wait()

    async def result(self) -> RunResult:
        """Wait for the run to end: its result, or the RunError of the call (the
        program could not be loaded, the journal failed)."""
        await self._ended.wait()
        return self.ended_result()

    def ended_result(self) -> RunResult:
        """The result of a run that ended (see :meth:`result`), without waiting."""
        if not self.done:
            raise RuntimeError(f"run {self.run_id} has not ended; await result()")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def cancel(self, task_id: str | None = None) -> bool:
        """Cancel the whole run (``task_id`` None: it ends as interrupted, and
        stays resumable; this waits until it has stopped), or one running task
        and everything under it, as its parent would (False if no task of that
        id is running)."""
        if task_id is None:
            self._stop(CANCELLED_BY_HOST)
            with anyio.CancelScope(shield=True):
                await self._ended.wait()
            return True
        if not isinstance(task_id, str) or not task_id or len(task_id) > 1024:
            raise InvalidRequest(f"task_id {task_id!r:.80} is not a task id (e.g. 'main/1')")
        await self._started.wait()
        run = self._run
        if run is None or self.done:
            return False
        return run.cancel_task(task_id, CANCELLED_BY_HOST)

    def live_tasks(self) -> list[LiveTask]:
        """The task attempts running now, each with the fuel it has burned so far
        and the messages waiting in its mailbox (none before the run's tasks
        begin, nor once it ended). Thread-safe and without waiting (it reads
        the run, never its loop): a dashboard may call it a few times a second."""
        # (A model built only for a caller that reads live tasks: a TUI, a dashboard.)
        from capsule.host.live import LiveTask

        with self._lock:
            run = self._run
        if run is None or self.done:
            return []
        return [
            LiveTask(
                task_id=reading.task_id,
                task=reading.task,
                attempt=reading.attempt,
                fuel_used=reading.fuel_used,
                fuel_budget=reading.fuel_budget,
                mailbox_depth=reading.mailbox_depth,
            )
            for reading in run.snapshot()
        ]

    def interrupt(self) -> None:
        """Stop the run as Ctrl-C stops ``capsule run``, wherever it is: while
        the guest runtime is built or the program imported (those stop at
        once), or while its tasks run (every task is cancelled, with the error
        ``cancelled: the run was interrupted``). It ends as interrupted, its
        journal written, resumable. Thread-safe and without waiting (a signal
        handler's thread may call it); :meth:`result` waits for the end."""
        self._interrupted.request()

    async def send(self, name: str, message: Any) -> str:
        """Put ``message`` (a JSON value) in the mailbox of the actor ``name``
        (a registered name or a task id); its message id once it is delivered
        (and journaled). DeliveryError if it cannot be, now."""
        external = await self._external(name)
        body = _body_json(message)
        try:
            delivered: Delivered = await anyio.to_thread.run_sync(
                external.send, name, body, limiter=self._limiter
            )
        except ExternalError as exc:
            raise DeliveryError(exc.kind, str(exc)) from None
        return delivered.message_id

    async def ask(self, name: str, message: Any, timeout: float = 60.0) -> Any:
        """Send ``message`` to the actor ``name`` and wait for its reply (the
        value it replied). DeliveryError: not delivered, or no reply within
        ``timeout`` seconds (kind ``timeout``), or the actor or run ended."""
        # (Compared as given: float() of an int past 1e308 would overflow.)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (0 < timeout <= MAX_ASK_TIMEOUT_S)
        ):
            raise InvalidRequest(
                f"timeout {timeout!r} is invalid; expected seconds from 0 to {MAX_ASK_TIMEOUT_S:g}"
            )
        external = await self._external(name)
        body = _body_json(message)
        let_go = anyio.Event()
        asking = Asking(on_end=lambda: self._soon(let_go.set))
        try:
            reply: str = await anyio.to_thread.run_sync(
                partial(external.ask, name, body, float(timeout), asking),
                abandon_on_cancel=True,
                limiter=self._limiter,
            )
        except ExternalError as exc:
            raise DeliveryError(exc.kind, str(exc)) from None
        except anyio.get_cancelled_exc_class():
            # The caller was cancelled: its thread stops waiting for the reply
            # now, and is back (the ask forgotten) before the cancellation goes on.
            if asking.stop():
                with anyio.CancelScope(shield=True):
                    await let_go.wait()
            raise
        return json.loads(reply)

    async def _external(self, name: str) -> ExternalMessages:
        from capsule.sandbox import guest_data

        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"name {name!r:.80} is not an actor name or task id")
        try:
            guest_data.name(name, "the actor name")
        except guest_data.ProtocolError as exc:
            raise InvalidRequest(str(exc)) from None
        await self._started.wait()
        run = self._run
        if run is None or self.done:
            raise DeliveryError("run_ended", f"run {self.run_id} has ended")
        return run.external


def _body_json(message: Any) -> str:
    return json_text(message, "the message")


def _text_size(event: Any) -> int:
    """The characters of text an event carries, what a guest can make large:
    output, a warning's text, an error's message and traceback (the previews
    of arguments and results are short)."""
    size = 0
    for value in vars(event).values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, ErrorDetail):
            size += len(value.message) + len(value.traceback or "")
    return size
