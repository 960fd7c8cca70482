"""Running out of memory: a refused ``memory.grow`` ends the instance, and the
host knows it did.

Why: wasmtime enforces a task's ram cap (``Store.set_limits``) by refusing a
``memory.grow`` past it, which the guest sees as ``sbrk`` failing, ``malloc``
returning NULL, and CPython raising MemoryError. CPython 3.14.0, the guest's
interpreter, does not survive that everywhere: some specialised instructions
mishandle the failed allocation (``s = s + s`` on a str in a function leaves a
NULL in the local and carries on: the next use reads garbage, and reports a
TypeError about types named '' or traps on a call through an empty table
slot), and the shim's own reporting of the error may need the memory that is
not there. The failure then says nothing about memory, and a guest can say
what it likes about its own failures anyway.

So the built runtime is patched: in wasi-libc's ``sbrk``, through which all of
the guest's memory growth goes (it is the only ``memory.grow`` in the
component), the branch that would set ``errno = ENOMEM`` and return -1 executes
``unreachable`` instead. A refused growth traps right there, before any guest
code sees a failed allocation, and the trap's innermost frame is ``sbrk``: code
the guest cannot change, so the host classifies it (``is_refused_growth``)
without asking the guest.

The patch is the same number of bytes as what it replaces (``unreachable``
then ``nop`` s), so no size or offset in the binary changes. It is applied to
the exact instruction sequence the wasi-sdk build shipped with componentize-py
0.25 has; if a later build differs, nothing is patched (``patch_refused_growth``
returns None) and the host falls back to what it sees of the memory's size.
"""

from __future__ import annotations

import re

#: Part of the runtime's cache key: a runtime built before this patch, or with
#: another version of it, is rebuilt.
PATCH_VERSION = "sbrk-traps-1"

#: The libc function whose refused ``memory.grow`` traps after the patch.
GROWTH_FUNCTION = "sbrk"

_COMPONENT_HEADER = b"\0asm\x0d\x00\x01\x00"
_MODULE_HEADER = b"\0asm\x01\x00\x00\x00"
_CORE_MODULE_SECTION = 1
_IMPORT_SECTION, _EXPORT_SECTION, _CODE_SECTION = 2, 7, 10

_LEB = rb"[\x80-\xff]*[\x00-\x7f]"
# In sbrk: memory.grow 0; local.tee N; i32.const -1; i32.ne; br_if 0; then the
# failure path, up to the end of its block: errno's address (global.get G, or
# i32.const A), i32.const 48 (ENOMEM); i32.store; i32.const -1; return.
_REFUSED_PATH = re.compile(
    rb"\x40\x00\x22" + _LEB + rb"\x41\x7f\x47\x0d\x00"
    rb"((?:\x23|\x41)" + _LEB + rb"\x41\x30\x36\x02" + _LEB + rb"\x41\x7f\x0f)\x0b",
    re.DOTALL,
)

_UNREACHABLE, _NOP = b"\x00", b"\x01"


class _Malformed(Exception):
    """Not a binary this patch understands."""


