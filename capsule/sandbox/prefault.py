"""The pages of instances' memory: a fresh instance's are prefaulted (the
pages its guest is going to write are made its own, in one system call per run
of pages, before it runs); an idle one's pages it only read are released.

Why: an instance's memory starts as a copy-on-write mapping of the guest
runtime's 16.8 MB memory image (CPython's heap after start-up). The guest
reads most pages it writes first (a wasm increment is a load, then a store), so
each such page costs two faults: the read maps the shared page read-only
(with up to 15 neighbours: the kernel's fault-around), the write copies it and
must then flush the read-only entry from every core that runs one of our
threads: an inter-processor interrupt, which on a VM is an exit to the
hypervisor. Measured on 200 sequential calls: 486 faults and ~880 TLB flushes
per instance; such write faults took a fifth of the process's CPU.
``MADV_POPULATE_WRITE`` on pages that are not mapped yet copies them with
neither the read fault nor the flush.

Which pages: those that instances of the same program wrote before. Every
``SAMPLE_EVERY``-th instance (and the second and third of a program) is left
alone, and at its end the pages it made its own are read from
``/proc/self/pagemap``; the pages that two samples in a row wrote are what the
next instances get. Samples are also read as their import ends (the same ~290
pages in every instance of a program) and as they hibernate: actors waiting
for messages may not end for a long time. Populating a page changes nothing in
it (the kernel makes the same copy a write would), so a wrong guess costs a
page of memory, never a wrong value, even in the memory of another instance.

Where an instance's memory is: wasmtime does not say. A new instance's memory
often lands where a torn-down one was (the kernel reuses the hole), so those
addresses are asked about first; failing that, the image's mappings are gone
through from the lowest for a fresh one: all of them while not too many
instances are alive, else the few lowest (the kernel places a new mapping
below those made before it when no hole above fits). Both with
``PROCMAP_QUERY`` on ``/proc/self/maps`` (one ioctl per mapping, ~5 us; reading
the text of that file cost 0.4 - 1.5 ms). A mapping is taken only if none of
its first pages is mapped yet (``pagemap``): its guest has not run, so it is a
new instance's. Instantiations take turns with that look (``instantiating``),
so the fresh mapping is the one just made; an instance's memory is confirmed
by its marker (below) once its program is imported.

Releasing (``release``, for a task hibernating while blocked in a host call):
most of an idle instance's resident memory is pages of the image it only read
(~8 of ~10 MB), shared with every other instance but counted in the RSS once
for each. ``MADV_DONTNEED`` unmaps them; they come back when read again. It
would throw away what a guest wrote to such a page meanwhile, so it is done
only on the instance's own thread while its guest is not running, and only to
the mapping proven to be that instance's: the host hands each instance 16
random bytes as it loads the program, the guest says where in its memory it
keeps them, and they are looked for there (what the guest says is only where
to look: no other instance was given those bytes).

Prefaulting needs Linux 6.11 or newer (``PROCMAP_QUERY``); elsewhere, or
with ``CAPSULE_PREFAULT=0``, it is not done. Releasing works on any Linux whose
pagemap says which pages are a file's (4.2); before 6.11 it reads the text of
``/proc/self/maps`` to find the image's mappings (~4 - 8 ms a release with 50 -
200 instances alive, against ~1.5 - 2.5 ms).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import platform
import re
import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Protocol, cast

#: One instance in this many is a sample (left alone and learned from).
SAMPLE_EVERY = 32
#: Go through the process's mappings to find a new instance's memory only while
#: at most this many instances are alive (each adds one to go through).
SCAN_UP_TO_INSTANCES = 64
#: Beyond that many, how many of the lowest image mappings are looked at.
_LOWEST_IMAGES = 4
#: The longest an instantiation waits for another's to end (see ``instantiating``).
_INSTANTIATING_WAIT_S = 0.05
#: How many of the mappings claimed last are looked at before all of them.
_RECENT_CLAIMS = 8
#: How many torn-down instances' addresses are remembered as candidates.
_CANDIDATES = 8
#: How many of a mapping's first pages tell whether anything ran in it.
_FIRST_PAGES = 64

_MADV_DONTNEED, _MADV_POPULATE_WRITE = 4, 23
#: How many random bytes a marker is (the host's nonce).
NONCE_SIZE = 16
_PAGE = mmap.PAGESIZE
#: A pagemap entry: present (bit 63), file-backed or shared (61), mapped once (56).
_PRESENT, _FILE, _EXCLUSIVE = 1 << 63, 1 << 61, 1 << 56
#: A page the instance made its own: present, anonymous, mapped only there.
_WRITTEN_MASK, _WRITTEN = _PRESENT | _FILE | _EXCLUSIVE, _PRESENT | _EXCLUSIVE
#: A page of the image the instance only read: present, the file's page.
_READ_ONLY = _PRESENT | _FILE

#: Runs of pages, as (first page from the image's start, count).
Runs = list[tuple[int, int]]


@dataclass(eq=False)
class Marker:
    """Random bytes the host gave one instance alone, and where in its linear
    memory the guest says it keeps them: they tell its memory from every other
    instance's (see ``Prefaulter.release``)."""

    address: int
    nonce: bytes
    #: The image mapping they were found in last, as (start, end), and where
    #: that linear memory starts.
    image: tuple[int, int] | None = None
    base: int | None = None


