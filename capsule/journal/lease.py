"""Run ownership: whoever executes a run holds its lease.

A lease is the run row's owner (host, process and random bytes: unique
across machines and PID namespaces) and the time it expires. The process
that runs a run renews it while the run's journal is open; a run whose
lease expired is dead, whatever its process id says (a process id means
nothing in another PID namespace, and a run that crashed as PID 1 in a
container would otherwise look alive forever). A resume takes the lease
atomically, and only an expired one: of two claimants at once, one runs.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass

#: How long a lease lasts unless renewed (seconds); CAPSULE_LEASE_SECONDS
#: changes it (from 1 s to an hour).
DEFAULT_LEASE_SECONDS = 15.0
MIN_LEASE_SECONDS = 1.0
MAX_LEASE_SECONDS = 3600.0


def lease_seconds() -> float:
    """The lease's length: ``CAPSULE_LEASE_SECONDS``, or the default."""
    raw = os.environ.get("CAPSULE_LEASE_SECONDS")
    try:
        seconds = float(raw) if raw else DEFAULT_LEASE_SECONDS
    except ValueError:
        return DEFAULT_LEASE_SECONDS
    if not math.isfinite(seconds):
        return DEFAULT_LEASE_SECONDS
    return min(max(seconds, MIN_LEASE_SECONDS), MAX_LEASE_SECONDS)


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@functools.cache
def this_machine() -> str:
    """This boot of this machine's kernel, and this process's PID namespace:
    where a process id means the same process ("" where unknown)."""
    boot, namespace = _read("/proc/sys/kernel/random/boot_id"), _pid_namespace()
    return f"{boot}/{namespace}" if boot and namespace else ""


@dataclass(frozen=True)
class Lease:
    """The lease this process holds (or is about to take) on a run."""

    owner: str
    seconds: float

    @classmethod
    def new(cls) -> Lease:
        """A lease for this process: its owner names the host (for people),
        the machine and PID namespace, the process id and random bytes."""
        host = socket.gethostname()[:64].replace(" ", "_") or "?"
        owner = f"{host} {os.getpid()} {this_machine() or '-'} {secrets.token_hex(6)}"
        return cls(owner, lease_seconds())

    @property
    def renew_every(self) -> float:
        """Renewed three times a lease, so that one late renewal loses nothing."""
        return self.seconds / 3

    def expires(self) -> float:
        """When it expires if taken or renewed now (wall-clock seconds)."""
        return time.time() + self.seconds


def expired(expires_at: object, now: float | None = None) -> bool:
    """Whether a lease that expires at ``expires_at`` (a journal's value:
    anything) has expired."""
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        return True
    return expires_at < (time.time() if now is None else now)


def owner_gone(owner: object) -> bool:
    """Whether the process that holds a lease is known to be gone already,
    before its lease expires: only where its process id means the same as
    here (this boot of this machine, this PID namespace) and no process has
    it. Anywhere else, only the lease's expiry tells (a reused id: the
    owner looks alive, and its run waits for the expiry; never the reverse)."""
    if not isinstance(owner, str):
        return False
    parts = owner.split(" ")
    if len(parts) != 4 or not parts[1].isdigit() or parts[2] != this_machine() or not parts[2]:
        return False
    pid = int(parts[1])
    if not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False
