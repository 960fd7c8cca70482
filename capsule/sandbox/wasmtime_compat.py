"""Every access to wasmtime-py's private parts (its ctypes bindings, private
attributes), in one place, so that an upgrade of wasmtime-py is checked here."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import wasmtime
from wasmtime import _bindings
from wasmtime.component import Instance

# Async API
#
# wasmtime's async C API (call futures, async host functions, fuel yields),
# which wasmtime-py's classes do not wrap. The prototypes are declared here from
# the C headers (wasmtime/async.h, wasmtime/component/linker.h,
# wasmtime/component/func.h), every pointer as an address: the callers keep the
# objects behind them alive. They are bound on first use, and a symbol the
# bundled library lacks is named in the error.


class AsyncApiUnavailable(RuntimeError):
    """The wasmtime library bundled with wasmtime-py lacks a function of the
    async C API."""


#: ``bool (*)(void *env)``: polled until the answer of an async host function is ready.
ContinuationCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
#: ``void (*)(void *env)``: frees a continuation's (or a host function's) data.
Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Continuation(ctypes.Structure):
    """``wasmtime_async_continuation_t``, which an async host function fills."""

    _fields_ = [
        ("callback", ContinuationCallback),
        ("env", ctypes.c_void_p),
        ("finalizer", Finalizer),
    ]


#: ``wasmtime_component_func_async_callback_t``: (env, context, type, args,
#: nargs, results, nresults, error_ret, continuation_ret), as addresses.
AsyncFuncCallback = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
)

_P = ctypes.c_void_p


@dataclass(frozen=True)
class AsyncApi:
    """The async C API's functions. Those that run wasm (polls, and the
    deletion of a future, which unwinds its fiber) release the GIL."""

    #: (linker, context, component, instance_out, error_ret) -> future
    component_linker_instantiate_async: Callable[..., int | None]
    #: (func, context, args, nargs, results, nresults, error_ret) -> future
    component_func_call_async: Callable[..., int | None]
    #: (linker_instance, name, name_len, callback, data, finalizer) -> error
    component_linker_instance_add_func_async: Callable[..., int | None]
    #: (future) -> ready
    call_future_poll: Callable[[int], bool]
    #: (future) -> None
    call_future_delete: Callable[[int], None]
    #: (context, interval; 0: none) -> error
    context_fuel_async_yield_interval: Callable[[int, int], int | None]
    #: (config, bytes) -> None
    config_async_stack_size_set: Callable[[int, int], None]


_DECLARATIONS: dict[str, tuple[Any, list[Any]]] = {
    "wasmtime_component_linker_instantiate_async": (_P, [_P, _P, _P, _P, _P]),
    "wasmtime_component_func_call_async": (
        _P,
        [_P, _P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, _P],
    ),
    "wasmtime_component_linker_instance_add_func_async": (
        _P,
        [_P, ctypes.c_char_p, ctypes.c_size_t, AsyncFuncCallback, _P, Finalizer],
    ),
    "wasmtime_call_future_poll": (ctypes.c_bool, [_P]),
    "wasmtime_call_future_delete": (None, [_P]),
    "wasmtime_context_fuel_async_yield_interval": (_P, [_P, ctypes.c_uint64]),
    "wasmtime_config_async_stack_size_set": (None, [_P, ctypes.c_size_t]),
    # (Not used: declared in async.h as returning an error, it returns nothing.)
    # "wasmtime_context_epoch_deadline_async_yield_and_update"
}

_api: AsyncApi | None = None
_api_lock = threading.Lock()


def async_api() -> AsyncApi:
    """The async C API of the bundled library (declared on first use);
    AsyncApiUnavailable names a function it lacks."""
    global _api
    with _api_lock:
        if _api is None:
            library: ctypes.CDLL = _bindings.dll  # type: ignore[attr-defined]
            functions: dict[str, Any] = {}
            for name, (restype, argtypes) in _DECLARATIONS.items():
                prototype = ctypes.CFUNCTYPE(restype, *argtypes)
                try:
                    functions[name.removeprefix("wasmtime_")] = prototype((name, library))
                except AttributeError:
                    raise AsyncApiUnavailable(
                        f"the wasmtime library of wasmtime-py {_wasmtime_py_version()} "
                        f"has no {name}; Capsule's async calls need wasmtime-py 50"
                    ) from None
            _api = AsyncApi(**functions)
        return _api


def _wasmtime_py_version() -> str:
    try:
        return metadata.version("wasmtime")
    except metadata.PackageNotFoundError:
        return "(unknown version)"


#: ``wasmtime_component_val_t``, the value of a component function's argument
#: or result, and ``wasmtime_component_instance_t``.
ComponentVal: Any = wasmtime._ffi.wasmtime_component_val_t
ComponentInstanceRaw: Any = wasmtime._ffi.wasmtime_component_instance_t


def address_of(pointer: Any) -> int:
    """The address a ctypes pointer (or wasmtime-py pointer object) holds."""
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def context_address(store: wasmtime.Store) -> int:
    """The address of ``store``'s ``wasmtime_context_t``."""
    return address_of(store._context())


def func_address(func: Any) -> tuple[int, Any]:
    """The address of a component function's ``wasmtime_component_func_t``,
    and the structure itself (to keep alive while the address is used)."""
    raw = func._func
    return ctypes.addressof(raw), raw


def instance_from_raw(raw: Any) -> Instance:
    """A wasmtime-py Instance for a ``wasmtime_component_instance_t``."""
    return Instance._from_raw(raw)


def error_from_address(address: int) -> wasmtime.WasmtimeError:
    """The error at ``address`` (a ``wasmtime_error_t *``), now owned by Python."""
    pointer = ctypes.cast(address, ctypes.POINTER(wasmtime._ffi.wasmtime_error_t))
    return wasmtime.WasmtimeError._from_ptr(pointer)


def error_to_address(error: wasmtime.WasmtimeError) -> int:
    """Hand ``error`` over to wasmtime: the address of its ``wasmtime_error_t``."""
    return address_of(error._consume())


def val_delete(address: int) -> None:
    """Free what the component value at ``address`` owns."""
    wasmtime._ffi.wasmtime_component_val_delete(ctypes.cast(address, ctypes.POINTER(ComponentVal)))


def config_address(config: wasmtime.Config) -> int:
    return address_of(config.ptr())


def disable_concurrency_support(config: wasmtime.Config) -> None:
    """The component model's concurrency support off (no Config property)."""
    wasmtime._ffi.wasmtime_config_concurrency_support_set(config.ptr(), False)