@dataclass(eq=False)
class Memory:
    """Where one instance's memory image is mapped, and what it is for."""

    start: int
    end: int
    program: str
    #: Left as the guest makes it, to learn the program's written pages from.
    sample: bool
    #: Its task ran (a sample is learned from only then: it wrote what tasks write).
    ran: bool = False
    #: Found as its instance was made, no other being made meanwhile: it is
    #: that instance's (not a guess that loading settles).
    own: bool = False


class Prefaulter:
    """Finds each fresh instance's memory image, prefaults the pages its
    program's instances write, and learns them from samples; releases an idle
    instance's pages it only read. Thread-safe."""

    def __init__(self, image: Path) -> None:
        self._image = os.stat(image)
        self._path = os.fsencode(os.path.realpath(image))
        self._enabled = _supported()
        self._releasing_enabled = _kernel_can_release()
        #: Ask about mappings with PROCMAP_QUERY (else: read /proc/self/maps).
        self._query = self._enabled or _kernel_can_query_mappings()
        #: /proc/self/maps (asked with PROCMAP_QUERY) and /proc/self/pagemap,
        #: open while the prefaulter is (a path lookup in /proc costs ~40 us).
        self._maps = self._pagemap = self._mem = -1
        if self._enabled or self._releasing_enabled:
            if self._query:
                self._maps = os.open("/proc/self/maps", os.O_RDONLY)
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
            # (Reading memory through it fails cleanly where nothing is mapped.)
            self._mem = os.open("/proc/self/mem", os.O_RDONLY)
        self._lock = threading.Lock()
        self._instantiating = _instantiating_lock(self._path)
        self._claimed: set[int] = set()
        #: The mappings claimed last, as (start, end): where an instance whose
        #: guess was another's (two made at once) is looked for next.
        self._recent: deque[tuple[int, int]] = deque(maxlen=_RECENT_CLAIMS)
        self._freed: deque[int] = deque(maxlen=_CANDIDATES)
        self._instances: dict[str, int] = {}
        self._last_sample: dict[str, set[int]] = {}
        self._learned: dict[str, Runs] = {}
        #: The same, learned from samples as their import ended (see loaded).
        self._last_loading: dict[str, set[int]] = {}
        self._learned_loading: dict[str, Runs] = {}
        #: The device the image's mappings are on (from the first found by path).
        self._image_device: tuple[int, int] | None = None
        self._releasing = threading.Lock()
        #: Instances whose memory was prefaulted, and times an idle one's read
        #: pages were released (for tests and diagnostics).
        self.prefaulted = self.released = 0

    def close(self) -> None:
        """Stop prefaulting and close the files it reads."""
        with self._releasing:  # (not while a release reads through them)
            self._enabled = self._releasing_enabled = False
            files = (self._maps, self._pagemap, self._mem)
            self._maps = self._pagemap = self._mem = -1
            for fd in files:  # (after the fields: a closed number may be reused at once)
                if fd >= 0:
                    os.close(fd)

    @property
    def enabled(self) -> bool:
        """Whether this machine can prefault (Linux's pagemap, PROCMAP_QUERY
        and MADV_POPULATE_WRITE), ``CAPSULE_PREFAULT`` is not 0 and it is open."""
        return self._enabled

    @property
    def asks_cheaply(self) -> bool:
        """Whether it asks about mappings with PROCMAP_QUERY (microseconds)
        rather than by reading ``/proc/self/maps`` (milliseconds)."""
        return self._query and self._releasing_enabled

    def learned_pages(self, program: str) -> int:
        """How many pages a fresh instance of ``program`` gets prefaulted."""
        runs = self._learned.get(program) or self._learned_loading.get(program, [])
        return sum(count for _, count in runs)

    @contextmanager
    def instantiating(self) -> Iterator[bool]:
        """Around an instantiation and the ``find`` of its memory: one at a
        time in the process (the prefaulters of every sandbox on this image
        take the same turns), so that the fresh mapping found is the one it
        made (two threads instantiating at once took each other's, or one
        found none: a third of 1,000 actors spawned at once). The wait is bounded
        (an instantiation may wait for a CPU slot another waiter holds): past
        it, the guess may be wrong, which loading settles (see ``loaded``).
        Gives whether they took turns (``find``'s ``own``)."""
        if not self._enabled:
            yield False
            return
        held = self._instantiating.acquire(timeout=_INSTANTIATING_WAIT_S)
        try:
            yield held
        finally:
            if held:
                self._instantiating.release()

    def find(self, program: str, live_instances: int, own: bool = False) -> Memory | None:
        """Right after an instantiation, before its guest runs: the new
        instance's memory, or None if it could not be found (``own``: no other
        instantiation ran meanwhile, see ``instantiating``)."""
        if not self._enabled:
            return None
        span = self._claim_freed() or self._scan(
            None if live_instances <= SCAN_UP_TO_INSTANCES else _LOWEST_IMAGES
        )
        if span is None:
            return None
        with self._lock:
            number = self._instances[program] = self._instances.get(program, 0) + 1
        sample = number in (2, 3) or number % SAMPLE_EVERY == 0
        return Memory(*span, program, sample=sample, own=own)

    def prefault(self, memory: Memory) -> None:
        """Before the instance's guest runs: make the pages its program's
        instances wrote its own (a sample is left alone)."""
        runs = self._learned.get(memory.program) or self._learned_loading.get(memory.program)
        if not runs or memory.sample:
            return
        # Still the image there? (Taken from another thread's instance, it may
        # have been torn down meanwhile, its address given to something else.)
        if memory.own or self._image_at(memory.start) is not None:
            self._populate(memory.start, runs)

    def loaded(self, memory: Memory, marker: Marker | None) -> None:
        """Once the program is imported in an instance (its guest idle): where
        its memory is, for certain (by its ``marker``, unless it was found as
        the instance was made: instances made at once whose look did not take
        turns may each have been given the other's by ``find``); then learn from a sample what importing writes, for the
        instances that start before any sample has ended (an instance
        learned from at its end says what its task wrote too; actors that
        wait for messages may not end for a long time)."""
        if marker is not None and not memory.own:
            self._settle(memory, marker)
        if not memory.sample or memory.program in self._learned:
            return
        written = _written_pages(self._pagemap, memory.start, memory.end)
        self._learn(memory.program, written, self._last_loading, self._learned_loading)

    def _settle(self, memory: Memory, marker: Marker) -> None:
        """Make ``memory`` the image mapping holding ``marker``, if it is not."""
        mappings = self._mappings()
        if mappings is None:
            return
        # (Without ``_releasing``, which a release holds for milliseconds: this
        # only reads, and the marker's random bytes found in a file that took
        # a closed one's number would be no marker of an instance.)
        found = self._locate(mappings, memory, marker)
        if found is None or found[0] == memory.start:
            return
        with self._lock:
            self._claimed.discard(memory.start)
            self._claimed.add(found[0])
        memory.start, memory.end = found[0], found[1]

    def closing(self, memory: Memory) -> None:
        """Before the instance's store is closed (by the pool's thread, off the
        task's critical path: reading the pagemap costs ~0.8 ms): learn from a
        sample whose task ran (or failed)."""
        if not (memory.sample and memory.ran):
            return
        self._learn(memory.program, _written_pages(self._pagemap, memory.start, memory.end))

    def _learn(
        self,
        program: str,
        written: set[int],
        last: dict[str, set[int]] | None = None,
        learned: dict[str, Runs] | None = None,
    ) -> None:
        """A sample of ``program`` that ran wrote the pages ``written``: what
        it and the sample before both wrote is learned (into ``learned``, with
        the samples in ``last``: by default, those of samples that ran)."""
        if not written:
            return
        last = self._last_sample if last is None else last
        learned = self._learned if learned is None else learned
        # (Computed outside the lock: an allocation may run the garbage
        # collector, whose finalizer of a lost store would take it again.)
        with self._lock:
            before = last.get(program)
            last[program] = written
        if before is not None:
            learned[program] = _runs(sorted(before & written))

    def unmapped(self, memory: Memory) -> None:
        """After the instance's store was closed: its address may come back."""
        with self._lock:
            self._claimed.discard(memory.start)
            self._freed.append(memory.start)

    def release(self, memory: Memory | None, marker: Marker) -> int:
        """Unmap the pages of an instance's memory image that it has only read
        (they come back from the shared image when it reads them again);
        returns how many bytes. Only on the instance's own thread while its
        guest waits in a host call: a page it wrote between the look at the
        pagemap and the unmapping would be lost.

        Its memory is the image mapping that holds ``marker`` (``memory``, the
        guess made at its start, is looked at first): unmapping pages of another
        instance's could lose what that one is writing meanwhile."""
        if not self._releasing_enabled:  # (looked at again under the lock)
            return 0
        mappings = self._mappings()
        if mappings is None:
            return 0
        # (Held throughout: close() must not close, and the number be reused
        # by another file, between reading the pagemap and unmapping.)
        with self._releasing:
            found = self._locate(mappings, memory, marker)
            if found is None:
                return 0
            start, end, _ = found
            entries = _pagemap(self._pagemap, start, end)
            if memory is not None and memory.sample and memory.start == start:
                # What a sample wrote until it waited: learned from now, as
                # it may wait long (an actor), for the instances made meanwhile.
                self._learn(memory.program, _written_in(entries))
            runs = _read_only_runs(entries)
            if not runs or _advise_all(start, runs, _MADV_DONTNEED) != 0:
                return 0
            self.released += 1
            return sum(count for _, count in runs) * _PAGE

    def nonce_address(self, memory: Memory | None, nonce: bytes) -> int | None:
        """Where in an instance's linear memory ``nonce`` is, read from its
        image mapping (``memory``, found as it started, else each image
        mapping in turn): for a runtime that keeps the host's marker at the
        same place in every instance without knowing where (the JS runtime: a
        buffer of its snapshot). None unless it is in one mapping, once.
        Reads an image (~10 ms for 12 MB) or, with no guess, up to all of
        them: once per runtime and sandbox."""
        mappings = self._mappings()
        if mappings is None:
            return None
        with self._releasing:
            # (The guess first; the others if it was wrong: two threads'
            # new instances may each have taken the other's mapping.)
            guess: list[tuple[int, int]] = []
            if memory is not None and mappings.image_at(memory.start) == memory.end:
                guess.append((memory.start, memory.end))
            others = (span for span in mappings.images() if span not in guess)
            for start, end in chain(guess, others):
                try:
                    data = os.pread(self._mem, end - start, start)
                except (OSError, OverflowError):
                    continue
                found = data.find(nonce)
                if found < 0:
                    continue
                if data.find(nonce, found + 1) >= 0:
                    return None
                below = mappings.memory_below(start)
                return start + found - (start if below is None else below)
        return None

    def linear_memory(self, memory: Memory | None, marker: Marker) -> tuple[int, int] | None:
        """Where the linear memory holding ``marker`` starts in this process, and
        where the image mapped in it ends: every address between is that
        instance's memory, mapped as long as its store is open."""
        mappings = self._mappings()
        if mappings is None:
            return None
        found = self._locate(mappings, memory, marker)  # (unlocked: see _settle)
        return None if found is None else (found[2], found[1])

    def memory_sizes(
        self, instances: list[tuple[Memory | None, Marker | None]]
    ) -> list[int | None]:
        """How large the linear memory holding each marker is now: from its start
        to the end of the writable anonymous mapping just above the image
        (``memory.grow`` extends it), or to the image's end if there is none;
        None where not found (or no marker). (One look at the mappings for all:
        before Linux 6.11 that is reading /proc/self/maps, milliseconds.)"""
        if not self._releasing_enabled or not instances:
            return [None] * len(instances)
        mappings = self._mappings()
        if mappings is None:
            return [None] * len(instances)

        def look(memory: Memory | None, marker: Marker | None) -> tuple[int, int, int] | None:
            if marker is None:
                return None
            return self._locate(mappings, memory, marker, scan=False)

        sizes: list[int | None] = []
        with self._releasing:
            located = [look(*instance) for instance in instances]
            lost = [
                marker
                for (_, marker), found in zip(instances, located, strict=True)
                if marker is not None and found is None
            ]
            if lost:
                self._find_markers(mappings, lost)
                located = [
                    found or look(*instance)
                    for instance, found in zip(instances, located, strict=True)
                ]
            for found in located:
                if found is None:
                    sizes.append(None)
                    continue
                _, end, base = found
                above = mappings.memory_above(end)
                sizes.append((end if above is None else above) - base)
        return sizes

    def _mappings(self) -> _Mappings | None:
        """The image's mappings as they are now; None if they cannot be read
        (or releasing is off: nothing of an instance's memory is looked at)."""
        if not self._releasing_enabled:
            return None
        if self._query:
            return _QueriedMappings(self)
        # Read before taking the lock (4 - 8 ms with many instances alive):
        # a stale list only misguides where to look; the marker decides.
        try:
            return _MapsText(self._image, self._path)
        except OSError:
            return None

    def _locate(
        self, mappings: _Mappings, memory: Memory | None, marker: Marker, scan: bool = True
    ) -> tuple[int, int, int] | None:
        """The image mapping holding ``marker``, as (start, end, where the linear
        memory starts); without ``scan``, only if a guess is right. Holding
        ``_releasing`` (but see _settle)."""
        if not self._releasing_enabled:
            return None
        # An instance's memory found as it was made is the only one looked in:
        # the marker's bytes say where it starts, not whose it is (its guest can
        # read them, and send them to another task, whose memory then holds a
        # copy where this guest says its marker is).
        own = (memory.start, memory.end) if memory is not None and memory.own else None
        image, base = marker.image, marker.base
        if (
            image is not None
            and base is not None
            and own in (None, image)
            and self._marker_at(base, marker)
        ):
            # Still there: its memory does not move while it lives. (One
            # read, where asking about its mappings takes three queries.)
            return image[0], image[1], base
        if own is not None:
            if mappings.image_at(own[0]) != own[1]:
                return None
            found = self._base(mappings, own[0], marker)
            if found is None:
                return None
            marker.image, marker.base = own, found
            return own[0], own[1], found
        guesses = [marker.image] if marker.image else []
        if memory is not None:
            guesses.append((memory.start, memory.end))
        # Then the mappings claimed last: instances made at once (by several
        # threads) may each have been given the other's. (Going through all
        # image mappings costs ~10 us each: with thousands alive, milliseconds.)
        # And the lowest: one no thread was given (its guest ran before
        # another looked) is there, where new mappings are made.
        with self._lock:
            recent = [span for span in reversed(self._recent) if span not in guesses]
        candidates = chain(
            (guess for guess in guesses if mappings.image_at(guess[0]) == guess[1]),
            (span for span in recent if mappings.image_at(span[0]) == span[1]),
            islice(mappings.images(), _LOWEST_IMAGES * 2) if scan else (),
            mappings.images() if scan else (),
        )
        for start, end in candidates:
            found = self._base(mappings, start, marker)
            if found is not None:
                marker.image, marker.base = (start, end), found
                return start, end, found
        return None

    def _find_markers(self, mappings: _Mappings, lost: list[Marker]) -> None:
        """Where the image mappings holding these markers are (``marker.image``),
        in one pass over them all rather than one each (a read per mapping and
        marker address: many tasks alive and not located yet would otherwise
        cost the square of their number). Holding ``_releasing``."""
        by_nonce = {marker.nonce: marker for marker in lost}
        addresses = {marker.address for marker in lost}
        for start, end in mappings.images():
            below = mappings.memory_below(start)
            for base in [start] if below is None else [below, start]:
                for address in addresses:
                    try:
                        found = os.pread(self._mem, NONCE_SIZE, base + address)
                    except (OSError, OverflowError):  # nothing mapped there
                        continue
                    marker = by_nonce.pop(found, None)
                    if marker is not None:
                        marker.image = start, end
                        marker.base = base if marker.address == address else None
            if not by_nonce:
                return

    def _base(self, mappings: _Mappings, start: int, marker: Marker) -> int | None:
        """Where the linear memory starts if the image mapping at ``start`` is
        that of the one holding ``marker``. (The memory begins where the
        writable anonymous mapping just below the image does, if there is one:
        wasmtime maps the image over the memory's data, after its stack. Either
        way, the marker's bytes found there are inside that instance's memory
        reservation, and only that instance was given them.)"""
        below = mappings.memory_below(start)
        bases = [start] if below is None else [below, start]
        return next((base for base in bases if self._marker_at(base, marker)), None)

    def _marker_at(self, base: int, marker: Marker) -> bool:
        """Whether the linear memory at ``base`` holds ``marker``."""
        try:
            found = os.pread(self._mem, len(marker.nonce), base + marker.address)
        except (OSError, OverflowError):  # nothing mapped there
            return False
        return found == marker.nonce

    def _claim_freed(self) -> tuple[int, int] | None:
        for start in reversed(self._freed.copy()):
            end = self._image_at(start)
            if end is not None and self._claim(start, end):
                return start, end
        return None

    def _image_at(self, start: int) -> int | None:
        """The end of the image mapping that starts at ``start``, if one does."""
        mapping = self._mapping(start, 0)
        if mapping is not None and mapping.vma_start == start and self._is_image(mapping):
            return int(mapping.vma_end)
        return None

    def _scan(self, most: int | None = None) -> tuple[int, int] | None:
        """A fresh image mapping nobody claimed, among the ``most`` lowest
        (None: all). The kernel places a new mapping below the ones made
        before it unless a hole above fits (a torn-down instance's: those are
        the candidates looked at first), so with many instances alive the new
        one is among the lowest, and going through the others would cost
        ~10 us each."""
        for looked, (start, end) in enumerate(self._images()):
            if most is not None and looked >= most:
                return None
            if self._claim(start, end):
                return start, end
        return None

    def _images(self, by_path: bool = True) -> Iterator[tuple[int, int]]:
        """The image's mappings, among the process's writable file mappings
        (``by_path=False``: by inode alone, one system call less a mapping)."""
        address = 0
        while (mapping := self._mapping(address, _NEXT_WRITABLE_FILE)) is not None:
            if self._is_image(mapping, by_path):
                yield mapping.vma_start, mapping.vma_end
            address = mapping.vma_end

    def _mapping(self, address: int, flags: int) -> _MappingQuery | None:
        """The mapping at ``address`` (or, with _NEXT_WRITABLE_FILE, the next such one)."""
        query = _MappingQuery(size=ctypes.sizeof(_MappingQuery), query_flags=flags)
        query.query_addr = address
        try:
            fcntl.ioctl(self._maps, _PROCMAP_QUERY, query, True)
        except (OSError, ValueError):  # none there (ENOENT); closed (fd -1: ValueError)
            return None
        return query

    def _is_image(self, mapping: _MappingQuery, by_path: bool = True) -> bool:
        """A private writable mapping of the image file (as wasmtime maps it
        copy-on-write). (By inode, then by path: the device PROCMAP_QUERY gives
        is the superblock's, which on btrfs is not the one ``stat`` gives.)"""
        flags = mapping.vma_flags
        if mapping.inode != self._image.st_ino or flags & (_WRITABLE | _SHARED) != _WRITABLE:
            return False
        if self._image_device is not None:  # (learned from a match by path)
            return (mapping.dev_major, mapping.dev_minor) == self._image_device
        name = ctypes.create_string_buffer(4096)
        query = _MappingQuery(size=ctypes.sizeof(_MappingQuery), query_addr=mapping.vma_start)
        query.vma_name_addr, query.vma_name_size = ctypes.addressof(name), len(name)
        try:
            fcntl.ioctl(self._maps, _PROCMAP_QUERY, query, True)
        except (OSError, ValueError):
            return False
        if name.value not in (self._path, self._path + _DELETED):
            return False
        self._image_device = mapping.dev_major, mapping.dev_minor
        return True

    def _claim(self, start: int, end: int) -> bool:
        """Take the image mapping at [start, end) if it is fresh (none of its
        first pages mapped: its guest has not run) and nobody took it. (Another
        thread's new instance may be taken so, and that thread takes this one's:
        each fresh instance is prefaulted all the same.)"""
        if start in self._claimed or not _untouched(self._pagemap, start):
            with self._lock:
                if start in self._freed:
                    self._freed.remove(start)  # someone else's now
            return False
        with self._lock:
            if start in self._claimed:
                return False
            self._claimed.add(start)
            self._recent.append((start, end))
            if start in self._freed:
                self._freed.remove(start)
            return True

    def _populate(self, start: int, runs: Runs) -> None:
        if _populate_all(start, runs) == 0:  # (else the mapping went away)
            self.prefaulted += 1


