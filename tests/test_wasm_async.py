"""Calls into Capsule's real guest runtime as futures (capsule.sandbox.wasm_async):
calls suspended in an async import, woken or cancelled; fuel yields; the
fiber-stack and store-lifetime hazards; thousands of waiting calls on a few
threads."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import wasmtime
from wasmtime.component import Component, Linker, Record

from capsule.sandbox import wasm_async, wasmtime_compat
from capsule.sandbox.hostcall import add_host_func
from capsule.sandbox.poller import Poller
from capsule.sandbox.wasm_async import (
    AsyncExport,
    AsyncStore,
    CallCancelled,
    CallFuture,
    Pending,
    StoreBusy,
    add_async_func,
    current_future,
    instantiate,
)
from tests.conftest import SPIN_TASK, assert_busy_calls_take_turns, os_threads, private_bytes

PACKAGE = "capsule:runtime/{}@0.1.0"
#: Every import of the guest runtime's world (wit/capsule.wit), by interface.
IMPORTS = {
    "modules": ["find", "offer-compiled"],
    "tasks": ["call", "spawn", "wait", "wait-any", "cancel", "sleep"],
    "messaging": ["send", "receive", "ask", "reply"],
    "output": ["write"],
    "clock": ["monotonic-ns"],
    "http": ["request"],
    "operations": ["start-http", "start-wait", "start-receive", "start-ask", "poll", "abandon"],
}
FUEL = 10**12

PROGRAM = (
    """
import json
import capsule

@capsule.task
def echo():
    message = capsule.receive()
    return {"got": message.body, "from": message.sender}

@capsule.task
def echo_forever():
    while True:
        message = capsule.receive()
        if message.body == "stop":
            return "stopped"
        capsule.send("out", message.body)

@capsule.task
def wake_then_spin():
    capsule.send("out", "wake")
    while True:
        pass
"""
    + SPIN_TASK
)


def _record(**fields: Any) -> Record:
    record = Record()
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def _host_error(exc: Exception) -> wasmtime.WasmtimeError:
    return wasmtime.WasmtimeError(f"host: {exc!r}")


def _not_served(*_args: Any) -> None:
    raise wasmtime.WasmtimeError("not served in this test")


@dataclass
class Guest:
    """The guest runtime on an async engine, its imports served by the test:
    ``receive`` async (by ``on_receive``), ``send`` recorded by caller."""

    engine: wasmtime.Engine
    component: Component
    load: AsyncExport
    run: AsyncExport
    #: What each call sent, by its future's data.
    sent: dict[Any, list[Any]] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def linker(
        self,
        on_receive: Callable[[int | None], Any],
        on_send: Callable[[str, str, int | None], tuple[bool, str]] | None = None,
    ) -> Linker:
        linker = Linker(self.engine)
        linker.add_wasip2()
        served: dict[tuple[str, str], Callable[..., Any]] = {
            ("messaging", "send"): on_send or self._send,
            ("output", "write"): self._write,
            ("modules", "find"): lambda _name: None,
            ("modules", "offer-compiled"): lambda _origin, _compiled: None,
        }
        with linker.root() as root:
            for interface, names in IMPORTS.items():
                with root.add_instance(PACKAGE.format(interface)) as instance:
                    for name in names:
                        if (interface, name) == ("messaging", "receive"):
                            add_async_func(instance, name, on_receive, _host_error)
                        else:
                            func = served.get((interface, name), _not_served)
                            add_host_func(instance, name, func, _host_error)
        return linker

    def _send(self, target: str, body: str, _timeout: int | None) -> tuple[bool, str]:
        future = current_future()
        assert future is not None
        self.sent.setdefault(future.data, []).append(json.loads(body))
        return True, json.dumps({"id": "m", "to": target})

    def _write(self, _stream: str, text: str) -> None:
        self.output.append(text)

    def start(
        self,
        linker: Linker,
        task: str,
        *args: Any,
        data: Any = None,
        fuel_yield_interval: int | None = None,
    ) -> CallFuture[Any]:
        """A fresh instance with PROGRAM loaded, and a call of ``task`` in it
        (not polled yet)."""
        store = AsyncStore(self.engine, fuel=FUEL)
        store.set_wasi(wasmtime.WasiConfig())
        instance = finish(instantiate(store, linker, self.component))
        program = _record(
            name="prog",
            source=_record(origin="/prog.py", code=PROGRAM, compiled=None, **{"is-package": False}),
            describe=False,
            marker=os.urandom(16).hex(),
        )
        finish(self.load.call(store, instance, program))
        if fuel_yield_interval is not None:
            store.set_fuel_yield_interval(fuel_yield_interval)
        invocation = {"task": task, "task_id": f"t{data}", "attempt": 1, "max_attempts": 1}
        invocation.update(seed=1, env={}, files=[])
        call = json.dumps({"args": list(args), "kwargs": {}})
        future = self.run.call(store, instance, json.dumps(invocation), call)
        future.data = data
        return future


def until_waiting(poller: Poller, *futures: CallFuture[Any]) -> None:
    """Until each of ``futures`` waits in an async import with its poll
    returned (a wake before that only has its poll thread poll it again)."""
    deadline = time.monotonic() + 60
    while not all(poller.waiting(future) for future in futures):
        assert time.monotonic() < deadline, "the calls did not come to wait"
        time.sleep(0.001)


def finish(future: CallFuture[Any]) -> Any:
    """Poll a call that waits on nothing until it ends; its result."""
    while not future.poll():
        assert not future.blocked
    return future.result()


def ended_with(future: CallFuture[Any]) -> Any:
    """What an ended call returned; its store is closed."""
    try:
        return json.loads(future.result())
    finally:
        future.store.close()


def failed(future: CallFuture[Any], match: str | None = None) -> None:
    """An ended call failed (a trap: WasmtimeError, matching ``match``); its
    store is closed."""
    try:
        with pytest.raises(wasmtime.WasmtimeError, match=match):
            future.result()
    finally:
        future.store.close()


def envelope(body: Any, sender: str = "t0") -> tuple[bool, list[tuple[str, str, str, bool]]]:
    """receive's answer: one message."""
    return True, [(f"{sender}#1", sender, json.dumps(body), False)]


