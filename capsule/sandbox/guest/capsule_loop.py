"""The guest's asyncio event loop: its waits are the host's.

CPython's default loop wakes itself through a socket pair and waits in
``select``: WASI has neither sockets nor threads. This loop waits on the host
instead: with no host operation in flight it sleeps there (``tasks.sleep``:
the task's CPU slot free meanwhile, its deadline and cancellation honoured,
journaled so that a replay does not wait again); with some in flight (a
request started by ``capsule.http.get_async``, say) it polls for their
completions (``operations.poll``), which run their futures' callbacks. Its
clock is ``time.monotonic``, which the host serves and journals, so a
replayed task takes the same turns.

It is the loop of the event loop policy: ``asyncio.run``, ``asyncio.Runner``
and ``asyncio.new_event_loop`` make one. Bundled into the guest runtime (see
``capsule.sandbox.runtime``); this file runs inside the sandbox only.
"""

# ruff: noqa
# mypy: ignore-errors

import asyncio
import math
from asyncio import base_events, events

#: Where a task's code reaches the network: said by everything that cannot.
NO_NETWORK = (
    "the sandbox has no network of its own: make HTTP requests with capsule.http "
    "(capsule.http.get(...), or await capsule.http.get_async(...) in async code), to "
    "the hosts the task is granted with @task(allowed_hosts=[...])"
)


class Deadlock(RuntimeError):
    """Every coroutine waits, and nothing the loop waits for can wake one."""


class _HostWaits:
    """What BaseEventLoop calls its ``_selector``: ``select(timeout)`` waits on
    the host and returns the callbacks of the operations that ended."""

    def __init__(self, host):
        #: The guest backend: ``has_operations()``, ``poll_operations(timeout)``
        #: (the completions' callbacks), ``abandon_operations(loop)`` and
        #: ``sleep(seconds)``.
        self._host = host

    def select(self, timeout):
        host = self._host
        if host.has_operations():
            return host.poll_operations(timeout)
        if timeout is None:
            raise Deadlock(
                "deadlock: every coroutine of the task's event loop is waiting, and "
                "nothing it waits for can happen (no timer, no host operation in "
                "flight: a Future nobody sets, an Event nobody sets?)"
            )
        if timeout > 0:
            # Rounded up: a wait cut short by a fraction of a millisecond would
            # make the loop turn again, and ask the host again, for nothing.
            host.sleep(math.ceil(timeout * 1000) / 1000)
        return []

    def close(self):
        pass


class CapsuleEventLoop(base_events.BaseEventLoop):
    """asyncio's event loop for code running in the sandbox."""

    def __init__(self, host):
        super().__init__()
        self._selector = _HostWaits(host)

    def close(self):
        if not self.is_running() and not self.is_closed():
            # What its futures still wait for on the host stops with it.
            self._selector._host.abandon_operations(self)
        super().close()

    def _process_events(self, event_list):
        for complete in event_list:
            complete()

    def _write_to_self(self):
        # Only other threads need waking the loop, and the guest has none.
        pass

    def run_in_executor(self, executor, func, *args):
        # No threads: the function runs now, to its end, and its future is
        # done at once (asyncio.to_thread and loop.run_in_executor work; they
        # only do not run concurrently with the loop).
        self._check_closed()
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def _no_network(self, *args, **kwargs):
        raise PermissionError(NO_NETWORK)

    async def _no_network_async(self, *args, **kwargs):
        raise PermissionError(NO_NETWORK)

    add_reader = add_writer = remove_reader = remove_writer = _no_network
    getaddrinfo = getnameinfo = create_connection = create_server = _no_network_async
    create_datagram_endpoint = create_unix_connection = create_unix_server = _no_network_async
    sock_connect = sock_accept = sock_recv = sock_sendall = _no_network_async

    async def subprocess_exec(self, *args, **kwargs):
        raise PermissionError("the sandbox cannot start processes")

    subprocess_shell = subprocess_exec


_BasePolicy = getattr(events, "_BaseDefaultEventLoopPolicy", None) or events.BaseDefaultEventLoopPolicy


def install(host):
    """Make the loops of asyncio (``asyncio.run``, ``new_event_loop``) host
    loops that wait on ``host``."""

    class Policy(_BasePolicy):
        def _loop_factory(self):
            return CapsuleEventLoop(host)

    set_policy = getattr(events, "_set_event_loop_policy", None) or asyncio.set_event_loop_policy
    set_policy(Policy())
