"""Actors blocked in receive, for measuring what an idle actor costs the host.

main sleeps first (the benchmark samples the baseline), then starts the actors
and sleeps again while they all wait (the benchmark samples again)."""

import capsule
from capsule import receive, task


@task(compute="LOW")
def idle() -> None:
    receive()


@task(name="main", compute="HIGH", timeout="10m")
def main(actors: str = "50", pause: str = "2") -> int:
    capsule.sleep(float(pause))
    handles = [idle.spawn() for _ in range(int(actors))]
    capsule.sleep(float(pause))
    return len(handles)  # returning cancels the idle actors