class _Mappings(Protocol):
    """The image's mappings in this process, as releasing asks about them."""

    def image_at(self, start: int) -> int | None:
        """The end of the image mapping that starts at ``start``, if one does."""

    def images(self) -> Iterator[tuple[int, int]]:
        """The image's mappings, as (start, end)."""

    def memory_below(self, start: int) -> int | None:
        """The start of the writable anonymous mapping that ends at ``start``."""

    def memory_above(self, end: int) -> int | None:
        """The end of the writable anonymous mapping that starts at ``end``."""


#: What the kernel appends to the name of a mapped file since removed (the
#: runtime cache prunes old builds; a process may still run one).
_DELETED = b" (deleted)"


class _QueriedMappings:
    """The image's mappings as PROCMAP_QUERY tells them (Linux 6.11)."""

    def __init__(self, prefaulter: Prefaulter) -> None:
        self._prefaulter = prefaulter

    def image_at(self, start: int) -> int | None:
        return self._prefaulter._image_at(start)

    def images(self) -> Iterator[tuple[int, int]]:
        return self._prefaulter._images(by_path=False)  # (the marker is the proof)

    def memory_below(self, start: int) -> int | None:
        below = self._anonymous_at(start - 1) if start else None
        return None if below is None or below[1] != start else below[0]

    def memory_above(self, end: int) -> int | None:
        above = self._anonymous_at(end)
        return None if above is None or above[0] != end else above[1]

    def _anonymous_at(self, address: int) -> tuple[int, int] | None:
        """The writable anonymous mapping holding ``address``, as (start, end)."""
        found = self._prefaulter._mapping(address, 0)
        if found is None or found.inode != 0 or not found.vma_flags & _WRITABLE:
            return None
        return int(found.vma_start), int(found.vma_end)


