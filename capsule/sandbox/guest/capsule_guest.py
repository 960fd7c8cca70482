"""The guest runtime: the Python app componentize-py wraps into the generic
component that every task instance runs.

Built once (see ``capsule.sandbox.runtime``); user programs are never compiled in.
They are imported at run time through :class:`HostFinder`, which asks the host for
module source text. Only modules imported here, while componentize-py
pre-initialises the app, exist in the guest afterwards, hence the long import
list below: it is the standard library the sandbox offers.

This file runs inside the sandbox only; it is data to the host.
"""

# ruff: noqa
# mypy: ignore-errors

import asyncio
import collections
import functools
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import io
import json
import linecache
import marshal
import math
import struct
import sys
import traceback
from array import array

# The standard library on offer. Each is imported now so that it is part of the
# pre-initialised snapshot; a module that fails to import here is simply absent.
GUEST_STDLIB = (
    "abc argparse array ast base64 binascii bisect calendar cmath codecs collections "
    "collections.abc colorsys contextlib contextvars copy csv dataclasses datetime "
    "decimal difflib email email.message email.utils enum fnmatch fractions functools "
    "gettext graphlib hashlib heapq hmac html html.entities html.parser inspect io "
    "ipaddress itertools json json.decoder keyword linecache locale logging "
    "logging.handlers math numbers operator os pathlib pprint quopri random re "
    "reprlib secrets shlex statistics string stringprep struct textwrap time "
    "timeit tokenize tomllib traceback types typing unicodedata urllib urllib.parse "
    "uuid warnings weakref zlib zoneinfo datetime "
    # Pure-Python modules that libraries commonly import at their top (attrs
    # imports platform, for one): importable here even where they can do little.
    "asyncio bz2 codeop concurrent.futures configparser copyreg dis errno filecmp "
    "fileinput getopt glob gzip http http.cookies importlib.metadata importlib.resources "
    "lzma mimetypes opcode optparse pickle pkgutil platform plistlib queue sched selectors "
    "shutil signal stat sysconfig tarfile tempfile threading token wave "
    "xml.dom.minidom xml.etree.ElementTree zipfile"
).split()


def _encodings() -> list[str]:
    # Every codec ("x".encode("cp1252"), idna's punycode): each is a module the
    # codec registry imports by name, which it could not do after the snapshot.
    import encodings
    import pkgutil

    return [f"encodings.{info.name}" for info in pkgutil.iter_modules(encodings.__path__)]


for _name in [*GUEST_STDLIB, *_encodings()]:
    try:
        importlib.import_module(_name)
    except Exception:  # absent from this CPython build: leave it out
        pass

import wit_world
from wit_world import exports
from wit_world.exports import runner as runner_types
from wit_world.imports import clock, http, messaging, modules, operations, output, tasks
from componentize_py_types import Err

import capsule
import capsule.http
import capsule_loop
from capsule.sdk import task as sdk_task
from capsule.sdk.http import HostNotAllowed, http_error
from capsule.sdk.errors import ReceiveTimeout, TaskError, message_error, unhandled


def _not_serializable(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_scan_json = json.decoder.JSONDecoder().scan_once


def _new_encoder():
    """json's C encoder, made as json.dumps makes it, but refusing NaN and
    Infinity as the host does (None where it is absent)."""
    make_encoder = json.encoder.c_make_encoder
    if make_encoder is None:
        return None
    return make_encoder(
        {},
        _not_serializable,
        json.encoder.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        False,
    )


_encoder = _new_encoder()


def _dumps(value) -> str:
    """``json.dumps(value, allow_nan=False)``, the same text, without its Python
    layers and with one encoder kept: in the guest's interpreter, making the
    encoder and the layers around it cost more than encoding a small message
    does. What the host would refuse is refused here, as a ValueError the
    task can catch: NaN and Infinity, and strings with lone surrogates."""
    global _encoder
    if _encoder is None:
        text = json.dumps(value, allow_nan=False)
    else:
        try:
            text = "".join(_encoder(value, 0))
        except BaseException:
            # A failed encoding may leave entries in the encoder's cycle markers.
            _encoder = _new_encoder()
            raise
    if "\\ud" in text or "\\uD" in text:  # (rare: only then look closer)
        _refuse_lone_surrogates(value)
    return text


def _refuse_lone_surrogates(value) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a string holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), "
            f"which is not text: JSON for the host must be valid Unicode"
        ) from None


