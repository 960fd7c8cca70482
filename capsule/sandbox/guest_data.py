"""What a guest hands the host, checked once where it enters.

Every value a task passes to a host import is the task's word, and the task may
be hostile: it can call the raw imports, or replace the guest SDK. So each value
is parsed and checked here, at the boundary, before the host acts on it, logs
it or passes it on: JSON must be strict (one value; no NaN or Infinity, which
JSON does not have, nor numbers that overflow to them; no lone surrogates, which
are not text; nested at most :data:`MAX_JSON_DEPTH` deep), names must be short,
and texts that the host only keeps (error messages, tracebacks) are cut to a
bound. What fails a check is a :class:`ProtocolError`, which fails the task that
sent it with kind ``protocol``: never the host, never another task.

The parser is pydantic-core's (already a dependency, through pydantic): strict
by design, a third of the cost of :func:`json.loads` on small values, and it
refuses lone surrogates and deep nesting itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

#: How deep JSON from a guest may nest (arrays and objects): pydantic-core's
#: own limit, which it enforces while parsing.
MAX_JSON_DEPTH = 200
#: The longest name a guest may give (a task, an actor, a message target or id).
MAX_NAME_CHARS = 1024
#: The longest list of names (task ids to wait on).
MAX_NAMES_CHARS = 4 * 1024**2
#: Error texts a guest reports are kept to these lengths (see kept_text).
MAX_ERROR_MESSAGE_CHARS = 16 * 1024
MAX_TRACEBACK_CHARS = 64 * 1024
#: A number that may overflow a float to Infinity: its exponent has three
#: digits or more, or it has over 300 digits before its point. (Two searches:
#: one alternation of both scanned five times slower.)
_LARGE_EXPONENT = re.compile(r"[eE][+]?0*[1-9][0-9]{2}")
_MANY_DIGITS = re.compile(r"(?<![0-9])[0-9]{300}")  # (from a run's start: linear)


#: Most items (array elements and object members, counted as the commas and
#: brackets that make them) one JSON value from a guest may have. A parsed
#: value takes up to ~24 times its text in the host's memory (``[[],[],...]``:
#: a list object per three characters); this bounds that to ~150 MB, whatever
#: the text's size, while a list of a million numbers still crosses.
MAX_JSON_ITEMS = 2_000_000


class ProtocolError(Exception):
    """A guest handed the host something malformed. Fails the task that sent it
    (kind ``protocol``); the message says what and where."""


class TooLarge(ProtocolError):
    """A value larger than the host takes. Where an honest program may offer
    one (arguments, a result, a message), it is refused to the task that
    offered it, saying why; elsewhere it is a protocol failure like any other."""


#: What names a value in an error: its text, or a function that makes it (on
#: a hot path, built only if the value is refused).
What = str | Callable[[], str]


def json_value(text: str, what: What, max_chars: int | None = None) -> Any:
    """The value of ``text``, strict JSON from a guest; ``what`` names it in the
    error (e.g. "the body of a message to 'worker'")."""
    if max_chars is not None and len(text) > max_chars:
        raise TooLarge(
            f"{_named(what)} is {len(text):,} characters of JSON; the limit is {max_chars:,}"
        )
    items = _items(text)
    if items > MAX_JSON_ITEMS:
        raise TooLarge(
            f"{_named(what)} has {items:,} items (array elements and object members); "
            f"the limit is {MAX_JSON_ITEMS:,}"
        )
    try:
        value = from_json(text, allow_inf_nan=False, cache_strings=False)
    except ValueError as exc:
        raise ProtocolError(f"{_named(what)} is not valid JSON: {_why(exc)}") from None
    if _LARGE_EXPONENT.search(text) is not None or _MANY_DIGITS.search(text) is not None:
        try:  # (only then: a float that overflowed is the one thing left to find)
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise ProtocolError(f"{_named(what)} holds a number too large for JSON") from None
    return value


def _named(what: What) -> str:
    return what if isinstance(what, str) else what()


#: A JSON string, escapes included (for counting items outside strings).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _items(text: str) -> int:
    """How many items ``text`` has, at most: its commas and opening brackets,
    those inside strings left out if the quick count says too many."""
    items = text.count(",") + text.count("[") + text.count("{")
    if items > MAX_JSON_ITEMS:  # (rare: only then scan past the strings)
        bare = _STRING.sub("", text)
        items = bare.count(",") + bare.count("[") + bare.count("{")
    return items


def json_text(text: str, what: What, max_chars: int | None = None) -> str:
    """``text`` itself, once checked to be one strict JSON value (bodies and
    results pass through the host as the guest wrote them)."""
    json_value(text, what, max_chars)
    return text


def _why(exc: ValueError) -> str:
    message = str(exc)
    if message.startswith("recursion limit exceeded"):
        return f"it nests deeper than {MAX_JSON_DEPTH} levels"
    if "surrogate" in message or "hex escape" in message:
        return f"a string holds a lone surrogate, which is not text ({message})"
    return message  # (NaN and Infinity: "expected value at line 1 column N")


def timeout_s(timeout_ms: int | None) -> float | None:
    """A guest's timeout in milliseconds (an unsigned WIT integer, so bounded
    and never negative) in seconds; None: none."""
    return None if timeout_ms is None else timeout_ms / 1000


def name(text: str, what: str) -> str:
    """A name or id from a guest: at most MAX_NAME_CHARS characters."""
    if len(text) > MAX_NAME_CHARS:
        raise ProtocolError(
            f"{what} is {len(text):,} characters long; names are at most {MAX_NAME_CHARS:,}"
        )
    return text


def names(text: str, what: str) -> list[str]:
    """A JSON array of distinct names (task ids to wait on, say)."""
    value = json_value(text, what, max_chars=MAX_NAMES_CHARS)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"{what} must be a JSON array of strings")
    if len(set(value)) != len(value):
        # (The answer to a wait holds each id's outcome: one child's result,
        # named many times, would make the host build an answer of any size.)
        raise ProtocolError(f"{what} name one more than once")
    return [name(item, what) for item in value]


def kept_text(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters: its head, then its tail (the
    last lines of a traceback say the most), saying how much was cut. (The
    guest runtime cuts what it reports the same way.)"""
    if len(text) <= limit:
        return text
    head = limit // 4
    cut = len(text) - limit
    return f"{text[:head]}\n... [{cut:,} characters not kept] ...\n{text[-(limit - head) :]}"