class _MapsText:
    """The process's mappings as ``/proc/self/maps`` lists them, read once: for
    kernels before PROCMAP_QUERY (6.11), where releasing still works (reading
    the file costs ~0.5 - 3 ms, once a hibernation)."""

    def __init__(self, image: os.stat_result, path: bytes) -> None:
        self._ends: dict[int, int] = {}  # image mappings: start -> end
        self._anonymous: dict[int, int] = {}  # writable anonymous ones: end -> start
        self._anonymous_ends: dict[int, int] = {}  # the same: start -> end
        with open("/proc/self/maps", "rb") as maps:
            lines = maps.read().splitlines()
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 5:
                continue
            span, perms, _, _, inode = fields[:5]
            low, _, high = span.partition(b"-")
            start, end = int(low, 16), int(high, 16)
            if perms[1:2] != b"w":
                continue
            if int(inode) == 0:
                self._anonymous[end] = start
                self._anonymous_ends[start] = end
            elif (
                perms[3:4] == b"p"
                and int(inode) == image.st_ino
                and len(fields) == 6
                and fields[5] in (path, path + _DELETED)
            ):
                self._ends[start] = end

    def image_at(self, start: int) -> int | None:
        return self._ends.get(start)

    def images(self) -> Iterator[tuple[int, int]]:
        return iter(self._ends.items())

    def memory_below(self, start: int) -> int | None:
        return self._anonymous.get(start)

    def memory_above(self, end: int) -> int | None:
        return self._anonymous_ends.get(end)


