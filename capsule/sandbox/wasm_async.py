"""Calls into components as futures the host polls: no thread waits in wasm.

A call (an instantiation, or a call of an export) starts as a
:class:`CallFuture`. Each :meth:`CallFuture.poll` runs the guest on a fiber of
its own until the call ends, waits in an async import, or uses up its store's
fuel yield interval; then the poll returns and the thread is free. An async
import's handler (:func:`add_async_func`) answers at once or with a
:class:`Pending` that the host resolves later, from any thread, which makes the
future runnable again (capsule.sandbox.poller polls runnable futures on a
few threads).

A store (:class:`AsyncStore`) has at most one live future, and can neither be
closed nor collected before it: wasmtime aborts the process if a store goes
while a future of it lives, so a close is refused and a collection deletes the
future first. A cancelled call leaves its instance unusable: one fresh instance
per attempt.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import wasmtime
from wasmtime.component import Component, ExportIndex, Instance, Linker, LinkerInstance

from capsule.sandbox import after_import
from capsule.sandbox.engine import ENGINE_SETTINGS
from capsule.sandbox.hostcall import OnError, _Import
from capsule.sandbox.runtime import Progress, ensure_runtime
from capsule.sandbox.wasmtime_compat import (
    AsyncFuncCallback,
    ComponentInstanceRaw,
    ComponentVal,
    Continuation,
    ContinuationCallback,
    Finalizer,
    address_of,
    async_api,
    config_address,
    context_address,
    disable_concurrency_support,
    error_from_address,
    error_to_address,
    func_address,
    instance_from_raw,
    val_delete,
)

T = TypeVar("T")

#: The stack of the fiber each call runs on, where host functions (Python) run
#: too: at wasmtime's default of 2 MiB, a deep ``json.loads`` in an import
#: overflowed it and aborted the process. Only what is touched is resident.
FIBER_STACK_BYTES = 8 * 1024**2


def async_engine() -> wasmtime.Engine:
    """An engine for async calls, with the settings the cached guest runtime
    was compiled for (``engine.ENGINE_SETTINGS``) and fibers of
    FIBER_STACK_BYTES. (This wasmtime has no async-support switch: an engine
    serves both kinds of call, but a store with a fuel yield interval, or
    whose instance has async imports, refuses sync ones.)"""
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    disable_concurrency_support(config)
    async_api().config_async_stack_size_set(config_address(config), FIBER_STACK_BYTES)
    return wasmtime.Engine(config)


def guest_component(engine: wasmtime.Engine, progress: Progress | None = None) -> Component:
    """Capsule's guest runtime for ``engine`` (built once, then cached)."""
    artifacts = ensure_runtime(engine, ENGINE_SETTINGS, progress)
    return Component.deserialize_file(engine, str(artifacts.compiled))


class StoreBusy(RuntimeError):
    """The store has a live call future (cancel it first)."""


class CallCancelled(Exception):
    """The call was cancelled before it ended."""


@dataclass(eq=False)
class _Live:
    """A live future of a store, and what its C side points into."""

    address: int
    keep: tuple[Any, ...]


