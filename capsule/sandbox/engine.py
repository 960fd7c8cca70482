"""The wasmtime engine and one fresh, limited instance per task invocation.

One :class:`Sandbox` per run owns the linker with the host imports and the
epoch ticker thread, on a :class:`GuestComponent` (the engine and the compiled
guest runtime) of its own or shared with other runs. :meth:`Sandbox.invoke`
runs one attempt of one task in a fresh instance and blocks until it ends; the
supervisor calls it on its task threads.

Limits are enforced by wasmtime: fuel (``Config.consume_fuel``), a memory cap
(``Store.set_limits``), and a deadline checked on every epoch tick by a callback
that traps the instance once the invocation's deadline has passed, or once what
it runs within (its owner's: see ``Within``) says it must stop.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import wasmtime
from wasmtime.component import Component, Instance, Linker, LinkerInstance, Record

from capsule.logs import logger
from capsule.sandbox import guest_data, oom
from capsule.sandbox import wasmtime_compat as compat
from capsule.sandbox.budget import MemoryBudget
from capsule.sandbox.channel import MAX_SIZE as MAX_CHANNEL_SIZE
from capsule.sandbox.channel import Channel, ChannelError
from capsule.sandbox.config import Limits
from capsule.sandbox.grants import NO_GRANTS, Grants
from capsule.sandbox.guest_data import ProtocolError, SpawnOptions, TaskCall, TooLarge
from capsule.sandbox.hostcall import CONVERTERS, ExportCaller, HostFunc, add_host_func
from capsule.sandbox.modules import ModuleFinder, ModuleSource, ProgramFinder, Refused
from capsule.sandbox.nesting import nested_call
from capsule.sandbox.paths import PathRefused, descriptor_path
from capsule.sandbox.prefault import NONCE_SIZE, Marker, Memory, Prefaulter
from capsule.sandbox.runtime import Progress, ensure_runtime
from capsule.sandbox.scheduler import CpuSlots

_log = logger("sandbox")

#: How often the epoch advances; the deadline check runs this often per instance.
TICK_SECONDS = 0.005
#: Engine settings the compiled artifact depends on (part of its cache key).
ENGINE_SETTINGS = "consume_fuel=1;epoch_interruption=1;cranelift_opt=speed;concurrency=0"
#: Below this memory cap the guest CPython cannot even start.
MIN_RAM_BYTES = 16 * 1024**2
#: Most random bytes one WASI call may ask the host for.
MAX_RANDOM_BYTES = 1024**2

_PACKAGE = "capsule:runtime"
_VERSION = "0.1.0"


def _interface(name: str) -> str:
    return f"{_PACKAGE}/{name}@{_VERSION}"


#: A received message as the guest gets it (the WIT record ``envelope``'s
#: fields in order): id, sender, body (checked JSON), expects-reply.
Envelope = tuple[str, str, str, bool]

#: A started operation that ended, as the guest gets it (the WIT record
#: ``completion``'s fields in order): handle, ok, payload (JSON).
Completion = tuple[int, bool, str]


def completions(answer: str) -> list[Completion]:
    """The completions of a poll's answer (JSON [[handle, ok, payload], ...],
    the host's own or its journal's); ValueError if it is not of that shape."""
    rows = json.loads(answer)
    if not isinstance(rows, list) or not all(
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], int)
        and 0 < row[0] < 1 << 64
        and isinstance(row[1], bool)
        and isinstance(row[2], str)
        for row in rows
    ):
        raise ValueError("malformed answer of a poll of operations")
    return [(handle, ok, payload) for handle, ok, payload in rows]


#: The kinds of failure a guest may report of itself; any other is the host's
#: to decide (a timeout, a cancellation), and a guest claiming one breaks the
#: protocol.
GUEST_FAILURE_KINDS = frozenset({"exception", "bad_arguments", "memory_limit"})
#: Most tasks an unhandled TaskError's cause may name as its way.
MAX_CAUSE_VIA = 16


@dataclass
class ErrorInfo:
    """Why an attempt failed: ``kind`` is exception, timeout, fuel_exhausted,
    memory_limit, trap, cancelled, protocol (the guest broke the host's
    protocol: see guest_data), ..."""

    kind: str
    message: str
    traceback: str | None = None
    type: str | None = None
    #: For a failure caused by an unhandled TaskError: the original failure.
    cause: dict[str, Any] | None = None
    #: False if the guest said no retry can help (it can only make a failure
    #: less retryable: see capsule.supervisor.retry).
    retryable: bool = True


@dataclass
class AttemptOutcome:
    """What one attempt produced."""

    result_json: str | None
    error: ErrorInfo | None
    fuel_consumed: int
    #: Size of its linear memory at its largest (if its invocation asked).
    peak_memory_bytes: int | None
    duration_s: float


class HostCalls(Protocol):
    """What the host does when the guest calls an import (implemented by the
    supervisor). Calls that return (ok, payload) give the guest ``result::ok``
    or ``result::err`` with that payload (JSON). Blocking calls return when done
    or when the caller must stop; the sandbox then ends the caller's instance."""

    def call_task(self, caller: Invocation, call: TaskCall) -> tuple[bool, str]:
        """Run a child task to the end: (True, result JSON) or (False, error JSON)."""
        ...

    def spawn_task(
        self, caller: Invocation, call: TaskCall, options: SpawnOptions
    ) -> tuple[bool, str]:
        """Start a concurrent child: (True, its task id) or (False, error JSON)."""
        ...

    def wait(
        self,
        caller: Invocation,
        task_ids: list[str],
        timeout: float | None,
        any_ended: bool = False,
    ) -> tuple[bool, str]:
        """Wait for children to end (``any_ended``: for one of them to end):
        (True, outcomes JSON, null for those still running) or (False, error
        JSON)."""
        ...

    def cancel(self, caller: Invocation, task_id: str) -> None: ...

    def sleep(self, caller: Invocation, seconds: float) -> None: ...

    def send(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        """Deliver a message: (True, "") or (False, error JSON)."""
        ...

    def receive(
        self, caller: Invocation, timeout: float | None
    ) -> tuple[bool, Sequence[Envelope] | str]:
        """(True, the messages taken, oldest first) or (False, error JSON)."""
        ...

    def ask(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        """(True, reply JSON) or (False, error JSON)."""
        ...

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]: ...

    def output(self, invocation: Invocation, stream: str, text: str) -> None: ...

    def wake(self, invocation: Invocation) -> None:
        """The sandbox set ``invocation.evicted`` from another thread (the run's
        memory budget stopped it): a blocking host call of it, or of a task it
        runs inline, must return now."""
        ...

    def held_bytes(self, invocation: Invocation) -> int:
        """Bytes the host holds for ``invocation``'s task (its mailbox, its
        output not yet shown, ...): counted with its memory by the run's
        memory budget. Called from the budget's thread."""
        ...

    def gathered(self, caller: Invocation, records: list[tuple[str, str]]) -> None:
        """Messages the guest wrote to its channel (see channel.py), as (target,
        body JSON), in its order: sends the host has not seen yet."""
        ...

    def ending(self, caller: Invocation, batch_taken: int | None) -> None:
        """The attempt's instance is about to close (its last gathered messages
        were handed over): ``batch_taken`` messages of the last batch it
        received were given to its code (None: not known)."""
        ...

    def wall_clock_ns(self, caller: Invocation) -> int:
        """Nanoseconds since the Unix epoch, for the guest's WASI wall clock."""
        ...

    def monotonic_ns(self, caller: Invocation) -> int:
        """Nanoseconds on a clock that never goes back, for ``time.monotonic``."""
        ...

    def random_bytes(self, caller: Invocation, count: int) -> bytes:
        """``count`` random bytes, for the guest's WASI random (``os.urandom``)."""
        ...

    def http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        """Perform an HTTP request: (True, response JSON) or (False, error JSON)."""
        ...

    def start_http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        """Start an HTTP request without waiting: (True, its handle, as
        decimal text) or (False, error JSON)."""
        ...

    def start_wait(self, caller: Invocation, task_ids: list[str]) -> tuple[bool, str]:
        """Start waiting for children to end (as ``wait`` does): (True, the
        operation's handle, as decimal text) or (False, error JSON)."""
        ...

    def start_receive(self, caller: Invocation) -> tuple[bool, str]:
        """Start waiting for a message in the caller's mailbox: (True, the
        operation's handle, as decimal text) or (False, error JSON)."""
        ...

    def start_ask(self, caller: Invocation, target: str, body_json: str) -> tuple[bool, str]:
        """Ask ``target`` and start waiting for the reply: (True, the
        operation's handle, as decimal text) or (False, error JSON)."""
        ...

    def poll(self, caller: Invocation, timeout: float | None) -> tuple[bool, str]:
        """Wait for started operations: (True, JSON [[handle, ok, payload],
        ...] of those that ended) or (False, error JSON)."""
        ...

    def abandon(self, caller: Invocation, handle: int) -> None:
        """Stop a started operation; it is never reported."""
        ...


class LiveClockAndRandom:
    """Clock and random answers straight from the host: for instances that only
    import the program, whose answers nothing replays."""

    def wall_clock_ns(self, caller: Invocation) -> int:
        return time.time_ns()

    def monotonic_ns(self, caller: Invocation) -> int:
        return time.monotonic_ns()

    def random_bytes(self, caller: Invocation, count: int) -> bytes:
        return os.urandom(count)


class RefusingHost(LiveClockAndRandom):
    """Host calls for an instance that only imports the program: output is
    dropped and every task operation is refused (module-level code must not
    start tasks)."""

    def _refuse(self, name: str) -> tuple[bool, str]:
        return refusal(name, f"task {name!r} was called while the program was being imported")

    def call_task(self, caller: Invocation, call: TaskCall) -> tuple[bool, str]:
        return self._refuse(call.name)

    def spawn_task(
        self, caller: Invocation, call: TaskCall, options: SpawnOptions
    ) -> tuple[bool, str]:
        return self._refuse(call.name)

    def wait(
        self,
        caller: Invocation,
        task_ids: list[str],
        timeout: float | None,
        any_ended: bool = False,
    ) -> tuple[bool, str]:
        return self._refuse("?")

    def cancel(self, caller: Invocation, task_id: str) -> None:
        return None

    def sleep(self, caller: Invocation, seconds: float) -> None:
        # (A stop: the import's deadline, its task's, a cancellation, the
        # memory budget, ends it within a tick.)
        sleep_unless_stopped(caller, min(seconds, PREPARE_LIMITS.timeout_s or 0.0))

    def _no_messages(self) -> tuple[bool, str]:
        message = "messages cannot be sent or received while the program is being imported"
        return False, json.dumps({"kind": "no_such_actor", "message": message})

    def send(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        return self._no_messages()

    def receive(
        self, caller: Invocation, timeout: float | None
    ) -> tuple[bool, Sequence[Envelope] | str]:
        return self._no_messages()

    def ask(
        self, caller: Invocation, target: str, body_json: str, timeout: float | None
    ) -> tuple[bool, str]:
        return self._no_messages()

    def reply(self, caller: Invocation, message_id: str, body_json: str) -> tuple[bool, str]:
        return self._no_messages()

    def http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        message = "HTTP requests cannot be made while the program is being imported"
        return False, json.dumps({"kind": "host_not_allowed", "message": message})

    def start_http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        return self.http(caller, request_json)

    def start_wait(self, caller: Invocation, task_ids: list[str]) -> tuple[bool, str]:
        return self.wait(caller, task_ids, None)

    def start_receive(self, caller: Invocation) -> tuple[bool, str]:
        return self._no_messages()

    def start_ask(self, caller: Invocation, target: str, body_json: str) -> tuple[bool, str]:
        return self._no_messages()

    def poll(self, caller: Invocation, timeout: float | None) -> tuple[bool, str]:
        return True, "[]"  # (nothing can have started)

    def abandon(self, caller: Invocation, handle: int) -> None:
        return None

    def gathered(self, caller: Invocation, records: list[tuple[str, str]]) -> None:
        return None  # no credit is ever given: nothing to take

    def ending(self, caller: Invocation, batch_taken: int | None) -> None:
        return None

    def output(self, invocation: Invocation, stream: str, text: str) -> None:
        return None

    def wake(self, invocation: Invocation) -> None:
        return None  # (it never blocks)

    def held_bytes(self, invocation: Invocation) -> int:
        return 0


#: Why an invocation was cancelled when nothing says more.
CALLER_STOPPED = "cancelled because its caller stopped"


class Within(Protocol):
    """Where an invocation runs (in the task tree, kept by its owner): the
    sandbox asks it whether the invocation must stop, and why."""

    def stop_reason(self, invocation: Invocation) -> str | None:
        """Why ``invocation``, which runs here, must stop now: "timeout" (its
        own deadline passed), "cancelled" (it or what it runs within was
        cancelled or stopped), or None."""
        ...

    def cancellation_message(self, invocation: Invocation) -> str:
        """Why ``invocation``, which runs here, was cancelled, for the error it
        reports."""
        ...


class Stoppable(Protocol):
    """An invocation, or a place in the task tree: says why what it stands for
    must stop now, or None."""

    def check_stop(self) -> str | None: ...


@dataclass(eq=False)
class Invocation:
    """One attempt of one task, as the sandbox sees it while it runs."""

    task_id: str
    task: str
    attempt: int
    max_attempts: int
    limits: Limits
    host: HostCalls
    #: Where it runs: what stops it besides its own deadline and abort (None:
    #: only those).
    within: Within | None = None
    started: float = field(default_factory=time.monotonic)
    stop_reason: str | None = None
    #: Set by the host to end this invocation with this error (e.g. a linked
    #: child failed); seen at the next epoch tick or host call.
    aborted: ErrorInfo | None = None
    #: Set by the sandbox to end it (the run's memory budget): like
    #: ``aborted``, but nothing the task does takes it back.
    evicted: ErrorInfo | None = None
    #: The host's traceback if a host import failed while serving this invocation.
    host_error: str | None = None
    #: Fuel left as of the last epoch tick (wasmtime-py reads it only between calls).
    fuel_left: int | None = None
    #: Seed for the guest's ``random`` module (the same when a resumed run replays it).
    seed: str = ""
    #: What the task may reach: hosts, environment variables, directories.
    grants: Grants = NO_GRANTS
    #: Its instance's message channel, once the host opened it (channel.py).
    channel: Channel | None = None
    #: Measure its memory's size at its end (~40 us; Linux 6.11 or newer).
    measure_memory: bool = False

    @property
    def deadline(self) -> float | None:
        if self.limits.timeout_s is None:
            return None
        return self.started + self.limits.timeout_s

    def cancellation_message(self) -> str:
        """Why this invocation is cancelled (see Within)."""
        within = self.within
        return CALLER_STOPPED if within is None else within.cancellation_message(self)

    def check_stop(self) -> str | None:
        """Why this invocation must stop now, or None: aborted, or what it
        runs within says (a child never outlives the deadline or cancellation
        of its callers), or its own deadline."""
        if self.aborted is not None or self.evicted is not None:
            return "aborted"
        within = self.within
        if within is not None:
            return within.stop_reason(self)
        return past_deadline(self)


def past_deadline(invocation: Invocation) -> str | None:
    """ "timeout" if the invocation's own deadline has passed, else None."""
    deadline = invocation.deadline
    return "timeout" if deadline is not None and time.monotonic() >= deadline else None


class _ImportFor:
    """Importing the program for a task's invocation: it stops with the task."""

    def __init__(self, task: Invocation) -> None:
        self.task = task

    def stop_reason(self, invocation: Invocation) -> str | None:
        return past_deadline(invocation) or (
            "cancelled" if self.task.check_stop() is not None else None
        )

    def cancellation_message(self, invocation: Invocation) -> str:
        if invocation.aborted is not None or invocation.evicted is not None:
            return CALLER_STOPPED
        return self.task.cancellation_message()


class _Closing:
    """The pool's imports: they stop once the pool closes."""

    closed = False

    def stop_reason(self, invocation: Invocation) -> str | None:
        return past_deadline(invocation) or ("cancelled" if self.closed else None)

    def cancellation_message(self, invocation: Invocation) -> str:
        return CALLER_STOPPED


def sleep_unless_stopped(invocation: Stoppable, seconds: float) -> bool:
    """Sleep ``seconds`` on this thread, in epoch ticks; False if
    ``invocation`` must stop meanwhile (a retry's backoff, a sleep while the
    program is imported: nothing wakes them early but a stop)."""
    until = time.monotonic() + seconds
    while True:
        if invocation.check_stop() is not None:
            return False
        left = until - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, TICK_SECONDS))


