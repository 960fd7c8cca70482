"""Actors blocked in receive, then woken together: what benchmarks/actors.py
measures.

main spawns the actors, each of which waits for one message, then waits itself
for a message from outside the run (`capsule send RUN_ID main ...`, which the
benchmark sends once it has measured every actor waiting). It then sends each
actor a message and returns once every one has taken it and ended."""

from capsule import gather, receive, send, task


@task(compute="LOW", timeout="1h")
def actor() -> int:
    receive()
    return 1


@task(name="main", compute="HIGH", timeout="1h")
def main(actors: str = "1000") -> dict:
    handles = [actor.spawn() for _ in range(int(actors))]
    receive()  # the benchmark's go-ahead
    for handle in handles:
        send(handle, "wake")
    return {"woken": sum(gather(*handles))}
