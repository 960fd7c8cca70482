"""Every host import, called from a guest with random and malformed arguments
(the raw WIT imports, past the SDK): the host answers each or fails the task
that called it, never fails itself, and a run afterwards works; on either core.

The guest draws its calls from a seeded generator, so a failure names the
seed that reproduces it. CI runs a few seeds; CAPSULE_FUZZ_SEEDS=N runs more.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from tests.conftest import capsule_cli
from tests.security.support import core_flags

SEEDS = int(os.environ.get("CAPSULE_FUZZ_SEEDS", "6"))

FUZZER = """
import json
import os
import random
import time

import capsule
from capsule import TaskError, task
from wit_world.imports import clock, http, messaging, modules, operations, output, tasks

IMPORTS = [
    "modules.find", "modules.offer_compiled", "tasks.call", "tasks.spawn", "tasks.wait",
    "tasks.wait_any", "tasks.cancel", "tasks.sleep", "messaging.send", "messaging.receive", "messaging.ask",
    "messaging.reply", "output.write", "clock.monotonic_ns", "http.request",
    "operations.start_http", "operations.start_wait", "operations.start_receive",
    "operations.start_ask", "operations.poll", "operations.abandon",
    "wasi.random", "wasi.clock",
]

FRAGMENTS = [
    "", "main", "echo", "main/1", "main/1#1", "nobody", "NaN", "Infinity", "-Infinity",
    "1e999", "null", "[]", "{}", '{"args": [], "kwargs": {}}', '{"args": [1], "kwargs": {}}',
    '{"args": "x", "kwargs": []}', '{"actor_name": "a", "awaited": true}', '{"link": true}',
    '{"actor_name": null}', '["main/1", "main/2"]', '"\\\\ud800"', '"\\\\udfff x"',
    '{"a": 1, "a": 2}', "[" * 300 + "]" * 300, '{"x": ' * 150 + "1" + "}" * 150,
    "1" * 5000, '{"method": "GET", "url": "http://127.0.0.1:1/", "headers": [], "body": ""}',
    '{"method": "GET", "url": "file:///etc/passwd"}', '{"method": "CONNECT", "url": 1}',
    '{"url": "http://u:p@[::1/x", "method": "GET"}', "\\x1b]52;c;AAAA\\x07", "a\\x00b",
    "../../etc/passwd", "os", "capsule", "encodings.idna", "x." * 200, "é漢😀",
]


def text(rng):
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(FRAGMENTS)
    if roll < 0.6:
        return "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(40)))
    if roll < 0.7:  # any code point but surrogates (which WIT strings cannot carry)
        points = [rng.randrange(0x110000) for _ in range(rng.randrange(20))]
        return "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)
    if roll < 0.78:
        return rng.choice(FRAGMENTS) + rng.choice(FRAGMENTS)
    if roll < 0.84:
        return json.dumps(rng.choice([[], {}, [1, "x"], {"args": [], "kwargs": {}}, None]))
    if roll < 0.9:
        return "x" * rng.choice([1024, 65536, 1 << 20])
    fragment = rng.choice(FRAGMENTS)
    cut = rng.randrange(len(fragment) + 1)
    return fragment[:cut]


def small_ms(rng):
    return rng.choice([None, 0, 1, 5, 20]) if rng.random() < 0.5 else rng.randrange(0, 30)


