"""The message channel an instance shares with the host, in its own memory.

Why: a send and a receive were a host call each, and on a stream of messages
the crossings were the cost (BENCHMARKS.md, Messages): with the GIL held for
each, two busy actors spent most of their time waiting for each other.

So a task that the host has given *credit* to a target (room reserved in its
mailbox, see ``capsule.actors.Router.reserve``) writes its next messages to it
here instead of calling the host, and a receive may take every message waiting
at once, the guest keeping the rest. The host takes what the guest wrote at the
task's next host call (before answering it, so steps keep the guest's order),
at every epoch tick (a task that computes after sending does not hold its
messages back by more than a tick), and when the attempt ends, however it ends.

The region is an ``array`` the guest runtime allocates in its snapshot; the
guest's load says where (an offset into its linear memory) and how long it is,
and the host checks that it lies inside the image mapping the instance's marker
was found in (``Prefaulter.linear_memory``): what the guest says is only where
to look, and every read stays inside that instance's memory. Layout:

- byte 0: how many messages of the last batch the host handed over the guest
  has given to the task's code (the host puts the rest back in the mailbox
  when the attempt ends);
- from byte 1: records, each ``[ready: u8][target length: u16][body length:
  u32][target, UTF-8][body, JSON (ASCII)]``.

The guest writes a record, clears the ready byte just after it, then sets the
record's own: a record is the host's to take once its ready byte is 1 (a one-
byte store, which an epoch tick cannot split). The host remembers how far it
took. It starts the records again (clearing the first ready byte) only while
the guest is inside a host call, which the guest never makes while it writes a
record (it writes in C calls only, with its garbage collector off, and not at
all while a trace or profile function could run between its lines); the guest
sees the cleared byte and writes from the start again.

Credit lasts only while the guest runs: it forgets it, and the host gives the
places back, at every call that may wait or tell it more about its targets
(call, spawn, wait, cancel, sleep, ask, receive, http, a send that had to wait
or failed) and when the attempt ends (``capsule.supervisor.messages``).
"""

from __future__ import annotations

import struct

from capsule.sandbox.hostcall import read_at, write_at

#: Where the records start.
RECORDS = 1
#: A record's header: ready byte, target length, body length.
_HEAD = struct.Struct("<BHI")
_READY = 1
#: The largest region a guest may declare.
MAX_SIZE = 1024**2


class ChannelError(Exception):
    """The guest wrote something that is not a record (a hostile or broken guest)."""


class Channel:
    """The host's side of one instance's channel (used on that instance's thread)."""

    def __init__(self, address: int, size: int) -> None:
        #: Where the region is in the host's address space.
        self.address = address
        self.size = size
        #: Where the next record the host has not taken starts.
        self._next = RECORDS

    def take(self) -> list[tuple[str, str]]:
        """The records the guest finished since the last take, as (target,
        body JSON), in the order it wrote them."""
        at = self._next
        address = self.address
        if read_at(address + at, 1)[0] != _READY:  # the common case: nothing new
            return []
        records = []
        limit = self.size - _HEAD.size
        while at <= limit:
            ready, target_length, body_length = _HEAD.unpack(read_at(address + at, _HEAD.size))
            if ready != _READY:
                break
            start = at + _HEAD.size
            end = start + target_length + body_length
            if end >= self.size:  # (the ready byte after it must fit too)
                raise ChannelError(f"a record at byte {at} runs past the channel's end")
            data = read_at(address + start, end - start)
            try:
                target = data[:target_length].decode()
                body = data[target_length:].decode("ascii")
            except UnicodeDecodeError as exc:
                raise ChannelError(f"a record at byte {at} is not text: {exc}") from None
            records.append((target, body))
            at = end
        self._next = at
        return records

    def restart(self) -> None:
        """Start the records again. Only while the guest is inside a host call
        (having taken every record first)."""
        if self._next != RECORDS:
            write_at(self.address + RECORDS, b"\0", 1)
            self._next = RECORDS

    def batch_handed(self) -> None:
        """A new batch of messages goes to the guest: none of it taken yet."""
        write_at(self.address, b"\0", 1)

    def batch_taken(self) -> int:
        """How many messages of the last batch the guest gave to the task."""
        return int(read_at(self.address, 1)[0])
