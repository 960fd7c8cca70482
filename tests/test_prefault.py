"""Prefaulting a fresh instance's memory (capsule/sandbox/prefault.py): the pages
a program's instances wrote are made a new instance's own before its guest runs,
without changing a byte of them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from capsule.sandbox import prefault
from capsule.sandbox.config import Limits
from capsule.sandbox.engine import Invocation, RefusingHost, Sandbox
from capsule.sandbox.prefault import Marker, Prefaulter, _pagemap, _populate_all

needs_prefault = pytest.mark.skipif(
    not prefault._supported(),
    reason="prefaulting needs Linux 6.11: pagemap, PROCMAP_QUERY, MADV_POPULATE_WRITE",
)
needs_release = pytest.mark.skipif(
    not prefault._kernel_can_release(), reason="releasing needs Linux's pagemap"
)


PAGES = 64
#: A program whose instances do next to nothing but import it.
RETURNS_ONE = """
    from capsule import task

    @task(name="main")
    def main():
        return 1
    """


def _own_pages(start: int, pages: int) -> set[int]:
    """Pages of the mapping at ``start`` that are present and private copies."""
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = _pagemap(pagemap.fileno(), start, start + pages * mmap.PAGESIZE)
    own = set()
    for page in range(pages):
        entry = int.from_bytes(entries[page * 8 : page * 8 + 8], "little")
        if entry >> 63 & 1 and not entry >> 61 & 1 and entry >> 56 & 1:
            own.add(page)
    return own


def _present_pages(start: int, pages: int) -> set[int]:
    """Pages of the mapping at ``start`` that are mapped (read or written)."""
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = _pagemap(pagemap.fileno(), start, start + pages * mmap.PAGESIZE)
    return {page for page in range(pages) if entries[page * 8 + 7] & 0x80}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.bin"
    path.write_bytes(b"".join(bytes([page]) * mmap.PAGESIZE for page in range(PAGES)))
    return path


@contextmanager
def instance(image: Path) -> Iterator[tuple[mmap.mmap, int]]:
    """A copy-on-write mapping of ``image``, as wasmtime maps an instance's memory."""
    with open(image, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE)
    view = (ctypes.c_char * len(mapping)).from_buffer(mapping)
    try:
        yield mapping, ctypes.addressof(view)
    finally:
        del view
        mapping.close()


@pytest.fixture
def prefaulter(image: Path) -> Iterator[Prefaulter]:
    prefaulter = Prefaulter(image)
    yield prefaulter
    prefaulter.close()


@needs_prefault
def test_a_fresh_mapping_gets_the_pages_two_samples_wrote_without_a_byte_changed(
    image: Path, prefaulter: Prefaulter
) -> None:
    written_by_sample = [{3, 5, 6, 40, 41}, {3, 5, 6, 40, 50}]
    for number in range(1, 5):
        with instance(image) as (mapping, start):
            memory = prefaulter.find("prog", live_instances=1)
            assert memory is not None and memory.start == start, (number, memory)
            assert memory.sample == (number in (2, 3))
            prefaulter.prefault(memory)
            if number == 4:
                # Before anything ran: the pages both samples wrote are its own,
                # and read as the image has them.
                assert _own_pages(start, PAGES) == {3, 5, 6, 40}
                assert all(mapping[page * mmap.PAGESIZE] == page for page in range(PAGES))
            elif memory.sample:
                for page in written_by_sample[number - 2]:
                    mapping[page * mmap.PAGESIZE] = 0xFF
                memory.ran = True
                prefaulter.closing(memory)
        prefaulter.unmapped(memory)
    assert prefaulter.learned_pages("prog") == 4
    assert prefaulter.prefaulted == 1