def _text(value, limit=None) -> str:
    """``value`` as text the host can take (WIT strings are UTF-8): lone
    surrogates shown as escapes; cut to ``limit`` characters, as the host
    would cut it (head, then tail: a traceback's last lines say the most)."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        head = limit // 4
        cut = len(text) - limit
        text = f"{text[:head]}\n... [{cut:,} characters not kept] ...\n{text[-(limit - head):]}"
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


#: What the host keeps of a failure's texts (capsule/sandbox/guest_data.py).
_MESSAGE_CHARS = 16 * 1024
_TRACEBACK_CHARS = 64 * 1024


def _loads(text: str):
    """``json.loads(text)`` for the host's JSON (no surrounding whitespace),
    straight through the scanner; anything else goes the long way."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return json.loads(text)  # raises json.loads' own error
    if end != len(text):
        return json.loads(text)
    return value


class HostStream(io.TextIOBase):
    """stdout/stderr of the guest: line-buffered writes to the host."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._buffer = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer.append(text)
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            text = "".join(self._buffer)
            self._buffer.clear()
            output.write(self._stream, _text(text))


_stdout = sys.stdout = HostStream(output.OutputStream.STDOUT)
_stderr = sys.stderr = HostStream(output.OutputStream.STDERR)


class SandboxImportError(ModuleNotFoundError):
    """A module exists on the host but cannot run in the sandbox (a C extension)."""


class SourceLoader(importlib.abc.Loader):
    def __init__(self, source) -> None:
        self._source = source

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # The guest cannot read the host file: give tracebacks the source lines.
        lines = self._source.code.splitlines(keepends=True)
        linecache.cache[self._source.origin] = (
            len(self._source.code), None, lines, self._source.origin
        )
        code = None
        if self._source.compiled is not None:
            try:
                code = marshal.loads(self._source.compiled.encode("latin-1"))
            except Exception:  # a stale or damaged entry: compile instead
                code = None
        if code is None:
            # Compiling is the costliest step of an import in a fresh instance;
            # the host keeps the result for the instances after this one.
            try:
                code = compile(self._source.code, self._source.origin, "exec", dont_inherit=True)
            except SyntaxError as exc:
                exc._capsule_import = True  # (the same source fails alike every attempt)
                raise
            modules.offer_compiled(self._source.origin, marshal.dumps(code).decode("latin-1"))
        exec(code, module.__dict__)


class HostFinder(importlib.abc.MetaPathFinder):
    """Finds modules the host serves: the user's program and pure-Python packages."""

    def find_spec(self, fullname, path=None, target=None):
        found = modules.find(fullname)
        if isinstance(found, modules.Lookup_NotFound):
            return None
        if isinstance(found, modules.Lookup_Refused):
            raise SandboxImportError(found.value, name=fullname)
        source = found.value
        spec = importlib.util.spec_from_loader(
            fullname, SourceLoader(source), origin=source.origin, is_package=source.is_package
        )
        spec.has_location = True
        if source.is_package:
            spec.submodule_search_locations = []
        return spec


# At run time the guest has no filesystem: the standard library is what was
# imported above, so the path-based finder can only waste time; the host serves
# everything else.
sys.meta_path[:] = [
    finder
    for finder in sys.meta_path
    if getattr(finder, "__name__", "") != "PathFinder"
]
sys.meta_path.append(HostFinder())


class NetworkModules(importlib.abc.MetaPathFinder):
    """The standard library's own network clients, absent from the sandbox:
    importing one says where a task's network is (``requests``, ``httpx`` and
    ``urllib3`` stop at one of them)."""

    NAMES = frozenset(
        "ssl _ssl http.client urllib.request ftplib smtplib poplib imaplib nntplib "
        "socketserver http.server xmlrpc.client xmlrpc.server".split()
    )

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.NAMES:
            raise SandboxImportError(
                f"No module named {fullname!r}: {capsule_loop.NO_NETWORK}", name=fullname
            )
        return None


