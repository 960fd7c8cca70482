"""Open directories and files below a directory without following any symlink.

Tasks with a writable grant can create symlinks inside the program's directory
and swap them in and out while the host works. So the host never opens a path
below a trusted directory by its name: it opens the trusted directory, then
each component from the one before it (``openat``, ``dir_fd=``) with
``O_NOFOLLOW``, and reads what it decided on from the descriptor it opened. A
symlink anywhere below the trusted directory is refused, whatever it points to.

wasmtime takes a preopened directory only as a path; it is handed
``/proc/self/fd/N`` of a directory opened this way, which the kernel resolves to
that open directory (a "magic link"), not by looking up names again. That needs
Linux with ``/proc`` mounted; elsewhere directory grants are refused
(``can_hand_over_directories``). Module files need only ``dir_fd`` support
(``can_open_beneath``: Linux, macOS and the BSDs; not Windows).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Sequence
from pathlib import Path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# (A FIFO or device planted under a module's name must not block or wake anything.)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class PathRefused(Exception):
    """A path the host will not open; the message says why, in the user's terms."""


class IsSymlink(PathRefused):
    """The path is, or goes through, a symlink."""


def can_open_beneath() -> bool:
    """Whether this platform can open a name relative to a directory descriptor
    without following a symlink there."""
    return bool(_NOFOLLOW and _DIRECTORY) and {os.open, os.stat} <= os.supports_dir_fd


@functools.cache
def can_hand_over_directories() -> bool:
    """Whether ``/proc/self/fd/N`` of a directory descriptor reopens that very
    directory (Linux with /proc mounted)."""
    if not can_open_beneath():
        return False
    try:
        fd = os.open(os.sep, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError:
        return False
    try:
        mine = os.fstat(fd)
        theirs = os.stat(descriptor_path(fd))
    except OSError:
        return False
    finally:
        os.close(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def descriptor_path(fd: int) -> str:
    """A path naming the open directory ``fd`` itself (see the module's doc)."""
    return f"/proc/self/fd/{fd}"


def entry_kind(dir_fd: int, name: str) -> str:
    """What ``name`` in the directory ``dir_fd`` is now, without following it:
    "file", "directory", "symlink", "other" or "missing". Only a hint: what the
    host then opens is checked again on the descriptor."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except (OSError, ValueError):
        return "missing"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _check_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise PathRefused(f"{name!r} is not a name in a directory")


def open_directory_at(dir_fd: int, name: str) -> int:
    """The directory ``name`` in ``dir_fd``, opened without following a symlink;
    IsSymlink if it is one, FileNotFoundError if there is nothing by that name,
    NotADirectoryError if it is something else, PathRefused if it cannot be opened."""
    _check_name(name)
    try:
        return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
            raise FileNotFoundError(exc.errno, exc.strerror, name) from None
        kind = entry_kind(dir_fd, name)
        if kind == "symlink":
            raise IsSymlink("is a symlink") from None
        if kind != "directory":
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", name) from None
        raise PathRefused(f"cannot be opened: {exc.strerror}") from None


def open_file_at(dir_fd: int, name: str) -> int:
    """The regular file ``name`` in ``dir_fd``, opened for reading without
    following a symlink; PathRefused otherwise (FileNotFoundError if missing)."""
    _check_name(name)
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
            raise FileNotFoundError(exc.errno, exc.strerror, name) from None
        if entry_kind(dir_fd, name) == "symlink" or exc.errno in (errno.ELOOP, errno.EMLINK):
            raise IsSymlink("is a symlink") from None
        raise PathRefused(f"cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathRefused("is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_root(path: Path) -> int:
    """A trusted directory, opened by its path (which may hold symlinks: it is
    the user's or the host's, never below anything a task can write)."""
    try:
        return os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except (OSError, ValueError) as exc:
        raise PathRefused(f"cannot be opened: {exc}") from None


def open_directory_beneath(root: Path, parts: Sequence[str]) -> int:
    """The directory ``root/parts...``, each part opened from the one before
    without following a symlink (the caller closes it). PathRefused (naming the
    part), FileNotFoundError or NotADirectoryError if it cannot be reached that way."""
    fd = open_root(root)
    try:
        for index, part in enumerate(parts):
            try:
                inner = open_directory_at(fd, part)
            except PathRefused as exc:
                where = root.joinpath(*parts[: index + 1])
                raise type(exc)(f"{where} {exc}") from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(fd: int, limit: int) -> bytes:
    """All of the open file ``fd``; PathRefused if it holds more than ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(1 << 20, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise PathRefused(f"is larger than {limit:,} bytes")
