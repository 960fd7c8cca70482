"""Journaled steps in a row (guest clock reads), then an optional pause that a
benchmark kills the run in, to time a resume that replays them all."""

import time

from capsule import sleep, task


@task(name="main", compute="HIGH", timeout="10m")
def main(steps: str = "10000", pause: str = "0") -> dict:
    started = time.time()
    for _ in range(int(steps)):
        time.time()
    elapsed = time.time() - started
    print("steps done", flush=True)
    sleep(float(pause))
    return {"steps_per_s": int(steps) / elapsed}