def _leb(data: bytes | bytearray, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise _Malformed("truncated LEB128")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _name(data: bytes | bytearray, at: int) -> tuple[bytes, int]:
    size, at = _leb(data, at)
    return bytes(data[at : at + size]), at + size


def _sections(data: bytes | bytearray, start: int, end: int) -> list[tuple[int, int, int]]:
    """(id, contents start, contents end) of each section in ``data[start:end]``."""
    sections = []
    at = start
    while at < end:
        section_id = data[at]
        size, body = _leb(data, at + 1)
        if body + size > end:
            raise _Malformed("section past the end")
        sections.append((section_id, body, body + size))
        at = body + size
    return sections


def _skip_limits(data: bytes | bytearray, at: int) -> int:
    flags = data[at]
    _, at = _leb(data, at + 1)
    if flags & 1:
        _, at = _leb(data, at)
    if flags & 8:  # a custom page size
        _, at = _leb(data, at)
    return at


def _skip_value_type(data: bytes | bytearray, at: int) -> int:
    if data[at] in (0x63, 0x64):  # (ref null? heaptype)
        _, at = _leb(data, at + 1)
        return at
    return at + 1


def _imported_functions(data: bytes | bytearray, start: int, end: int) -> int:
    count, at = _leb(data, start)
    functions = 0
    for _ in range(count):
        _, at = _name(data, at)
        _, at = _name(data, at)
        kind = data[at]
        at += 1
        if kind == 0x00:  # function
            _, at = _leb(data, at)
            functions += 1
        elif kind == 0x01:  # table
            at = _skip_limits(data, _skip_value_type(data, at))
        elif kind == 0x02:  # memory
            at = _skip_limits(data, at)
        elif kind == 0x03:  # global
            at = _skip_value_type(data, at) + 1
        elif kind == 0x04:  # tag
            _, at = _leb(data, at + 1)
        else:
            raise _Malformed(f"import kind {kind:#x}")
    if at != end:
        raise _Malformed("import section size")
    return functions


def _exported_function(data: bytes | bytearray, start: int, name: bytes) -> int | None:
    count, at = _leb(data, start)
    for _ in range(count):
        export, at = _name(data, at)
        kind = data[at]
        index, at = _leb(data, at + 1)
        if kind == 0x00 and export == name:
            return index
    return None


def _function_body(data: bytes | bytearray, start: int, index: int) -> tuple[int, int]:
    count, at = _leb(data, start)
    if index >= count:
        raise _Malformed("no such function body")
    for _ in range(index):
        size, at = _leb(data, at)
        at += size
    size, at = _leb(data, at)
    return at, at + size


def _growth_function(module: bytearray, start: int, end: int) -> tuple[int, int] | None:
    """Where the body of the module's exported ``sbrk`` is, if it has one."""
    imported = 0
    index = None
    code = None
    for section_id, body, body_end in _sections(module, start + len(_MODULE_HEADER), end):
        if section_id == _IMPORT_SECTION:
            imported = _imported_functions(module, body, body_end)
        elif section_id == _EXPORT_SECTION:
            index = _exported_function(module, body, GROWTH_FUNCTION.encode())
        elif section_id == _CODE_SECTION:
            code = body
    if index is None or code is None or index < imported:
        return None
    return _function_body(module, code, index - imported)


def patch_refused_growth(component: bytes) -> bytes | None:
    """The component with a refused growth trapping in ``sbrk``; None if it
    has no ``sbrk`` of the expected shape (exactly one)."""
    data = bytearray(component)
    if not data.startswith(_COMPONENT_HEADER):
        return None
    spans = []
    try:
        for section_id, body, body_end in _sections(data, len(_COMPONENT_HEADER), len(data)):
            if section_id != _CORE_MODULE_SECTION or not data.startswith(_MODULE_HEADER, body):
                continue
            found = _growth_function(data, body, body_end)
            if found is not None:
                spans.append(found)
    except (_Malformed, IndexError):
        return None
    matches = [
        match for start, end in spans for match in _REFUSED_PATH.finditer(bytes(data[start:end]))
    ]
    if len(spans) != 1 or len(matches) != 1:
        return None
    start = spans[0][0]
    first, last = matches[0].span(1)
    data[start + first : start + last] = _UNREACHABLE + _NOP * (last - first - 1)
    return bytes(data)


# A wasm backtrace frame as wasmtime writes it: "  0: 0x1a2b - module!function"
# (with details on, file and line lines may follow a frame).
_FRAME = re.compile(r"^\s*(\d+): 0x[0-9a-f]+ - (?:.*!)?(.+?)\s*$", re.MULTILINE)


def is_refused_growth(trap_text: str) -> bool:
    """Whether wasmtime's text of a trap says the guest's memory could not
    grow: an ``unreachable`` executed in ``sbrk`` itself (the patched refusal)."""
    if "wasm trap: wasm `unreachable` instruction executed" not in trap_text:
        return False
    frames = _FRAME.findall(trap_text.partition("Caused by:")[0])
    return bool(frames) and frames[0] == ("0", GROWTH_FUNCTION)