@pytest.fixture(scope="module")
def guest() -> Guest:
    return make_guest()


def make_guest() -> Guest:
    engine = wasm_async.async_engine()
    component = wasm_async.guest_component(engine)
    runner = component.get_export_index(PACKAGE.format("runner"))
    assert runner is not None
    load = component.get_export_index("load", instance=runner)
    run = component.get_export_index("run", instance=runner)
    assert load is not None and run is not None
    return Guest(engine, component, AsyncExport(load), AsyncExport(run))


class Mailboxes:
    """receive's handler: every call's Pending, by its future's data."""

    def __init__(self) -> None:
        self.waiting: dict[Any, Pending] = {}
        self.changed = threading.Condition()

    def __call__(self, _timeout_ms: int | None) -> Pending:
        future = current_future()
        assert future is not None
        pending = Pending()
        with self.changed:
            self.waiting[future.data] = pending
            self.changed.notify_all()
        return pending

    def take(self, key: Any) -> Pending:
        with self.changed:
            return self.waiting.pop(key)

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.waiting) >= count, timeout=600)


def suspended(
    guest: Guest, mailboxes: Mailboxes, key: Any, linker: Linker | None = None
) -> tuple[CallFuture[Any], Pending]:
    """An echo call (``data`` ``key``) polled once: suspended in receive; and
    that receive's Pending."""
    future = guest.start(linker or guest.linker(mailboxes), "echo", data=key)
    assert future.poll() is False
    return future, mailboxes.take(key)


# -- the bindings ----------------------------------------------------------------


def test_a_function_the_library_lacks_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    declarations = {**wasmtime_compat._DECLARATIONS, "wasmtime_no_such_function": (None, [])}
    monkeypatch.setattr(wasmtime_compat, "_DECLARATIONS", declarations)
    monkeypatch.setattr(wasmtime_compat, "_api", None)
    with pytest.raises(
        wasmtime_compat.AsyncApiUnavailable, match="has no wasmtime_no_such_function"
    ):
        wasmtime_compat.async_api()


# -- one call ------------------------------------------------------------------


