"""8 identical CPU-bound tasks at once: how evenly do they share the cores?"""

import time

from capsule import task


@task(compute="HIGH", timeout="10m")
def burn(iterations: int) -> list:
    started = time.monotonic()
    total = 0
    for i in range(iterations):
        total += i
    return [started, time.monotonic()]


@task(name="main", compute="HIGH", timeout="10m")
def main(tasks: str = "8", iterations: str = "3000000") -> list:
    return burn.map([int(iterations)] * int(tasks))