sys.meta_path.insert(len(sys.meta_path) - 1, NetworkModules())


class MissingHttpClients(importlib.abc.MetaPathFinder):
    """Asked last: an HTTP client package the host does not have either says
    where a task's network is, as one it has does (it stops at ``ssl``)."""

    NAMES = frozenset("requests httpx aiohttp urllib3 websockets".split())

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.NAMES:
            raise SandboxImportError(
                f"No module named {fullname!r}: {capsule_loop.NO_NETWORK}", name=fullname
            )
        return None


sys.meta_path.append(MissingHttpClients())


# No threads and no sockets in the sandbox. Importing threading and socket
# works (libraries do at their top); starting a thread or opening a socket says
# what to use instead.
import _thread
import socket
import threading

_NO_THREADS = (
    "can't start new thread: a task runs on a single thread in its sandbox; run work "
    "concurrently with asyncio (an async def task, asyncio.gather; for HTTP, "
    "capsule.http's *_async functions) or in child tasks (task.spawn, task.map)"
)


def _no_thread(*args, **kwargs):
    raise RuntimeError(_NO_THREADS)


_thread.start_new_thread = _thread.start_new = _no_thread
for _name in ("start_joinable_thread",):
    if hasattr(_thread, _name):
        setattr(_thread, _name, _no_thread)
for _name in ("_start_joinable_thread", "_start_new_thread"):
    if hasattr(threading, _name):
        setattr(threading, _name, _no_thread)


def _no_network(*args, **kwargs):
    raise PermissionError(capsule_loop.NO_NETWORK)


class _NoSocket(socket.socket):
    __slots__ = ()

    def __init__(self, *args, **kwargs):
        raise PermissionError(capsule_loop.NO_NETWORK)


socket.socket = _NoSocket
for _name in (
    "socketpair create_connection create_server fromfd getaddrinfo gethostbyname "
    "gethostbyname_ex gethostbyaddr getnameinfo"
).split():
    setattr(socket, _name, _no_network)


def _explain_missing(exc: ModuleNotFoundError) -> str:
    name = exc.name or "?"
    return (
        f"No module named {name!r}: it is not in the sandbox's standard library and "
        f"was not found beside the program or among the pure-Python packages of the "
        f"host environment"
    )


