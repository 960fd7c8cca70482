"""Task attempts in the sandbox's async mode (capsule.sandbox.async_sandbox):
`python3 benchmarks/async_sandbox.py [--attempts 1000] [--poll-threads 2]`
prints, for attempts of a real program that wait in ``receive``:

- the time to start them all until each waits (instances prepared on the
  starting thread, as when the pool is empty);
- the private memory each waiting attempt holds (as /proc/self/smaps_rollup
  counts it), then once each hibernated, and the process's threads before
  and after;
- the time to wake them all with a message and have each end.
Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capsule.sandbox.async_sandbox import AsyncSandbox  # noqa: E402
from tests.test_async_sandbox import (  # noqa: E402
    PROGRAM,
    Ended,
    Host,
    Waits,
    args,
    invocation,
    os_threads,
    private_bytes,
    run,
    until,
)


def measure(attempts: int, poll_threads: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "prog.py").write_text(PROGRAM)
        host = Host()
        with AsyncSandbox([root], poll_threads=poll_threads) as sandbox:
            waits, ended = Waits(sandbox, host), Ended()
            run(sandbox, waits, invocation("warm", "hello", host), args("warm"))
            gc.collect()
            threads_before, private_before = os_threads(), private_bytes()
            started = time.perf_counter()
            started_attempts = [
                sandbox.start(invocation(f"a{key}", "echo", host), "prog", args(), waits, ended)
                for key in range(attempts)
            ]
            waits.wait_receiving(attempts)
            start_s = time.perf_counter() - started
            private = (private_bytes() - private_before) / attempts
            threads = os_threads()
            released = 0
            for attempt in started_attempts:
                released += until(lambda attempt=attempt: sandbox.hibernate_waiting(attempt))
            hibernated = (private_bytes() - private_before) / attempts
            started = time.perf_counter()
            for key in range(attempts):
                waits.deliver(f"a{key}", key)
            ended.wait_for(attempts)
            wake_s = time.perf_counter() - started
    print(f"{attempts} attempts waiting in receive, {poll_threads} poll threads:")
    print(f"  started and waiting: {start_s:.2f} s ({start_s / attempts * 1e3:.2f} ms each)")
    print(f"  private memory each: {private / 1024**2:.2f} MB")
    print(
        f"  hibernated:          {hibernated / 1024**2:.2f} MB each "
        f"({released / attempts / 1024**2:.2f} MB given back each)"
    )
    print(f"  threads: {threads_before} before, {threads} while they wait")
    print(f"  woken and ended:     {wake_s:.2f} s ({wake_s / attempts * 1e3:.2f} ms each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=1000)
    parser.add_argument("--poll-threads", type=int, default=2)
    options = parser.parse_args()
    measure(options.attempts, options.poll_threads)


if __name__ == "__main__":
    main()
