"""The records of the task tree: invocations across attempts, running attempts,
spawned children and the scopes that cancel them, results, and the threads tasks
run on."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from capsule.interrupts import wait_interruptibly
from capsule.sandbox.engine import CALLER_STOPPED, Invocation, past_deadline
from capsule.sandbox.nesting import start_deep_thread
from capsule.supervisor.events import ErrorDetail
from capsule.supervisor.operations import Operations

_T = TypeVar("_T")

if TYPE_CHECKING:
    from capsule.actors.router import Message
    from capsule.net.http import Transfer
    from capsule.supervisor.steps import Step


@dataclass
class TaskResult:
    """How a task invocation (all its attempts) ended."""

    task_id: str
    task: str
    attempts: int
    fuel_consumed: int
    duration_s: float
    result_json: str | None = None
    error: ErrorDetail | None = None
    peak_memory_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def value(self) -> Any:
        return None if self.result_json is None else json.loads(self.result_json)


@dataclass(frozen=True)
class LiveTask:
    """A running attempt, as :meth:`Run.snapshot` reports it."""

    task_id: str
    task: str
    attempt: int
    fuel_budget: int
    fuel_used: int
    mailbox_depth: int


@dataclass
class Node:
    """A task invocation across its attempts: numbers the calls it makes, so that
    child ids are deterministic (the parent's id plus the call's sequence number;
    attempts continue the count, so ids stay unique across retries)."""

    task_id: str
    children: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    messages: int = 0

    def next_child_id(self) -> str:
        with self.lock:
            self.children += 1
            return f"{self.task_id}/{self.children}"

    def next_message_id(self) -> str:
        with self.lock:
            self.messages += 1
            return f"{self.task_id}#{self.messages}"


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class Attempt:
    """A running attempt, as the tree sees it: its children and its wake-ups."""

    invocation: Invocation
    node: Node
    #: Its place in the tree: what it runs in, and what runs under it.
    scope: Scope
    #: Its spawned children, until their outcomes are collected (a wait
    #: delivered them): running ones, and ended ones with their outcomes.
    children: dict[str, Child] = field(default_factory=dict)
    #: How many of them are admitted and not ended (under the run's lock).
    running_children: int = 0
    #: When its children were restarted (restart intensity).
    restarts: deque[float] = field(default_factory=deque)
    #: Host calls of the run being resumed still to be answered from its journal.
    replay: deque[Step] = field(default_factory=deque)
    #: Host calls (steps) made so far.
    steps_taken: int = 0
    #: What its steps made the host record so far, in characters (see
    #: JournaledSteps.step): bounded by RunSettings.max_task_output_bytes.
    recorded: int = 0
    #: How much of that the run's total counts already (see JournaledSteps.count).
    recorded_counted: int = 0
    #: Its HTTP exchange in flight, if any (what the host holds for it).
    transfer: Transfer | None = None
    #: The operations it started without waiting (its asyncio code's).
    operations: Operations = field(init=False)
    #: Room reserved for its messages in targets' mailboxes, by target as the
    #: guest names it: [target id, places left, places given] (see MessageCalls.send).
    credit: dict[str, list[Any]] = field(default_factory=dict)
    #: What its last send tells the guest about its credit (see MessageCalls.send).
    credit_note: str = ""
    #: Its last send had to wait and gave back every place it held.
    credit_forgotten: bool = False
    #: The last batch of messages it received, which its guest hands to the
    #: task's code one by one (the rest go back to its mailbox when it ends).
    batch: list[Message] | None = None
    #: Direct calls whose child runs as a task of its own (the async core) and
    #: has not ended (changed under the run's lock).
    calling: int = 0
    #: Held while no wake-up is pending; a wake releases it, the wait takes it.
    _no_wakeup: threading.Lock = field(default_factory=_held_lock, repr=False)
    #: Called by every wake while a wait of its runs by continuation (see
    #: continuations.py), which sets it.
    waker: Callable[[], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.operations = Operations(self.wake)

    def wake(self) -> None:
        """Something the attempt may be waiting on changed (a message came, a
        child ended, it was cancelled, it must stop, an operation ended): its
        wait, or its next one, returns, or is checked again. Every wake-up of
        an attempt comes through here (from any thread, maybe holding the
        router's lock)."""
        no_wakeup = self._no_wakeup
        if no_wakeup.locked():  # (else a wake-up is pending already: no exception raised)
            try:
                no_wakeup.release()
            except RuntimeError:
                pass  # another wake released it just now
        waker = self.waker
        if waker is not None:
            waker()

    def wait_for_wakeup(self, timeout: float) -> None:
        """Until woken (or woken since the last wait), or ``timeout`` seconds.
        Callers check what they wait for before and after: a wake-up that came
        in between is pending, so none is lost. (A bare lock, not a Condition:
        on a busy mailbox the receiver waits for every message, and a
        Condition's Python-level wait and notify cost more than the rest of
        the receive.)"""
        self._no_wakeup.acquire(timeout=max(0.0, timeout))


@dataclass(eq=False)
class Child:
    """A spawned child, from its parent attempt's side."""

    task_id: str
    name: str
    scope: Scope
    #: Spawned with link=True: its failure fails its parent at once, unless
    #: the parent is waiting on it then.
    link: bool
    parent_attempt: Attempt
    #: The name it was registered under at spawn, if any.
    actor_name: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: TaskResult | None = None
    thread: threading.Thread | None = None
    current: Attempt | None = None
    #: Set when a sibling's failure restarts this child (the strategy).
    restart_reason: str | None = None
    #: Its parent is blocked in a wait on it (changed under the run's lock).
    waited_on: bool = False
    #: A wait delivered its outcome to its parent (under the run's lock).
    collected: bool = False


class Scope:
    """A place in the task tree, which the sandbox asks whether what runs in it
    must stop (see capsule.sandbox.engine.Within): an attempt's own (it
    carries the attempt's deadline and abort to what runs under it), one
    between a parent and a spawned child, or one above ``main`` (or the
    program's import). Cancelling it cancels everything under it."""

    def __init__(
        self, parent: Scope | None, task_id: str, invocation: Invocation | None = None
    ) -> None:
        self.parent = parent
        #: The task it belongs to ("" above ``main``): a spawned child's scope
        #: belongs to its parent.
        self.task_id = task_id
        #: The attempt whose scope this is, if any (set once it exists).
        self.invocation = invocation
        self.cancelled = False
        #: Why it was cancelled, for the error its descendants report.
        self.cancel_message = CALLER_STOPPED

    def stop_reason(self, invocation: Invocation) -> str | None:
        """Why ``invocation``, running here, must stop: its own deadline (unless
        it runs in a scope of its own, where its place comes after the scope's
        cancellation), or a scope it runs in cancelled, or an attempt above it
        stopped (aborted, or past its deadline)."""
        if self.invocation is not invocation:
            reason = past_deadline(invocation)
            if reason is not None:
                return reason
        return self._stopped(invocation)

    def check_stop(self) -> str | None:
        """Why what runs here must stop now (as the sandbox would see it), or None."""
        owner = self.invocation
        return self._stopped(None) if owner is None else owner.check_stop()

    def _stopped(self, invocation: Invocation | None) -> str | None:
        now = time.monotonic()
        node: Scope | None = self
        while node is not None:
            if node.cancelled:
                return "cancelled"
            owner = node.invocation
            if owner is not None:
                if owner is not invocation and (
                    owner.aborted is not None or owner.evicted is not None
                ):
                    return "cancelled"
                deadline = owner.deadline
                if deadline is not None and now >= deadline:
                    return "timeout" if owner is invocation else "cancelled"
            node = node.parent
        return None

    def cancellation_message(self, invocation: Invocation | None = None) -> str:
        """Why what runs here (``invocation``, if given) was cancelled: the
        message of the nearest cancelled scope from here up, or the generic one
        when an attempt stopped otherwise first."""
        if invocation is not None and invocation is not self.invocation:
            if invocation.aborted is not None or invocation.evicted is not None:
                return CALLER_STOPPED
        node: Scope | None = self
        while node is not None:
            if node.cancelled:
                return node.cancel_message
            owner = node.invocation
            if owner is not None and (owner.aborted is not None or owner.evicted is not None):
                break
            node = node.parent
        return CALLER_STOPPED


def nearest_deadline(scope: Scope) -> float | None:
    """The earliest deadline of the attempts from ``scope`` up."""
    nearest: float | None = None
    node: Scope | None = scope
    while node is not None:
        owner = node.invocation
        if owner is not None:
            deadline = owner.deadline
            if deadline is not None and (nearest is None or deadline < nearest):
                nearest = deadline
        node = node.parent
    return nearest


def start_task_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a thread with a stack deep enough for a tree of nested task calls."""
    return start_deep_thread(target, name)


def run_interruptibly(
    body: Callable[[], _T], interrupt: Callable[[], None], name: str
) -> tuple[_T, bool]:
    """Run ``body`` on a task thread while this one (the main thread, where
    Ctrl-C and SIGTERM land, or one whose owner stops it: capsule.interrupts)
    waits: wasm never runs where a signal could interrupt a host call of its
    in the middle. An interrupt calls
    ``interrupt`` (which must make ``body`` end soon) and the wait goes on until
    it has. Returns (what ``body`` returned, whether it was interrupted);
    re-raises what ``body`` raised."""
    outcome: list[_T] = []
    failure: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            outcome.append(body())
        except BaseException as exc:  # re-raised on the waiting thread
            failure.append(exc)
        finally:
            finished.set()

    thread = start_task_thread(run, name=name)
    # Wait on an Event, not on Thread.join: an interrupted join can mark a
    # thread finished while it still runs (CPython < 3.13).
    interrupted = wait_interruptibly(finished, interrupt)
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0], interrupted
