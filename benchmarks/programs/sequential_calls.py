"""A task calls a trivial child N times in a row; per-call times measured in the guest.

``wait`` seconds pass first (to let a large instance pool fill, in the
diagnostic that measures the call path alone)."""

import time

from capsule import task


@task(compute="LOW")
def child(i: int) -> int:
    return i


@task(name="main", compute="HIGH", timeout="5m")
def main(n: str = "200", wait: str = "0") -> dict:
    time.sleep(float(wait))
    times = []
    for i in range(int(n)):
        start = time.perf_counter()
        child(i)
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "calls": len(times),
        "p50_ms": times[len(times) // 2] * 1000,
        "p95_ms": times[int(len(times) * 0.95)] * 1000,
    }