#: The pseudo task id of an instance importing the program ahead of any task.
LOAD_TASK_ID = "<load>"
#: Limits for importing the program into an instance before any task uses it.
PREPARE_LIMITS = Limits(fuel=2_000_000_000, ram_bytes=256 * 1024**2, timeout_s=30.0)
#: How much more memory than the program's first import a later one may use
#: (its module-level code is the same; this is room for what varies).
IMPORT_GROWTH_BYTES = 64 * 1024**2


_PREPARE_HOST = RefusingHost()


@dataclass
class Prepared:
    """A fresh instance with the program imported, waiting for its one task."""

    program: str
    store: _TrackedStore
    instance: Instance
    #: What the guest's load returned, as JSON: where it keeps its marker and,
    #: if asked to describe the program, the tasks it declares.
    declared: str


class PrepareError(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class _TrackedStore(wasmtime.Store):
    """A Store that counts itself while open, so tests and diagnostics can check
    that no instance outlives its invocation, and tells the prefaulter when its
    instance's memory is gone."""

    _live = 0
    _lock = threading.Lock()

    def __init__(self, engine: wasmtime.Engine, prefaulter: Prefaulter | None = None) -> None:
        super().__init__(engine)
        with _TrackedStore._lock:
            _TrackedStore._live += 1
        self._counted = True
        self._prefaulter = prefaulter
        #: Where its instance's memory image is mapped, if the prefaulter found it.
        self.memory: Memory | None = None
        #: What only its instance's memory holds, and where (from the guest's load).
        self.marker: Marker | None = None
        #: Where the guest says its message channel is: (offset, size).
        self.channel_at: tuple[int, int] | None = None
        #: Its channel, once opened (None, and channel_at None, if it cannot be).
        self.channel: Channel | None = None
        #: The task attempt it serves, and on which thread (once it serves one).
        self.invocation: Invocation | None = None
        self.thread: int | None = None
        #: The run's memory budget, told when it is closed (counted from its start).
        self.budget: MemoryBudget | None = None
        #: Why the budget stopped it while no attempt had it (its next one ends at once).
        self.evicted: str | None = None
        #: Where its guest's imports find modules: its sandbox's (whose linker
        #: may be another's, shared: see Sandbox).
        self.finder: ProgramFinder | None = None

    @property
    def prefaulter(self) -> Prefaulter | None:
        """The prefaulter of its runtime's memory image (a sandbox may run
        programs of two runtimes)."""
        return self._prefaulter

    def close(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            with _TrackedStore._lock:
                _TrackedStore._live -= 1
        memory, self.memory = getattr(self, "memory", None), None
        prefaulter = getattr(self, "_prefaulter", None)
        if memory is not None and prefaulter is not None:
            prefaulter.closing(memory)
        super().close()
        if memory is not None and prefaulter is not None:
            prefaulter.unmapped(memory)
        budget, self.budget = getattr(self, "budget", None), None
        if budget is not None:
            budget.forget(self)


def live_instances() -> int:
    """How many sandbox instances (stores) are open in this process."""
    return _TrackedStore._live


class _Stop(wasmtime.WasmtimeError):
    """Raised by a host import to end the instance (its reason is on the Invocation)."""


_thread = threading.local()


# (A class, not a generator: it wraps every host call on the async core.)
class _bound:
    """Make ``invocation`` the one host imports and the epoch callback on this
    thread act for, while its instance (in ``store``) runs here (a context
    manager)."""

    __slots__ = ("invocation", "previous", "store")

    def __init__(self, invocation: Invocation, store: _TrackedStore | None = None) -> None:
        self.invocation = invocation
        self.store = store

    def __enter__(self) -> None:
        self.previous = getattr(_thread, "invocation", None), getattr(_thread, "store", None)
        _thread.invocation, _thread.store = self.invocation, self.store

    def __exit__(self, *exc: object) -> None:
        _thread.invocation, _thread.store = self.previous


def _record(**fields: Any) -> Record:
    # wasmtime-py lowers a record from the attributes named as its WIT fields.
    record = Record()
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def _source_record(source: ModuleSource) -> Record:
    return _record(
        **{
            "origin": source.origin,
            "code": source.code,
            "is-package": source.is_package,
            "compiled": source.compiled,
        }
    )


def _memory_layout(loaded: str, nonce: bytes) -> tuple[Marker | None, tuple[int, int] | None]:
    """Where the guest's load says it keeps ``nonce``, and its message channel
    as (offset, size) (each None if malformed). Addresses are the guest's word
    (the program's import ran before load returned, and may have meddled); the
    nonce's bytes are the host's, which no other instance has, so only this
    instance's memory can hold them, and the channel is looked for only there."""
    try:
        layout = guest_data.json_value(loaded, "the program's layout")
        address, channel = layout["marker"], layout.get("channel")
    except (ProtocolError, KeyError, TypeError, AttributeError):
        return None, None
    if type(address) is not int or not 0 <= address < 2**32:
        return None, None
    marker = Marker(address, nonce)
    if (
        not isinstance(channel, list)
        or len(channel) != 2
        or not all(type(value) is int for value in channel)
        or not (0 <= channel[0] < 2**32 and 16 <= channel[1] <= MAX_CHANNEL_SIZE)
    ):
        return marker, None
    return marker, (channel[0], channel[1])


def _host_failure(exc: Exception) -> wasmtime.WasmtimeError:
    """What ends an instance when serving one of its imports failed: its guest
    broke the protocol (a ProtocolError: it fails with kind protocol), or the
    host's own code failed (a trap, with the host traceback kept on the
    invocation for the outcome)."""
    invocation: Invocation | None = getattr(_thread, "invocation", None)
    if isinstance(exc, ProtocolError):
        if invocation is not None:
            invocation.aborted = ErrorInfo("protocol", str(exc))
            invocation.stop_reason = "aborted"
        return _Stop("capsule: aborted")
    if invocation is not None:
        invocation.host_error = "".join(traceback.format_exception(exc))
    return _Stop("capsule: host error")


def refusal(name: str, message: str, kind: str = "exception") -> Answer:
    """A task call or spawn refused (the error its guest raises as TaskError)."""
    return False, json.dumps({"kind": kind, "task": name, "message": message})


def _wasi_config(grants: Grants) -> wasmtime.WasiConfig:
    """WASI for a task granted directories: each preopened at ``/`` + its path
    in the program (wasmtime refuses paths, and symlinks, that leave them).
    Each directory is opened here, from the program's directory, without
    following a symlink, and wasmtime is handed that open directory (it opens
    it at once, in ``preopen_dir``); PathRefused if one cannot be."""
    config = wasmtime.WasiConfig()
    for grant in grants.files:
        fd = grant.open()
        try:
            config.preopen_dir(descriptor_path(fd), grant.guest_path, grant.writable)
        except wasmtime.WasmtimeError as exc:
            raise PathRefused(
                f"allowed_files {grant.declared!r}: cannot be opened: {exc}"
            ) from None
        finally:
            os.close(fd)
    return config


def _stop_if_asked(invocation: Invocation) -> None:
    """After a host call that may have blocked: end the instance if it must
    stop (deadline, cancellation, abort)."""
    reason = invocation.check_stop()
    if reason is not None:
        invocation.stop_reason = reason
        raise _Stop(f"capsule: {reason}")


#: What a host call answers the guest: (True, value) or (False, error JSON).
Answer = tuple[bool, str]


def _failed(invocation: Invocation, answer: Answer) -> Answer:
    """A failed answer may be the caller's stop (the "{}" of a wait cut short, a
    replay that diverged): end the instance then, else hand the failure over.

    An ok answer is a real effect (a message delivered or taken, a child's
    result) and goes as it is, unchecked: if the caller must stop, its next
    epoch tick ends it. On a stream of messages the check ran twice per
    message."""
    _stop_if_asked(invocation)
    return answer


def _started(invocation: Invocation, answer: Answer) -> tuple[bool, int | str]:
    """A started operation's answer for the guest: its handle as a number."""
    ok, payload = answer
    if ok:
        return True, int(payload)
    return _failed(invocation, answer)


def _take_gathered(invocation: Invocation, channel: Channel, restart: bool) -> None:
    """Hand the host the messages the guest wrote to its channel since the last
    look (see channel.py); ``restart`` (only inside a host call): start the
    channel's records again. Ends the instance if the channel holds garbage, or
    if handing them over ended the caller (a replay that diverged)."""
    try:
        records = channel.take()
    except ChannelError as exc:
        invocation.aborted = ErrorInfo("trap", f"the task's message channel is corrupt: {exc}")
        invocation.stop_reason = "aborted"
        raise _Stop("capsule: aborted") from None
    if records:
        aborted = invocation.aborted
        invocation.host.gathered(invocation, records)
        if invocation.aborted is not aborted:  # written without credit, or diverged
            invocation.stop_reason = "aborted"
            raise _Stop("capsule: aborted")
    if restart:
        channel.restart()


def _step_caller() -> Invocation:
    """The invocation a step's import serves on this thread, once the messages
    its guest gathered in its channel (sent before this call) are taken."""
    invocation: Invocation = _thread.invocation
    if invocation.channel is not None:
        _take_gathered(invocation, invocation.channel, restart=True)
    return invocation


def _trap_with(message: str) -> int:
    """What the epoch callback returns to trap the instance."""
    return compat.trap_address(message)


def tick_check(invocation: Invocation, context: Any) -> int:
    """At an epoch tick of ``invocation``'s instance (on the thread that runs
    it): read its fuel, hand over the messages it gathered, and say whether it
    must stop: 0 to go on, else the address of the error that traps it."""
    left = compat.fuel_left(context)
    if left is not None:
        invocation.fuel_left = left
    channel = invocation.channel
    if channel is not None:
        # Messages a task gathered reach their targets within a tick, even
        # if it computes after sending instead of calling the host.
        try:
            _take_gathered(invocation, channel, restart=False)
        except _Stop:
            return _trap_with("capsule: aborted")
        except Exception as exc:
            _host_failure(exc)
            return _trap_with("capsule: host error")
    reason = invocation.check_stop()
    if reason is not None:
        invocation.stop_reason = reason
        return _trap_with(f"capsule: {reason}")
    return 0


@compat.EPOCH_CALLBACK_T  # type: ignore[untyped-decorator]
def _on_epoch(context: Any, _data: Any, delta: Any, kind: Any) -> int:
    # Runs on the wasm thread at every epoch tick the instance sees.
    invocation: Invocation | None = getattr(_thread, "invocation", None)
    if invocation is not None:
        trap = tick_check(invocation, context)
        if trap:
            return trap
        slots: CpuSlots | None = getattr(_thread, "slots", None)
        if slots is not None:
            slots.yield_turn()  # blocks while other instances take their turn
            reason = invocation.check_stop()
            if reason is not None:  # cancelled while it waited for its turn
                invocation.stop_reason = reason
                return _trap_with(f"capsule: {reason}")
    delta[0] = 1
    kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
    return 0


@compat.EPOCH_FINALIZER_T  # type: ignore[untyped-decorator]
def _no_finalizer(_data: Any) -> None:
    return None


class EpochTicker:
    """Advances one engine's epoch every TICK_SECONDS (what deadlines, turns
    on the CPU slots and cancellation are measured in) while any sandbox on it
    is open. One thread per engine, however many runs share it: a tick is
    TICK_SECONDS for every instance. Each open sandbox's own work for the tick
    (``add``) runs after the increment."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._work: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, work: Callable[[], None]) -> None:
        """Run ``work`` at each tick until ``remove``; ticking starts with the first."""
        with self._lock:
            self._work.append(work)
            if self._thread is None:
                self._stop = stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(stop,), name="capsule-epoch", daemon=True
                )
                self._thread.start()

    def remove(self, work: Callable[[], None]) -> None:
        """Stop running ``work``; ticking stops (its thread joined) with the last."""
        with self._lock:
            self._work.remove(work)
            if self._work or self._thread is None:
                return
            thread, stop = self._thread, self._stop
            self._thread = None
        stop.set()
        thread.join()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_SECONDS):
            self._engine.increment_epoch()
            with self._lock:
                work = list(self._work)
            for each in work:
                try:
                    each()
                except Exception:  # (one sandbox's failed tick must not end the others')
                    _log.exception("a sandbox's epoch tick failed; the ticker goes on")


def default_engine() -> tuple[wasmtime.Engine, str]:
    """The engine, and the settings its compiled artifact depends on."""
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    # The component model's async support (concurrent tasks, streams) is
    # unused here, and with it on every host call goes through its task
    # machinery: off, a message costs ~6% less CPU.
    settings = ENGINE_SETTINGS
    if not compat.disable_concurrency_support(config):
        settings = settings.replace("concurrency=0", "concurrency=1")
    return wasmtime.Engine(config), settings


@dataclass(frozen=True)
class EngineParts:
    """A wasmtime engine, the settings compiled artifacts for it depend on,
    and the ticker of its epochs: what the guests of one core share, so that
    one sandbox can run a program of each language."""

    engine: wasmtime.Engine
    settings: str
    ticker: EpochTicker

    @classmethod
    def make(
        cls, make_engine: Callable[[], tuple[wasmtime.Engine, str]] | None = None
    ) -> EngineParts:
        engine, settings = (make_engine or default_engine)()
        return cls(engine, settings, EpochTicker(engine))


class GuestComponent:
    """The wasmtime engine and the compiled guest runtime of one language
    loaded in it: built once, shared by every sandbox that is given it (each
    run of a host application), read-only once made."""

    def __init__(
        self,
        progress: Progress | None = None,
        make_engine: Callable[[], tuple[wasmtime.Engine, str]] | None = None,
        language: str = "python",
        on: EngineParts | None = None,
    ) -> None:
        # (make_engine: the engine, and the settings its compiled artifact
        # depends on; an async sandbox's engine differs only where it does not.
        # on: the engine of guests of other languages this one runs beside.)
        self.parts = on if on is not None else EngineParts.make(make_engine)
        self.engine: wasmtime.Engine = self.parts.engine
        self.settings: str = self.parts.settings
        self.ticker: EpochTicker = self.parts.ticker
        #: The language of the programs it runs: "python" or "javascript".
        self.language = language
        #: The guest runtime's files (instances map their memory image from ``compiled``).
        if language == "javascript":
            from capsule.sandbox.js.build import ensure_js_runtime  # (only JS runs need it)

            self.artifacts = ensure_js_runtime(self.engine, self.settings, progress)
        else:
            self.artifacts = ensure_runtime(self.engine, self.settings, progress)
        self.component = Component.deserialize_file(self.engine, str(self.artifacts.compiled))


@dataclass
class ProgramImage:
    """A program a sandbox runs: the guest runtime it runs on (its component,
    with the runner's exports, and the prefaulter of its memory image) and
    where its instances get the program's code."""

    component: Component
    prefaulter: Prefaulter
    finder: ProgramFinder
    load_index: Any
    run_index: Any
    #: Whether its runtime keeps the host's marker where it cannot say (the
    #: JS runtime: in its snapshot, at the same place in every instance),
    #: and where that is once found (see Prefaulter.nonce_address).
    finds_marker: bool = False
    marker_address: int | None = None

    @classmethod
    def of(cls, guest: GuestComponent, finder: ProgramFinder) -> ProgramImage:
        component = guest.component
        runner = component.get_export_index(_interface("runner"))
        assert runner is not None, "guest runtime exports no runner interface"
        load = component.get_export_index("load", instance=runner)
        run = component.get_export_index("run", instance=runner)
        assert load is not None and run is not None
        prefaulter = Prefaulter(guest.artifacts.compiled)
        return cls(
            component, prefaulter, finder, load, run, finds_marker=guest.language == "javascript"
        )

    def marker_of(self, store: _TrackedStore, nonce: bytes) -> Marker | None:
        """The marker of a new instance of a runtime that finds it (the first
        time, by reading the instance's memory)."""
        if not self.finds_marker:
            return None
        if self.marker_address is None:
            self.marker_address = self.prefaulter.nonce_address(store.memory, nonce)
        return None if self.marker_address is None else Marker(self.marker_address, nonce)


class Sandbox:
    """The linker and instances of one run, on an engine and compiled runtime
    of its own or shared (``guest``); use as a context manager. ``linker``: one
    made by another sandbox on the same guest, shared with it (its imports
    act for the instance they serve: they find its module finder by its
    store); by default it makes its own."""

    def __init__(
        self,
        roots: list[Path],
        progress: Progress | None = None,
        cpu_slots: int | None = None,
        memory_budget: int | None = None,
        guest: GuestComponent | None = None,
        linker: Linker | None = None,
        finder: ProgramFinder | None = None,
    ) -> None:
        guest = guest or GuestComponent(progress, self._make_engine)
        self.engine = guest.engine
        self.ticker = guest.ticker
        self.artifacts = guest.artifacts
        self.component = guest.component
        #: The run's program (where instances get its code: by default a
        #: module finder on ``roots``, for a Python program), and the other
        #: programs whose tasks it runs too, by module name (add_program).
        self._main = ProgramImage.of(guest, finder if finder is not None else ModuleFinder(roots))
        self._others: dict[str, ProgramImage] = {}
        self.prefaulter = self._main.prefaulter
        self.finder = self._main.finder
        self._load_index, self._run_index = self._main.load_index, self._main.run_index
        self._exports = {
            index: ExportCaller(index) for index in (self._load_index, self._run_index)
        }
        self._owns_linker = linker is None
        self.linker = self._make_linker() if linker is None else linker
        #: The limits of imports after the first, by program (see prepare).
        self._import_limits: dict[str, Limits] = {}
        #: How long the last import of each program took (seconds of wall time).
        self.import_seconds: dict[str, float] = {}
        self._pool: InstancePool | None = None
        #: At most this many threads run task wasm at once (default: CPU cores).
        self.slots = CpuSlots(cpu_slots)
        #: The run's memory bound (None: none), read at every tick.
        self.budget = (
            None
            if memory_budget is None
            else MemoryBudget(memory_budget, self._task_sizes, self._stop_for_memory)
        )

    @staticmethod
    def _make_engine() -> tuple[wasmtime.Engine, str]:
        """The engine of a sandbox made without a ``guest``, and its settings."""
        return default_engine()

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self.ticker.add(self._on_tick)
        CONVERTERS.acquire()  # (wasmtime-py's converters are faster while it is open)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self.ticker.remove(self._on_tick)
            for image in (self._main, *self._others.values()):
                image.prefaulter.close()
            if self.budget is not None:
                self.budget.close()
            # wasmtime-py keeps host functions in a registry of its own until their
            # linker is deleted, and ours are bound methods of this sandbox: without
            # this, every sandbox (engine, compiled code mapped) lived on (~11 MB a
            # run, for a program that runs several in one process).
            if self._owns_linker:
                self.linker.close()
        finally:
            CONVERTERS.release()

    def _on_tick(self) -> None:
        """This sandbox's work at each epoch tick (on the engine's ticker)."""
        if self.budget is not None:
            self.budget.sample()

    def _memory_sizes(self, stores: list[Any]) -> list[int | None]:
        """The size of each open task instance's linear memory (the budget's)."""
        if not self._others:  # (one look at the mappings for all)
            return self.prefaulter.memory_sizes([(store.memory, store.marker) for store in stores])
        sizes: list[int | None] = []
        for store in stores:
            prefaulter = store.prefaulter or self.prefaulter
            sizes += prefaulter.memory_sizes([(store.memory, store.marker)])
        return sizes

    def _task_sizes(self, stores: list[Any]) -> list[int | None]:
        """What each open task instance holds, for the budget: its linear
        memory, and what the host holds for its task (HostCalls.held_bytes)."""
        sizes = self._memory_sizes(stores)
        for index, store in enumerate(stores):
            invocation: Invocation | None = store.invocation
            size = sizes[index]
            if size is not None and invocation is not None:
                sizes[index] = size + invocation.host.held_bytes(invocation)
        return sizes

    def _stop_for_memory(self, store: Any, why: str) -> None:
        """The budget chose this task instance's attempt to stop: it traps at
        its next epoch tick, or its blocking host call returns now; waiting for
        a CPU slot, it gets the next one."""
        invocation: Invocation | None = store.invocation
        if invocation is None:  # an idle instance, the program imported
            if self._pool is not None and self._pool.discard(store):
                return
            store.evicted = why  # (a task took it just now: it stops as it starts)
            invocation = store.invocation
            if invocation is None:
                return
        invocation.evicted = ErrorInfo("memory_limit", why)
        invocation.host.wake(invocation)
        if store.thread is not None:
            self.slots.hurry(store.thread)

    # -- host imports ------------------------------------------------------

    def _make_linker(self) -> Linker:
        linker = Linker(self.engine)
        linker.add_wasip2()
        # The WASI wall clock and random are served by the host (and journaled by
        # the supervisor), so that time and randomness replay on resume.
        linker.allow_shadowing = True
        root = linker.root()
        self._shadow_wasi(root, self.component)
        with root.add_instance(_interface("clock")) as clock:
            self._add(clock, "monotonic-ns", self._monotonic_ns)
        with root.add_instance(_interface("http")) as http:
            self._add(http, "request", self._http_request)
        with root.add_instance(_interface("operations")) as operations:
            self._add(operations, "start-http", self._start_http)
            self._add(operations, "start-wait", self._start_wait)
            self._add(operations, "start-receive", self._start_receive)
            self._add(operations, "start-ask", self._start_ask)
            self._add(operations, "poll", self._poll)
            self._add(operations, "abandon", self._abandon)
        with root.add_instance(_interface("modules")) as modules:
            self._add(modules, "find", self._find_module)
            self._add(modules, "offer-compiled", self._offer_compiled)
        with root.add_instance(_interface("tasks")) as tasks:
            self._add(tasks, "call", self._call_task)
            self._add(tasks, "spawn", self._spawn_task)
            self._add(tasks, "wait", self._wait)
            self._add(tasks, "wait-any", self._wait_any)
            self._add(tasks, "cancel", self._cancel)
            self._add(tasks, "sleep", self._sleep)
        with root.add_instance(_interface("messaging")) as messaging:
            self._add(messaging, "send", self._send)
            self._add(messaging, "receive", self._receive)
            self._add(messaging, "ask", self._ask)
            self._add(messaging, "reply", self._reply)
        with root.add_instance(_interface("output")) as output:
            self._add(output, "write", self._write)
        return linker

    def _shadow_wasi(self, root: LinkerInstance, component: Component) -> None:
        """Serve ``component``'s WASI wall clock and random from the host, at
        the versions it imports (each runtime's WASI is of its own version)."""
        wasi = {name.split("@")[0]: name for name in component.type.imports(self.engine)}
        with root.add_instance(wasi["wasi:clocks/wall-clock"]) as wall_clock:
            self._add(wall_clock, "now", self._wall_clock_now)
            self._add(wall_clock, "resolution", self._wall_clock_resolution)
        with root.add_instance(wasi["wasi:random/random"]) as random:
            self._add(random, "get-random-bytes", self._random_bytes)
            self._add(random, "get-random-u64", self._random_u64)

    def add_program(self, module: str, guest: GuestComponent, finder: ProgramFinder) -> None:
        """Run the tasks of another program, ``module``, too: its instances are
        of ``guest``'s runtime (another language's, on this sandbox's engine:
        ``GuestComponent(beside=...)``) and get its code from ``finder``."""
        if guest.engine is not self.engine:
            raise ValueError("a program added to a sandbox must run on the sandbox's engine")
        if not self._owns_linker:
            raise ValueError("a sandbox on a shared linker runs one program")
        if module in self._others:
            raise ValueError(f"the sandbox runs a program named {module!r} already")
        image = ProgramImage.of(guest, finder)
        if not any(other.component is guest.component for other in self._images()):
            with self.linker.root() as root:
                self._shadow_wasi(root, guest.component)
        self._others[module] = image
        for index in (image.load_index, image.run_index):
            self._exports[index] = ExportCaller(index)

    def finders(self) -> list[ProgramFinder]:
        """Where the instances of each of its programs get their code."""
        return [image.finder for image in self._images()]

    def _images(self) -> list[ProgramImage]:
        return [self._main, *self._others.values()]

    def _image(self, program: str) -> ProgramImage:
        """The image ``program`` runs on (the run's program: the main one)."""
        return self._others.get(program, self._main)

    def _add(self, instance: LinkerInstance, name: str, func: HostFunc) -> None:
        """Define import ``name`` of ``instance`` as served by ``func``."""
        add_host_func(instance, name, func, _host_failure)

    # Each function below serves one import: it takes the import's arguments
    # and answers a result<...> as an (ok, payload) pair (see hostcall). Those
    # that are steps find their caller with _step_caller, which first takes the
    # messages the guest gathered in its channel (sent before this call).
    # Timeouts come in milliseconds and are converted inline: a helper's call
    # per message cost more than the division.

    def _wall_clock_now(self) -> Any:
        invocation = _step_caller()
        nanoseconds = invocation.host.wall_clock_ns(invocation)
        _stop_if_asked(invocation)  # e.g. a replay that diverged here
        return _record(seconds=nanoseconds // 10**9, nanoseconds=nanoseconds % 10**9)

    def _wall_clock_resolution(self) -> Any:
        return _record(seconds=0, nanoseconds=1000)

    def _monotonic_ns(self) -> int:
        invocation = _step_caller()
        nanoseconds = invocation.host.monotonic_ns(invocation)
        _stop_if_asked(invocation)
        return nanoseconds

    def _random_bytes(self, count: int) -> bytes:
        invocation = _step_caller()
        if count > MAX_RANDOM_BYTES:
            invocation.aborted = ErrorInfo(
                "limit",
                f"the guest asked for {count:,} random bytes at once; "
                f"the limit is {MAX_RANDOM_BYTES:,}",
            )
            invocation.stop_reason = "aborted"
            raise _Stop("capsule: aborted")
        data = invocation.host.random_bytes(invocation, count)
        _stop_if_asked(invocation)
        return data

    def _random_u64(self) -> int:
        return int.from_bytes(self._random_bytes(8), "little")

    def _http_request(self, request_json: str) -> Answer:
        invocation = _step_caller()
        answer = invocation.host.http(invocation, request_json)
        return answer if answer[0] else _failed(invocation, answer)

    def _start_http(self, request_json: str) -> tuple[bool, int | str]:
        invocation = _step_caller()
        return _started(invocation, invocation.host.start_http(invocation, request_json))

    def _start_wait(self, ids_json: str) -> tuple[bool, int | str]:
        invocation = _step_caller()
        task_ids = guest_data.names(ids_json, "the task ids to wait on")
        return _started(invocation, invocation.host.start_wait(invocation, task_ids))

    def _start_receive(self) -> tuple[bool, int | str]:
        invocation = _step_caller()
        return _started(invocation, invocation.host.start_receive(invocation))

    def _start_ask(self, target: str, body_json: str) -> tuple[bool, int | str]:
        invocation = _step_caller()
        target = guest_data.name(target, "a message's target")
        return _started(invocation, invocation.host.start_ask(invocation, target, body_json))

    def _poll(self, timeout_ms: int | None) -> tuple[bool, list[Completion] | str]:
        invocation = _step_caller()
        ok, answer = invocation.host.poll(invocation, guest_data.timeout_s(timeout_ms))
        if not ok:
            return _failed(invocation, (ok, answer))
        return True, completions(answer)

    def _abandon(self, handle: int) -> None:
        invocation = _step_caller()
        invocation.host.abandon(invocation, handle)
        _stop_if_asked(invocation)

    def _finder_here(self) -> ProgramFinder:
        """The module finder of the instance whose import is served on this
        thread: its sandbox's (this one's, unless this linker is shared)."""
        finder = getattr(getattr(_thread, "store", None), "finder", None)
        return finder if finder is not None else self.finder

    def _find_module(self, fullname: str) -> Any:
        found = self._finder_here().find(fullname)
        if found is None:
            return None
        if isinstance(found, Refused):
            return found.reason
        return _source_record(found)

    def _offer_compiled(self, origin: str, compiled: str) -> None:
        # Only an instance importing the program, before any task input reached
        # it, may supply code that later instances will run.
        if _thread.invocation.task_id == LOAD_TASK_ID:
            self._finder_here().remember_compiled(origin, compiled)

    def _call_task(self, name: str, call_json: str) -> Answer:
        invocation = _step_caller()
        try:
            call = guest_data.task_call(name, call_json)
        except TooLarge as exc:
            return refusal(name, str(exc))
        with nested_call():
            answer = invocation.host.call_task(invocation, call)
        return answer if answer[0] else _failed(invocation, answer)

    def _spawn_task(self, name: str, call_json: str, options_json: str | None) -> Answer:
        invocation = _step_caller()
        try:
            call = guest_data.task_call(name, call_json)
        except TooLarge as exc:
            return refusal(name, str(exc))
        options = guest_data.spawn_options(options_json or "{}")
        answer = invocation.host.spawn_task(invocation, call, options)
        return answer if answer[0] else _failed(invocation, answer)

    def _wait(self, ids_json: str, timeout_ms: int | None, any_ended: bool = False) -> Answer:
        invocation = _step_caller()
        task_ids = guest_data.names(ids_json, "the task ids to wait on")
        answer = invocation.host.wait(
            invocation, task_ids, guest_data.timeout_s(timeout_ms), any_ended
        )
        return answer if answer[0] else _failed(invocation, answer)

    def _wait_any(self, ids_json: str, timeout_ms: int | None) -> Answer:
        return self._wait(ids_json, timeout_ms, any_ended=True)

    def _cancel(self, task_id: str) -> None:
        invocation = _step_caller()
        invocation.host.cancel(invocation, guest_data.name(task_id, "the task id to cancel"))
        _stop_if_asked(invocation)

    def _sleep(self, ms: int) -> None:
        invocation = _step_caller()
        invocation.host.sleep(invocation, ms / 1000)
        _stop_if_asked(invocation)

    # Message bodies are checked by the run (capsule.supervisor.messages), after
    # its size limit: a body over it is refused unparsed.

    def _send(self, target: str, body_json: str, timeout_ms: int | None) -> Answer:
        invocation = _step_caller()
        answer = invocation.host.send(
            invocation,
            guest_data.name(target, "a message's target"),
            body_json,
            guest_data.timeout_s(timeout_ms),
        )
        return answer if answer[0] else _failed(invocation, answer)

    def _receive(self, timeout_ms: int | None) -> tuple[bool, Sequence[Envelope] | str]:
        invocation = _step_caller()
        answer = invocation.host.receive(invocation, guest_data.timeout_s(timeout_ms))
        if answer[0]:
            return answer
        _stop_if_asked(invocation)
        return answer

    def _ask(self, target: str, body_json: str, timeout_ms: int | None) -> Answer:
        invocation = _step_caller()
        answer = invocation.host.ask(
            invocation,
            guest_data.name(target, "a message's target"),
            body_json,
            guest_data.timeout_s(timeout_ms),
        )
        return answer if answer[0] else _failed(invocation, answer)

    def _reply(self, message_id: str, body_json: str) -> Answer:
        invocation = _step_caller()
        return invocation.host.reply(
            invocation, guest_data.name(message_id, "the id of the message replied to"), body_json
        )

    def _write(self, stream: str, text: str) -> None:
        invocation = _step_caller()
        invocation.host.output(invocation, stream, text)
        _stop_if_asked(invocation)

    # -- running -----------------------------------------------------------

    def _new_store(self, limits: Limits, prefaulter: Prefaulter | None = None) -> _TrackedStore:
        store = _TrackedStore(self.engine, prefaulter or self.prefaulter)
        store.set_limits(memory_size=limits.ram_bytes)
        store.set_fuel(limits.fuel)
        store.set_wasi(wasmtime.WasiConfig())  # no env, args, files or stdin
        compat.set_epoch_callback(store, _on_epoch, _no_finalizer)
        store.set_epoch_deadline(1)
        return store

    def start_pool(self, program: str, size: int, first: Prepared | None = None) -> None:
        """Keep ``size`` fresh instances with ``program`` imported ready for
        invocations; ``first`` (the instance the program was loaded in) is used first."""
        if self._pool is None:
            self._pool = InstancePool(self, program, size, first)
        elif first is not None:
            first.store.close()

    def prepare(
        self,
        program: str,
        host: HostCalls | None = None,
        describe: bool = False,
        within: Within | None = None,
    ) -> Prepared:
        """A fresh instance with the program imported, not yet used by any task.

        Module-level code runs here under the prepare limits, and stops with
        what it runs ``within`` (the task it is imported for, or a scope its
        owner cancels).
        An import after the first may use at most IMPORT_GROWTH_BYTES more
        memory than the first did: module-level code that does more in the
        instances tasks run in than when the program loads is stopped there.
        The run's memory budget counts the instance from its start. Its output
        goes to ``host``; by default it is dropped, since it was shown once
        already, when the program was first loaded (``describe=True``, which also
        returns the declared tasks in ``Prepared.declared``)."""
        image = self._image(program)
        source = image.finder.find(program)
        if not isinstance(source, ModuleSource):
            reason = source.reason if isinstance(source, Refused) else "no such module"
            raise PrepareError(ErrorInfo("exception", f"cannot load {program!r}: {reason}"))
        nonce = os.urandom(NONCE_SIZE)
        payload = _record(
            name=program, source=_source_record(source), describe=describe, marker=nonce.hex()
        )
        limits = PREPARE_LIMITS if describe else self._import_limits.get(program, PREPARE_LIMITS)
        invocation = Invocation(
            LOAD_TASK_ID, LOAD_TASK_ID, 1, 1, limits, host or _PREPARE_HOST, within
        )
        began = time.monotonic()
        with _bound(invocation):
            store = self._new_store(limits, image.prefaulter)
            store.finder = image.finder
            store.invocation, store.thread = invocation, threading.get_ident()
            if self.budget is not None:
                store.budget = self.budget
                self.budget.register(store)
            try:
                instance = self._instantiate(store, program)
                result = self._call_export(store, instance, image.load_index, payload)
            except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
                store.close()
                raise PrepareError(self._classify(invocation, exc)) from None
            if isinstance(result, ErrorInfo):
                store.close()
                raise PrepareError(result)
        store.invocation = store.thread = None  # (imported: idle until a task takes it)
        self.import_seconds[program] = time.monotonic() - began
        store.marker, store.channel_at = _memory_layout(result, nonce)
        if store.marker is None:
            store.marker = image.marker_of(store, nonce)
        if store.memory is not None:
            image.prefaulter.loaded(store.memory, store.marker)
        if describe:
            size = image.prefaulter.memory_sizes([(store.memory, store.marker)])[0]
            if size is not None:
                ram = -(-(size + IMPORT_GROWTH_BYTES) // WASM_PAGE) * WASM_PAGE
                self._import_limits[program] = replace(
                    PREPARE_LIMITS, ram_bytes=min(ram, PREPARE_LIMITS.ram_bytes)
                )
        return Prepared(program, store, instance, declared=result)

    def _instantiate(self, store: _TrackedStore, program: str) -> Instance:
        """A new instance of the guest runtime in ``store``, its memory
        prefaulted for ``program`` (see prefault.py)."""
        image = self._image(program)
        with image.prefaulter.instantiating() as own:
            instance = self.linker.instantiate(store, image.component)
            store.memory = image.prefaulter.find(program, live_instances(), own)
        if store.memory is not None:
            image.prefaulter.prefault(store.memory)
        return instance

    def hibernate(self) -> int:
        """Called on the thread of a task whose guest waits in a host call (and
        so cannot write its memory meanwhile): give back the pages of its memory
        it has only read. They are the shared image's; the guest gets them back
        when it reads them again. Returns how many bytes were unmapped."""
        store: _TrackedStore | None = getattr(_thread, "store", None)
        if store is None or store.marker is None:
            return 0
        return (store.prefaulter or self.prefaulter).release(store.memory, store.marker)

    def open_channel(self) -> Channel | None:
        """On the thread of a task whose guest is in a host call: its instance's
        message channel (channel.py), opened on first use; None if it cannot be
        (the guest gave no marker or channel, or its memory was not found). The
        same lookup as hibernation's, once per instance: ~20 us with Linux
        6.11's PROCMAP_QUERY, 0.5 - 8 ms reading /proc/self/maps before it."""
        invocation: Invocation = _thread.invocation
        if invocation.channel is not None:
            return invocation.channel
        store: _TrackedStore | None = getattr(_thread, "store", None)
        if store is None or store.channel_at is None or store.marker is None:
            return None
        offset, size = store.channel_at
        located = (store.prefaulter or self.prefaulter).linear_memory(store.memory, store.marker)
        if located is None or located[0] + offset + size > located[1]:
            store.channel_at = None  # (not looked for again)
            return None
        store.channel = invocation.channel = Channel(located[0] + offset, size)
        return store.channel

    def invoke(self, invocation: Invocation, program: str, call_json: str) -> AttemptOutcome:
        """Run one attempt of a task in a fresh instance, with ``call_json``
        (checked ``{"args": [...], "kwargs": {...}}``) as its arguments; blocks
        until it ends."""
        started = time.monotonic()
        error = too_little_ram(invocation.limits)
        if error is not None:
            return self._outcome(None, error, 0, started)
        with self._running():
            return self._invoke(invocation, program, task_input(invocation), call_json, started)

    @contextmanager
    def _running(self) -> Iterator[None]:
        """Hold a CPU slot on this thread; the epoch callback yields it in turn."""
        previous = getattr(_thread, "slots", None)
        _thread.slots = self.slots
        try:
            with self.slots.running():
                yield
        finally:
            _thread.slots = previous

    def _instance_for(self, invocation: Invocation, program: str) -> Prepared | ErrorInfo:
        """A fresh instance with ``program`` imported, taken by ``invocation``
        (its clock starts now), or why there is none: a ready one from the
        pool, else one prepared here."""
        prepared = self._ready_instance(program)
        if prepared is None:
            try:
                prepared = self.prepare(program, within=_ImportFor(invocation))
            except PrepareError as exc:
                return exc.error
        return self._taken(invocation, prepared)

    def _ready_instance(self, program: str) -> Prepared | None:
        """A prepared instance of ``program`` from the pool, or None if it has
        none ready (it is not waited on)."""
        if self._pool is None or self._pool.program != program:
            return None
        prepared = self._pool.take()
        if prepared is not None and prepared.program != program:
            prepared.store.close()  # (the pool's is another program's)
            return None
        return prepared

    def _taken(self, invocation: Invocation, prepared: Prepared) -> Prepared | ErrorInfo:
        """``prepared``, taken by ``invocation``: its clock starts now, with
        the files it was granted; or why it cannot start (then its instance is
        closed)."""
        store = prepared.store
        if invocation.grants.files:
            try:
                store.set_wasi(_wasi_config(invocation.grants))
            except PathRefused as exc:
                store.close()
                return ErrorInfo("limit", f"the host did not start the task: {exc}")
        invocation.started = time.monotonic()
        store.invocation = invocation
        if store.evicted is not None:  # (the budget chose it as the task took it)
            invocation.evicted = ErrorInfo("memory_limit", store.evicted)
        if self.budget is not None:
            store.budget = self.budget
            self.budget.register(store)
        return prepared

    def _invoke(
        self, invocation: Invocation, program: str, payload: str, call_json: str, started: float
    ) -> AttemptOutcome:
        limits = invocation.limits
        prepared = self._instance_for(invocation, program)
        if isinstance(prepared, ErrorInfo):
            return self._outcome(None, prepared, 0, started)
        store = prepared.store
        store.thread = threading.get_ident()
        result: str | ErrorInfo | None = None
        with _bound(invocation, store):
            try:
                # The task's own budget, from now: nothing spent while preparing counts.
                store.set_limits(memory_size=limits.ram_bytes)
                store.set_fuel(limits.fuel)
                store.set_epoch_deadline(1)
                result = self._call_export(
                    store, prepared.instance, self._image(program).run_index, payload, call_json
                )
            except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
                result = self._classify(invocation, exc)
            else:
                if isinstance(result, str):
                    result = _checked_result(invocation, result)
            finally:  # (an interrupt too: the instance is closed, and it goes on up)
                outcome = self._concluded(invocation, store, result, started)
        return outcome

    def _concluded(
        self,
        invocation: Invocation,
        store: _TrackedStore,
        result: str | ErrorInfo | None,
        started: float,
    ) -> AttemptOutcome:
        """The outcome of an attempt whose call ended with ``result`` (None: it
        never returned), on either mode's thread, with the attempt bound: what
        ending it finds (its channel's last messages), its fuel and, if it
        says why it failed or is asked, its memory's size; its instance is
        closed."""
        ending_failure = self._end_attempt(invocation)
        fuel = self._used(store, invocation)
        measure = invocation.measure_memory and self.prefaulter.asks_cheaply
        size = None
        if measure or _unexplained(invocation, result):
            # (Linear memory only grows: its size now is its largest.)
            size = self._memory_sizes([store])[0]
        self._close(store)
        peak = size if measure else None
        if isinstance(result, ErrorInfo) and _unexplained(invocation, result):
            result = _filled(result, size, invocation.limits) or result
        if ending_failure is not None and not isinstance(result, ErrorInfo):
            result = ending_failure
        if isinstance(result, ErrorInfo):
            return self._outcome(None, result, fuel, started, peak)
        return self._outcome(result, None, fuel, started, peak)

    def _close(self, store: _TrackedStore) -> None:
        """After a task's attempt: close its instance, or have the pool's thread
        do it (off the task's path) unless the memory budget stopped it: its
        memory must go now. (The budget counts it until it is closed.)"""
        if store.memory is not None:
            store.memory.ran = True  # learned from at teardown if a sample
        store.invocation = store.thread = None  # (its attempt is over)
        if self._pool is not None and not (self.budget and self.budget.stopping(store)):
            self._pool.retire(store)
        else:
            store.close()

    @staticmethod
    def _end_attempt(invocation: Invocation) -> ErrorInfo | None:
        """Before the attempt's instance closes, however it ended (a trap too):
        hand the host what is left in its channel, and tell it how much of the
        last batch of messages the guest took."""
        channel = invocation.channel
        failure = None
        taken = None
        try:
            if channel is not None:
                taken = channel.batch_taken()
                _take_gathered(invocation, channel, restart=False)
        except _Stop:  # garbage in the channel, or written without credit
            failure = invocation.aborted
        except ProtocolError as exc:  # a malformed message in it
            failure = ErrorInfo("protocol", str(exc))
        except Exception:
            failure = ErrorInfo(
                "trap", "the host failed while ending the task", traceback=traceback.format_exc()
            )
        try:
            invocation.host.ending(invocation, taken)
        except Exception:
            failure = failure or ErrorInfo(
                "trap", "the host failed while ending the task", traceback=traceback.format_exc()
            )
        return failure

    def _call_export(
        self, store: wasmtime.Store, instance: Instance, index: Any, *payload: Any
    ) -> str | ErrorInfo:
        """Call ``load`` or ``run``: what it returned (text, checked by the
        caller), or the failure it reported, checked here."""
        # (result<string, failure> comes back untagged from wasmtime-py: the
        # string, or the failure's record.)
        value = self._exports[index](store, instance, *payload)
        if isinstance(value, str):
            return value
        return _reported_failure(value)

    @staticmethod
    def _used(store: wasmtime.Store, invocation: Invocation) -> int:
        """Fuel the invocation consumed. After an epoch trap the store's counter
        is stale, so the reading taken at the last tick counts too."""
        left = store.get_fuel()
        if invocation.fuel_left is not None:
            left = min(left, invocation.fuel_left)
        return invocation.limits.fuel - left

    @staticmethod
    def _outcome(
        result: str | None,
        error: ErrorInfo | None,
        fuel: int,
        started: float,
        peak_memory_bytes: int | None = None,
    ) -> AttemptOutcome:
        return AttemptOutcome(
            result_json=result,
            error=error,
            fuel_consumed=fuel,
            peak_memory_bytes=peak_memory_bytes,
            duration_s=time.monotonic() - started,
        )

    @staticmethod
    def _classify(invocation: Invocation, exc: Exception) -> ErrorInfo:
        text = str(exc)
        limits = invocation.limits
        if invocation.stop_reason == "aborted":
            error = invocation.evicted or invocation.aborted
            if error is not None:
                return error
        if invocation.stop_reason == "timeout":
            return ErrorInfo("timeout", f"deadline of {limits.timeout_s:g}s exceeded")
        if invocation.stop_reason == "cancelled":
            return ErrorInfo("cancelled", invocation.cancellation_message())
        if invocation.host_error is not None:
            return ErrorInfo(
                "trap", "the host failed while serving the task", traceback=invocation.host_error
            )
        if oom.is_refused_growth(text):
            return ErrorInfo("memory_limit", _out_of_memory(limits), traceback=text)
        if "all fuel consumed" in text:
            return ErrorInfo("fuel_exhausted", f"used all of its {limits.fuel:,} fuel")
        if "memory" in text.lower() and "minimum" in text.lower():
            return ErrorInfo(
                "memory_limit",
                f"the ram limit of {limits.ram_bytes} bytes is too small to start the instance",
            )
        return ErrorInfo("trap", f"the instance trapped: {_trap_cause(exc)}", traceback=text)


def _reported_failure(failure: Any) -> ErrorInfo:
    """The failure a guest reported (the WIT record ``failure``): texts kept to
    their bounds; a kind only the host may give is a protocol failure."""
    kind = failure.kind
    if kind not in GUEST_FAILURE_KINDS:
        return ErrorInfo(
            "protocol",
            f"the task reported a failure of kind {guest_data.kept_text(kind, 80)!r}; a task "
            f"may report only {', '.join(sorted(GUEST_FAILURE_KINDS))}",
        )
    cause = failure.cause
    return ErrorInfo(
        kind=kind,
        message=guest_data.kept_text(failure.message, guest_data.MAX_ERROR_MESSAGE_CHARS),
        traceback=None
        if failure.traceback is None
        else guest_data.kept_text(failure.traceback, guest_data.MAX_TRACEBACK_CHARS),
        type=None if failure.type is None else guest_data.kept_text(failure.type, 200),
        cause=None
        if cause is None
        else {
            "task": guest_data.kept_text(cause.task, guest_data.MAX_NAME_CHARS),
            "kind": guest_data.kept_text(cause.kind, 80),
            "message": guest_data.kept_text(cause.message, guest_data.MAX_ERROR_MESSAGE_CHARS),
            "via": [
                guest_data.kept_text(task, guest_data.MAX_NAME_CHARS)
                for task in cause.via[:MAX_CAUSE_VIA]
            ],
        },
        retryable=failure.retryable is not False,
    )


def _checked_result(invocation: Invocation, text: str) -> str | ErrorInfo:
    """A task's result, as its guest returned it, once checked: one strict JSON
    value, within the size results may have."""
    if len(text) > guest_data.MAX_PAYLOAD_CHARS:
        return ErrorInfo(
            "exception",
            f"task {invocation.task!r} returned {len(text):,} bytes of JSON; "
            f"results are limited to {guest_data.MAX_PAYLOAD_CHARS:,} bytes",
        )
    try:
        return guest_data.json_text(text, f"the result of task {invocation.task!r}")
    except TooLarge as exc:  # (an honest task may return that much)
        return ErrorInfo("exception", str(exc))
    except ProtocolError as exc:
        return ErrorInfo("protocol", str(exc))


#: Failures that may be the aftermath of running out of memory: what the guest
#: reported (or claimed, or returned malformed), and traps the host has no
#: other reason for.
_AFTERMATH_KINDS = frozenset({"exception", "bad_arguments", "trap", "protocol"})
#: Linear memory grows by whole pages of this size.
WASM_PAGE = 64 * 1024


def _out_of_memory(limits: Limits) -> str:
    return f"MemoryError: the task ran out of memory (its ram limit is {limits.ram_bytes:,} bytes)"


def _unexplained(invocation: Invocation, result: str | ErrorInfo | None) -> bool:
    """Whether ``result`` is a failure the host did not decide itself (no stop,
    no host error, no limit it enforced): the guest's word, or a trap."""
    return (
        isinstance(result, ErrorInfo)
        and result.kind in _AFTERMATH_KINDS
        and invocation.stop_reason is None
        and invocation.host_error is None
    )


def _filled(error: ErrorInfo, size: int | None, limits: Limits) -> ErrorInfo | None:
    """A failure of an attempt whose memory is full (not one more page fits
    under its cap) ran out of memory, whatever the guest then said or did:
    a refused growth leaves CPython's state unsound in places, and the guest's
    report may be anything. None if its memory was not full (or not found)."""
    if size is None or size + WASM_PAGE <= limits.ram_bytes:
        return None
    said = f"with its memory full, the task reported {error.kind}: {error.message}"
    details = f"{said}\n{error.traceback}" if error.traceback else said
    return ErrorInfo("memory_limit", _out_of_memory(limits), traceback=details)


def _trap_cause(exc: Exception) -> str:
    """What a trap says in a line. wasmtime's text starts with "error while
    executing at wasm backtrace:" and a frame per line, and ends with "Caused
    by:" and the causes, numbered ("0: memory fault at ...", "1: wasm trap: ...")."""
    text = str(exc).strip()
    head, _, causes = text.partition("Caused by:")
    lines = [line.strip() for line in (causes or head).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not causes:
        return lines[0]
    cause = ": ".join(reversed([re.sub(r"^\d+: ", "", line) for line in lines]))
    if "call stack exhausted" in cause:
        return f"its call stack overflowed (recursion too deep?): {cause}"
    return cause


def too_little_ram(limits: Limits) -> ErrorInfo | None:
    """Why an attempt with ``limits`` cannot even start, or None."""
    if limits.ram_bytes >= MIN_RAM_BYTES:
        return None
    return ErrorInfo(
        "memory_limit",
        f"the ram limit of {limits.ram_bytes:,} bytes is below the "
        f"{MIN_RAM_BYTES // 1024**2} MiB the Python runtime needs to start",
    )


def task_input(invocation: Invocation) -> str:
    """What the guest's ``run`` is told of the attempt it runs (JSON)."""
    return json.dumps(
        {
            "task": invocation.task,
            "task_id": invocation.task_id,
            "attempt": invocation.attempt,
            "max_attempts": invocation.max_attempts,
            "seed": invocation.seed,
            "env": dict(invocation.grants.env),
            # For the hint on a path no grant covers (the guest's own check).
            "files": [grant.guest_path for grant in invocation.grants.files],
        }
    )


class InstancePool:
    """Fresh instances prepared ahead of need by a filler thread, each used once.

    Instantiating and importing the program costs a few milliseconds; doing it
    here, off the critical path, leaves a task call only its own run. A take that
    finds the pool empty prepares inline rather than waiting. The filler starts
    at the first such take, not with the pool: a run whose only task takes the
    instance its program was loaded in (``first``) never pays for one, nor
    shares the CPU (and the GIL) with it while it starts.
    """

    def __init__(self, sandbox: Sandbox, program: str, size: int, first: Prepared | None) -> None:
        self._sandbox = sandbox
        self._program = program
        #: The program its instances have imported.
        self.program = program
        self._ready: queue.Queue[Prepared] = queue.Queue(maxsize=max(size, 1))
        if first is not None:
            self._ready.put_nowait(first)
        self._stop = threading.Event()
        #: What the filler's imports stop with: cancelled as the pool closes.
        self._scope = _Closing()
        #: Used instances the filler is to close, and the lock that claims one
        #: (the filler, or the memory budget's thread: never both).
        self._retired: list[wasmtime.Store] = []
        self._retired_lock = threading.Lock()
        self._size = size
        #: The filler, once a take found the pool empty (and the lock that starts it once).
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def retire(self, store: wasmtime.Store) -> None:
        """Hand over a used instance to be torn down off the caller's critical path."""
        if self._thread is None or not self._thread.is_alive():  # (it gave up)
            store.close()
        else:
            with self._retired_lock:
                self._retired.append(store)

    def _close_retired(self) -> None:
        with self._retired_lock:
            retired, self._retired = self._retired, []
        for store in retired:
            store.close()

    def discard(self, store: wasmtime.Store) -> bool:
        """Close an instance the pool holds (ready, or used and not yet torn
        down) now: the memory budget chose it. False if the pool does not hold
        it (a task took it)."""
        with self._retired_lock:
            if store in self._retired:
                self._retired.remove(store)
                store.close()
                return True
        # (queue.Queue's own lock and deque: a ready instance is taken out
        # from the middle, which its methods cannot do.)
        with self._ready.mutex:
            found = [prepared for prepared in self._ready.queue if prepared.store is store]
            if not found:
                return False
            self._ready.queue.remove(found[0])
            self._ready.not_full.notify()
        store.close()
        return True

    def take(self) -> Prepared | None:
        """A prepared instance, or None if the caller should prepare its own.

        An empty pool is not waited on: preparing inline while the filler works
        too uses both cores (measured: waiting for the filler doubled the p50 of
        back-to-back calls)."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            self._start_filling()
            return None

    def _start_filling(self) -> None:
        """Start the filler (once; none for a pool of size 0, or closed)."""
        if self._thread is not None or self._size <= 0:
            return
        with self._starting:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._fill, name="capsule-pool", daemon=True)
                self._thread.start()

    def _fill(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._close_retired()
            try:
                prepared = self._sandbox.prepare(self._program, within=self._scope)
            except PrepareError:
                # The program fails to import here; invocations will report why.
                failures += 1
                if failures >= 3:
                    return
                self._stop.wait(0.1)
                continue
            failures = 0
            while not self._stop.is_set():
                try:
                    self._ready.put(prepared, timeout=0.02)
                    break
                except queue.Full:
                    self._close_retired()
            else:
                prepared.store.close()

    def close(self) -> None:
        with self._starting:  # (no filler starts from now on)
            self._stop.set()
        self._scope.closed = True  # (an import under way stops at its next tick)
        if self._thread is not None:
            self._thread.join()
        self._close_retired()
        while True:
            try:
                self._ready.get_nowait().store.close()
            except queue.Empty:
                return