class AsyncStore(wasmtime.Store):
    """A store driven through call futures, one at a time.

    ``fuel`` is its budget; ``epoch_deadline`` the engine's epoch ticks it may
    run for (the owner of the engine advances its epoch); with
    ``fuel_yield_interval``, a running call returns control to its poller each
    time it has used that much fuel."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        fuel: int,
        epoch_deadline: int = 1,
        fuel_yield_interval: int | None = None,
    ) -> None:
        super().__init__(engine)
        #: Guards the live future: its deletion, and the flag of its poll.
        # (Reentrant: a pending future collected by the cycle collector cancels
        # itself, which may happen on a thread that holds this lock.)
        self._future_lock = threading.RLock()
        self._future: _Live | None = None
        self._yield_interval: int | None = None
        self._yield_shortened = False
        self.set_fuel(fuel)
        self.set_epoch_deadline(epoch_deadline)
        if fuel_yield_interval is not None:
            self.set_fuel_yield_interval(fuel_yield_interval)

    def set_fuel_yield_interval(self, fuel: int | None) -> None:
        """Have a running call yield each time it used ``fuel`` (None: never)."""
        if fuel is not None and fuel <= 0:
            raise ValueError(f"a fuel yield interval must be > 0, not {fuel!r}")
        self._set_yield_interval(fuel)
        self._yield_interval, self._yield_shortened = fuel, False

    def yield_soon(self, fuel: int) -> None:
        """Have the running call yield once it has used ``fuel`` more (if
        that is less than its interval: wasmtime starts a slice anew when the
        interval is set), until :meth:`yield_as_set`."""
        if not self._yield_shortened:
            interval = self._yield_interval
            if interval is None or fuel < interval:
                self._set_yield_interval(fuel)
                self._yield_shortened = True

    def yield_as_set(self) -> None:
        """Undo :meth:`yield_soon`: the interval is the one set again (its next
        slice starts whole)."""
        if self._yield_shortened:
            self._yield_shortened = False
            self._set_yield_interval(self._yield_interval)

    def _set_yield_interval(self, fuel: int | None) -> None:
        error = async_api().context_fuel_async_yield_interval(context_address(self), fuel or 0)
        if error:
            raise error_from_address(error)

    @property
    def busy(self) -> bool:
        """Whether a call future of this store is live."""
        return self._future is not None

    def close(self) -> None:
        """Close the store; StoreBusy while a call future of it is live."""
        with self._future_lock:
            if self._future is not None:
                raise StoreBusy(
                    "the store has a live call future: cancel it before closing the store"
                )
            super().close()

    def __del__(self) -> None:
        # Collected (possibly in the same cycle as its future, in any order):
        # the future goes first.
        if not hasattr(self, "_future_lock"):  # (its __init__ failed)
            super().close()
            return
        with self._future_lock:
            live, self._future = self._future, None
            if live is not None:
                async_api().call_future_delete(live.address)
        super().close()

    def _adopt(self, address: int, keep: tuple[Any, ...]) -> _Live:
        with self._future_lock:
            if not address:
                raise wasmtime.WasmtimeError("wasmtime returned no call future")
            if self._future is not None:
                async_api().call_future_delete(address)
                raise StoreBusy("the store already has a live call future")
            self._future = _Live(address, keep)
            return self._future

    def _end(self, live: _Live) -> None:
        """Delete ``live`` if it is still this store's (the lock held)."""
        if self._future is live:
            self._future = None
            async_api().call_future_delete(live.address)


_PENDING, _DONE, _CANCELLED = "pending", "done", "cancelled"
_current = threading.local()


def current_future() -> CallFuture[Any] | None:
    """The future being polled on this thread (for host functions: their caller)."""
    future: CallFuture[Any] | None = getattr(_current, "future", None)
    return future