def _format_traceback(exc: BaseException) -> str:
    """The traceback from the user's code down, without this shim's own frame."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _error(
    kind: str,
    task: str,
    exc: BaseException,
    message: str | None = None,
    cause=None,
    retryable: bool = True,
) -> Err:
    if message is None:
        message = f"{type(exc).__name__}: {exc}"
    return _err(kind, message, type(exc).__name__, _format_traceback(exc), cause, retryable)


def _err(kind, message, type_name=None, traceback_text=None, cause=None, retryable=True) -> Err:
    """The failure a task's attempt (or the program's import) returns."""
    if cause is not None:
        cause = runner_types.FailureCause(
            task=_text(cause.get("task", "?"), 1024),
            kind=_text(cause.get("kind", "exception"), 80),
            message=_text(cause.get("message", ""), _MESSAGE_CHARS),
            via=[_text(via, 1024) for via in cause.get("via", [])[:16]],
        )
    return Err(
        runner_types.Failure(
            kind=kind,
            message=_text(message, _MESSAGE_CHARS),
            type=None if type_name is None else _text(type_name, 200),
            traceback=None if traceback_text is None else _text(traceback_text, _TRACEBACK_CHARS),
            cause=cause,
            retryable=retryable,
        )
    )


def _unhandled_task_error(task: str, exc: TaskError, retryable: bool) -> Err:
    message, cause = unhandled(exc)
    return _error("exception", task, exc, message, cause, retryable)


def _refusal_in_chain(exc: BaseException):
    """The SandboxImportError behind ``exc``, if a package's own error handling
    wrapped it (numpy, for one, re-raises with a long message of its own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SandboxImportError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


#: Memory kept in the image for reporting a MemoryError: with the heap full,
#: formatting the error and handing it to the host need room of their own.
_MEMORY_RESERVE: bytearray | None = bytearray(64 << 10)


def _deterministic(exc: BaseException) -> bool:
    """Whether ``exc`` is a programming error that every attempt would meet
    again: a module that does not exist, cannot run in the sandbox or does not
    compile, a host the task was not granted."""
    if isinstance(exc, HostNotAllowed) or _refusal_in_chain(exc) is not None:
        return True
    if isinstance(exc, ModuleNotFoundError) and str(exc) == f"No module named {exc.name!r}":
        return True
    return isinstance(exc, SyntaxError) and getattr(exc, "_capsule_import", False)


def _failure(task: str, exc: BaseException, fn=None) -> Err:
    """The failure ``exc`` ends an attempt of task ``fn`` with (``fn`` None: the
    program's import), retryable as the task's rules and the exception say."""
    if isinstance(exc, MemoryError):
        # What the task's frames held (the list it grew, say) is garbage now,
        # but the traceback keeps their locals alive: let them go, keeping the
        # line numbers; then the reserve, for what little still holds on.
        global _MEMORY_RESERVE
        _MEMORY_RESERVE = None
        traceback.clear_frames(exc.__traceback__)
        return _error("memory_limit", task, exc, "MemoryError: the task ran out of memory")
    retryable = not _deterministic(exc) and (
        fn.retries(exc) if fn is not None else not isinstance(exc, capsule.NonRetryable)
    )
    if isinstance(exc, TaskError):
        return _unhandled_task_error(task, exc, retryable)
    if isinstance(exc, ImportError):
        refusal = _refusal_in_chain(exc)
        if refusal is not None:
            return _error("exception", task, exc, f"ImportError: {refusal}", retryable=False)
        if isinstance(exc, ModuleNotFoundError) and str(exc) == f"No module named {exc.name!r}":
            message = f"ModuleNotFoundError: {_explain_missing(exc)}"
            return _error("exception", task, exc, message, retryable=False)
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        hint = _ungranted_path_hint(exc.filename)
        if hint is not None:
            message = f"{type(exc).__name__}: {exc} ({hint})"
            return _error("exception", task, exc, message, retryable=retryable)
    return _error("exception", task, exc, retryable=retryable)


#: The directories the running task was granted (allowed_files), as it sees them.
_granted_dirs: list = []


def _ungranted_path_hint(filename):
    """A hint for a file the task could not reach because no allowed_files
    entry grants its directory (None if one does: then it is really missing)."""
    if not isinstance(filename, str):
        return None
    # (The task's working directory is "/": a relative path is below it.)
    path = "/" + "/".join(part for part in filename.split("/") if part not in ("", "."))
    for granted in _granted_dirs:
        if path == granted or path.startswith(granted.rstrip("/") + "/"):
            return None
    declared = ", ".join(repr(d.lstrip("/")) for d in _granted_dirs) or "none"
    return (
        f"hint: a task reaches only the directories its allowed_files grants "
        f"(this one: {declared}); grant the file's directory, e.g. "
        f"@task(allowed_files=[\"data\"]) for data/..., relative to the program"
    )


#: What an export raises when even its failure cannot be reported: made here,
#: so that raising them needs next to no memory.
_OUT_OF_MEMORY = _err("memory_limit", "MemoryError: the task ran out of memory")
_UNREPORTABLE = _err("exception", "the task failed, and so did reporting how")


def _fails_with_err(export):
    """An export that fails only with an Err. Anything else escaping it (a
    failure while reporting a failure or serialising a result: a str() or
    flush() that raises, memory running out) panics the runtime, and the task
    would end in a trap that says nothing of why."""

    def guarded(self, *args):
        try:
            return export(self, *args)
        except Err:
            raise
        except MemoryError:
            raise _OUT_OF_MEMORY from None
        except BaseException as exc:
            try:
                error = _error(
                    "exception", "?", exc,
                    f"{type(exc).__name__} while reporting the task's outcome",
                )
            except BaseException:
                error = _UNREPORTABLE
            raise error from None

    return guarded


def _payload(name, args, kwargs) -> str:
    try:
        return _dumps({"args": list(args), "kwargs": kwargs})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arguments to task {name!r} are not JSON-serializable: {exc}") from None


def _body(target, body) -> str:
    try:
        return _dumps(body)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"message for {target!r} is not JSON-serializable: {exc}") from None