def _supported() -> bool:
    """Whether to prefault: ``CAPSULE_PREFAULT`` is not 0 and the kernel can."""
    return os.environ.get("CAPSULE_PREFAULT") != "0" and _kernel_can_prefault()


def can_measure_memory() -> bool:
    """Whether the size of an instance's memory can be found (as releasing
    does: Linux's pagemap and /proc/self/mem)."""
    return _kernel_can_release()


@functools.cache  # the kernel does not change: asked once per process, not per run
def _kernel_can_release() -> bool:
    """Linux with a pagemap that says which pages are the file's (4.2 for a
    process without privileges), and its own memory readable by offset."""
    if not sys.platform.startswith("linux") or sys.byteorder != "little":
        return False  # (_read_only_runs reads a pagemap entry's top byte)
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.read(8)
        with open("/proc/self/mem", "rb"):
            return True
    except OSError:
        return False


@functools.cache
def _kernel_can_query_mappings() -> bool:
    """Linux 6.11 or newer: PROCMAP_QUERY on /proc/self/maps."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps", "rb") as maps:
            query = _MappingQuery(
                size=ctypes.sizeof(_MappingQuery), query_flags=_NEXT_WRITABLE_FILE
            )
            fcntl.ioctl(maps.fileno(), _PROCMAP_QUERY, query, True)
        return True
    except OSError as error:
        return error.errno == errno.ENOENT  # (asked and answered: none there)


@functools.cache
def _kernel_can_prefault() -> bool:
    """Linux with pagemap, PROCMAP_QUERY (6.11) and MADV_POPULATE_WRITE (5.14)."""
    if not (_kernel_can_release() and _kernel_can_query_mappings()):
        return False  # (also on big-endian hosts: _untouched reads an entry's top byte)
    try:
        with mmap.mmap(-1, _PAGE) as page:
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            return _populate_all(address, [(0, 1)]) == 0
    except (OSError, BufferError):
        return False


class _MappingQuery(ctypes.Structure):
    """``struct procmap_query`` (linux/fs.h): one mapping of the process."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("query_flags", ctypes.c_uint64),
        ("query_addr", ctypes.c_uint64),
        ("vma_start", ctypes.c_uint64),
        ("vma_end", ctypes.c_uint64),
        ("vma_flags", ctypes.c_uint64),
        ("vma_page_size", ctypes.c_uint64),
        ("vma_offset", ctypes.c_uint64),
        ("inode", ctypes.c_uint64),
        ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32),
        ("vma_name_size", ctypes.c_uint32),
        ("build_id_size", ctypes.c_uint32),
        ("vma_name_addr", ctypes.c_uint64),
        ("build_id_addr", ctypes.c_uint64),
    ]


