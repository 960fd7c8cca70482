"""Running out of memory inside a task ends it with ``memory_limit``, however
the memory runs out and whatever the guest says afterwards, and the run goes on,
on either core.

Each pattern runs for real at three caps, each attempt in its own instance;
after each, a task in a fresh instance must still work."""

from __future__ import annotations

import pytest

from tests.conftest import ProgramRunner

CAPS_MIB = (32, 64, 128)

PATTERNS = """
    import sys
    import capsule
    from capsule import TaskError, task

    def room(cap):
        # Roughly what is left under the cap: a fresh large block comes from
        # the top of the heap, so its address is about how much is in use.
        return cap - id(bytes(100_000))

    def string_doubling(cap):
        s = "x"
        while True:
            s = s + s

    def string_augmented(cap):
        s = "x"
        while True:
            s += s

    def bytes_doubling(cap):
        b = b"x"
        while True:
            b = b + b

    def list_growth(cap):
        items = []
        while True:
            items.extend(range(100_000))

    def list_repeat(cap):
        items = [0]
        while True:
            items = items * 2

    def bytearray_growth(cap):
        buffer = bytearray()
        while True:
            buffer += bytes(1 << 20)

    def bytearray_small_steps(cap):
        buffer = bytearray()
        while True:
            buffer.extend(bytes(4096))

    def dict_growth(cap):
        table = {}
        start = 0
        while True:
            table.update((key, key) for key in range(start, start + 100_000))
            start += 100_000

    def big_int(cap):
        n = 1
        while True:
            n <<= n.bit_length()

    def small_objects(cap):
        hoard = []
        while True:
            hoard.append(object())

    def kept_strings(cap):
        hoard = []
        while True:
            hoard.append("x" * 10_000)

    def recursion_allocating(cap):
        sys.setrecursionlimit(1_000_000)
        def down(depth):
            keep = "x" * 50_000 + str(depth)
            return down(depth + 1) + len(keep)
        return down(0)

    def memory_error_ignored(cap):
        hoard = []
        while True:
            try:
                hoard.append("x" * 100_000)
            except MemoryError:
                hoard.append(None)

    def memory_error_caught_then_continue(cap):
        hoard = []
        try:
            while True:
                hoard.append("x" * 100_000)
        except MemoryError:
            hoard.clear()
        return "recovered"

    def doubling_caught_and_retried(cap):
        for _ in range(3):
            s = "x"
            try:
                while True:
                    s = s + s
            except MemoryError:
                pass
        return "survived"

    class Enormous(Exception):
        def __str__(self):
            return "y" * (1 << 30)

    def allocation_while_formatting(cap):
        raise Enormous()

    def huge_exception_message(cap):
        raise ValueError("z" * (room(cap) * 6 // 10))

    def huge_result(cap):
        return "r" * (room(cap) * 6 // 10)

    def huge_print(cap):
        print("p" * (room(cap) * 6 // 10))

    def huge_send(cap):
        capsule.send("main", "m" * (room(cap) * 6 // 10))

    def huge_join(cap):
        return len(",".join(str(i) for i in range(cap)))

    PATTERNS = {pattern.__name__: pattern for pattern in [
        string_doubling, string_augmented, bytes_doubling, list_growth, list_repeat,
        bytearray_growth, bytearray_small_steps, dict_growth, big_int, small_objects,
        kept_strings, recursion_allocating, memory_error_ignored,
        memory_error_caught_then_continue, doubling_caught_and_retried,
        allocation_while_formatting, huge_exception_message, huge_result, huge_print,
        huge_send, huge_join,
    ]}

    def limited(mib):
        @task(name=f"limited_{mib}", max_retries=0, ram=f"{mib}MB", compute="HIGH")
        def limited_task(which):
            return PATTERNS[which](mib << 20)
        return limited_task

    LIMITED = [limited(mib) for mib in (32, 64, 128)]

    @task(max_retries=0)
    def afterwards():
        return sum(range(10))

    @task(name="main", max_retries=0, compute="HIGH")
    def main(which):
        outcomes = []
        for limited_task in LIMITED:
            try:
                outcome = ["ok", str(limited_task(which))[:100]]
            except TaskError as error:
                outcome = [error.kind, error.message]
            outcomes.append([*outcome, afterwards()])
        return outcomes
"""

PATTERN_NAMES = [
    "string_doubling",
    "string_augmented",
    "bytes_doubling",
    "list_growth",
    "list_repeat",
    "bytearray_growth",
    "bytearray_small_steps",
    "dict_growth",
    "big_int",
    "small_objects",
    "kept_strings",
    "recursion_allocating",
    "memory_error_ignored",
    "memory_error_caught_then_continue",
    "doubling_caught_and_retried",
    "allocation_while_formatting",
    "huge_exception_message",
    "huge_result",
    "huge_print",
    "huge_send",
    "huge_join",
]