def _flush() -> None:
    # Output written before a blocking call reaches the host before the wait.
    # (Runs before every message: our own streams are flushed only when they
    # hold something, streams a program put in their place always.)
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is not _stdout or _stdout._buffer:
        stdout.flush()
    if stderr is not _stderr or _stderr._buffer:
        stderr.flush()


def _ms(seconds):
    if seconds is None:
        return None
    if seconds < 0:
        raise ValueError(f"a timeout must be >= 0 seconds, not {seconds!r}")
    return int(seconds * 1000)


# The message channel this instance shares with the host (the host's
# capsule/sandbox/channel.py says why and how): byte 0, how many messages of the
# last batch received the task's code took; then records, each
# [ready u8][target length u16][body length u32][target][body]. Allocated here,
# in the snapshot, and filled, so that it lies in the memory image where the
# host looks for it.
_CHANNEL_SIZE = 64 * 1024
_channel = array("B", b"\xff" * _CHANNEL_SIZE)
_channel[0] = _channel[1] = 0
_channel_bytes = memoryview(_channel)
_RECORDS = 1
_RECORD_HEAD = struct.Struct("<HI")


def _channel_put(target: str, text: str, at: int) -> int:
    """Write a message record at ``at`` (at the start again if the host, inside
    a host call, cleared the first record's ready byte); returns where the next
    one goes, or 0 if it cannot be written here.

    No host call may come while it writes (the host would take the records and
    start again under it): the code is all C calls, the garbage collector (whose
    finalizers may print) is off meanwhile, and nothing is written while a
    trace, profile or monitoring function (which may run between its lines) is
    set."""
    if _tracing():
        return 0
    name = target.encode()
    if len(name) > 0xFFFF:
        return 0
    record = _RECORD_HEAD.pack(len(name), len(text)) + name + text.encode()
    collecting = gc.isenabled()
    gc.disable()
    try:
        if at > _RECORDS and _channel[_RECORDS] == 0:  # the host took them all
            at = _RECORDS
        end = at + 1 + len(record)
        if end >= _CHANNEL_SIZE:
            return 0
        _channel[end] = 0  # the next record is not ready...
        _channel_bytes[at + 1 : end] = record
        _channel[at] = 1  # ...this one is: the host may take it from now on
        return end
    finally:
        if collecting:
            gc.enable()


