"""Calls into the guest runtime as futures (capsule.sandbox.wasm_async):
`python3 benchmarks/wasm_async.py [--calls 1000]` prints, as medians of a few
rounds, what a call waiting in an async import costs:

- the private memory each waiting call holds (its instance), and the threads;
- waking every waiting call with a message and running it to its end, on one
  and on two poll threads;
- a poll of a waiting call (nothing to run);
- a resume: the answer lowered, the guest takes the message, sends it on and
  waits again.
Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capsule.sandbox.poller import Poller  # noqa: E402
from capsule.sandbox.wasm_async import CallFuture  # noqa: E402
from tests.test_wasm_async import (  # noqa: E402
    Guest,
    Mailboxes,
    envelope,
    make_guest,
    os_threads,
    private_bytes,
)


def waiting_calls(guest: Guest, count: int, poll_threads: int) -> dict[str, float]:
    mailboxes = Mailboxes()
    linker = guest.linker(mailboxes)
    ended = threading.Semaphore(0)
    gc.collect()
    private_before = private_bytes()
    with Poller(threads=poll_threads) as poller:
        futures = []
        for key in range(count):
            future = guest.start(linker, "echo", data=key)
            futures.append(future)
            poller.submit(future, lambda _future: ended.release())
        mailboxes.wait_for(count)
        private = private_bytes() - private_before
        threads = os_threads()
        started = time.perf_counter()
        for key in range(count):
            mailboxes.take(key).resolve(envelope(key))
        for _ in range(count):
            ended.acquire()
        woken = time.perf_counter() - started
    for future in futures:
        future.result()
        future.store.close()
    return {
        "private_mb_per_call": private / count / 1024**2,
        "threads": threads,
        "wake_and_finish_s": woken,
    }


def poll_and_resume(guest: Guest, rounds: int) -> dict[str, float]:
    mailboxes = Mailboxes()
    future: CallFuture[Any] = guest.start(guest.linker(mailboxes), "echo_forever", data="r")
    assert future.poll() is False
    started = time.perf_counter()
    for _ in range(rounds):
        future.poll()
    poll_us = (time.perf_counter() - started) / rounds * 1e6
    started = time.perf_counter()
    for body in range(rounds):
        mailboxes.take("r").resolve(envelope(body))
        assert future.poll() is False
    resume_us = (time.perf_counter() - started) / rounds * 1e6
    mailboxes.take("r").resolve(envelope("stop"))
    assert future.poll() is True
    future.store.close()
    return {"poll_us": poll_us, "resume_us": resume_us}


def median(rounds: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    results = [measure() for _ in range(rounds)]
    return {key: statistics.median(result[key] for result in results) for key in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="waiting calls (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (default 3)")
    options = parser.parse_args()
    guest = make_guest()
    for poll_threads in (1, 2):
        figures = median(
            options.rounds, lambda n=poll_threads: waiting_calls(guest, options.calls, n)
        )
        print(
            f"{options.calls} waiting calls, {poll_threads} poll thread(s): "
            f"{figures['private_mb_per_call']:.2f} MB private each, "
            f"{figures['threads']:.0f} threads in the process; "
            f"all woken and ended in {figures['wake_and_finish_s']:.2f} s"
        )
    figures = median(options.rounds, lambda: poll_and_resume(guest, 2000))
    print(
        f"a poll of a waiting call: {figures['poll_us']:.1f} us; "
        f"a resume (message taken, sent on, waiting again): {figures['resume_us']:.0f} us"
    )


if __name__ == "__main__":
    main()