def call_one(rng, name):
    if name == "modules.find":
        return modules.find(text(rng))
    if name == "modules.offer_compiled":
        return modules.offer_compiled(text(rng), text(rng))
    if name == "tasks.call":
        return tasks.call(rng.choice(["echo", "nope", text(rng)]), text(rng))
    if name == "tasks.spawn":
        return tasks.spawn(rng.choice(["echo", "nope", text(rng)]), text(rng), text(rng))
    if name == "tasks.wait":
        return tasks.wait(text(rng), rng.choice([0, 1, 10]))
    if name == "tasks.wait_any":
        return tasks.wait_any(text(rng), rng.choice([0, 1, 10]))
    if name == "tasks.cancel":
        return tasks.cancel(text(rng))
    if name == "tasks.sleep":
        return tasks.sleep(rng.randrange(0, 5))
    if name == "messaging.send":
        return messaging.send(text(rng), text(rng), rng.choice([0, 1, 10]))
    if name == "messaging.receive":
        return messaging.receive(rng.choice([0, 1, 5]))
    if name == "messaging.ask":
        return messaging.ask(text(rng), text(rng), rng.choice([0, 1, 10]))
    if name == "messaging.reply":
        return messaging.reply(text(rng), text(rng))
    if name == "output.write":
        stream = rng.choice([output.OutputStream.STDOUT, output.OutputStream.STDERR])
        return output.write(stream, text(rng))
    if name == "clock.monotonic_ns":
        return clock.monotonic_ns()
    if name == "http.request":
        return http.request(text(rng))
    if name == "operations.start_http":
        return operations.start_http(text(rng))
    if name == "operations.start_wait":
        return operations.start_wait(text(rng))
    if name == "operations.start_receive":
        return operations.start_receive()
    if name == "operations.start_ask":
        return operations.start_ask(text(rng), text(rng))
    if name == "operations.poll":
        return operations.poll(rng.choice([0, 1, 10]))
    if name == "operations.abandon":
        return operations.abandon(rng.choice([0, 1, 2, 64, 65, (1 << 64) - 1]))
    if name == "wasi.random":
        return os.urandom(rng.choice([0, 1, 64, 4096, 1 << 20, (1 << 20) + 1, 1 << 22]))
    if name == "wasi.clock":
        return time.time()
    raise ValueError(name)


@task(name="echo", timeout="5s", max_retries=0)
def echo(*args, **kwargs):
    return [args, kwargs]


@task(name="fuzz", timeout="20s", max_retries=0, ram="128MB")
def fuzz(seed, name, calls):
    rng = random.Random(f"{seed}:{name}")
    answered = refused = 0
    for _ in range(calls):
        try:
            call_one(rng, name)
            answered += 1
        except Exception:  # an error answer, or what the guest itself refused
            refused += 1
    return [answered, refused]


@task(name="main", timeout="10m", compute=10**13)
def main(seeds, calls):
    outcomes = []
    for seed in seeds:
        for name in IMPORTS:
            try:
                outcomes.append([seed, name, "ok", fuzz(seed, name, calls)])
            except TaskError as exc:
                outcomes.append([seed, name, exc.kind, exc.message[:300]])
    return {"outcomes": outcomes, "after": echo("still", alive=True)}
"""


def test_every_import_survives_random_and_malformed_calls(tmp_path: Path, core: str) -> None:
    program = tmp_path / "fuzzer.py"
    program.write_text(textwrap.dedent(FUZZER))
    done = capsule_cli(
        "run",
        str(program),
        "--json",
        "--args-json",
        json.dumps([list(range(SEEDS)), 12]),
        *core_flags(core),
        cwd=tmp_path,
        timeout=900,
    )
    assert 'Traceback (most recent call last):\n  File "/' not in done.stderr.replace(
        '"/0/', '"guest/'
    ), done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    value = json.loads(done.stdout)["result"]
    assert value["after"] == [["still"], {"alive": True}]
    host_failures = [
        outcome
        for outcome in value["outcomes"]
        if outcome[2] == "trap" and "host failed" in str(outcome[3])
    ]
    assert host_failures == [], host_failures
    kinds = {outcome[2] for outcome in value["outcomes"]}
    assert kinds <= {"ok", "protocol", "limit", "exception", "trap", "cancelled"}, kinds
    assert "protocol" in kinds  # (the fuzzer does reach the checks)
    # The journal of all that reads back, and a plain run in the same place works.
    inspected = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    json.loads(inspected.stdout)
    hello = tmp_path / "hello.py"
    hello.write_text('from capsule import task\n\n@task(name="main")\ndef main():\n    return 1\n')
    again = capsule_cli("run", str(hello), *core_flags(core), cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, "1\n"), again.stderr
