"""The sandbox in async mode: each task attempt a call future, polled by a
few threads, with the host calls that may wait as async imports.

:class:`AsyncSandbox` is a :class:`~capsule.sandbox.engine.Sandbox` whose engine
drives calls through wasmtime's async API (capsule.sandbox.wasm_async) with the
same compiled guest runtime. :meth:`AsyncSandbox.start` starts an attempt and
returns at once; the attempt runs on the sandbox's poll threads, which are its
CPU slots, and its outcome is handed to the caller's ``on_done`` when it ends.

Cheap imports are served on the poll thread exactly as in the thread mode. The
imports that may wait (WAITING) go to a :class:`WaitingHost`, which answers at
once or with a :class:`~capsule.sandbox.wasm_async.Pending` it resolves later,
from any thread: meanwhile the attempt holds memory, not a thread. A direct
task call is such an import: the host starts the child as an attempt of its
own and resolves the caller's call when the child ends.

Limits are the thread mode's: fuel per attempt, the memory cap per store, and
epoch deadlines (the epoch callback traps a running attempt that must stop).
A fuel yield interval makes a busy attempt give its poll thread to the next
one in turn. An attempt that waits is not running, so no tick reaches it: the
sandbox stops it at its deadline, and :meth:`AsyncSandbox.stop` stops it when
its host says it must (cancelled, aborted); its future is deleted and its
instance discarded, and it ends with the failure kind of the thread mode.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import wasmtime
from wasmtime.component import Instance, LinkerInstance

from capsule.sandbox import after_import, guest_data
from capsule.sandbox import wasmtime_compat as compat
from capsule.sandbox.engine import (
    CALLER_STOPPED,
    ENGINE_SETTINGS,
    Answer,
    AttemptOutcome,
    Completion,
    Envelope,
    ErrorInfo,
    GuestComponent,
    Invocation,
    Prepared,
    Sandbox,
    _bound,
    _checked_result,
    _failed,
    _host_failure,
    _no_finalizer,
    _reported_failure,
    _step_caller,
    _Stop,
    _stop_if_asked,
    _thread,
    _TrackedStore,
    completions,
    refusal,
    task_input,
    tick_check,
    too_little_ram,
)
from capsule.sandbox.guest_data import TaskCall, TooLarge
from capsule.sandbox.hostcall import HostFunc, add_host_func
from capsule.sandbox.modules import ProgramFinder
from capsule.sandbox.poller import Poller
from capsule.sandbox.prefault import Prefaulter
from capsule.sandbox.runtime import Progress
from capsule.sandbox.wasm_async import (
    AsyncExport,
    AsyncStore,
    CallCancelled,
    CallFuture,
    Pending,
    add_async_func,
    async_engine,
    current_future,
    instantiate,
)

#: Fuel a busy attempt runs before it gives its poll thread to the next one
#: (~1.5 ms of guest code: slices this long cost nothing measurable).
FUEL_YIELD_INTERVAL = 10_000_000

#: An import at most this long is made on the poll thread that starts its
#: attempt; a longer one (or one never made) on a preparer thread, so that a
#: slow module-level program does not hold up the tasks that thread serves.
QUICK_IMPORT_S = 0.02

#: The imports that may wait, by the Sandbox method that serves them in the
#: thread mode: in async mode each is an async import served by a WaitingHost.
WAITING = frozenset(
    {
        "_call_task",
        "_wait",
        "_wait_any",
        "_sleep",
        "_send",
        "_receive",
        "_ask",
        "_http_request",
        "_poll",
    }
)

Received = tuple[bool, Sequence[Envelope] | str]


class WaitingHost(Protocol):
    """The host calls that may wait, in async mode (implemented by the
    supervisor). Each is called on a poll thread, inside its caller's call,
    and must return at once: its answer (as HostCalls' namesake gives it), or
    a Pending it resolves with that answer later, from any thread. A host that
    decides the caller must stop resolves its Pending with a failed answer, or
    has the sandbox stop the attempt (AsyncSandbox.stop)."""

    def call_task(self, caller: Invocation, call: TaskCall) -> Answer | Pending:
        """Run a child task to its end (as an attempt of its own, never on the
        caller's poll): (True, result JSON) or (False, error JSON)."""
        ...

    def wait(
        self, caller: Invocation, task_ids: list[str], timeout: float | None, any_ended: bool
    ) -> Answer | Pending: ...

    def sleep(self, caller: Invocation, seconds: float) -> Pending | None:
        """Nothing at once (no sleep), or a Pending resolved (with None) once
        the time has passed."""
        ...

    def send(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> Answer | Pending:
        """Answered at once unless the target's mailbox is full."""
        ...

    def receive(self, caller: Invocation, timeout: float | None) -> Received | Pending: ...

    def ask(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> Answer | Pending: ...

    def http(self, caller: Invocation, request_json: str) -> Answer | Pending: ...

    def poll(self, caller: Invocation, timeout: float | None) -> Answer | Pending:
        """(True, JSON [[handle, ok, payload], ...]) or (False, error JSON)."""
        ...


OnDone = Callable[["Attempt"], None]


@dataclass(eq=False)
class Attempt:
    """One attempt of a task as a call future (or an instance being prepared)."""

    invocation: Invocation
    #: Serves its waiting imports (None: they are served as in the thread
    #: mode, at once: an instance importing the program).
    waiting: WaitingHost | None
    on_done: OnDone | None = None
    started: float = field(default_factory=time.monotonic)
    store: _AsyncTrackedStore | None = None
    future: CallFuture[Any] | None = None
    #: What it produced, once it ended (then ``on_done`` was called).
    outcome: AttemptOutcome | None = None
    #: The answer it waited for last, given later.
    pending: Pending | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not None


class _AsyncTrackedStore(AsyncStore, _TrackedStore):
    """A store driven by call futures, counted and prefaulted as the thread
    mode's are."""

    def __init__(self, engine: wasmtime.Engine, prefaulter: Prefaulter) -> None:
        super().__init__(engine, fuel=0)
        self._prefaulter = prefaulter
        #: The attempt it serves, once a task took it.
        self.attempt: Attempt | None = None


def _serving() -> Attempt | None:
    """The attempt whose call is polled on this thread."""
    future = current_future()
    data = None if future is None else future.data
    return data if isinstance(data, Attempt) else None


@contextmanager
def _bound_here() -> Iterator[Attempt | None]:
    """Bind the polled attempt for the thread mode's import functions."""
    attempt = _serving()
    if attempt is None:
        yield None
        return
    with _bound(attempt.invocation, attempt.store):
        yield attempt


def _on_host_error(exc: Exception) -> wasmtime.WasmtimeError:
    with _bound_here():
        return _host_failure(exc)


@compat.EPOCH_CALLBACK_T  # type: ignore[untyped-decorator]
def _on_async_epoch(context: Any, _data: Any, delta: Any, kind: Any) -> int:
    # Runs on a poll thread, during the poll of the store's call.
    attempt = _serving()
    if attempt is not None:
        with _bound(attempt.invocation, attempt.store):
            trap = tick_check(attempt.invocation, context)
        if trap:
            return trap
    delta[0] = 1
    kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE (fuel yields give the turns)
    return 0


def _driven(future: CallFuture[Any], attempt: Attempt) -> Any:
    """Poll a call that must not wait (an instantiation, the program's import)
    to its end on this thread: its result."""
    future.data = attempt
    while not future.poll():
        if future.blocked:  # (every waiting import answers at once here)
            future.cancel()
            raise wasmtime.WasmtimeError("capsule: the program's import waited on the host")
    return future.result()


class AsyncSandbox(Sandbox):
    """A Sandbox whose task attempts run as call futures on ``poll_threads``
    threads (default: the CPU cores), each given the turn after
    ``fuel_yield_interval`` fuel; use as a context manager. ``invoke`` (the
    thread mode's blocking call) is not available: :meth:`start` instead.
    ``guest``: an engine and compiled runtime shared with other async
    sandboxes (made with this class's engine: ``SharedGuests.for_core("async")``).

    ``warm``: a host application's warm sandbox on the same ``guest`` (one
    opened with :meth:`open_warm`), whose linker and poll threads this one
    uses rather than making its own, if it has as many poll threads; what is
    the run's (its module finder, memory budget, CPU slots, instances) stays
    its own."""

    def __init__(
        self,
        roots: list[Path],
        progress: Progress | None = None,
        poll_threads: int | None = None,
        memory_budget: int | None = None,
        fuel_yield_interval: int = FUEL_YIELD_INTERVAL,
        guest: GuestComponent | None = None,
        warm: AsyncSandbox | None = None,
        finder: ProgramFinder | None = None,
    ) -> None:
        if fuel_yield_interval <= 0:
            raise ValueError(f"fuel_yield_interval must be > 0, not {fuel_yield_interval!r}")
        if warm is not None and (
            warm._warm_poller is None
            or guest is None
            or warm.engine is not guest.engine
            or warm.component is not guest.component
            or (poll_threads is not None and poll_threads != warm.slots.size)
        ):
            warm = None  # (not open, on another engine, or of other poll threads)
        #: The warm sandbox whose linker and poll threads it uses (None: its own).
        self._warm = warm
        super().__init__(
            roots,
            progress,
            cpu_slots=poll_threads,
            memory_budget=memory_budget,
            guest=guest,
            linker=None if warm is None else warm.linker,
            finder=finder,
        )
        self.fuel_yield_interval = fuel_yield_interval
        self._async_exports = {
            self._load_index: AsyncExport(self._load_index),
            self._run_index: AsyncExport(self._run_index),
        }
        self._poller: Poller | None = None
        #: The poll threads of a warm sandbox (see open_warm), once open.
        self._warm_poller: Poller | None = None
        #: Attempts started and not ended, and the lock of them and their
        #: deadlines (notified once none is left nor ending: a close on shared
        #: poll threads waits for that).
        self._lock = threading.Condition(threading.Lock())
        #: How many attempts' ends are being made (their on_done not yet returned).
        self._ending = 0
        #: Prepares an instance for an attempt that found none ready, off its
        #: starter's thread (a poll thread or the run's loop: neither may wait
        #: for a program's import, which may take long). Its threads start
        #: with the first such attempt.
        self._preparer: ThreadPoolExecutor | None = None
        self._attempts: set[Attempt] = set()
        self._importing: set[Attempt] = set()
        self._closing = False
        #: (Weak: an attempt that ended early is not held until its deadline.)
        self._deadlines: list[tuple[float, int, weakref.ref[Attempt]]] = []
        self._order = itertools.count()

    @staticmethod
    def _make_engine() -> tuple[wasmtime.Engine, str]:
        # (The same settings, hence the same cached artifact, as the thread mode's.)
        return async_engine(), ENGINE_SETTINGS

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> AsyncSandbox:
        super().__enter__()
        warm = self._warm
        if warm is not None and warm._warm_poller is not None:
            self._poller = warm._warm_poller
        else:
            self._warm = None
            self._poller = Poller(threads=self.slots.size, name="capsule-poll")
        self._closing = False
        self._preparer = ThreadPoolExecutor(
            max_workers=self.slots.size, thread_name_prefix="capsule-prepare"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self._lock:
                self._closing = True
                preparing = list(self._importing)
            for attempt in preparing:  # (their imports stop at the next tick)
                attempt.invocation.aborted = ErrorInfo("cancelled", CALLER_STOPPED)
            if self._preparer is not None:
                self._preparer.shutdown(wait=True)
                self._preparer = None
            poller, self._poller = self._poller, None
            if poller is not None and self._warm is not None:
                # (Shared poll threads go on: the calls left, none once its
                # run ended, end there, with their on_done.)
                with self._lock:
                    left = [attempt.future for attempt in self._attempts]
                for future in left:
                    if future is not None:
                        poller.cancel(future)
                with self._lock:
                    self._lock.wait_for(lambda: not self._attempts and not self._ending)
            elif poller is not None:
                poller.close()  # (cancels the calls left, without their on_done)
            with self._lock:
                left_attempts, self._attempts = list(self._attempts), set()
            for attempt in left_attempts:
                assert attempt.future is not None
                self._finished(attempt.future)
        finally:
            super().__exit__(*exc)

    def add_program(self, module: str, guest: GuestComponent, finder: ProgramFinder) -> None:
        super().add_program(module, guest, finder)
        image = self._image(module)
        for index in (image.load_index, image.run_index):
            self._async_exports[index] = AsyncExport(index)

    def open_warm(self) -> AsyncSandbox:
        """Start its poll threads, as a host application's warm sandbox: the
        sandboxes of its runs (made with ``warm=`` it) use them and its linker.
        It runs nothing itself (it is not opened, nor ticks); :meth:`close_warm`
        once they have all closed."""
        if self._warm_poller is None:
            self._warm_poller = self._poller = Poller(threads=self.slots.size, name="capsule-poll")
        return self

    def close_warm(self) -> None:
        """Stop its poll threads (joined) and let go of its linker."""
        poller, self._warm_poller, self._poller = self._warm_poller, None, None
        if poller is not None:
            poller.close()
        self.prefaulter.close()
        self.linker.close()

    @property
    def running(self) -> int:
        """How many attempts started and have not ended."""
        return len(self._attempts)

    def _on_tick(self) -> None:
        super()._on_tick()
        poller = self._poller
        if poller is not None:
            poller.flush_handed()
        for attempt in self._due(time.monotonic()):
            self.stop(attempt)

    def _due(self, now: float) -> list[Attempt]:
        """The attempts whose deadline has passed (each once)."""
        due = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                attempt = heapq.heappop(self._deadlines)[2]()
                if attempt is not None and not attempt.ended:
                    due.append(attempt)
        return due

    # -- instances -----------------------------------------------------------

    def _new_store(self, limits: Any, prefaulter: Prefaulter | None = None) -> _AsyncTrackedStore:
        store = _AsyncTrackedStore(self.engine, prefaulter or self.prefaulter)
        store.set_limits(memory_size=limits.ram_bytes)
        store.set_fuel(limits.fuel)
        store.set_wasi(wasmtime.WasiConfig())  # no env, args, files or stdin
        compat.set_epoch_callback(store, _on_async_epoch, _no_finalizer)
        store.set_epoch_deadline(1)
        return store

    def _instantiate(self, store: _TrackedStore, program: str) -> Instance:
        assert isinstance(store, _AsyncTrackedStore)
        attempt = self._preparing(store)
        image = self._image(program)
        with image.prefaulter.instantiating() as own:
            future = instantiate(store, self.linker, image.component)
            instance: Instance = _driven(future, attempt)
            store.memory = image.prefaulter.find(program, _TrackedStore._live, own)
        if store.memory is not None:
            image.prefaulter.prefault(store.memory)
        return instance

    def _call_export(
        self, store: wasmtime.Store, instance: Instance, index: Any, *payload: Any
    ) -> str | ErrorInfo:
        # (Only the program's import comes here: attempts are started.)
        assert isinstance(store, _AsyncTrackedStore)
        future = self._async_exports[index].call(store, instance, *payload)
        value = _driven(future, self._preparing(store))
        if isinstance(value, str):
            return value
        return _reported_failure(value)

    @staticmethod
    def _preparing(store: _AsyncTrackedStore) -> Attempt:
        """The import of the program into ``store``, by the invocation bound
        on this thread (see Sandbox.prepare)."""
        invocation: Invocation = _thread.invocation
        return Attempt(invocation, None, store=store)

    # -- attempts ----------------------------------------------------------

    def invoke(self, invocation: Invocation, program: str, call_json: str) -> AttemptOutcome:
        raise TypeError("an AsyncSandbox runs attempts as call futures: use start()")

    def start(
        self,
        invocation: Invocation,
        program: str,
        call_json: str,
        waiting: WaitingHost,
        on_done: OnDone,
    ) -> Attempt:
        """Start one attempt of a task in a fresh instance, with ``call_json``
        (checked ``{"args": [...], "kwargs": {...}}``) as its arguments, and
        return at once. ``on_done(attempt)`` is called once it ended (on a
        poll thread; on this one or a preparer's if it could not start; on
        the one that closes the sandbox for those it ends), with
        ``attempt.outcome`` set. If no prepared instance is ready, the program
        is imported into a new one first, on a thread of the sandbox's (a few
        milliseconds, or as long as the program's import takes)."""
        if self._poller is None or self._preparer is None:
            raise RuntimeError("the sandbox is not open")
        attempt = Attempt(invocation, waiting, on_done)
        error = too_little_ram(invocation.limits)
        if error is not None:
            self._launch(attempt, error, call_json)
            return attempt
        ready = self._ready_instance(program)
        if ready is not None:
            self._launch(attempt, self._taken(invocation, ready), call_json)
            return attempt
        if current_future() is not None and self._quick_import(program):
            # On a poll thread, serving its caller's task call or spawn: a
            # quick import is made here (handing it to a preparer costs its
            # caller a GIL handover, ~20 % of a call measured).
            self._launch(attempt, self._instance_for(invocation, program), call_json)
            return attempt
        preparer = self._preparer
        with self._lock:  # (a close from now on waits for this import)
            closing = self._closing
            if not closing:
                self._importing.add(attempt)
                preparer.submit(self._prepare_then_launch, attempt, program, call_json)
        if closing:
            self._launch(attempt, ErrorInfo("cancelled", CALLER_STOPPED), call_json)
        return attempt

    def _quick_import(self, program: str) -> bool:
        """Whether ``program``'s last import took at most QUICK_IMPORT_S (one
        never made, or slow, is imported on a preparer thread)."""
        seconds = self.import_seconds.get(program)
        return seconds is not None and seconds <= QUICK_IMPORT_S

    def _prepare_then_launch(self, attempt: Attempt, program: str, call_json: str) -> None:
        """On a preparer thread: an instance for ``attempt``, then its call."""
        try:
            prepared = self._instance_for(attempt.invocation, program)
        except Exception:  # (its owner must hear of its end all the same)
            error = ErrorInfo(
                "trap", "the host failed while starting the task", traceback=traceback.format_exc()
            )
            prepared = error
        finally:
            with self._lock:
                self._importing.discard(attempt)
        self._launch(attempt, prepared, call_json)

    def _launch(self, attempt: Attempt, prepared: Prepared | ErrorInfo, call_json: str) -> None:
        """Make ``attempt``'s call in its ``prepared`` instance, or end it with
        why it has none."""
        poller = self._poller
        if poller is None and isinstance(prepared, Prepared):  # (the sandbox closed meanwhile)
            prepared.store.close()
            prepared = ErrorInfo("cancelled", CALLER_STOPPED)
        if isinstance(prepared, ErrorInfo):
            attempt.outcome = self._outcome(None, prepared, 0, attempt.started)
            if attempt.on_done is not None:
                attempt.on_done(attempt)
            return
        assert poller is not None
        store = prepared.store
        assert isinstance(store, _AsyncTrackedStore)
        store.attempt, attempt.store = attempt, store
        try:
            self._begin(attempt, prepared, call_json, poller)
        except Exception:  # (the attempt never ran: its instance must not outlive it)
            self._not_started(attempt, traceback.format_exc())

    def _begin(self, attempt: Attempt, prepared: Prepared, call_json: str, poller: Poller) -> None:
        """Make the attempt's call in its instance and hand it to the poll threads."""
        invocation, store = attempt.invocation, attempt.store
        assert store is not None
        limits = invocation.limits
        # The task's own budget, from now: nothing spent while preparing counts.
        store.set_limits(memory_size=limits.ram_bytes)
        store.set_fuel(limits.fuel)
        store.set_epoch_deadline(1)
        store.set_fuel_yield_interval(self.fuel_yield_interval)
        future = self._async_exports[self._image(prepared.program).run_index].call(
            store, prepared.instance, task_input(invocation), call_json
        )
        future.data, attempt.future = attempt, future
        deadline = invocation.deadline
        with self._lock:
            self._attempts.add(attempt)
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, next(self._order), weakref.ref(attempt)))
        poller.submit(future, self._finished)

    def _not_started(self, attempt: Attempt, host_traceback: str) -> None:
        """End an attempt the host failed to start once its instance was taken:
        its call (if made) deleted, its instance closed, ``on_done`` here."""
        if attempt.future is not None:
            attempt.future.cancel()
        with self._lock:
            self._attempts.discard(attempt)
        store = attempt.store
        if store is not None:
            store.attempt = store.invocation = None
            store.close()
        error = ErrorInfo(
            "trap", "the host failed while starting the task", traceback=host_traceback
        )
        attempt.outcome = self._outcome(None, error, 0, attempt.started)
        if attempt.on_done is not None:
            attempt.on_done(attempt)

    def stop(self, attempt: Attempt) -> bool:
        """End ``attempt`` now if it must stop (its invocation's check_stop:
        its deadline passed, it or what it runs within was cancelled, it was
        aborted): waiting or running, its call is deleted and its instance
        discarded; ``on_done`` follows on a poll thread. False if it need not
        stop (or ended already)."""
        invocation = attempt.invocation
        reason = invocation.check_stop()
        future, poller = attempt.future, self._poller
        if reason is None or future is None or attempt.ended:
            return False
        if invocation.stop_reason is None:
            invocation.stop_reason = reason
        if poller is not None:
            poller.cancel(future)
        else:
            future.cancel()
        return True

    def hibernate_waiting(self, attempt: Attempt) -> int:
        """Give back the pages of a waiting attempt's memory it has only read
        (they are the shared image's; it gets them back as it reads them
        again): bytes unmapped, 0 if it is not waiting (its call is not
        polled meanwhile, so its guest cannot write its memory)."""
        future, poller, store = attempt.future, self._poller, attempt.store
        if future is None or poller is None or store is None or store.marker is None:
            return 0
        with poller.held(future) as waiting:
            if not waiting or attempt.ended:
                return 0
            return (store.prefaulter or self.prefaulter).release(store.memory, store.marker)

    def _stop_for_memory(self, store: Any, why: str) -> None:
        super()._stop_for_memory(store, why)
        attempt = getattr(store, "attempt", None)
        if isinstance(attempt, Attempt):
            self.stop(attempt)

    def _finished(self, future: CallFuture[Any]) -> None:
        with self._lock:
            self._ending += 1
        try:
            self._finish(future)
        finally:
            with self._lock:
                self._ending -= 1
                if not self._attempts and not self._ending:
                    self._lock.notify_all()

    def _finish(self, future: CallFuture[Any]) -> None:
        """Make the outcome of an attempt whose call ended, and call its on_done."""
        attempt: Attempt = future.data
        with self._lock:
            self._attempts.discard(attempt)
            if len(self._deadlines) > 2 * len(self._attempts) + 1024:
                # Most are of attempts that ended early: kept only those still on.
                self._deadlines = [
                    entry for entry in self._deadlines if entry[2]() in self._attempts
                ]
                heapq.heapify(self._deadlines)
        if attempt.ended:
            return
        try:
            attempt.outcome = self._ended(attempt, future)
        except Exception:  # (its owner must hear of its end all the same)
            error = ErrorInfo(
                "trap", "the host failed while ending the task", traceback=traceback.format_exc()
            )
            attempt.outcome = self._outcome(None, error, 0, attempt.started)
            store = attempt.store
            if store is not None and not store.busy:
                store.close()
        if attempt.on_done is not None:
            attempt.on_done(attempt)

    def _ended(self, attempt: Attempt, future: CallFuture[Any]) -> AttemptOutcome:
        """The outcome of an attempt whose call ended; its instance is closed."""
        invocation, store = attempt.invocation, attempt.store
        assert store is not None
        result: str | ErrorInfo
        with _bound(invocation, store):
            if future.cancelled:
                if invocation.stop_reason is None:
                    invocation.stop_reason = "cancelled"
                result = self._classify(invocation, CallCancelled("the call was deleted"))
            else:
                try:
                    value = future.result()
                except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
                    _blame_the_answer(attempt)
                    result = self._classify(invocation, exc)
                else:
                    result = (
                        _checked_result(invocation, value)
                        if isinstance(value, str)
                        else _reported_failure(value)
                    )
            store.attempt = None
            return self._concluded(invocation, store, result, attempt.started)

    # -- imports -------------------------------------------------------------

    def _add(self, instance: LinkerInstance, name: str, func: HostFunc) -> None:
        waiting = getattr(func, "__name__", "") in WAITING
        if waiting:
            add_async_func(instance, name, self._waiting_import(func), _on_host_error)
        else:
            add_host_func(instance, name, _bound_import(func), _on_host_error)

    def _waiting_import(self, func: HostFunc) -> HostFunc:
        """Serve an import that may wait: by the attempt's WaitingHost (an
        answer now, or a Pending), or by ``func`` as in the thread mode for an
        instance importing the program."""
        serve = getattr(self, f"_later{func.__name__}")

        def waiting(*args: Any) -> Any:
            future = current_future()
            attempt = None if future is None else future.data
            if not isinstance(attempt, Attempt) or attempt.waiting is None:
                with _bound_here():
                    return func(*args)
            with _bound(attempt.invocation, attempt.store):
                invocation = _step_caller()
                answer, then = serve(attempt.waiting, invocation, *args)
                if not isinstance(answer, Pending):
                    if then in _PASS_OK and answer[0]:
                        return answer
                    return then(invocation, answer)
            answer.adapt = _adapter(attempt, then, self.stop)
            attempt.pending = answer
            return answer

        return waiting

    # Each function below asks the WaitingHost for one import's answer, and
    # says how an answer (given now or later) becomes what the guest gets,
    # as the thread mode's namesake does.

    def _later_call_task(
        self, host: WaitingHost, invocation: Invocation, name: str, call_json: str
    ) -> tuple[Any, Then]:
        try:
            call = guest_data.task_call(name, call_json)
        except TooLarge as exc:
            return refusal(name, str(exc)), _answered
        return host.call_task(invocation, call), _answered

    def _later_wait(
        self,
        host: WaitingHost,
        invocation: Invocation,
        ids_json: str,
        timeout_ms: int | None,
        any_ended: bool = False,
    ) -> tuple[Any, Then]:
        task_ids = guest_data.names(ids_json, "the task ids to wait on")
        timeout = guest_data.timeout_s(timeout_ms)
        return host.wait(invocation, task_ids, timeout, any_ended), _answered

    def _later_wait_any(
        self, host: WaitingHost, invocation: Invocation, ids_json: str, timeout_ms: int | None
    ) -> tuple[Any, Then]:
        return self._later_wait(host, invocation, ids_json, timeout_ms, any_ended=True)

    def _later_sleep(self, host: WaitingHost, invocation: Invocation, ms: int) -> tuple[Any, Then]:
        return host.sleep(invocation, ms / 1000), _slept

    def _later_send(
        self,
        host: WaitingHost,
        invocation: Invocation,
        target: str,
        body_json: str,
        timeout_ms: int | None,
    ) -> tuple[Any, Then]:
        target = guest_data.name(target, "a message's target")
        timeout = guest_data.timeout_s(timeout_ms)
        return host.send(invocation, target, body_json, timeout), _answered

    def _later_receive(
        self, host: WaitingHost, invocation: Invocation, timeout_ms: int | None
    ) -> tuple[Any, Then]:
        timeout = guest_data.timeout_s(timeout_ms)
        return host.receive(invocation, timeout), _received

    def _later_ask(
        self,
        host: WaitingHost,
        invocation: Invocation,
        target: str,
        body_json: str,
        timeout_ms: int | None,
    ) -> tuple[Any, Then]:
        target = guest_data.name(target, "a message's target")
        timeout = guest_data.timeout_s(timeout_ms)
        return host.ask(invocation, target, body_json, timeout), _answered

    def _later_http_request(
        self, host: WaitingHost, invocation: Invocation, request_json: str
    ) -> tuple[Any, Then]:
        return host.http(invocation, request_json), _answered

    def _later_poll(
        self, host: WaitingHost, invocation: Invocation, timeout_ms: int | None
    ) -> tuple[Any, Then]:
        timeout = guest_data.timeout_s(timeout_ms)
        return host.poll(invocation, timeout), _polled


#: Turns a waiting import's answer into what the guest gets (or ends the
#: caller, raising _Stop, if it must stop).
Then = Callable[[Invocation, Any], Any]


def _answered(invocation: Invocation, answer: Answer) -> Answer:
    return answer if answer[0] else _failed(invocation, answer)


def _received(invocation: Invocation, answer: Received) -> Received:
    if not answer[0]:
        _stop_if_asked(invocation)
    return answer


def _slept(invocation: Invocation, _answer: None) -> None:
    _stop_if_asked(invocation)


def _polled(invocation: Invocation, answer: Answer) -> tuple[bool, list[Completion] | str]:
    if not answer[0]:
        return _failed(invocation, answer)
    return True, completions(answer[1])


#: The Thens that give an ok answer to the guest as it is (no check needed).
_PASS_OK: frozenset[Then] = frozenset({_answered, _received})


def _blame_the_answer(attempt: Attempt) -> None:
    """A failed call whose last answer, given later, could not be given to
    the guest (the host's answer was not of the import's type) failed because
    of the host: keep why, as a host import's failure is kept."""
    pending, invocation = attempt.pending, attempt.invocation
    failure = None if pending is None else pending.failure
    if failure is not None and invocation.host_error is None and invocation.stop_reason is None:
        invocation.host_error = "".join(traceback.format_exception(failure))


def _adapter(
    attempt: Attempt, then: Then, stop: Callable[[Attempt], object]
) -> Callable[[Any], Any]:
    """``then`` for an answer given later, on the poll that delivers it. A
    caller that must stop is stopped (an import with no result, a sleep,
    would not fail its call for what ``then`` raised)."""

    passes_ok = then in _PASS_OK

    def adapt(answer: Any) -> Any:
        if passes_ok and answer.__class__ is tuple and answer[0]:
            return answer
        with _bound(attempt.invocation, attempt.store):
            try:
                return then(attempt.invocation, answer)
            except _Stop:
                stop(attempt)
                raise
            except Exception as exc:
                _host_failure(exc)
                raise

    return adapt


def _bound_import(func: HostFunc) -> HostFunc:
    """``func`` (a thread mode import) served for the attempt polled here."""

    def serve(*args: Any) -> Any:
        deferred = after_import.begin()
        try:
            future = current_future()
            attempt = None if future is None else future.data
            if not isinstance(attempt, Attempt):
                return func(*args)
            with _bound(attempt.invocation, attempt.store):
                return func(*args)
        finally:
            if deferred is not None:
                after_import.end(deferred)

    return serve


__all__ = [
    "FUEL_YIELD_INTERVAL",
    "WAITING",
    "AsyncSandbox",
    "Attempt",
    "OnDone",
    "WaitingHost",
]