def test_a_call_waits_in_an_async_import_until_its_answer_is_given(guest: Guest) -> None:
    mailboxes = Mailboxes()
    future = guest.start(guest.linker(mailboxes), "echo", data="a")

    assert future.poll() is False
    assert future.blocked and not future.done
    pending = mailboxes.waiting["a"]
    for _ in range(3):  # polled again, it still waits: the guest did not run
        assert future.poll() is False
    assert list(mailboxes.waiting) == ["a"]
    with pytest.raises(RuntimeError, match="not ended"):
        future.result()

    # Resolved from another thread, as the host will.
    resolver = threading.Thread(target=pending.resolve, args=(envelope([1, "two"], "t9"),))
    resolver.start()
    resolver.join()
    assert pending.resolved and not future.blocked
    assert future.poll() is True
    assert ended_with(future) == {"got": [1, "two"], "from": "t9"}
    assert pending.delivered
    assert pending.resolve(envelope("again")) is False  # (answered once)


def test_an_async_import_answering_at_once_does_not_suspend(guest: Guest) -> None:
    future = guest.start(guest.linker(lambda _timeout: envelope("now")), "echo", data="b")
    assert future.poll() is True
    assert ended_with(future)["got"] == "now"


def test_a_wrong_answer_fails_the_call_not_the_host(guest: Guest) -> None:
    future, pending = suspended(guest, Mailboxes(), "c")
    pending.resolve((True, [("only", "two fields")]))
    assert future.poll() is True
    failed(future)
    assert isinstance(pending.failure, TypeError)


def test_a_call_takes_many_answers_in_turn(guest: Guest) -> None:
    mailboxes = Mailboxes()
    future = guest.start(guest.linker(mailboxes), "echo_forever", data="d")
    for body in range(5):
        assert future.poll() is False
        mailboxes.take("d").resolve(envelope(body))
    assert future.poll() is False
    mailboxes.take("d").resolve(envelope("stop"))
    assert future.poll() is True
    assert ended_with(future) == "stopped"
    assert guest.sent["d"] == [0, 1, 2, 3, 4]


def test_an_interrupt_in_an_async_import_fails_the_call_then_is_raised(guest: Guest) -> None:
    def receive(_timeout: int | None) -> Any:
        raise KeyboardInterrupt

    future = guest.start(guest.linker(receive), "echo", data="i")
    with pytest.raises(KeyboardInterrupt):
        future.poll()
    assert future.done
    failed(future, match="interrupted")


# -- cancellation and the store's lifetime -------------------------------------------


def test_a_suspended_call_cancelled_leaves_nothing_behind(guest: Guest) -> None:
    mailboxes = Mailboxes()
    linker = guest.linker(mailboxes)

    def cancel_one(key: Any) -> None:
        future, pending = suspended(guest, mailboxes, key, linker)
        assert future.cancel() is True
        assert future.done and future.cancelled
        with pytest.raises(CallCancelled):
            future.result()
        assert future.poll() is True  # (ended: nothing to run)
        assert future.cancel() is False
        assert pending.resolve(envelope("late")) is False  # nobody waits for it
        assert not pending.delivered
        future.store.close()

    for key in range(20):  # (warm: the allocator's pools, the guest's image)
        cancel_one(key)
    gc.collect()
    before = private_bytes()
    for key in range(20, 120):
        cancel_one(key)
    gc.collect()
    grown = private_bytes() - before
    # A call left behind holds its instance (~3 MB): 100 would be ~300 MB.
    assert grown < 40 * 1024**2, f"100 cancelled calls left {grown:,} bytes"
    assert not wasm_async._PENDING_BY_KEY  # every continuation was dropped


def test_a_store_with_a_live_call_cannot_be_closed(guest: Guest) -> None:
    mailboxes = Mailboxes()
    future, pending = suspended(guest, mailboxes, "e")
    store = future.store
    assert store.busy
    with pytest.raises(StoreBusy, match="cancel it"):
        store.close()
    with pytest.raises(StoreBusy, match="cancel it"), store:
        pass
    with pytest.raises(StoreBusy, match="already has a live call"):
        instantiate(store, guest.linker(mailboxes), guest.component)
    # The store is still open, and its call goes on.
    pending.resolve(envelope("still here"))
    assert future.poll() is True
    assert ended_with(future)["got"] == "still here"


def test_a_call_cancelled_while_polled_ends_when_its_poll_returns(guest: Guest) -> None:
    entered, leave = threading.Event(), threading.Event()

    def receive(_timeout: int | None) -> Any:
        entered.set()
        assert leave.wait(60)
        return envelope("answered")

    future = guest.start(guest.linker(receive), "echo", data="f")
    poller = threading.Thread(target=future.poll)
    poller.start()
    assert entered.wait(60)
    assert future.cancel() is True  # asked during the poll
    assert not future.done
    with pytest.raises(RuntimeError, match="two threads"):
        future.poll()
    leave.set()
    poller.join()
    assert future.cancelled
    future.store.close()