@needs_prefault
@pytest.mark.parametrize("one_call", [True, False], ids=["process_madvise", "madvise"])
def test_prefaulting_a_mapping_in_use_keeps_what_was_written(
    image: Path, one_call: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wrong guess (another instance's memory) must cost memory, never a value;
    # with all runs in one call or (kernels before 6.13) one call a run.
    monkeypatch.setattr(prefault, "_one_call", one_call)
    with instance(image) as (mapping, start):
        mapping[7 * mmap.PAGESIZE] = 0xAB  # written: a private copy
        assert mapping[9 * mmap.PAGESIZE] == 9  # read: the file's page, read-only
        assert _populate_all(start, [(0, 5), (5, PAGES - 5)]) == 0
        if one_call and not prefault._one_call:
            pytest.skip("this kernel has no process_madvise for MADV_POPULATE_WRITE (6.13)")
        assert mapping[7 * mmap.PAGESIZE] == 0xAB
        assert mapping[8 * mmap.PAGESIZE] == 8
        assert mapping[9 * mmap.PAGESIZE] == 9
        assert _own_pages(start, PAGES) == set(range(PAGES))


@needs_prefault
def test_a_mapping_something_ran_in_is_not_taken_for_a_new_one(
    image: Path, prefaulter: Prefaulter
) -> None:
    with instance(image) as (used, used_at), instance(image) as (_, fresh_at):
        _ = used[0]  # its "guest" ran: a page is mapped
        memory = prefaulter.find("prog", live_instances=2)
        assert memory is not None and memory.start == fresh_at != used_at
        assert prefaulter.find("prog", live_instances=2) is None  # the used one is left


@needs_prefault
def test_what_samples_wrote_while_importing_is_learned_before_any_ends(
    image: Path, prefaulter: Prefaulter
) -> None:
    # Actors waiting for messages may not end for a long time: the samples'
    # pages are learned once their import is done, not only at their end.
    written_by_sample = [{3, 5, 6, 40, 41}, {3, 5, 6, 40, 50}]
    with contextlib.ExitStack() as alive:  # (none of them ends)
        for number in range(1, 5):
            mapping, start = alive.enter_context(instance(image))
            memory = prefaulter.find("prog", live_instances=number)
            assert memory is not None and memory.start == start, (number, memory)
            prefaulter.prefault(memory)
            if memory.sample:
                for page in written_by_sample[number - 2]:
                    mapping[page * mmap.PAGESIZE] = 0xFF
            prefaulter.loaded(memory, None)
        assert _own_pages(start, PAGES) == {3, 5, 6, 40}
    assert prefaulter.learned_pages("prog") == 4
    assert prefaulter.prefaulted == 1


@needs_prefault
def test_instances_given_each_others_mapping_are_settled_by_their_markers(
    image: Path, prefaulter: Prefaulter
) -> None:
    # Two instances made at once by two threads: the first to look is given
    # the lowest fresh mapping, the other's, and the other its own; each
    # one's marker then says which mapping is its own.
    size = PAGES * mmap.PAGESIZE
    with instance(image) as (first, first_at), instance(image) as (second, second_at):
        given = [prefaulter.find("prog", live_instances=2) for _ in range(2)]
        assert [memory.start for memory in given if memory] == [second_at, first_at]
        address = 5 * mmap.PAGESIZE + 100
        for memory, own in zip(given, [first, second], strict=True):
            nonce = os.urandom(prefault.NONCE_SIZE)
            own[address : address + len(nonce)] = nonce  # its guest keeps it there
            assert memory is not None
            prefaulter.loaded(memory, Marker(address, nonce))
        assert [(m.start, m.end) for m in given if m] == [
            (first_at, first_at + size),
            (second_at, second_at + size),
        ]


@needs_prefault
def test_what_samples_wrote_until_they_hibernated_is_learned(
    image: Path, prefaulter: Prefaulter
) -> None:
    # An actor's task runs until it waits (for a message) and hibernates
    # there: the pages samples wrote by then are learned, beyond importing's.
    page = mmap.PAGESIZE
    written_by_sample = [{3, 5, 6, 40, 41}, {3, 5, 6, 40, 50}]
    with contextlib.ExitStack() as alive:  # (none of them ends)
        for number in range(1, 5):
            mapping, start = alive.enter_context(instance(image))
            memory = prefaulter.find("prog", live_instances=number)
            assert memory is not None and memory.start == start, (number, memory)
            prefaulter.prefault(memory)
            prefaulter.loaded(memory, None)  # (imported: nothing written yet)
            if memory.sample:
                nonce = os.urandom(prefault.NONCE_SIZE)
                mapping[20 * page : 20 * page + len(nonce)] = nonce
                for written in written_by_sample[number - 2]:
                    mapping[written * page] = 0xFF
                assert mapping[9 * page] == 9  # read: released
                assert prefaulter.release(memory, Marker(20 * page, nonce)) >= page
        assert _own_pages(start, PAGES) == {3, 5, 6, 20, 40}
    assert prefaulter.prefaulted == 1


@needs_prefault
def test_a_new_instance_is_found_among_many_alive(image: Path, prefaulter: Prefaulter) -> None:
    # Past SCAN_UP_TO_INSTANCES alive, the lowest mappings are looked at (the
    # kernel puts a new one below those made before it), not none of them.
    with contextlib.ExitStack() as alive:
        for _ in range(3):
            used, _ = alive.enter_context(instance(image))
            _ = used[0]  # its "guest" ran
        _, fresh_at = alive.enter_context(instance(image))
        many = prefault.SCAN_UP_TO_INSTANCES + 100
        memory = prefaulter.find("prog", live_instances=many)
        assert memory is not None and memory.start == fresh_at
        assert prefaulter.find("prog", live_instances=many) is None


@needs_prefault
def test_instances_that_never_end_are_prefaulted_even_with_many_alive(
    program: Callable[..., Path],
) -> None:
    path = program(RETURNS_ONE)
    alive = prefault.SCAN_UP_TO_INSTANCES + 16
    with Sandbox([path.parent]) as sandbox:
        prepared = [sandbox.prepare("prog") for _ in range(alive)]
        prefaulted = sandbox.prefaulter.prefaulted
        for each in prepared:
            each.store.close()
    # The 2nd and 3rd are samples (learned from as their import ends); from
    # the 4th on each is found and prefaulted, those past the 64th too.
    assert prefaulted >= alive - 8, prefaulted


@needs_prefault
def test_instances_of_a_program_are_prefaulted_once_learned(
    program: Callable[..., Path],
) -> None:
    path = program(
        """
        from capsule import task

        @task(name="main")
        def main(n):
            return sum(range(n))
        """
    )
    limits = Limits(fuel=10**10, ram_bytes=256 * 1024**2, timeout_s=30.0)
    with Sandbox([path.parent]) as sandbox:
        outcomes = [
            sandbox.invoke(
                Invocation(f"t{n}", "main", 1, 1, limits, RefusingHost()),
                "prog",
                json.dumps({"args": [n], "kwargs": {}}),
            )
            for n in range(10)
        ]
        learned = sandbox.prefaulter.learned_pages("prog")
        prefaulted = sandbox.prefaulter.prefaulted
    assert [outcome.result_json for outcome in outcomes] == [str(sum(range(n))) for n in range(10)]
    # Instances 2 and 3 are the samples; from the 4th on each is prefaulted.
    assert learned > 50, learned
    assert prefaulted >= 5, prefaulted


@needs_prefault
@pytest.mark.parametrize("sandboxes", [1, 2], ids=["one sandbox", "two sandboxes"])
def test_instances_made_at_once_by_several_threads_each_find_their_own_memory(
    program: Callable[..., Path], sandboxes: int
) -> None:
    # (Two sandboxes: two runs of a host application, each with a
    # prefaulter of its own, on the same memory image.)
    path = program(RETURNS_ONE)
    threads, per_thread = 4, 12
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(Sandbox([path.parent])) for _ in range(sandboxes)]
        for sandbox in opened:
            sandbox.prepare("prog").store.close()  # (the first compiles)
        prepared: list[Any] = []
        barrier = threading.Barrier(threads)

        def prepare_some(sandbox: Sandbox) -> None:
            barrier.wait()
            for _ in range(per_thread):
                prepared.append(sandbox.prepare("prog"))

        workers = [
            threading.Thread(target=prepare_some, args=(opened[number % sandboxes],))
            for number in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        found = [one.store.memory for one in prepared]
        learned = opened[0].prefaulter.learned_pages("prog")
        for one in prepared:
            one.store.close()
    # Each found its memory as it was made (none found another's, or none),
    # and all but the samples were prefaulted.
    assert all(memory is not None for memory in found)
    assert len({memory.start for memory in found if memory}) == threads * per_thread
    assert learned > 50


@needs_release
def test_releasing_unmaps_the_pages_only_read_of_the_marked_mapping_alone(
    image: Path, mappings_by: str, request: pytest.FixtureRequest
) -> None:
    page = mmap.PAGESIZE
    nonce = os.urandom(16)
    prefaulter = Prefaulter(image)
    request.addfinalizer(prefaulter.close)
    assert prefaulter._query == (mappings_by == "procmap_query")
    with instance(image) as (other, other_at), instance(image) as (mapping, start):
        mapping[7 * page] = 0xAB  # written: its own copy
        mapping[20 * page : 20 * page + 16] = nonce  # the marker (its page written too)
        other[20 * page : 20 * page + 16] = os.urandom(16)  # another instance, same place
        for view in (mapping, other):
            assert view[9 * page] == 9 and view[40 * page] == 40  # read: the file's pages
        assert {9, 40} <= _present_pages(start, PAGES)
        others_before = _present_pages(other_at, PAGES)

        assert prefaulter.release(None, Marker(20 * page, os.urandom(16))) == 0  # no such marker
        assert _present_pages(start, PAGES) >= {7, 9, 20, 40}

        released = prefaulter.release(None, Marker(20 * page, nonce))
        assert released >= 2 * page
        assert _present_pages(start, PAGES) == {7, 20} == _own_pages(start, PAGES)
        assert _present_pages(other_at, PAGES) == others_before  # the other one untouched
        # Every byte reads as before: the written pages kept, the others the file's.
        assert mapping[7 * page] == 0xAB and mapping[20 * page : 20 * page + 16] == nonce
        assert all(mapping[n * page + 1] == n for n in range(PAGES) if n != 20)
    assert prefaulter.released == 1


@needs_prefault
def test_a_copy_of_an_instances_marker_elsewhere_never_makes_that_memory_its_own(
    image: Path, prefaulter: Prefaulter
) -> None:
    # A guest can read its marker's bytes, and send them to another task,
    # whose memory then holds them (a message body), and it names where its
    # marker is. Its memory, found as it was made, is the only one looked
    # in: the other's is never released, nor written, for it.
    page = mmap.PAGESIZE
    nonce = os.urandom(prefault.NONCE_SIZE)
    with instance(image) as (mine, mine_at):
        memory = prefaulter.find("prog", live_instances=1, own=True)
        assert memory is not None and memory.start == mine_at
        assert mine[9 * page] == 9  # read by its guest: releasable if it were its marker's
        with instance(image) as (other, other_at):
            other[20 * page : 20 * page + len(nonce)] = nonce  # the copy, where it says
            assert other[9 * page] == 9
            others_before = _present_pages(other_at, PAGES)
            marker = Marker(20 * page, nonce)
            prefaulter.loaded(memory, marker)
            assert (memory.start, memory.end) == (mine_at, mine_at + PAGES * page)
            assert prefaulter.release(memory, marker) == 0
            assert prefaulter.linear_memory(memory, marker) is None
            assert _present_pages(other_at, PAGES) == others_before
        # Its own marker is found where it says, and only its memory released.
        mine[20 * page : 20 * page + len(nonce)] = nonce
        assert prefaulter.linear_memory(memory, marker) == (mine_at, mine_at + PAGES * page)
        assert prefaulter.release(memory, marker) >= page


class _HibernatingHost(RefusingHost):
    """Hibernates the task in every sleep, noting the image pages mapped from
    the file (read, not written) by the process before and after."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.released: list[int] = []
        self.read_pages: list[tuple[int, int]] = []

    def sleep(self, caller: Invocation, seconds: float) -> None:
        before = _image_pages_read(self.sandbox)
        self.released.append(self.sandbox.hibernate())
        self.read_pages.append((before, _image_pages_read(self.sandbox)))


def _image_pages_read(sandbox: Sandbox) -> int:
    """Bytes of the instances' memory images that are the file's pages (read,
    not written): the writable mappings of the runtime's file (its code is
    mapped from the same file, read-only)."""
    image = os.path.realpath(sandbox.artifacts.compiled)
    total, in_image = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                in_image = fields[-1] == image and fields[1].startswith("rw")
            elif in_image and fields[0] in ("Rss:", "Anonymous:"):
                total += int(fields[1]) * 1024 * (1 if fields[0] == "Rss:" else -1)
    return total


@needs_release
def test_a_hibernated_task_gives_back_the_pages_it_read_and_carries_on(
    program: Callable[..., Path], mappings_by: str
) -> None:
    path = program(
        """
        import capsule, statistics
        from capsule import task

        @task(name="main")
        def main(n):
            table = {str(i): [i, i * i] for i in range(n)}
            before = (sum(v[1] for v in table.values()), statistics.mean(range(n)))
            answers = []
            for _ in range(2):
                capsule.sleep(0)  # hibernates here
                table[str(n)] = [n, n * n]
                answers.append((sum(v[1] for v in table.values()), statistics.mean(range(n))))
            return [before, answers]
        """
    )
    limits = Limits(fuel=10**10, ram_bytes=256 * 1024**2, timeout_s=30.0)
    with Sandbox([path.parent]) as sandbox:
        assert sandbox.prefaulter._query == (mappings_by == "procmap_query")
        host = _HibernatingHost(sandbox)
        outcome = sandbox.invoke(
            Invocation("t1", "main", 1, 1, limits, host), "prog", '{"args": [5000], "kwargs": {}}'
        )
    squares = sum(i * i for i in range(5000))
    assert json.loads(outcome.result_json or "null") == [
        [squares, 2499.5],
        [[squares + 5000**2, 2499.5]] * 2,
    ], outcome.error
    # The only instance alive gave back ~8 MB of pages it had read.
    assert host.released[0] > 4 * 1024**2, host.released
    (before, after), _ = host.read_pages
    assert before - after >= host.released[0] * 0.9, host.read_pages
    assert after < 1024**2, host.read_pages
    assert host.released[1] > 0  # (what the task read again since)


@needs_release
def test_a_program_that_moves_its_marker_gets_nothing_released(
    program: Callable[..., Path],
) -> None:
    # The program's import runs inside the guest's load, before it returns where
    # it keeps the host's marker: a hostile one can change that address, to the
    # zeros of its own memory or anywhere. Only the host's bytes prove a memory,
    # and no memory but the instance's own was given them.
    path = program(
        """
        import sys, capsule
        from capsule import task

        zeros = bytes(64)
        frame = sys._getframe()
        while frame is not None and "marker" not in frame.f_locals:
            frame = frame.f_back
        assert frame is not None, "no load frame"
        frame.f_locals["marker"] = id(zeros) + 32  # all zeros there
        assert frame.f_locals["marker"] == id(zeros) + 32

        @task(name="main")
        def main():
            capsule.sleep(0)
            return "still here"
        """
    )
    limits = Limits(fuel=10**10, ram_bytes=256 * 1024**2, timeout_s=30.0)
    with Sandbox([path.parent]) as sandbox:
        host = _HibernatingHost(sandbox)
        moved = sandbox.invoke(
            Invocation("t1", "main", 1, 1, limits, host), "prog", '{"args": [], "kwargs": {}}'
        )
    assert moved.result_json == '"still here"', moved.error
    assert host.released == [0]
    assert sandbox.prefaulter.released == 0