#: _IOWR('f', 17, struct procmap_query)
_PROCMAP_QUERY = (3 << 30) | (ctypes.sizeof(_MappingQuery) << 16) | (ord("f") << 8) | 17
_WRITABLE, _SHARED, _COVERING_OR_NEXT, _FILE_BACKED = 0x02, 0x08, 0x10, 0x20
_NEXT_WRITABLE_FILE = _COVERING_OR_NEXT | _FILE_BACKED | _WRITABLE


#: The turns instantiations of each memory image take (see
#: Prefaulter.instantiating), by the image's path: one for all the sandboxes
#: of a process, each of which has a prefaulter of its own.
_INSTANTIATING: dict[bytes, threading.Lock] = {}
_INSTANTIATING_GUARD = threading.Lock()


def _instantiating_lock(image: bytes) -> threading.Lock:
    with _INSTANTIATING_GUARD:
        return _INSTANTIATING.setdefault(image, threading.Lock())


def _populate_all(start: int, runs: Runs) -> int:
    """Make the pages of ``runs`` (from ``start``) private copies, as a write
    would, without writing: 0, or the errno of what failed."""
    return _advise_all(start, runs, _MADV_POPULATE_WRITE)


def _advise_all(start: int, runs: Runs, advice: int) -> int:
    """``madvise`` the pages of ``runs`` (from ``start``): 0, or the errno of
    what failed."""
    global _one_call
    if _one_call:
        # All runs in one process_madvise (any advice for the caller's own
        # process since Linux 6.13): a madvise per run cost ~3 us each, ~0.7 ms
        # for the ~230 runs an instance gets. The iovec array is (base, length)
        # pairs of 64-bit words.
        vector = array(
            "Q",
            chain.from_iterable((start + first * _PAGE, count * _PAGE) for first, count in runs),
        )
        address = vector.buffer_info()[0]
        for done in range(0, len(runs), _MAX_IOVECS):
            count = min(_MAX_IOVECS, len(runs) - done)
            try:
                result = _process_madvise(address + done * 16, count, advice)
            except OSError:  # no pidfd (say, out of file descriptors)
                result, failure = -1, errno.EBADF
            else:
                failure = ctypes.get_errno()
            if result < 0:
                if failure not in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF):
                    return failure
                _one_call = False  # an older kernel: one madvise a run
                break
        else:
            return 0
    for first, count in runs:
        if _madvise(start + first * _PAGE, count * _PAGE, advice) != 0:
            return ctypes.get_errno()
    return 0