LOST_STORE = """
import gc, json, sys
sys.path.insert(0, {tests!r})
from test_wasm_async import Mailboxes, make_guest

guest = make_guest()
mailboxes = Mailboxes()
linker = guest.linker(mailboxes)
for key in range(5):
    future = guest.start(linker, "echo", data=key)
    assert future.poll() is False
    store = future.store
    store.lost = future  # a cycle: store -> future -> store
    del future, store
gc.collect()  # the cycles go, each store's future first
for key in range(5):
    assert mailboxes.take(key).resolve(("late",)) is False
future = guest.start(linker, "echo", data="next")
assert future.poll() is False
mailboxes.take("next").resolve((True, [("x#1", "x", json.dumps("ok"), False)]))
assert future.poll() is True
print(future.result())
"""


def test_a_store_lost_with_its_live_call_does_not_crash(tmp_path: Any) -> None:
    # (In a subprocess: if the store went first, wasmtime would abort it.)
    script = tmp_path / "lost.py"
    script.write_text(LOST_STORE.format(tests=os.path.dirname(__file__)))
    completed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout) == {"got": "ok", "from": "x"}


def test_a_poller_closed_cancels_the_calls_it_holds(guest: Guest) -> None:
    mailboxes = Mailboxes()
    linker = guest.linker(mailboxes)
    futures = [guest.start(linker, "echo", data=key) for key in range(3)]
    ended: list[CallFuture[Any]] = []
    two_ended = threading.Event()

    def on_done(future: CallFuture[Any]) -> None:
        ended.append(future)
        if len(ended) == 2:
            two_ended.set()

    with Poller(threads=2) as poller:
        for future in futures:
            poller.submit(future, on_done)
        mailboxes.wait_for(3)
        mailboxes.take(0).resolve(envelope("first"))
        poller.cancel(futures[1])
        assert two_ended.wait(60)
        assert len(poller) == 1
    assert json.loads(futures[0].result())["got"] == "first"
    assert futures[1].cancelled and futures[2].cancelled
    assert ended == [futures[0], futures[1]] or ended == [futures[1], futures[0]]
    for future in futures:
        future.store.close()


def sender_pinged(
    guest: Guest,
    poller: Poller,
    mailboxes: Mailboxes,
    on_send: Callable[[str, str, int | None], tuple[bool, str]],
    on_done: Callable[[CallFuture[Any]], None],
) -> tuple[CallFuture[Any], CallFuture[Any]]:
    """An echo_forever call ("sender") and an echo call ("woken") on
    ``poller``, both waiting in receive; then the sender given "ping", which
    it sends on (``on_send``, which may wake the woken one)."""
    linker = guest.linker(mailboxes, on_send)
    sender = guest.start(linker, "echo_forever", data="sender")
    woken = guest.start(linker, "echo", data="woken")
    poller.submit(sender, on_done)
    poller.submit(woken, on_done)
    mailboxes.wait_for(2)
    until_waiting(poller, woken)
    mailboxes.take("sender").resolve(envelope("ping"))
    return sender, woken


def sender_stopped(
    mailboxes: Mailboxes,
    sender_ended: threading.Event,
    sender: CallFuture[Any],
    woken: CallFuture[Any],
) -> None:
    """After sender_pinged, once the woken call ended: the sender, waiting for
    its next message, given "stop"; what both returned checked, their stores
    closed."""
    mailboxes.wait_for(1)
    mailboxes.take("sender").resolve(envelope("stop"))
    assert sender_ended.wait(60)
    assert json.loads(woken.result())["got"] == "ping"
    assert json.loads(sender.result()) == "stopped"
    for future in (sender, woken):
        future.store.close()