#: The largest JSON a task may pass as arguments or return as its result. The
#: value crosses the host, so the cap bounds what one task can make it hold.
MAX_PAYLOAD_CHARS = 64 * 1024**2


@dataclass(frozen=True)
class TaskCall:
    """A call or spawn of a task, as a guest asked for it, checked."""

    name: str
    #: The arguments as the guest wrote them, ``{"args": [...], "kwargs":
    #: {...}}``: checked, then passed on as text (journaled, compared on
    #: replay, and handed to the child's instance), never held parsed.
    call_json: str


def task_call(task: str, call_json: str) -> TaskCall:
    """The call of ``task`` with ``call_json`` = ``{"args": [...], "kwargs": {...}}``."""
    task = name(task, "a task name")
    if len(call_json) > MAX_PAYLOAD_CHARS:
        raise TooLarge(
            f"the arguments to {task!r} are {len(call_json):,} bytes of JSON; "
            f"arguments are limited to {MAX_PAYLOAD_CHARS:,} bytes"
        )
    value = json_value(call_json, f"the arguments to {task!r}")
    if (
        not isinstance(value, dict)
        or set(value) != {"args", "kwargs"}
        or not isinstance(value["args"], list)
        or not isinstance(value["kwargs"], dict)
    ):
        raise ProtocolError(
            f'the arguments to {task!r} must be a JSON object {{"args": [...], "kwargs": {{...}}}}'
        )
    return TaskCall(task, call_json)


@dataclass(frozen=True)
class SpawnOptions:
    actor_name: str | None
    #: The child's failure fails its parent at once (``spawn(..., link=True)``).
    link: bool
    #: As the guest wrote them (journaled, compared on replay).
    text: str


#: The spawn options a guest may give. ``awaited`` (what guests before link
#: wrote) is still taken, and means nothing now.
_SPAWN_OPTIONS = ("actor_name", "link", "awaited")


def spawn_options(text: str) -> SpawnOptions:
    """``{"actor_name": name or null, "link": bool}``."""
    value = json_value(text, "the spawn options", max_chars=4 * MAX_NAME_CHARS)
    if not isinstance(value, dict) or not set(value) <= set(_SPAWN_OPTIONS):
        raise ProtocolError(
            'the spawn options must be a JSON object {"actor_name": name or null, '
            '"link": true or false}'
        )
    actor_name = value.get("actor_name")
    if actor_name is not None and not isinstance(actor_name, str):
        raise ProtocolError(f"an actor name must be a string or null, not {actor_name!r:.80}")
    for option in ("link", "awaited"):
        flag = value.get(option, False)
        if not isinstance(flag, bool):
            raise ProtocolError(
                f"the spawn option {option} must be true or false, not {flag!r:.80}"
            )
    if actor_name is not None:
        name(actor_name, "an actor name")
    return SpawnOptions(actor_name, value.get("link", False), text)
