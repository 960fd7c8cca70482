"""100 children via map versus the same 100 called one by one."""

import time

from capsule import task


@task(compute="HIGH")
def work(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


@task(name="main", compute="HIGH", timeout="10m")
def main(children: str = "100", iterations: str = "100000") -> dict:
    n, size = int(children), int(iterations)
    started = time.perf_counter()
    one_by_one = [work(size) for _ in range(n)]
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    mapped = work.map([size] * n)
    parallel = time.perf_counter() - started
    assert mapped == one_by_one
    return {"one_by_one_s": sequential, "map_s": parallel, "speedup": sequential / parallel}