def test_a_call_woken_by_another_is_polled_next_by_the_wakers_thread(guest: Guest) -> None:
    """A send that wakes a call leaves it to the thread polling the sender,
    once that poll returns (the sender waits again here): the other poll
    thread is not woken for it, so a ping-pong stays on one thread."""
    mailboxes = Mailboxes()
    woken_ended, handled = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def on_send(_target: str, body: str, _timeout: int | None) -> tuple[bool, str]:
        seen["sender's thread"] = threading.get_ident()
        mailboxes.take("woken").resolve(envelope(json.loads(body)))
        # (Polled elsewhere meanwhile, it would end now.)
        seen["ended meanwhile"] = woken_ended.wait(0.3)
        handled.set()
        return True, json.dumps({"id": "m", "to": "woken"})

    sender_ended = threading.Event()

    def on_done(future: CallFuture[Any]) -> None:
        if future.data == "woken":
            seen["woken's thread"] = threading.get_ident()
            woken_ended.set()
        else:
            sender_ended.set()

    with Poller(threads=2) as poller:
        sender, woken = sender_pinged(guest, poller, mailboxes, on_send, on_done)
        assert handled.wait(60) and woken_ended.wait(60)
        assert seen["ended meanwhile"] is False
        assert seen["woken's thread"] == seen["sender's thread"]
        sender_stopped(mailboxes, sender_ended, sender, woken)


def test_a_call_woken_by_a_busy_one_is_not_left_waiting_for_it(guest: Guest) -> None:
    """The thread polling a call that woke another polls the woken one next;
    if the waker keeps running (it never yields here on its own), it yields
    soon after, and the woken call runs before it runs on."""
    mailboxes = Mailboxes()
    woken_ended = threading.Event()

    def on_send(_target: str, _body: str, _timeout: int | None) -> tuple[bool, str]:
        mailboxes.take("woken").resolve(envelope("wake"))
        return True, json.dumps({"id": "m", "to": "woken"})

    busy_ended = threading.Event()

    def on_done(future: CallFuture[Any]) -> None:
        (woken_ended if future.data == "woken" else busy_ended).set()

    linker = guest.linker(mailboxes, on_send)
    woken = guest.start(linker, "echo", data="woken")
    busy = guest.start(linker, "wake_then_spin", data="busy")
    with Poller(threads=1) as poller:  # (the woken call goes ahead of its waker)
        poller.submit(woken, on_done)
        mailboxes.wait_for(1)
        until_waiting(poller, woken)
        poller.submit(busy, on_done)
        assert woken_ended.wait(60)
        assert not busy.done
        guest.engine.increment_epoch()  # its deadline (one tick) passes
        assert busy_ended.wait(60)
    assert json.loads(woken.result())["got"] == "wake"
    failed(busy, match="interrupt")
    woken.store.close()


def test_a_ping_pong_on_one_poll_thread_does_not_keep_the_queue_waiting(guest: Guest) -> None:
    """Two calls waking each other in turn stay on one thread, but a call
    queued meanwhile runs next, not once the pair yields: a woken call goes
    behind the calls queued before it."""
    mailboxes = Mailboxes()
    cap = 2_000
    exchanges = {"count": 0}
    at_other_end: list[int] = []
    ten_exchanges, other_ended, pair_stopped = (threading.Event() for _ in range(3))

    def on_send(_target: str, body: str, _timeout: int | None) -> tuple[bool, str]:
        sender = current_future()
        assert sender is not None
        if sender.data not in ("a", "b"):  # (the spinning call's progress)
            return True, json.dumps({"id": "m", "to": "progress"})
        partner = "b" if sender.data == "a" else "a"
        exchanges["count"] += 1
        if exchanges["count"] == 10:
            ten_exchanges.set()
        answer = "stop" if exchanges["count"] >= cap or other_ended.is_set() else body
        mailboxes.take(partner).resolve(envelope(answer))
        return True, json.dumps({"id": "m", "to": partner})

    def on_done(future: CallFuture[Any]) -> None:
        if future.data == "other":
            at_other_end.append(exchanges["count"])
            other_ended.set()
        else:
            pair_stopped.set()

    linker = guest.linker(mailboxes, on_send)
    pair = [guest.start(linker, "echo_forever", data=key) for key in ("a", "b")]
    other = guest.start(linker, "spin", 1, 1_000, data="other")
    with Poller(threads=1) as poller:
        for future in pair:
            poller.submit(future, on_done)
        mailboxes.wait_for(2)
        until_waiting(poller, *pair)
        mailboxes.take("a").resolve(envelope("ping"))
        assert ten_exchanges.wait(60)
        poller.submit(other, on_done)
        at_submit = exchanges["count"]
        assert other_ended.wait(60)
        assert pair_stopped.wait(60)  # one of the pair took "stop"
        mailboxes.wait_for(1)
        [last] = mailboxes.waiting
        mailboxes.take(last).resolve(envelope("stop"))
    # (It ran once the exchange under way, if any, had ended.)
    assert at_other_end and at_other_end[0] - at_submit <= 2, (at_submit, at_other_end)
    for future in [*pair, other]:
        future.store.close()


