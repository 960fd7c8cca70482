"""Messages between two actors: a one-way stream, and ask/reply ping-pong."""

import time

from capsule import ask, receive, send, task


@task(compute="HIGH", timeout="10m")
def sink(count: int) -> int:
    for _ in range(count):
        receive()
    return count


@task(compute="HIGH", timeout="10m")
def ponger(count: int) -> None:
    for _ in range(count):
        message = receive()
        message.reply(message.body)


@task(name="main", compute="HIGH", timeout="10m")
def main(count: str = "5000") -> dict:
    n = int(count)
    target = sink.spawn(n)
    started = time.perf_counter()
    for i in range(n):
        send(target, i)
    target.result()
    one_way = n / (time.perf_counter() - started)
    partner = ponger.spawn(n // 5)
    started = time.perf_counter()
    for i in range(n // 5):
        ask(partner, i)
    round_trips = (n // 5) / (time.perf_counter() - started)
    return {"one_way_per_s": one_way, "ask_reply_per_s": round_trips}
