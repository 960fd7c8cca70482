"""Host calls that wait, as waits: a sleep, a send to a full mailbox, a
receive, an ask's reply, a wait on children, a direct task call, an HTTP
request, a poll of operations. A host call that may wait starts, and either
answers at once or returns a :class:`Wait`: what it waits for (``ready``),
until when (``timeout``; its attempt's deadline and stop come on top), what
its task is reported waiting on (``reason``), and how its answer is made once
it is ready, timed out or stopped (``finish``).

What runs a wait is a driver: the thread driver (``Blocking.run``) blocks the
calling thread until the wait is over; the continuation driver
(``continuations.Continuations``) keeps the wait, re-checks it whenever its
attempt is woken and once its time is up (a task on the run's event loop), and
hands the answer to a callback.
The host call's code is the same under both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capsule.supervisor.events import WaitReason

if TYPE_CHECKING:
    from capsule.supervisor.tree import Attempt

#: A host call's answer: (ok, payload JSON).
Answer = tuple[bool, str]


@dataclass(eq=False)
class Wait:
    """A host call waiting for something (see the module)."""

    attempt: Attempt
    #: What its task is reported waiting on.
    reason: WaitReason
    #: Whether what it waits for holds now. Called again whenever its attempt is
    #: woken, never by two threads at once, and never again once it held (it
    #: may take what it waited for: a message, room in a mailbox).
    ready: Callable[[], bool]
    #: Makes the host call's answer, called once: with True once ``ready()``
    #: held, False if it timed out or its task must stop. It may return the
    #: next wait of the same host call (an ask waits for room, then for its reply).
    finish: Callable[[bool], Waiting]
    #: Seconds it waits at most (None: until ready or stopped).
    timeout: float | None = None
    #: Lasts until ``ready()`` holds, even once its task must stop: what it
    #: waits for ends soon after then (a direct task call's child, cancelled
    #: with its caller), and must not be left running.
    until_ready: bool = False
    #: Runs what it waits for on the calling thread, to the end (a direct task
    #: call's child, inline): the thread driver does so instead of blocking.
    inline: Callable[[], None] | None = None
    #: Starts what it waits for elsewhere, ending with a wake of its attempt
    #: (the same child as a task of its own): the continuation driver does so.
    start: Callable[[], None] | None = None


#: What a host call that may wait returns: its answer, or the wait for it.
Waiting = Answer | Wait

#: Takes a host call's answer once its wait is over, or what the wait raised
#: (a host bug), when a wait runs by continuation.
Resolve = Callable[[Answer | BaseException], object]


def never() -> bool:
    """What a sleep waits for: nothing but its time."""
    return False


def over(attempt: Attempt, reason: WaitReason, answer: Answer) -> Wait:
    """A wait that is over at once, with ``answer`` (a call refused where a
    wait was expected)."""
    return Wait(attempt, reason, _always, lambda _: answer)


def _always() -> bool:
    return True