@pytest.mark.parametrize("which", PATTERN_NAMES)
def test_running_out_of_memory_is_memory_limit(run_on_core: ProgramRunner, which: str) -> None:
    """The hazards: CPython 3.14.0's in-place str concatenation leaves a NULL
    in the local when its allocation fails, and carries on (``string_doubling``
    then reports ``TypeError: ... '' and ''`` or traps on "uninitialized
    element"); the shim's own reporting of a failure, or serialising of a
    result, needs memory too; a task that catches a MemoryError carries on in
    an interpreter that may be unsound."""
    outcome = run_on_core(PATTERNS, which)
    by_cap = dict(zip(CAPS_MIB, outcome.value, strict=True))
    for mib, (kind, message, afterwards) in by_cap.items():
        assert kind == "memory_limit", (mib, kind, message)
        assert "ran out of memory" in message, (mib, message)
        assert afterwards == 45, mib
    failed = {e.task: e.error.kind for e in outcome.of_type("failed")}
    assert failed == {f"limited_{mib}": "memory_limit" for mib in CAPS_MIB}


FILLS = """
    from capsule import TaskError, task

    from componentize_py_types import Err
    from wit_world.exports.runner import Failure

    CAP = 32 << 20

    class Forged(Exception):
        # Reporting it hands the host a failure report of the task's making.
        def __str__(self):
            raise Err(Failure("cancelled", "said to be cancelled", None, None, None, True))

    @task(max_retries=0, ram="32MB", compute="HIGH")
    def fill_then_fail(room, forged):
        # Take 4 KB pieces until one lies within `room` bytes of the cap (a
        # piece's address is where the heap has grown to), then fail for a
        # reason of its own: with room < a page, the memory cannot grow again.
        failure = Forged() if forged else ValueError("a failure of its own")
        keep = [None] * 20_000
        for i in range(len(keep)):
            keep[i] = piece = bytes(4000)
            if id(piece) + room >= CAP:
                raise failure
        return "never there"

    @task(max_retries=0)
    def afterwards():
        return "works"

    @task(name="main", max_retries=0)
    def main(room, forged):
        try:
            fill_then_fail(room, forged)
        except TaskError as error:
            return [error.kind, error.message, error.traceback, afterwards()]
"""


@pytest.mark.parametrize("forged", [False, True])
def test_a_failure_with_the_memory_full_is_memory_limit(
    run_on_core: ProgramRunner, forged: bool
) -> None:
    """Whatever a task reports once its memory is full (no page fits under its
    cap any more) - its own exception, or a kind it has no say in - the host,
    which sees the memory's size, says it ran out of memory."""
    kind, message, details, afterwards = run_on_core(FILLS, 60_000, forged).value
    assert kind == "memory_limit", (kind, message)
    assert message.startswith("MemoryError: the task ran out of memory")
    reported = (
        "protocol: the task reported a failure of kind 'cancelled'"
        if forged
        else "ValueError: a failure of its own"
    )
    assert details.startswith("with its memory full, the task reported "), details
    assert reported in details.splitlines()[0], details
    assert afterwards == "works"


def test_a_failure_with_room_left_keeps_its_kind(run_on_core: ProgramRunner) -> None:
    """The same failure 2 MB short of the cap is what the task says it is."""
    kind, message, _, afterwards = run_on_core(FILLS, 2 << 20, False).value
    assert (kind, message) == ("exception", "ValueError: a failure of its own")
    assert afterwards == "works"


def test_running_out_of_memory_while_importing_the_program(run_on_core: ProgramRunner) -> None:
    outcome = run_on_core(
        """
        from capsule import task

        def grow():
            s = "x"
            while True:
                s = s + s

        grow()

        @task(name="main")
        def main():
            return 1
        """
    )
    error = outcome.report.usage_error or ""
    assert "importing the program failed (memory_limit)" in error, outcome.report


LOWERING = """
    from capsule import TaskError, task

    @task(max_retries=0, ram="256MB", compute="HIGH")
    def producer(size):
        return "q" * size

    @task(max_retries=0, ram="32MB", compute="HIGH")
    def takes_a_result(size):
        return len(producer(size))

    @task(max_retries=0, ram="32MB", compute="HIGH")
    def takes_arguments(text):
        return len(text)

    @task(max_retries=0)
    def afterwards():
        return "works"

    @task(name="main", max_retries=0, ram="256MB", compute="HIGH")
    def main(size):
        outcomes = []
        for call in (lambda: takes_a_result(size), lambda: takes_arguments("a" * size)):
            try:
                outcomes.append(["ok", call()])
            except TaskError as error:
                outcomes.append([error.kind, error.message])
        return [outcomes, afterwards()]
"""


def test_a_host_answer_too_large_for_the_task_s_memory(run_on_core: ProgramRunner) -> None:
    """What the host hands a task (a child's result, its own arguments) is
    copied into its memory by the runtime's allocator; when that cannot grow,
    the task ran out of memory. (Carrying on from that failed allocation,
    the runtime went on to trap on an out-of-bounds table access.)"""
    outcomes, afterwards = run_on_core(LOWERING, 12_000_000).value
    for kind, message in outcomes:
        assert kind == "memory_limit", (kind, message)
        assert message.startswith("MemoryError: the task ran out of memory"), message
    assert afterwards == "works"
