"""Prefaulting a fresh instance's memory (capsule/sandbox/prefault.py): the pages
a program's instances wrote are made a new instance's own before its guest runs,
without changing a byte of them."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from capsule.sandbox import prefault
from capsule.sandbox.config import Limits
from capsule.sandbox.engine import Invocation, RefusingHost, Sandbox
from capsule.sandbox.prefault import Prefaulter, _pagemap, _populate_all

pytestmark = pytest.mark.skipif(
    not prefault._supported(),
    reason="prefaulting needs Linux 6.11: pagemap, PROCMAP_QUERY, MADV_POPULATE_WRITE",
)

PAGES = 64


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


def test_a_mapping_something_ran_in_is_not_taken_for_a_new_one(
    image: Path, prefaulter: Prefaulter
) -> None:
    with instance(image) as (used, used_at), instance(image) as (_, fresh_at):
        _ = used[0]  # its "guest" ran: a page is mapped
        memory = prefaulter.find("prog", live_instances=2)
        assert memory is not None and memory.start == fresh_at != used_at
        assert prefaulter.find("prog", live_instances=2) is None  # the used one is left


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
                Invocation(f"t{n}", "main", 1, 1, limits, RefusingHost()), "prog", [n], {}
            )
            for n in range(10)
        ]
        learned = sandbox.prefaulter.learned_pages("prog")
        prefaulted = sandbox.prefaulter.prefaulted
    assert [outcome.result_json for outcome in outcomes] == [str(sum(range(n))) for n in range(10)]
    # Instances 2 and 3 are the samples; from the 4th on each is prefaulted.
    assert learned > 50, learned
    assert prefaulted >= 5, prefaulted