def _tracing() -> bool:
    """Whether code may run between the lines of this module's functions."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    get_tool = sys.monitoring.get_tool
    return any(get_tool(tool) is not None for tool in range(6))


class GuestBackend:
    """Routes task calls in user code to the host."""

    def __init__(self) -> None:
        self.info = None
        #: Messages each target (as the code names it) may still get through the
        #: channel without a host call: room the host reserved in its mailbox.
        self._credit = {}
        #: Bodies larger than this (JSON characters) go through the host.
        self._credit_bytes = 0
        self._channel_at = _RECORDS
        #: The rest of the last batch of messages the host handed over.
        self._inbox = collections.deque()
        self._taken = 0
        #: Host operations started and not yet reported: handle -> (future,
        #: how its completion's payload becomes the future's outcome).
        self._operations = {}

    def _end_credit(self) -> None:
        # Before a call that may wait (the room reserved for this task is then
        # given back to others), or after which the code may know more about
        # its targets (that one ended, say): the next send to each goes through
        # the host, which says no_such_actor then. The host drops its
        # reservations at the same calls (ENDS_CREDIT).
        if self._credit:
            self._credit.clear()

    def call_task(self, name, args, kwargs):
        payload = _payload(name, args, kwargs)
        self._end_credit()
        _flush()
        try:
            return _loads(tasks.call(name, payload))
        except Err as err:  # componentize-py's form of an import's result::err
            raise TaskError.from_dict(json.loads(err.value)) from None

    def spawn_task(self, name, args, kwargs, actor_name, link):
        payload = _payload(name, args, kwargs)
        options = json.dumps({"actor_name": actor_name, "link": bool(link)})
        self._end_credit()
        try:
            return tasks.spawn(name, payload, options)
        except Err as err:
            raise TaskError.from_dict(json.loads(err.value)) from None

    def wait(self, task_ids, timeout, any_ended=False):
        self._end_credit()
        _flush()
        wait = tasks.wait_any if any_ended else tasks.wait
        try:
            reply = wait(json.dumps(list(task_ids)), _ms(timeout))
        except Err as err:
            error = json.loads(err.value)
            if error.get("kind") == "wait_timeout":
                raise TimeoutError(error.get("message", "timed out")) from None
            raise TaskError.from_dict(error) from None
        outcomes = []
        for item in _loads(reply):
            if item is None:  # (wait-any: it has not ended)
                outcomes.append(None)
            elif item["ok"]:
                outcomes.append((True, item["value"]))
            else:
                outcomes.append((False, TaskError.from_dict(item["error"])))
        return outcomes

    def cancel(self, task_id):
        self._end_credit()
        tasks.cancel(task_id)

    def sleep(self, seconds):
        self._end_credit()
        _flush()
        tasks.sleep(_ms(seconds) or 0)

    def send(self, target, body, timeout):
        text = _body(target, body)
        timeout_ms = _ms(timeout)  # (checked alike on either path)
        _flush()
        credit = self._credit.get(target)
        if credit and len(text) <= self._credit_bytes:
            at = _channel_put(target, text, self._channel_at)
            if at:
                self._channel_at = at
                self._credit[target] = credit - 1
                return
        try:
            answer = messaging.send(target, text, timeout_ms)
        except Err as err:
            self._end_credit()  # (the host gave back every reservation)
            raise message_error(json.loads(err.value)) from None
        if answer.endswith("]}"):
            # {..., "credit": [messages, JSON characters each, forget the rest]}
            places, self._credit_bytes, forget = _loads(answer)["credit"]
            if forget:  # (it had to wait: the host gave back every reservation)
                self._credit.clear()
            self._credit[target] = places

    def receive(self, timeout):
        inbox = self._inbox
        if inbox:
            self._taken += 1
            _channel[0] = self._taken  # (the host puts back what was not taken)
            return _message(inbox.popleft())
        self._end_credit()  # (it may wait: the host gives back the reservations)
        _flush()
        try:
            envelopes = messaging.receive(_ms(timeout))
        except Err as err:
            raise message_error(json.loads(err.value)) from None
        if len(envelopes) > 1:  # a batch: every message that was waiting
            inbox.extend(envelopes[1:])
            self._taken = 1
            _channel[0] = 1
        return _message(envelopes[0])

    def ask(self, target, body, timeout):
        text = _body(target, body)
        self._end_credit()
        _flush()
        try:
            return _loads(messaging.ask(target, text, _ms(timeout)))
        except Err as err:
            raise message_error(json.loads(err.value)) from None

    def reply(self, message_id, body):
        text = _body(message_id, body)
        try:
            messaging.reply(message_id, text)
        except Err as err:
            raise message_error(json.loads(err.value)) from None

    def current(self):
        return self.info

    def http(self, request):
        self._end_credit()
        _flush()
        try:
            return json.loads(http.request(json.dumps(request)))
        except Err as err:
            raise http_error(json.loads(err.value)) from None

    # -- operations the event loop waits for (capsule_loop) -------------------

    def http_async(self, request):
        return self._start(lambda: operations.start_http(json.dumps(request)), _http_answer)

    def wait_async(self, task_ids):
        ids = json.dumps(list(task_ids))
        return self._start(lambda: operations.start_wait(ids), _wait_answer)

    async def receive_async(self, timeout):
        _ms(timeout)  # (checked as receive checks it)
        try:
            async with asyncio.timeout(timeout):
                while not self._inbox:
                    # Until a message waits; then taken as receive takes it
                    # (another coroutine of the task may have taken it first).
                    await self._start(operations.start_receive, _no_answer)
                    try:
                        return self.receive(0)
                    except ReceiveTimeout:
                        continue
        except TimeoutError:
            raise ReceiveTimeout(f"no message arrived within {timeout:g}s") from None
        return self.receive(0)  # (the rest of the last batch: no host call)

    async def ask_async(self, target, body, timeout):
        text = _body(target, body)
        _ms(timeout)  # (checked as ask checks it)
        try:
            async with asyncio.timeout(timeout):
                return await self._start(lambda: operations.start_ask(target, text), _reply_answer)
        except TimeoutError as exc:
            if isinstance(exc, ReceiveTimeout):
                raise
            raise ReceiveTimeout(f"no reply from {target!r} within {timeout:g}s") from None

    def _start(self, start, answer):
        """Start a host operation; the future its completion settles with
        ``answer(ok, payload)``, on the running (host) event loop."""
        loop = asyncio.get_running_loop()
        if not isinstance(loop, capsule_loop.CapsuleEventLoop):
            raise RuntimeError(
                "capsule's async calls run on the event loop asyncio makes in a task "
                "(asyncio.run, or an async def task), not on another loop"
            )
        future = loop.create_future()
        self._end_credit()
        _flush()
        try:
            handle = start()
        except Err as err:  # refused: nothing started, nothing to abandon
            _settle(future, answer, False, err.value)
            return future
        self._operations[handle] = (future, answer)
        future.add_done_callback(lambda done: self._cancelled(handle, done))
        return future

    def _cancelled(self, handle, future):
        # A future cancelled before its operation ended (asyncio.wait_for's
        # timeout, a cancelled task): the host stops the operation.
        if future.cancelled() and self._operations.pop(handle, None) is not None:
            operations.abandon(handle)

    def has_operations(self):
        return bool(self._operations)

    def poll_operations(self, timeout):
        """Wait on the host for started operations: the callbacks that settle
        the futures of those that ended."""
        self._end_credit()
        _flush()
        timeout_ms = None if timeout is None else math.ceil(timeout * 1000)
        try:
            completions = operations.poll(timeout_ms)
        except Err as err:
            raise RuntimeError(f"waiting for the task's operations failed: {err.value}") from None
        settle = []
        for completion in completions:
            entry = self._operations.pop(completion.handle, None)
            if entry is not None:
                future, answer = entry
                settle.append(functools.partial(_settle, future, answer, completion.ok, completion.payload))
        return settle

    def abandon_operations(self, loop):
        """The loop closes: the operations its futures wait for are stopped."""
        for handle, (future, _) in list(self._operations.items()):
            if future.get_loop() is loop:
                del self._operations[handle]
                operations.abandon(handle)


def _settle(future, answer, ok, payload):
    if future.done():
        return
    try:
        value = answer(ok, payload)
    except Exception as exc:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _wait_answer(ok, payload):
    if not ok:
        raise TaskError.from_dict(json.loads(payload))
    return [
        (True, item["value"]) if item["ok"] else (False, TaskError.from_dict(item["error"]))
        for item in _loads(payload)
    ]


def _reply_answer(ok, payload):
    if not ok:
        raise message_error(json.loads(payload))
    return _loads(payload)


def _no_answer(ok, payload):
    if not ok:
        raise message_error(json.loads(payload))


def _http_answer(ok, payload):
    if ok:
        return json.loads(payload)
    raise http_error(json.loads(payload))


def _message(envelope):
    """(id, sender, body, expects_reply) of a received envelope."""
    return envelope.id, envelope.sender, _loads(envelope.body), envelope.expects_reply


_backend = GuestBackend()
sdk_task.install_backend(_backend)
# asyncio's loops wait on the host (see capsule_loop).
capsule_loop.install(_backend)


# Wall-clock time and randomness reach the guest through the WASI imports, which
# the host serves and journals. The monotonic clocks are served by the host's own
# import (the WASI one cannot be replaced alone), so a replay sees the same values.
import hashlib
import os
import random
import time


def _monotonic() -> float:
    return clock.monotonic_ns() / 1e9


time.monotonic = _monotonic
time.perf_counter = _monotonic
time.monotonic_ns = clock.monotonic_ns
time.perf_counter_ns = clock.monotonic_ns


# ``time.sleep`` is ``capsule.sleep``: on the host, the CPU slot free meanwhile,
# journaled (a replay does not wait again). WASI's own sleep held the slot, and
# ran no wasm, so no epoch tick took the task's gathered messages meanwhile.
time.sleep = capsule.sleep


# componentize-py reseeds `random` from WASI randomness as an instance starts
# (`random.seed()`, before the first export call): 2,496 bytes in ten host
# calls, then the generator set up from them, in every fresh instance (a tenth
# of the process's CPU on back-to-back calls). load seeds it from the random
# bytes the host hands over instead (a task then seeds it from its own seed).
_seed_random = random.seed


def _seed_later(*args, **kwargs):
    if args or kwargs:  # (not the start-up reseed: nothing else runs before load)
        _seed_random(*args, **kwargs)


random.seed = _seed_later

_program = None
#: Random bytes from the host that only this instance holds, kept from before
#: the program is imported: the host finds this instance's memory by them.
_marker = b""


def _keep_marker(marker_hex):
    """Keep the host's marker bytes, and seed `random` from a digest of them
    (the program's import may use it); returns where their data is in linear
    memory. (``id`` is an object's address there; a bytes object's data starts
    one byte before its type's basic size, which counts the final NUL.)"""
    global _marker
    _marker = bytes.fromhex(marker_hex)
    random.seed = _seed_random
    # (From a digest: the generator's outputs reveal its seed, and the marker's
    # bytes are to be in this instance's memory alone.)
    _seed_random(hashlib.sha512(b"capsule random " + _marker).digest())
    return id(_marker) + bytes.__basicsize__ - 1


class Runner(exports.Runner):
    @_fails_with_err
    def load(self, program) -> str:
        global _program
        name, source = program.name, program.source
        marker = _keep_marker(program.marker)
        try:
            if name in sys.modules:
                raise ImportError(
                    f"the program's module name {name!r} is taken by a module of the "
                    f"sandbox's standard library; rename the program file"
                )
            # Straight from the source the host handed over: no trip through the
            # finders (in a fresh instance, every step of an import costs).
            spec = importlib.util.spec_from_loader(name, SourceLoader(source), origin=source.origin)
            spec.has_location = True
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        except BaseException as exc:
            raise _failure("<load>", exc)
        _program = module
        layout = '"marker": %d, "channel": [%d, %d]' % (
            marker, _channel.buffer_info()[0], _CHANNEL_SIZE
        )
        if not program.describe:
            # (Formatted by hand: json.dumps would touch pages no task needs.)
            return "{%s}" % layout
        declared = [
            {"name": fn.name, "function": fn.qualified_name, "options": fn.options}
            for fn in sdk_task.registry.values()
        ]
        return '{%s, "tasks": %s}' % (layout, json.dumps(declared))

    @_fails_with_err
    def run(self, invocation_json: str, call_json: str) -> str:
        inv = _loads(invocation_json)
        call = _loads(call_json)
        name = inv["task"]
        fn = sdk_task.registry.get(name)
        if fn is None:
            raise _err("exception", f"no task named {name!r}", retryable=False)
        _backend.info = capsule.TaskInfo(
            id=inv["task_id"], name=name, attempt=inv["attempt"], max_attempts=inv["max_attempts"]
        )
        # `random` draws from a seed the host derives from the run and the task:
        # different for every task and run, the same when a resumed run replays it.
        random.seed(inv["seed"])
        # The environment variables the task was granted, and no others.
        os.environ.clear()
        os.environ.update(inv.get("env", {}))
        _granted_dirs[:] = inv.get("files", [])
        try:
            result = fn.func(*call["args"], **call["kwargs"])
            if inspect.iscoroutine(result):  # an async def task: run on the host loop
                result = asyncio.run(result)
        except TypeError as exc:
            # Raised by the call itself (no frame of the task's own code): the
            # arguments do not fit its signature, which no retry can fix.
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                raise _error(
                    "bad_arguments", name, exc,
                    f"task {name!r} cannot take these arguments: {exc}",
                    retryable=False,
                )
            raise _failure(name, exc, fn)
        except BaseException as exc:
            raise _failure(name, exc, fn)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        try:
            return _dumps(result)
        except (TypeError, ValueError) as exc:
            raise _error(
                "exception",
                name,
                exc,
                f"task {name!r} returned a value that is not JSON-serializable "
                f"({type(result).__name__}): {exc}",
                retryable=False,
            )


# Everything above is in the pre-initialised snapshot. Freezing it keeps the
# garbage collector from walking (and so copying-on-write) those pages in every
# instance.
gc.collect()
gc.freeze()
