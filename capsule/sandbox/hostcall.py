"""Calls across the host-guest boundary with the types looked up once.

wasmtime-py's component API re-reads a function's type (a dozen ctypes calls
and objects) on every call into or out of the guest. Task calls, messages and
module lookups cross that boundary constantly, so these trampolines do the same
conversions with each function's parameter and result types resolved once.
They use wasmtime-py's own converters where ours do not apply; the type lookup
is cached (the types are owned copies, independent of the call), and a host
function's failure goes to a handler of the caller's instead of wasmtime-py's
one process-wide slot.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime.component import (
    U8,
    U64,
    Bool,
    Instance,
    LinkerInstance,
    ListType,
    OptionType,
    RecordType,
    ResultType,
    String,
)

from capsule.sandbox import wasmtime_compat as compat

HostFunc = Callable[..., Any]


# -- values of our imports, read and written by address ----------------------
#
# Each import's arguments arrive as an array of wasmtime_component_val_t and its
# result goes into one; wasmtime-py reads and writes them through ctypes
# structures, a handful of Python objects per field. Our imports take strings,
# integers and option<u64>, and return result<string?, string?>: those are
# read and written here by address, with the GIL held throughout. The strings
# wasmtime-py itself converts go through the same functions (patched below).


def _offset(structure: Any, field: str) -> int:
    return int(getattr(structure, field).offset)


_VAL = compat.VAL_T
_VAL_SIZE = ctypes.sizeof(_VAL)
#: Where a value's payload starts (after its kind byte).
_PAYLOAD = _offset(_VAL, "of")
_RESULT_OK_AT = _PAYLOAD + _offset(compat.VALRESULT_T, "is_ok")
_RESULT_VAL_AT = _PAYLOAD + _offset(compat.VALRESULT_T, "val")
_STRING = compat.KIND["STRING"]
_STRING_KIND = bytes((_STRING,))
_U64_KIND = compat.KIND["U64"]
#: A u64 value: kind, then the number at the payload's offset.
_U64_VAL = struct.Struct(f"@B{_PAYLOAD - 1}xQ")
_RESULT = compat.KIND["RESULT"]
#: A byte vector (size, then data, as in wasm.h) and a 64-bit word.
_BYTE_VEC = struct.Struct("@NN")
_WORD = struct.Struct("@Q")
#: A result slot: kind, is_ok, and the boxed value of its case.
_RESULT_SLOT = struct.Struct(f"@B{_RESULT_OK_AT - 1}x?{_RESULT_VAL_AT - _RESULT_OK_AT - 1}xN")
assert _RESULT_SLOT.size <= _VAL_SIZE
assert (_offset(compat.BYTE_VEC_T, "size"), _offset(compat.BYTE_VEC_T, "data")) == (0, 8)

#: Raw reads and writes of this process's memory, GIL held (the values above,
#: and an instance's message channel: capsule/sandbox/channel.py).
read_at = ctypes._string_at  # type: ignore[attr-defined]  # (address, size) -> bytes
write_at = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)(
    ctypes._memmove_addr  # type: ignore[attr-defined]
)
# wasmtime's allocators of values, GIL held (compat.gil_holding), by address.
_vec_new_at = compat.gil_holding(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)(
    "wasm_byte_vec_new"
)
_vec_delete_at = compat.gil_holding(None, ctypes.c_void_p)("wasm_byte_vec_delete")
_val_new_at = compat.gil_holding(ctypes.c_void_p, ctypes.c_void_p)("wasmtime_component_val_new")
_val_delete_at = compat.gil_holding(None, ctypes.c_void_p)("wasmtime_component_val_delete")


#: Reads an import's arguments from the address of its argument array.
ArgumentReader = Callable[[int], tuple[Any, ...]]
#: Reads an argument of another type from its value's address (wasmtime-py's way).
Lift = Callable[[int], Any]

# How an argument of our imports' types is read, as source for a reader made
# for the signature (see _argument_reader): from ``raw``, a copy of the whole
# argument array, at ``{at}`` (the payload's offset); the callee owns its
# arguments, so what a value points to is freed. ``{i}``: the argument's index.
_STRING_LIFT = (
    "size, data = _BYTE_VEC.unpack_from(raw, {at})\n"
    "a{i} = read_at(data, size).decode('utf-8') if size else ''\n"
    "_vec_delete_at(address + {at})\n"
)
_U64_LIFT = "(a{i},) = _WORD.unpack_from(raw, {at})\n"
_OPTION_U64_LIFT = (
    "(boxed,) = _WORD.unpack_from(raw, {at})\na{i} = _take_boxed_u64(boxed) if boxed else None\n"
)


def _take_boxed_u64(boxed: int) -> int:
    """The u64 in the heap value at ``boxed`` (an option's payload), then freed."""
    value: int = _WORD.unpack(read_at(boxed + _PAYLOAD, _WORD.size))[0]
    _val_delete_at(boxed)
    return value


def _lifting(ty: Any) -> str | Lift:
    """How to read an argument of type ``ty``: the source that reads it inline,
    or for other types wasmtime-py's converter."""
    if isinstance(ty, String):
        return _STRING_LIFT
    if isinstance(ty, U64):
        return _U64_LIFT
    if isinstance(ty, OptionType) and isinstance(ty.payload, U64):
        return _OPTION_U64_LIFT

    def convert(address: int) -> Any:
        return ty.convert_from_c(_VAL.from_address(address))

    return convert


def _argument_reader(lifts: list[str | Lift]) -> ArgumentReader:
    """A function that reads the whole argument array at once, then every
    argument from that copy, inline where the type allows: made from source
    for each signature, as namedtuple and dataclasses make their methods,
    since a call per argument cost about a microsecond each on a busy run."""
    lines = [f"raw = read_at(address, {len(lifts) * _VAL_SIZE})\n" if lifts else ""]
    namespace: dict[str, Any] = {
        "read_at": read_at,
        "_BYTE_VEC": _BYTE_VEC,
        "_WORD": _WORD,
        "_vec_delete_at": _vec_delete_at,
        "_take_boxed_u64": _take_boxed_u64,
    }
    for index, lift in enumerate(lifts):
        offset = index * _VAL_SIZE
        if isinstance(lift, str):
            lines.append(lift.format(at=offset + _PAYLOAD, i=index))
        else:
            namespace[f"lift{index}"] = lift
            lines.append(f"a{index} = lift{index}(address + {offset})\n")
    result = "".join(f"a{index}, " for index in range(len(lifts)))
    body = "".join(lines) + f"return ({result})\n"
    source = "def read(address):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    exec(source, namespace)
    reader: ArgumentReader = namespace["read"]
    return reader


_read_one_string = _argument_reader([_STRING_LIFT])


def _take_string(address: int) -> str:
    """The string value at ``address``, whose byte vector is then freed."""
    text: str = _read_one_string(address)[0]
    return text


def _string_vec(text: Any, address: int) -> None:
    """Write ``text`` as a new byte vector at ``address`` (the value then owns it)."""
    if not isinstance(text, str):
        raise TypeError("expected string type")
    data = text.encode("utf-8")
    _vec_new_at(address, len(data), data)  # one copy, in C


# The string value that _boxed_string fills, then moves into a box (which
# leaves it reset). One for all threads: every step from filling to moving is a
# Python-API call, which keeps the GIL, so no other thread runs in between.
_SCRATCH = (ctypes.c_char * _VAL_SIZE)()
_SCRATCH_AT = ctypes.addressof(_SCRATCH)


def _boxed_string(text: Any) -> int:
    """A new heap value holding ``text`` (what a result's case points to)."""
    if not isinstance(text, str):
        raise TypeError("expected string type")
    data = text.encode("utf-8")
    _SCRATCH[0] = _STRING_KIND
    _vec_new_at(_SCRATCH_AT + _PAYLOAD, len(data), data)  # as _string_vec, one call fewer
    boxed: int = _val_new_at(_SCRATCH_AT)  # moves the value into the box
    return boxed


# (Parameter names as wasmtime-py's, whose functions these replace.)
def _bytes_to_c(s: bytes | bytearray) -> Any:
    if not isinstance(s, (bytes, bytearray)):
        raise TypeError("expected bytes or bytearray")
    vec = compat.BYTE_VEC_T()
    _vec_new_at(ctypes.addressof(vec), len(s), bytes(s))
    return vec


def _str_to_c(s: str) -> Any:
    vec = compat.BYTE_VEC_T()
    _string_vec(s, ctypes.addressof(vec))
    return vec


def _string_from_c(self: Any, c: Any) -> str:
    assert c.kind == _STRING
    return _take_string(ctypes.addressof(c))


#: The byte vectors wasmtime-py makes and reads itself: strings (its
#: String.convert_to_c calls str_to_capi), and the names of record fields,
#: variant cases and enum values, which the C API takes as byte vectors on every
#: value lowered. It copies bytes twice on their way in (a ctypes array, then a
#: memmove that gives up the GIL); these take them as they are. In place while
#: a Sandbox is open (see compat.ConverterPatches).
CONVERTERS = compat.ConverterPatches(
    str_to_capi=_str_to_c, bytes_to_capi=_bytes_to_c, string_from_c=_string_from_c
)


#: Lowers a host function's answer into the value slot (by address) the guest
#: reads; the store's context comes as an address, made a StoreContext only
#: where wasmtime-py's converters need one.
Lowering = Callable[[int, Any, int], None]


def _result_lowering(ty: ResultType) -> Lowering:
    """``result<string?, string?>`` (or ``result<u64, string?>``) from an
    ``(ok, payload)`` pair: the payload is the string (or number) of the case,
    ignored where the case carries none."""
    ok_has_string = isinstance(ty.ok, String)
    ok_has_number = isinstance(ty.ok, U64)
    err_has_string = isinstance(ty.err, String)

    def lower(_context: int, answer: tuple[bool, Any], address: int) -> None:
        ok, payload = answer
        if ok and ok_has_number:
            boxed = _boxed_u64(payload)
        else:
            boxed = _boxed_string(payload) if (ok_has_string if ok else err_has_string) else 0
        write_at(address, _RESULT_SLOT.pack(_RESULT, ok, boxed), _RESULT_SLOT.size)

    return lower


def _boxed_u64(value: Any) -> int:
    """A new heap value holding the u64 ``value``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise TypeError("expected a u64")
    packed = _U64_VAL.pack(_U64_KIND, value)
    write_at(_SCRATCH_AT, packed, len(packed))
    boxed: int = _val_new_at(_SCRATCH_AT)
    return boxed


_vallist_new_at = compat.gil_holding(None, ctypes.c_void_p, ctypes.c_size_t)(
    "wasmtime_component_vallist_new_uninit"
)
_U8_KIND = bytes((compat.KIND["U8"],))
_LIST_KIND = bytes((compat.KIND["LIST"],))


def _lower_bytes(_context: int, data: bytes, address: int) -> None:
    """``list<u8>`` from bytes, every element written at once. (wasmtime-py
    converts a byte at a time: the ~2.5 KB of random bytes each fresh
    instance draws to seed its ``random`` module took ~4 ms to lower.)"""
    if not isinstance(data, bytes):
        raise TypeError("expected bytes value")
    count = len(data)
    _vallist_new_at(address + _PAYLOAD, count)  # the list value's (size, elements)
    if count:
        _, elements_at = _BYTE_VEC.unpack(read_at(address + _PAYLOAD, _BYTE_VEC.size))
        elements = bytearray(count * _VAL_SIZE)
        elements[0::_VAL_SIZE] = _U8_KIND * count
        elements[_PAYLOAD::_VAL_SIZE] = data
        write_at(elements_at, bytes(elements), len(elements))
    write_at(address, _LIST_KIND, 1)


_valrecord_new_at = compat.gil_holding(None, ctypes.c_void_p, ctypes.c_size_t)(
    "wasmtime_component_valrecord_new_uninit"
)
_RECORD_KIND = bytes((compat.KIND["RECORD"],))
_BOOL_KIND = compat.KIND["BOOL"]
_ENTRY = compat.VALRECORD_ENTRY_T
_ENTRY_SIZE = ctypes.sizeof(_ENTRY)
_ENTRY_VAL = _offset(_ENTRY, "val")
#: A bool value: kind, then the flag at the payload's offset.
_BOOL_VAL = struct.Struct(f"@B{_PAYLOAD - 1}x?")

#: Writes a list of records (each given as a tuple of its fields' values, in
#: the record's order) as a list value at an address.
RecordsWriter = Callable[[list[tuple[Any, ...]], int], None]


def _records_writer(ty: ListType) -> RecordsWriter | None:
    """How to write a ``list<record>`` whose fields are strings, bools and
    u64s, by address (wasmtime-py's converter made a dozen Python objects per
    field: a received message is such a record); None for other types."""
    element = ty.element
    if not isinstance(element, RecordType):
        return None
    fields = element.fields
    if not all(isinstance(field_type, (String, Bool, U64)) for _, field_type in fields):
        return None
    names = [field_name.encode("utf-8") for field_name, _ in fields]
    strings = [isinstance(field_type, String) for _, field_type in fields]
    numbers = [isinstance(field_type, U64) for _, field_type in fields]
    has_numbers = any(numbers)
    count = len(fields)

    def fits(value: Any, position: int) -> bool:
        if strings[position]:
            return isinstance(value, str)
        if numbers[position]:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64
        return isinstance(value, bool)

    def write(rows: list[tuple[Any, ...]], address: int) -> None:
        # Every value is checked before anything is allocated: a failure
        # half-way would leave the list half made.
        for row in rows:
            if len(row) != count or not (
                all(fits(value, position) for position, value in enumerate(row))
                if has_numbers
                else all(  # (the common case, a message: no call per field)
                    isinstance(value, str) if is_string else isinstance(value, bool)
                    for value, is_string in zip(row, strings, strict=True)
                )
            ):
                raise TypeError(f"expected records of {count} fields, not {row!r:.200}")
        _vallist_new_at(address + _PAYLOAD, len(rows))
        if rows:
            _, elements_at = _BYTE_VEC.unpack(read_at(address + _PAYLOAD, _BYTE_VEC.size))
            for index, row in enumerate(rows):
                element_at = elements_at + index * _VAL_SIZE
                write_at(element_at, _RECORD_KIND, 1)
                _valrecord_new_at(element_at + _PAYLOAD, count)
                _, entries_at = _BYTE_VEC.unpack(read_at(element_at + _PAYLOAD, _BYTE_VEC.size))
                for position, value in enumerate(row):
                    entry_at = entries_at + position * _ENTRY_SIZE
                    field_name = names[position]
                    _vec_new_at(entry_at, len(field_name), field_name)
                    value_at = entry_at + _ENTRY_VAL
                    if strings[position]:
                        data = value.encode("utf-8")
                        write_at(value_at, _STRING_KIND, 1)
                        _vec_new_at(value_at + _PAYLOAD, len(data), data)
                    elif numbers[position]:
                        packed = _U64_VAL.pack(_U64_KIND, value)
                        write_at(value_at, packed, len(packed))
                    else:
                        packed = _BOOL_VAL.pack(_BOOL_KIND, value)
                        write_at(value_at, packed, len(packed))
        write_at(address, _LIST_KIND, 1)

    return write


def _records_result_lowering(ty: ResultType, write_records: RecordsWriter) -> Lowering:
    """``result<list<record>, string>`` from an ``(ok, payload)`` pair: the
    records as tuples when ok, the error's string when not."""

    def lower(_context: int, answer: tuple[bool, Any], address: int) -> None:
        ok, payload = answer
        if ok:
            value = (ctypes.c_char * _VAL_SIZE)()  # (its own: filled, then boxed)
            write_records(payload, ctypes.addressof(value))
            boxed: int = _val_new_at(ctypes.addressof(value))
        else:
            boxed = _boxed_string(payload)
        write_at(address, _RESULT_SLOT.pack(_RESULT, ok, boxed), _RESULT_SLOT.size)

    return lower


def _lowering(ty: Any) -> Lowering:
    """How to lower answers of type ``ty``: results of strings and lists of
    bytes by address; anything else with wasmtime-py's converter. (Its variant lowering
    also picks the case of an untagged variant through a process-wide set that
    concurrent calls on other threads clear under each other.)"""
    if (
        isinstance(ty, ResultType)
        and (ty.ok is None or isinstance(ty.ok, (String, U64)))
        and (ty.err is None or isinstance(ty.err, String))
    ):
        return _result_lowering(ty)
    if (
        isinstance(ty, ResultType)
        and isinstance(ty.ok, ListType)
        and isinstance(ty.err, String)
        and (write_records := _records_writer(ty.ok)) is not None
    ):
        return _records_result_lowering(ty, write_records)
    if isinstance(ty, ListType) and isinstance(ty.element, U8):
        return _lower_bytes
    convert = ty.convert_to_c

    def lower(context: int, value: Any, address: int) -> None:
        with compat.store_context(context) as store:
            convert(store, value, ctypes.pointer(_VAL.from_address(address)))

    return lower


#: Turns an exception of a host function into the error that traps the guest.
OnError = Callable[[Exception], wasmtime.WasmtimeError]


class _Import:
    def __init__(self, func: HostFunc, on_error: OnError) -> None:
        self.func = func
        self.on_error = on_error
        self.read_arguments: ArgumentReader | None = None
        self.lower_result: Lowering | None = None

    def resolve(self, context: int, ty_raw: int) -> ArgumentReader:
        with compat.store_context(context) as store, compat.func_type(ty_raw, store) as fty:
            result_type = fty.result
            if result_type is not None:
                self.lower_result = _lowering(result_type)
            read = _argument_reader([_lifting(ty) for _, ty in fty.params])
        self.read_arguments = read
        return read


# Indexed from 1: the C side hands index 0 back as a NULL pointer (None).
_IMPORTS: list[_Import | None] = [None]
#: Indexes of entries wasmtime let go of (reused), and the lock for both.
_FREE: list[int] = []
#: (Reentrant: an allocation under it may collect a store whose functions go.)
_IMPORTS_LOCK = threading.RLock()


_error_address = compat.error_address


# wasmtime's callback type, with the context, function type and the argument
# and result arrays as addresses: ctypes would make a pointer object of each on
# every call, and only the first call of an import needs them.
@ctypes.CFUNCTYPE(  # type: ignore[untyped-decorator]
    compat.CALLBACK_RESULT_T,
    compat.CALLBACK_DATA_T,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
)
def _call_import(
    idx: int, context: int, ty_raw: int, args: int, _nargs: int, results: int, _nresults: int
) -> int:
    # wasmtime-py's catch_exceptions, without its StoreContext and closure per
    # call (no host function here takes the store), and with the host's own
    # failures handed to on_error rather than to wasmtime-py's one
    # process-wide slot, which threads would race for.
    entry = _IMPORTS[idx]
    assert entry is not None
    try:
        read = entry.read_arguments or entry.resolve(context, ty_raw)
        answer = entry.func(*read(args))
        if entry.lower_result is not None:
            entry.lower_result(context, answer, results)
        return 0
    except wasmtime.WasmtimeError as error:
        return _error_address(error)
    except Exception as exc:
        try:
            trap = entry.on_error(exc)
        except Exception:  # the handler's own failure must still trap the guest
            trap = wasmtime.WasmtimeError("capsule: host error")
        return _error_address(trap)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # type: ignore[untyped-decorator]
def _forget(idx: Any) -> None:
    # wasmtime let go of the function (its linker and every store that used it
    # are gone): its entry, which holds the host's bound method, goes too.
    with _IMPORTS_LOCK:
        _IMPORTS[idx] = None
        _FREE.append(idx)


def add_host_func(instance: LinkerInstance, name: str, func: HostFunc, on_error: OnError) -> None:
    """Like ``LinkerInstance.add_func``, with the function's types resolved on
    its first call. ``func`` takes the import's arguments (no store) and
    answers a ``result`` as an ``(ok, payload)`` pair; an exception it raises
    traps the guest: a WasmtimeError as it is, any other as ``on_error`` makes
    it."""
    entry = _Import(func, on_error)
    with _IMPORTS_LOCK:
        if _FREE:
            index = _FREE.pop()
            _IMPORTS[index] = entry
        else:
            index = len(_IMPORTS)
            _IMPORTS.append(entry)
    compat.add_func(instance, name, _call_import, index, _forget)


class ExportCaller:
    """Calls one export of the guest, in any instance of the component, with its
    types resolved on the first call."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self._params: list[Any] | None = None
        self._result: Any = None

    def __call__(self, store: wasmtime.Store, instance: Instance, *params: Any) -> Any:
        func = compat.export_func(instance, store, self.index)
        if self._params is None:
            fty = func.type(store)
            self._result = fty.result
            self._params = [ty for _, ty in fty.params]
        types = self._params
        raw = (_VAL * len(params))()
        lowered = 0
        try:
            for ty, value in zip(types, params, strict=True):
                ty.convert_to_c(store, value, ctypes.pointer(raw[lowered]))
                lowered += 1
            space = _VAL()
            compat.call_export(func, store, raw, lowered, space)
            value = self._result.convert_from_c(space)
        finally:
            for i in range(lowered):
                compat.delete_val(ctypes.addressof(raw[i]))
        func.post_return(store)
        return value
