"""Every use of wasmtime-py's private names, checked against the versions it
was written for, and nothing changed in wasmtime-py at import.

wasmtime-py's public API has no epoch callback, no host function that skips its
per-call type lookup, and no way to turn the component model's concurrency
support off; its raw bindings (``wasmtime._bindings``, ``wasmtime._ffi``) have.
Those are wasmtime-py's internals, free to change in any release, so they are
read here and nowhere else, one section per feature. Written against
wasmtime-py 50 (``SUPPORTED_MAJOR``; pyproject pins ``wasmtime>=50,<51``).

What happens when a name is missing, or the version is another one, by feature:

- Host calls, export calls, value layouts, epoch deadlines: required (no
  public equivalent). Importing this module raises :class:`WasmtimeUnsupported`
  naming the feature, the version found and the fix; with a version other than
  50 whose names are all present they are used as they are (they are
  wasmtime-py's own definitions of the C API it ships).
- Concurrency support off: optional. Without it the component model's task
  machinery stays on: every host call costs a little more.
- Faster converters (:class:`ConverterPatches`): optional, and only on a
  supported version, since they replace wasmtime-py functions whose internal
  contracts may change. Without them wasmtime-py's own converters run: slower
  crossings, same results. They are the only change to wasmtime-py Capsule
  makes, applied explicitly by whoever needs them (a live Sandbox) and undone
  when the last holder lets go.

Capsule's own calls of short C functions use prototypes of its own (made here
from the library handle) that keep the GIL. The bindings wasmtime-py's
converters call are rebound that way only as part of the converter patches.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import StoreContext
from wasmtime.component import (
    EnumType,
    FuncType,
    Instance,
    LinkerInstance,
    ListType,
    OptionType,
    RecordType,
    ResultType,
    String,
    VariantType,
)

from capsule.sandbox.distributions import installed_version

# -- versions -----------------------------------------------------------------

#: The wasmtime-py major version these accesses were written against.
SUPPORTED_MAJOR = 50


#: wasmtime-py's installed version (None: not known to the package metadata).
VERSION = installed_version("wasmtime")
#: Whether the installed wasmtime-py is one these accesses were written against.
SUPPORTED = VERSION is not None and VERSION.split(".")[0] == str(SUPPORTED_MAJOR)


class WasmtimeUnsupported(ImportError):
    """The installed wasmtime-py lacks an internal name a required feature uses."""

    def __init__(self, feature: str, missing: str) -> None:
        super().__init__(
            f"capsule cannot use the installed wasmtime-py {VERSION or '(unknown version)'} "
            f"for {feature}: it has no {missing}. Install the version capsule supports: "
            f"pip install 'wasmtime>={SUPPORTED_MAJOR},<{SUPPORTED_MAJOR + 1}'"
        )


def _require(feature: str, read: Callable[[], Any], missing: str) -> Any:
    try:
        return read()
    except (ImportError, AttributeError, IndexError, TypeError):
        raise WasmtimeUnsupported(feature, missing) from None


def _optional(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (ImportError, AttributeError, IndexError, TypeError):
        return None


def _modules() -> tuple[Any, Any, Any, Any]:
    from wasmtime import _bindings, _ffi
    from wasmtime.component import _enter, _types

    return _bindings, _ffi, _enter, _types


_bindings, _ffi, _enter, _types = _require(
    "its raw C API bindings",
    _modules,
    "wasmtime._bindings, wasmtime._ffi or wasmtime.component._enter/_types",
)

#: wasmtime's shared library, for Capsule's own prototypes.
LIBRARY: ctypes.CDLL = _require("its raw C API bindings", lambda: _bindings.dll, "_bindings.dll")


def gil_holding(restype: Any, *argtypes: Any) -> Callable[[str], Any]:
    """A maker of prototypes for short C functions of wasmtime's library that
    keep the GIL. ctypes releases it around every foreign call; for a call that
    only allocates, frees or reads a field that costs more than the call, and on
    a busy run hands the GIL to another thread the caller must then wait out."""
    prototype = ctypes.PYFUNCTYPE(restype, *argtypes)

    def bind(name: str) -> Any:
        return prototype((name, LIBRARY))

    return bind


# -- value layouts --------------------------------------------------------------
#
# The C structures of component values, for reading and writing them by address.


def _layouts() -> tuple[Any, ...]:
    return (
        _ffi.wasmtime_component_val_t,
        _bindings.wasmtime_component_valresult,
        _bindings.wasmtime_component_valrecord_entry,
        _ffi.wasm_byte_vec_t,
    )


VAL_T, VALRESULT_T, VALRECORD_ENTRY_T, BYTE_VEC_T = _require(
    "component values", _layouts, "component value structures in wasmtime._ffi"
)


def _kinds() -> dict[str, int]:
    names = ("STRING", "U64", "RESULT", "U8", "LIST", "RECORD", "BOOL")
    return {name: int(getattr(_ffi, f"WASMTIME_COMPONENT_{name}").value) for name in names}


#: The kind byte of each value type Capsule reads or writes by address.
KIND: dict[str, int] = _require("component values", _kinds, "WASMTIME_COMPONENT_* kinds")

# -- host functions -------------------------------------------------------------
#
# Imports of the guest bound as raw C callbacks: wasmtime-py's add_func looks up
# the function's type on every call, and hands a host function's failure to one
# process-wide slot that threads race for.


def _callback_types() -> tuple[Any, Any, Any, Any, Any]:
    callback = _bindings.wasmtime_component_func_callback_t
    return (
        callback,
        callback._restype_,
        callback._argtypes_[0],
        ctypes.POINTER(_ffi.wasmtime_context_t),
        ctypes.POINTER(_ffi.wasmtime_component_func_type_t),
    )


#: wasmtime's host function callback type, its result and data argument's
#: types, and the pointer types of a store context and a function type.
CALLBACK_T, CALLBACK_RESULT_T, CALLBACK_DATA_T, _CONTEXT_P, _FUNC_TYPE_P = _require(
    "host functions", _callback_types, "wasmtime_component_func_callback_t"
)
_add_func = _require(
    "host functions",
    lambda: _ffi.wasmtime_component_linker_instance_add_func,
    "wasmtime_component_linker_instance_add_func",
)
_require("host functions", lambda: (StoreContext._invalidate, FuncType._from_ptr), "StoreContext")


@contextmanager
def store_context(address: int) -> Iterator[StoreContext]:
    """The store context at ``address`` (a callback's), valid in the block only."""
    store = StoreContext(ctypes.cast(address, _CONTEXT_P))
    try:
        yield store
    finally:
        store._invalidate()


def func_type(address: int, owner: StoreContext) -> FuncType:
    """The function type at ``address`` (a callback's); use as a context manager."""
    return FuncType._from_ptr(ctypes.cast(address, _FUNC_TYPE_P), owner=owner)


def error_address(error: wasmtime.WasmtimeError) -> int:
    """Hand ``error`` over to wasmtime (which traps the guest with it): its address."""
    return ctypes.cast(error._consume(), ctypes.c_void_p).value or 0


def add_func(instance: LinkerInstance, name: str, callback: Any, data: int, finalizer: Any) -> None:
    """Define ``name`` in ``instance`` as the raw ``callback`` (of CALLBACK_T's
    signature) called with ``data``; ``finalizer(data)`` runs when wasmtime lets
    go of it."""
    encoded = name.encode("utf-8")
    error = _add_func(
        instance.ptr(),
        ctypes.create_string_buffer(encoded),
        len(encoded),
        ctypes.cast(callback, CALLBACK_T),
        data,
        finalizer,
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


# -- export calls ---------------------------------------------------------------
#
# A call of a guest export with its arguments already lowered (wasmtime-py's
# Func.__call__ looks the function's type up on every call).

_func_call = _require(
    "export calls", lambda: _ffi.wasmtime_component_func_call, "wasmtime_component_func_call"
)
_enter_wasm = _require("export calls", lambda: _enter.enter_wasm, "component._enter.enter_wasm")
_val_delete = gil_holding(None, ctypes.c_void_p)("wasmtime_component_val_delete")


def call_export(func: Any, store: wasmtime.Store, params: Any, count: int, result: Any) -> None:
    """Call the export ``func`` (a component Func) with ``count`` lowered
    ``params`` (an array of VAL_T), its result lowered into ``result`` (a
    VAL_T); raises what the call trapped or failed with."""
    _enter_wasm(
        lambda: _func_call(
            ctypes.byref(func._func),
            store._context(),
            params,
            count,
            ctypes.byref(result),
            1,
        )
    )


def delete_val(address: int) -> None:
    """Free what the value at ``address`` owns."""
    _val_delete(address)


def export_func(instance: Instance, store: wasmtime.Store, index: Any) -> Any:
    """The export at ``index`` of ``instance``: a component Func."""
    func = instance.get_func(store, index)
    assert func is not None
    return func


# -- epoch deadlines ------------------------------------------------------------
#
# wasmtime-py has no epoch deadline callback; the raw binding works with
# component instances. The callback and finalizer types are the binding's own.

EPOCH_CALLBACK_T, EPOCH_FINALIZER_T = _require(
    "epoch deadlines",
    lambda: tuple(_bindings._wasmtime_store_epoch_deadline_callback.argtypes[1::2]),
    "wasmtime_store_epoch_deadline_callback",
)
_set_epoch_callback = _require(
    "epoch deadlines",
    lambda: _ffi.wasmtime_store_epoch_deadline_callback,
    "wasmtime_store_epoch_deadline_callback",
)
_error_new = _require("epoch deadlines", lambda: _ffi.wasmtime_error_new, "wasmtime_error_new")
_get_fuel = gil_holding(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
    "wasmtime_context_get_fuel"
)


def set_epoch_callback(store: wasmtime.Store, callback: Any, finalizer: Any) -> None:
    """Have wasmtime call ``callback`` at every epoch deadline of ``store``."""
    _set_epoch_callback(store.ptr(), callback, None, finalizer)


def trap_address(message: str) -> int:
    """A new wasmtime error of ``message``, as an epoch callback returns it to trap."""
    return ctypes.cast(_error_new(message.encode()), ctypes.c_void_p).value or 0


def fuel_left(context: Any) -> int | None:
    """Fuel left in the store of ``context`` (an epoch callback's); None if unknown."""
    left = ctypes.c_uint64(0)
    if _get_fuel(ctypes.cast(context, ctypes.c_void_p), ctypes.addressof(left)):
        return None  # (an error: fuel is off)
    return left.value


# -- engine configuration -------------------------------------------------------

_concurrency_support_set = _optional(lambda: _ffi.wasmtime_config_concurrency_support_set)


def disable_concurrency_support(config: wasmtime.Config) -> bool:
    """Turn the component model's async support off (no Config property has
    it); False if this wasmtime-py cannot, and it stays on."""
    if _concurrency_support_set is None:
        return False
    _concurrency_support_set(config.ptr(), False)
    return True


# -- faster converters ----------------------------------------------------------


def _memoized(cls: type, name: str) -> Any:
    """What replaces ``cls.name`` (a property or a no-argument method) to
    compute it once per type object. Component types are immutable, and
    wasmtime-py recomputes these lists with several ctypes calls on every value
    it converts."""
    original = cls.__dict__[name]
    compute: Callable[[Any], Any] = (
        original.fget if isinstance(original, property) and original.fget else original
    )
    slot = f"_capsule_memo_{name}"

    def memoized(self: Any) -> Any:
        try:
            return self.__dict__[slot]
        except KeyError:
            value = self.__dict__[slot] = compute(self)
            return value

    return property(memoized) if isinstance(original, property) else memoized


#: C functions wasmtime-py's converters call on every crossing that only
#: allocate, free or read a field: bound again, while the patches are in
#: place, as prototypes that keep the GIL (see gil_holding). (Calls that run
#: wasm, compile or instantiate keep releasing it: other threads run meanwhile.)
_HOLD_GIL = (
    "wasm_byte_vec_new",
    "wasm_byte_vec_new_uninitialized",
    "wasm_byte_vec_delete",
    "wasmtime_component_val_new",
    "wasmtime_component_val_delete",
    "wasmtime_component_vallist_new_uninit",
    "wasmtime_component_valrecord_new_uninit",
    "wasmtime_context_get_fuel",
)


def _gil_holding_bindings() -> list[tuple[Any, str, Any]]:
    replacements = []
    for name in _HOLD_GIL:
        releasing = _bindings.__dict__[f"_{name}"]
        holding = gil_holding(releasing.restype, *releasing.argtypes)(name)
        replacements.append((_bindings, f"_{name}", holding))
    return replacements


def _memoizable() -> list[tuple[type, str]]:
    return [
        (RecordType, "fields"),
        (ListType, "element"),
        (VariantType, "cases"),
        (VariantType, "_cases"),
        (EnumType, "names"),
        (OptionType, "payload"),
        (OptionType, "_cases"),
        (ResultType, "ok"),
        (ResultType, "err"),
        (ResultType, "_cases"),
        (_types.VariantLikeType, "_tagged"),
    ]


class ConverterPatches:
    """Faster replacements of some of wasmtime-py's value converters, and of
    the bindings of the short C calls they make (ones that keep the GIL), in
    place while at least one holder needs them (:meth:`held`) and put back after.

    They make the same values as the originals. While they are in place they
    serve every user of wasmtime-py in the process, which is why they are not
    applied at import, only on a supported version, and undone when the last
    holder ends."""

    def __init__(
        self,
        str_to_capi: Callable[[str], Any],
        bytes_to_capi: Callable[[bytes | bytearray], Any],
        string_from_c: Callable[[Any, Any], str],
    ) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._replacements: list[tuple[Any, str, Any]] = []
        if SUPPORTED:
            self._replacements = [
                (_ffi, "str_to_capi", str_to_capi),
                (_ffi, "bytes_to_capi", bytes_to_capi),
                (String, "convert_from_c", string_from_c),
            ]
            self._replacements += [(cls, name, _memoized(cls, name)) for cls, name in _memoizable()]
            self._replacements += _optional(_gil_holding_bindings) or []
        #: What the replaced names held, while replaced.
        self._originals: list[tuple[Any, str, Any]] = []

    @property
    def applied(self) -> bool:
        return bool(self._originals)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        with self._lock:
            self._holders += 1
            if self._holders == 1:
                self._originals = [
                    (owner, name, owner.__dict__[name]) for owner, name, _ in self._replacements
                ]
                for owner, name, replacement in self._replacements:
                    setattr(owner, name, replacement)

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                for owner, name, original in self._originals:
                    setattr(owner, name, original)
                self._originals = []


# -- async API ----------------------------------------------------------------

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
            library: ctypes.CDLL = LIBRARY
            functions: dict[str, Any] = {}
            for name, (restype, argtypes) in _DECLARATIONS.items():
                prototype = ctypes.CFUNCTYPE(restype, *argtypes)
                try:
                    functions[name.removeprefix("wasmtime_")] = prototype((name, library))
                except AttributeError:
                    raise AsyncApiUnavailable(
                        f"the wasmtime library of wasmtime-py {VERSION or '(unknown version)'} "
                        f"has no {name}; Capsule's async calls need wasmtime-py 50"
                    ) from None
            _api = AsyncApi(**functions)
        return _api


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