def test_a_call_handed_to_a_busy_poll_thread_is_queued_at_the_next_flush(guest: Guest) -> None:
    """A waker whose poll does not return (slow host work here) does not
    keep the call it woke: the second flush_handed (each epoch tick makes
    one) queues it, and another poll thread runs it."""
    mailboxes = Mailboxes()
    in_send, woken_ended, sender_ended = (threading.Event() for _ in range(3))

    def on_send(_target: str, body: str, _timeout: int | None) -> tuple[bool, str]:
        mailboxes.take("woken").resolve(envelope(json.loads(body)))
        in_send.set()
        assert woken_ended.wait(60)  # (the slow host work: until the woken call ended)
        return True, json.dumps({"id": "m", "to": "woken"})

    def on_done(future: CallFuture[Any]) -> None:
        (woken_ended if future.data == "woken" else sender_ended).set()

    with Poller(threads=2) as poller:
        sender, woken = sender_pinged(guest, poller, mailboxes, on_send, on_done)
        assert in_send.wait(60)
        poller.flush_handed()  # the first sees it there
        assert not woken_ended.is_set()
        poller.flush_handed()  # the second queues it
        assert woken_ended.wait(60)
        sender_stopped(mailboxes, sender_ended, sender, woken)


def test_a_poller_starts_its_threads_as_calls_need_them(guest: Guest) -> None:
    linker = guest.linker(lambda _timeout: envelope("at once"))
    ended = threading.Semaphore(0)
    with Poller(threads=3) as poller:
        assert poller.threads == 0
        alone = guest.start(linker, "echo", data="alone")
        poller.submit(alone, lambda _future: ended.release())
        assert ended.acquire(timeout=60)
        assert poller.threads == 1  # (nothing else wanted a thread meanwhile)
        busy = [guest.start(linker, "spin", 4, 20_000, data=key) for key in range(6)]
        for future in busy:
            poller.submit(future, lambda _future: ended.release())
        for _ in busy:
            assert ended.acquire(timeout=60)
        assert 1 < poller.threads <= 3
    for future in [alone, *busy]:
        future.store.close()


def test_a_store_told_to_yield_soon_yields_until_told_otherwise(guest: Guest) -> None:
    linker = guest.linker(lambda _timeout: envelope(None))
    soon = guest.start(linker, "spin", 2, 10_000, data="soon")
    soon.store.yield_soon(50_000)
    assert soon.poll() is False and not soon.blocked  # it yielded
    soon.store.yield_as_set()  # (it never yields on its own)
    assert soon.poll() is True
    assert ended_with(soon) == sum(range(10_000)) * 2


def test_a_failure_handing_on_a_calls_end_is_logged_and_the_poller_goes_on(
    guest: Guest, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    linker = guest.linker(lambda _timeout: envelope("at once"))
    futures = [guest.start(linker, "echo", data=key) for key in range(2)]
    second_ended = threading.Event()

    def on_done(future: CallFuture[Any]) -> None:
        if future is futures[0]:
            raise LookupError("a bug in on_done")
        second_ended.set()

    with Poller(threads=1) as poller:
        poller.submit(futures[0], on_done)
        poller.submit(futures[1], on_done)
        assert second_ended.wait(60)
    [record] = [r for r in caplog.records if r.name == "capsule.sandbox"]
    assert record.exc_info is not None and record.exc_info[0] is LookupError
    assert capfd.readouterr().err == ""
    for future in futures:
        future.store.close()


# -- the fiber's stack ---------------------------------------------------------------


def test_deep_json_in_an_async_import_does_not_overflow_the_fiber(guest: Guest) -> None:
    depth = 20_000
    document = "[" * depth + "]" * depth
    parsed: list[int] = []
    pendings: list[Pending] = []

    def measure(value: Any) -> int:
        levels = 0
        while value:
            value, levels = value[0], levels + 1
        return levels

    def receive(_timeout: int | None) -> Pending:
        # The host's Python runs on the call's fiber: the C parser recurses
        # once per level (a 2 MiB fiber aborted the process here).
        parsed.append(measure(json.loads(document)))
        pending = Pending()
        pendings.append(pending)
        return pending

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 1_000)
    try:
        future = guest.start(guest.linker(receive), "echo", data="g")
        assert future.poll() is False
    finally:
        sys.setrecursionlimit(limit)
    assert parsed == [depth - 1]
    pendings[0].resolve(envelope("deep"))
    assert future.poll() is True
    assert ended_with(future)["got"] == "deep"