#: Whether process_madvise takes MADV_POPULATE_WRITE here (until it says no).
_one_call = (
    sys.platform.startswith("linux")
    and hasattr(os, "pidfd_open")
    and platform.machine() in ("x86_64", "aarch64", "riscv64")
)
#: Most iovecs one process_madvise call takes (UIO_MAXIOV).
_MAX_IOVECS = 1024
_SYS_PROCESS_MADVISE = 440  # on the architectures _one_call allows
#: (pid, pidfd) of this process, opened on first use and kept for its life.
_self: tuple[int, int] | None = None


def _process_madvise(iovecs: int, count: int, advice: int) -> int:
    global _self
    if _self is None or _self[0] != os.getpid():
        _self = (os.getpid(), os.pidfd_open(os.getpid()))
    result: int = _syscall(
        ctypes.c_long(_SYS_PROCESS_MADVISE),
        ctypes.c_int(_self[1]),
        ctypes.c_void_p(iovecs),
        ctypes.c_size_t(count),
        ctypes.c_int(advice),
        ctypes.c_uint(0),
    )
    return result


def _pagemap(fd: int, start: int, end: int) -> bytes:
    """The pagemap entries of [start, end): 8 bytes a page, in native order."""
    try:
        entries = os.pread(fd, (end - start) // _PAGE * 8, start // _PAGE * 8)
    except OSError:
        return b""
    return entries[: len(entries) // 8 * 8]  # whole entries only, whatever the kernel did


def _untouched(pagemap: int, start: int) -> bool:
    """Nothing has run in the image mapping at ``start``: none of its first
    pages is mapped. (Anything that ran there mapped some: 51 of the first 64
    after a program's import. Reading the whole image's entries costs the
    kernel ~0.25 ms even when none is mapped; and a wrong answer here only
    prefaults the wrong instance.)"""
    entries = _pagemap(pagemap, start, start + _FIRST_PAGES * _PAGE)
    # Bits 63 (present) and 62 (swapped) are the top of each entry's last byte
    # (little-endian: see _supported).
    return bool(entries) and max(entries[7::8]) < 0x40


def _written_pages(pagemap: int, start: int, end: int) -> set[int]:
    """The pages of [start, end) this process made its own copy of."""
    return _written_in(_pagemap(pagemap, start, end))


def _written_in(entries: bytes) -> set[int]:
    """The pages this process made its own copy of, among pagemap ``entries``."""
    return {
        page for page, entry in enumerate(array("Q", entries)) if entry & _WRITTEN_MASK == _WRITTEN
    }


#: A pagemap entry's top byte -> 1 if it is a page of the file only read (see _READ_ONLY).
_READ_ONLY_TOP = bytes(int(top << 56 & _READ_ONLY == _READ_ONLY) for top in range(256))


def _read_only_runs(entries: bytes) -> Runs:
    """The runs of pages present and the file's (read, never written) among
    pagemap ``entries``: found in C, by each entry's top byte (little-endian)."""
    flags = entries[7::8].translate(_READ_ONLY_TOP)
    return [(run.start(), run.end() - run.start()) for run in re.finditer(b"\x01+", flags)]


def _runs(pages: list[int]) -> Runs:
    runs: Runs = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _load_madvise() -> Callable[[int, int, int], int]:
    if not sys.platform.startswith("linux"):
        return lambda _address, _length, _advice: -1
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], madvise)


#: libc's madvise (it gives up the GIL while the kernel copies the pages).
_madvise = _load_madvise()
#: libc's syscall(2), for process_madvise (variadic: arguments typed per call).
_syscall: Any = ctypes.CDLL(None, use_errno=True).syscall if _one_call else None
if _syscall is not None:
    _syscall.restype = ctypes.c_long
