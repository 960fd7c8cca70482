"""A task calls a trivial child N times in a row; per-call times measured in the guest."""

import time

from capsule import task


@task(compute="LOW")
def child(i: int) -> int:
    return i


@task(name="main", compute="HIGH")
def main(n: str = "200") -> dict:
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