# -- fuel yields ------------------------------------------------------------------


def _race(guest: Guest, fuel_yield_interval: int | None) -> dict[Any, int]:
    """Four busy calls on one poll thread: how far each had got when the first ended."""
    calls, chunks, steps = 4, 8, 100_000
    first: dict[Any, int] = {}
    ended = threading.Event()
    linker = guest.linker(lambda _timeout: envelope(None))

    def on_done(future: CallFuture[Any]) -> None:
        if not first:
            first.update({key: len(guest.sent.get(key, [])) for key in range(calls)})
        assert ended_with(future) == chunks * steps * (steps - 1) // 2
        if all(len(guest.sent.get(key, [])) == chunks for key in range(calls)):
            ended.set()

    guest.sent.clear()
    futures = [
        guest.start(
            linker, "spin", chunks, steps, data=key, fuel_yield_interval=fuel_yield_interval
        )
        for key in range(calls)
    ]
    with Poller(threads=1) as poller:
        for future in futures:
            poller.submit(future, on_done)
        assert ended.wait(300)
    return first


def test_an_epoch_deadline_still_stops_a_busy_call(guest: Guest) -> None:
    linker = guest.linker(lambda _timeout: envelope(None))
    future = guest.start(linker, "spin", 1_000, 100_000, data="h", fuel_yield_interval=1_000_000)
    assert future.poll() is False  # (it yielded: busy)
    guest.engine.increment_epoch()  # its deadline (one tick) passes
    while not future.poll():
        pass
    failed(future, match="interrupt")


def test_busy_calls_take_turns_under_fuel_yields(guest: Guest) -> None:
    assert_busy_calls_take_turns(partial(_race, guest), without_yields=None)


# -- many calls on few threads ---------------------------------------------------------


def test_thousands_of_waiting_calls_hold_no_thread_each(guest: Guest) -> None:
    count, poll_threads = 2_000, 2
    mailboxes = Mailboxes()
    linker = guest.linker(mailboxes)
    ended: list[CallFuture[Any]] = []
    all_ended = threading.Event()

    def on_done(future: CallFuture[Any]) -> None:
        ended.append(future)
        if len(ended) == count:
            all_ended.set()

    gc.collect()
    threads_before, private_before = os_threads(), private_bytes()
    active_before = threading.active_count()
    futures = []
    with Poller(threads=poll_threads) as poller:
        for key in range(count):
            future = guest.start(linker, "echo", data=key)
            futures.append(future)
            poller.submit(future, on_done)
        mailboxes.wait_for(count)
        assert all(future.blocked for future in futures)
        threads = os_threads()
        private = private_bytes()
        assert threading.active_count() <= active_before + poll_threads
        assert threads <= threads_before + poll_threads, (threads_before, threads)
        per_call = (private - private_before) / count
        print(
            f"\n{count} suspended calls: {per_call / 1024**2:.2f} MB private each, {threads} threads"
        )
        assert per_call < 8 * 1024**2

        # Half woken with a message of their own, half cancelled.
        started = time.perf_counter()
        for key in range(0, count, 2):
            mailboxes.take(key).resolve(envelope({"n": key}, sender=f"s{key}"))
        for key in range(1, count, 2):
            poller.cancel(futures[key])
        assert all_ended.wait(600)
        print(f"woken or cancelled, and ended: {time.perf_counter() - started:.2f} s")
        assert len(poller) == 0

    for key, future in enumerate(futures):
        if key % 2:
            with pytest.raises(CallCancelled):
                future.result()
            future.store.close()
        else:
            assert ended_with(future) == {"got": {"n": key}, "from": f"s{key}"}
    assert not mailboxes.waiting.keys() - set(range(1, count, 2))
    assert not wasm_async._PENDING_BY_KEY