class CallFuture(Generic[T]):
    """One call into a store, polled until it ends.

    ``poll`` may be called from any thread, never from two at once; ``cancel``
    from any thread, at any time (during a poll, the call is deleted when the
    poll returns). ``on_wake`` is called (from the thread that resolves a
    Pending of this call) when a call waiting in an async import can go on."""

    def __init__(
        self,
        store: AsyncStore,
        begin: Callable[[int], int],
        finish: Callable[[], T],
        keep: tuple[Any, ...],
        release: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._error = ctypes.c_void_p()
        self._finish = finish
        self._release = release
        self._state = _PENDING
        self._polling = False
        self._cancel_asked = False
        self._outcome: T | None = None
        self._failure: BaseException | None = None
        #: The Pending this call waits on, if it waits in an async import.
        self._waiting: Pending | None = None
        self.on_wake: Callable[[CallFuture[Any]], None] | None = None
        #: What interrupted a host function of the call (raised by its poll).
        self._interrupted: BaseException | None = None
        #: The host's own data about the call.
        self.data: Any = None
        if store.busy:  # (checked again, under the store's lock, as it is adopted)
            raise StoreBusy("the store already has a live call future")
        address = begin(ctypes.addressof(self._error))
        self._live = store._adopt(address, (*keep, self._error))

    @property
    def store(self) -> AsyncStore:
        return self._store

    @property
    def done(self) -> bool:
        """Whether the call ended (finished, failed or cancelled)."""
        return self._state != _PENDING

    @property
    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    @property
    def blocked(self) -> bool:
        """Whether the call waits in an async import for an answer not given yet."""
        waiting = self._waiting
        return waiting is not None and waiting._state is _WAITING

    def poll(self) -> bool:
        """Run the call until it ends (True) or waits or yields (False). A
        KeyboardInterrupt (or other BaseException) raised in one of its host
        functions fails the call, and is raised here once the call has ended."""
        store = self._store
        with store._future_lock:
            if self._state != _PENDING:
                return True
            if self._polling:
                raise RuntimeError("a call future was polled from two threads at once")
            self._polling = True
        previous = getattr(_current, "future", None)
        _current.future = self
        ready = False
        try:
            ready = async_api().call_future_poll(self._live.address)
        finally:
            _current.future = previous
            with store._future_lock:
                self._polling = False
                if self._cancel_asked:
                    ready = True
                    self._state = _CANCELLED
                elif ready:
                    self._state = _DONE
                if ready:
                    # (Now: a finished call's fiber stack is freed at once.)
                    store._end(self._live)
        if not ready:
            return False
        if self._state == _DONE:
            try:
                if self._error.value:
                    self._failure = error_from_address(self._error.value)
                else:
                    self._outcome = self._finish()
            except Exception as exc:
                self._failure = exc
        self._ended()
        interrupted, self._interrupted = self._interrupted, None
        if interrupted is not None:
            raise interrupted
        return True

    def cancel(self) -> bool:
        """Cancel the call (delete its future) unless it ended; False if it had."""
        store = self._store
        with store._future_lock:
            if self._state != _PENDING:
                return False
            if self._polling:
                self._cancel_asked = True
                return True
            self._state = _CANCELLED
            store._end(self._live)
        self._ended()
        return True

    def result(self) -> T:
        """What the call returned; raises what it failed with, CallCancelled,
        or RuntimeError if it has not ended."""
        if self._state == _PENDING:
            raise RuntimeError("the call has not ended: poll it until it does")
        if self._state == _CANCELLED:
            raise CallCancelled("the call was cancelled")
        if self._failure is not None:
            raise self._failure
        return self._outcome  # type: ignore[return-value]

    def _ended(self) -> None:
        self._waiting = None
        release, self._release = self._release, None
        if release is not None:
            release()

    def _wake(self) -> None:
        on_wake = self.on_wake
        if on_wake is not None:
            on_wake(self)

    def __del__(self) -> None:
        # (Only a call still pending: one that ended holds nothing to delete.)
        if getattr(self, "_state", None) == _PENDING and getattr(self, "_live", None) is not None:
            self.cancel()


def instantiate(store: AsyncStore, linker: Linker, component: Component) -> CallFuture[Instance]:
    """Instantiate ``component`` in ``store`` (imports may be async)."""
    raw = ComponentInstanceRaw()
    linker_at, component_at = address_of(linker.ptr()), address_of(component.ptr())
    context = context_address(store)

    def begin(error_ret: int) -> int:
        address: int | None = async_api().component_linker_instantiate_async(
            linker_at, context, component_at, ctypes.addressof(raw), error_ret
        )
        return address or 0

    return CallFuture(store, begin, lambda: instance_from_raw(raw), keep=(raw, linker, component))


class AsyncExport:
    """Calls one export of a component, in any of its instances, as a future,
    with its types resolved on the first call."""

    def __init__(self, index: ExportIndex) -> None:
        self.index = index
        self._params: list[Any] | None = None
        self._result: Any = None

    def call(self, store: AsyncStore, instance: Instance, *params: Any) -> CallFuture[Any]:
        func = instance.get_func(store, self.index)
        if func is None:
            raise ValueError("the export is not a function")
        if self._params is None:
            fty = func.type(store)
            self._result = fty.result
            self._params = [ty for _, ty in fty.params]
        if len(params) != len(self._params):
            raise TypeError(f"the export takes {len(self._params)} arguments, not {len(params)}")
        args = (ComponentVal * max(len(params), 1))()
        lowered = 0

        def release() -> None:
            for index in range(lowered):
                val_delete(ctypes.addressof(args[index]))

        try:
            for ty, value in zip(self._params, params, strict=True):
                ty.convert_to_c(store, value, ctypes.pointer(args[lowered]))
                lowered += 1
        except BaseException:
            release()
            raise
        result_type = self._result
        slot = ComponentVal()
        func_at, func_raw = func_address(func)
        context = context_address(store)

        def begin(error_ret: int) -> int:
            address: int | None = async_api().component_func_call_async(
                func_at,
                context,
                ctypes.addressof(args),
                lowered,
                ctypes.addressof(slot),
                0 if result_type is None else 1,
                error_ret,
            )
            return address or 0

        def finish() -> Any:
            return None if result_type is None else result_type.convert_from_c(slot)

        return CallFuture(store, begin, finish, keep=(args, slot, func_raw), release=release)


# -- async imports ---------------------------------------------------------

_WAITING, _ANSWERED, _DELIVERED, _DROPPED = "waiting", "answered", "delivered", "dropped"


class Pending:
    """The answer an async import owes its caller, given later by the host.

    A handler returns a new Pending instead of its answer, keeps it, and calls
    :meth:`resolve` once the answer is known (from any thread); the call is
    then woken, and the answer lowered into the guest on its next poll."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = _WAITING
        self._answer: Any = None
        #: (Weak: the call's owner is whoever holds its future, not who owes it an answer.)
        self._future: weakref.ref[CallFuture[Any]] | None = None
        self._lower: Callable[[int, Any, int], None] | None = None
        self._context = 0
        self._results = 0
        #: Why the answer could not be given to the guest (its call then fails).
        self.failure: Exception | None = None
        #: What turns the answer into the value the guest gets, on the poll
        #: that delivers it (None: as it is); what it raises fails the call.
        self.adapt: Callable[[Any], Any] | None = None

    @property
    def resolved(self) -> bool:
        return self._state != _WAITING

    @property
    def delivered(self) -> bool:
        """Whether the guest got the answer (False if its call was cancelled first)."""
        return self._state == _DELIVERED

    @property
    def future(self) -> CallFuture[Any] | None:
        """The call that waits for the answer (None once it is gone)."""
        return None if self._future is None else self._future()

    def resolve(self, answer: Any) -> bool:
        """Give the answer; False if it was given before or the call was cancelled."""
        with self._lock:
            if self._state != _WAITING:
                return False
            self._answer, self._state = answer, _ANSWERED
        # (CallFuture._wake inline: this runs on every answer given later.)
        ref = self._future
        future = None if ref is None else ref()
        if future is not None:
            on_wake = future.on_wake
            if on_wake is not None:
                on_wake(future)
        return True

    def _bind(
        self,
        future: CallFuture[Any] | None,
        lower: Callable[[int, Any, int], None] | None,
        context: int,
        results: int,
    ) -> int:
        with self._lock:
            if self._lower is not None or self._state in (_DELIVERED, _DROPPED):
                raise ValueError("a Pending answers one call")
            self._future = None if future is None else weakref.ref(future)
            self._lower = lower or _no_result
            self._context, self._results = context, results
            key = next(_PENDING_KEYS)
            _PENDING_BY_KEY[key] = self
        if future is not None:
            future._waiting = self
        return key

    def _deliver(self) -> bool:
        """On the poll: lower the answer if given (True), else still wait (False)."""
        with self._lock:
            if self._state != _ANSWERED:
                return False
            self._state = _DELIVERED
            answer, self._answer = self._answer, None
        assert self._lower is not None
        try:
            if self.adapt is not None:
                answer = self.adapt(answer)
            self._lower(self._context, answer, self._results)
        except Exception as exc:  # (wasmtime then fails the call: its result is missing)
            self.failure = exc
        return True

    def _drop(self) -> None:
        with self._lock:
            if self._state != _DELIVERED:
                self._state = _DROPPED
            self._answer = None


def _no_result(_context: int, _answer: Any, _results: int) -> None:
    return None


_PENDING_KEYS = itertools.count(1)  # (0 would reach the callbacks as None)
_PENDING_BY_KEY: dict[int, Pending] = {}


@ContinuationCallback  # type: ignore[untyped-decorator]
def _continue(key: int) -> bool:
    pending = _PENDING_BY_KEY[key]
    # wasmtime polls the continuation as soon as the import returned, before
    # its answer is given, as a rule: that poll is told no without a lock.
    if pending._state is _WAITING:
        return False
    return pending._deliver()


@ContinuationCallback  # type: ignore[untyped-decorator]
def _ready(_key: Any) -> bool:
    return True


@Finalizer  # type: ignore[untyped-decorator]
def _release_pending(key: int) -> None:
    # The continuation is dropped: delivered, or its call deleted.
    pending = _PENDING_BY_KEY.pop(key, None)
    if pending is not None:
        pending._drop()


AsyncHandler = Callable[..., Any]

_ASYNC_IMPORTS: dict[int, _Import] = {}
_IMPORT_KEYS = itertools.count(1)


@AsyncFuncCallback  # type: ignore[untyped-decorator]
def _call_async_import(
    key: int,
    context: int,
    ty_raw: int,
    args: int,
    _nargs: int,
    results: int,
    _nresults: int,
    error_ret: int,
    continuation_ret: int,
) -> None:
    # (The work its handler deferred runs once its Pending is bound: a wait
    # it makes ready may be the caller's own.)
    deferred = after_import.begin()
    try:
        _serve_async_import(key, context, ty_raw, args, results, error_ret, continuation_ret)
    finally:
        if deferred is not None:
            after_import.end(deferred)


def _serve_async_import(
    key: int,
    context: int,
    ty_raw: int,
    args: int,
    results: int,
    error_ret: int,
    continuation_ret: int,
) -> None:
    entry = _ASYNC_IMPORTS[key]
    try:
        read = entry.read_arguments or entry.resolve(context, ty_raw)
        answer = entry.func(*read(args))
        continuation = Continuation.from_address(continuation_ret)
        if isinstance(answer, Pending):
            future = getattr(_current, "future", None)  # (current_future(), inline)
            env = answer._bind(future, entry.lower_result, context, results)
            continuation.callback = _continue
            continuation.env = env
            continuation.finalizer = _release_pending
        else:
            if entry.lower_result is not None:
                entry.lower_result(context, answer, results)
            continuation.callback = _ready
    except wasmtime.WasmtimeError as error:
        ctypes.c_void_p.from_address(error_ret).value = error_to_address(error)
    except Exception as exc:
        try:
            trap = entry.on_error(exc)
        except Exception:  # the handler's own failure must still fail the call
            trap = wasmtime.WasmtimeError("capsule: host error")
        ctypes.c_void_p.from_address(error_ret).value = error_to_address(trap)
    except BaseException as exc:
        # (KeyboardInterrupt, SystemExit: the callback must fill the error or
        # the continuation, or wasmtime aborts. The call fails; its poll
        # raises the exception once the guest is off this thread's stack.)
        ctypes.c_void_p.from_address(error_ret).value = error_to_address(
            wasmtime.WasmtimeError(f"capsule: the host was interrupted ({type(exc).__name__})")
        )
        future = current_future()
        if future is not None:
            future._interrupted = exc


@Finalizer  # type: ignore[untyped-decorator]
def _forget_import(key: int) -> None:
    # wasmtime let go of the function (its linker and every store that used it).
    _ASYNC_IMPORTS.pop(key, None)


def add_async_func(
    instance: LinkerInstance, name: str, handler: AsyncHandler, on_error: OnError
) -> None:
    """Define import ``name`` as an async host function: ``handler`` takes the
    import's arguments and returns its answer (as hostcall.add_host_func's
    functions do) or a Pending resolved later. An exception it raises fails
    the call: a WasmtimeError as it is, any other as ``on_error`` makes it.
    A store that calls it must be driven by call futures."""
    key = next(_IMPORT_KEYS)
    _ASYNC_IMPORTS[key] = _Import(handler, on_error)
    encoded = name.encode("utf-8")
    error = async_api().component_linker_instance_add_func_async(
        address_of(instance.ptr()),
        encoded,
        len(encoded),
        _call_async_import,
        key,
        _forget_import,
    )
    if error:
        _ASYNC_IMPORTS.pop(key, None)
        raise error_from_address(error)
