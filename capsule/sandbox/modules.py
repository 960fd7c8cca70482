"""Serve module source text to the guest: the user's program and pure-Python packages.

The guest's import system asks for modules by dotted name; this finder answers
from an explicit list of roots (the program's directory, then the host
environment's site-packages), never from the host's standard library (the guest
has its own, for its own CPython version). Only source files are served: a C
extension module is refused with an explanation, since native code cannot run
in the sandbox.

Every name a guest asks for is attacker-controlled, and tasks may write some
directories of the program. So: each file is reached from its root one
component at a time without following a symlink and read from the descriptor
opened (paths.py); a module in a directory granted to a task is refused
(``forbid_below``); a module once served is pinned by its digest for the run;
and what the finder keeps is bounded (see ``ModuleFinder``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from capsule.sandbox import paths
from capsule.sandbox.paths import IsSymlink, PathRefused

_SOURCE_SUFFIXES = tuple(importlib.machinery.SOURCE_SUFFIXES)
_EXTENSION_SUFFIXES = tuple(dict.fromkeys((*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd")))
#: Longest dotted name looked up (a path the kernel could open is shorter).
MAX_NAME_LENGTH = 1024
#: Largest module file served.
MAX_SOURCE_BYTES = 16 * 1024**2
#: Source text kept in memory for the run; past it, a module is read again (and
#: checked against its digest) each time it is served.
CACHED_SOURCE_BYTES = 64 * 1024**2
#: Compiled forms (from load instances) kept for the run; past it, none more.
CACHED_COMPILED_BYTES = 64 * 1024**2
_GRANTED_WHY = (
    "modules are not imported from a granted directory (a task may have written "
    "the code there, or every task could read through an import what only the "
    "granted tasks may)"
)


@dataclass(frozen=True)
class ModuleSource:
    origin: str
    code: str
    is_package: bool
    compiled: str | None = None
    #: SHA-256 of the file as read (hex); empty for a namespace package.
    digest: str = ""


@dataclass(frozen=True)
class Refused:
    reason: str


class ProgramFinder(Protocol):
    """Where a sandbox's instances get the program's code: a :class:`ModuleFinder`
    for a Python program, a bundle for a JS/TS one (capsule.sandbox.js)."""

    def find(self, fullname: str) -> ModuleSource | Refused | None: ...

    def watch(self, on_source: Callable[[str, str], None]) -> None: ...

    def forbid_below(self, granted: Mapping[Path, str]) -> list[str]: ...

    def remember_compiled(self, origin: str, compiled: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Served:
    """A module served in this run: where it is, and its file's digest."""

    root: int
    #: The file (or, for a namespace package, the directory) below its root.
    parts: tuple[str, ...]
    origin: str
    is_package: bool
    digest: str


def site_package_dirs() -> list[Path]:
    """The host environment's site-packages directories, in search order."""
    seen: list[Path] = []
    candidates = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]
    try:
        candidates.append(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - site without user dirs
        pass
    for raw in candidates:
        if raw:
            path = Path(raw)
            if path.is_dir() and path not in seen:
                seen.append(path)
    return seen


class ModuleFinder:
    """Resolves dotted module names against a fixed list of root directories.

    What it holds is bounded whatever guests ask: nothing for a name not found
    or refused; for each module served, one record (its name, path and digest:
    ~550 bytes plus the name's and the path's lengths), and these are at most
    the module files and directories below the roots outside every granted
    directory, which no task can add to; source text up to ``cached_source_bytes``
    and compiled forms up to ``cached_compiled_bytes`` in all. A lookup holds
    at most one file of ``MAX_SOURCE_BYTES`` while it reads it."""

    def __init__(
        self,
        roots: list[Path],
        cached_source_bytes: int = CACHED_SOURCE_BYTES,
        cached_compiled_bytes: int = CACHED_COMPILED_BYTES,
    ) -> None:
        self.roots = roots
        # Each root as given and as resolved: a directory a task may write is
        # recognised under either name (see forbid_below).
        self._root_names = [
            tuple(dict.fromkeys((os.path.abspath(root), os.path.realpath(root)))) for root in roots
        ]
        self._lock = threading.Lock()
        self._served: dict[str, _Served] = {}
        self._origins: set[str] = set()
        #: Origin -> what is served for it, while there is room (compiled form included).
        self._sources: dict[str, ModuleSource] = {}
        self._source_room = cached_source_bytes
        self._compiled: dict[str, str] = {}
        self._compiled_room = cached_compiled_bytes
        #: Directories any task may write -> who may (for messages).
        self._granted: dict[str, str] = {}
        self._on_source: Callable[[str, str], None] | None = None

    def watch(self, on_source: Callable[[str, str], None]) -> None:
        """Call ``on_source(path, sha256)`` for every source file served so far
        and for each one served from now on (once per file: the journal keeps
        them, so that a resume can tell whether the program's code changed)."""
        self._on_source = on_source
        with self._lock:
            served = list(self._served.values())
        for record in served:
            if record.digest:
                on_source(record.origin, record.digest)

    def forbid_below(self, granted: Mapping[Path, str]) -> list[str]:
        """Refuse, from now on, every module in or below these directories
        (each mapped to a task granted it, e.g. "task 'x' (allowed_files 'out:rw')"):
        a task could have put code in a writable one that every later instance
        would run, and a module of a read-only one would let any task read what
        only the granted tasks may. Returns what is wrong with the modules served
        so far (one line each)."""
        added = {os.path.abspath(path): who for path, who in granted.items()}
        with self._lock:
            # (Replaced, not updated: lookups read it without the lock.)
            self._granted = {**self._granted, **added}
            served = list(self._served.items())
        problems = []
        for fullname, record in served:
            where = self._granted_above(record.root, record.parts)
            if where is not None:
                with self._lock:  # looked up again, it is refused
                    self._served.pop(fullname, None)
                    self._sources.pop(record.origin, None)
                problems.append(
                    f"module {fullname!r} ({record.origin}) is in {where[0]}, which is "
                    f"granted to {where[1]}; {_GRANTED_WHY}: move the module out of that "
                    f"directory (or grant a directory that holds no modules)"
                )
        return problems

    def find(self, fullname: str) -> ModuleSource | Refused | None:
        if len(fullname) > MAX_NAME_LENGTH:
            return None
        parts = fullname.split(".")
        if any(not part.isidentifier() for part in parts):
            return None
        # (Read without the lock: a dict lookup is atomic, and the common case.)
        record = self._served.get(fullname)
        if record is not None:
            cached = self._sources.get(record.origin)
            return cached if cached is not None else self._serve_again(fullname, record)
        if not paths.can_open_beneath():
            return Refused(
                "this platform cannot open a file without following symlinks (no "
                "dir_fd support), so no module is served to the sandbox"
            )
        for index in range(len(self.roots)):
            found = self._find_in(index, parts, fullname)
            if found is not None:
                return self._remember(fullname, found)
        return None

    def remember_compiled(self, origin: str, compiled: str) -> None:
        """Keep a module's compiled form (from the guest) to serve with its source."""
        with self._lock:
            size = sys.getsizeof(compiled)
            if (
                origin in self._origins
                and origin not in self._compiled
                and size <= self._compiled_room
            ):
                self._compiled[origin] = compiled
                self._compiled_room -= size
                cached = self._sources.get(origin)
                if cached is not None:
                    self._sources[origin] = replace(cached, compiled=compiled)

    def _remember(
        self, fullname: str, found: tuple[_Served, ModuleSource] | Refused
    ) -> ModuleSource | Refused:
        if isinstance(found, Refused):
            return found
        record, source = found
        with self._lock:
            pinned = self._served.get(fullname)
            if pinned is None:
                self._served[fullname] = record
                self._origins.add(record.origin)
                size = sys.getsizeof(source.code)
                if size <= self._source_room:
                    self._sources[record.origin] = source
                    self._source_room -= size
        if pinned is not None:  # another thread served it meanwhile
            return self._pinned(pinned, source)
        on_source = self._on_source
        if on_source is not None and record.digest:
            on_source(record.origin, record.digest)
        return source

    def _serve_again(self, fullname: str, record: _Served) -> ModuleSource | Refused:
        # (A module below a granted directory is no longer in _served: forbid_below.)
        found = self._find_in(record.root, list(fullname.split(".")), fullname)
        if isinstance(found, Refused):
            return found
        if found is None:
            return Refused(f"{record.origin} was removed while the run was using it")
        return self._pinned(record, found[1])

    def _pinned(self, record: _Served, source: ModuleSource) -> ModuleSource | Refused:
        """``source`` as read again, if it is what was served first."""
        if source.origin != record.origin or source.digest != record.digest:
            return Refused(
                f"{record.origin} changed while the run was using it; every instance of "
                f"a run gets the same code: run the program again to use the new version"
            )
        with self._lock:
            compiled = self._compiled.get(record.origin)
        return replace(source, compiled=compiled)

    def _granted_above(self, root: int, parts: tuple[str, ...]) -> tuple[str, str] | None:
        """The granted directory holding ``parts`` below root ``root``, if any,
        and a task granted it."""
        granted = self._granted
        if not granted:
            return None
        relative = "/".join(parts)
        for name in self._root_names[root]:
            place = os.path.join(name, relative)
            for directory, who in granted.items():
                if place == directory or place.startswith(directory + os.sep):
                    return directory, who
        return None

    @staticmethod
    def _granted_refusal(fullname: str, where: tuple[str, str]) -> Refused:
        return Refused(
            f"module {fullname!r} is in {where[0]}, which is granted to {where[1]}; "
            f"{_GRANTED_WHY}: move the module out of it"
        )

    def _find_in(
        self, root: int, parts: list[str], fullname: str
    ) -> tuple[_Served, ModuleSource] | Refused | None:
        """The module ``parts`` below root number ``root``, reached without
        following a symlink and read from the descriptor opened."""
        *packages, leaf = parts
        # Nothing in or below a granted directory is looked at (the package
        # directory ``parts`` itself included: a task could add __init__.py).
        where = self._granted_above(root, tuple(parts))
        if where is not None:
            return self._granted_refusal(fullname, where)
        base = self.roots[root]
        try:
            fd = paths.open_root(base)
        except PathRefused:
            return None
        try:
            for index, package in enumerate(packages):
                try:
                    inner = paths.open_directory_at(fd, package)
                except (FileNotFoundError, NotADirectoryError):
                    return None
                except PathRefused as exc:
                    return self._refused_entry(fullname, base, parts[: index + 1], exc)
                os.close(fd)
                fd = inner
            return self._find_leaf(root, fd, packages, leaf, fullname)
        finally:
            os.close(fd)

    def _find_leaf(
        self, root: int, dir_fd: int, packages: list[str], leaf: str, fullname: str
    ) -> tuple[_Served, ModuleSource] | Refused | None:
        base = self.roots[root]
        package_kind = paths.entry_kind(dir_fd, leaf)
        if package_kind == "symlink":
            return self._refused_entry(fullname, base, [*packages, leaf], IsSymlink())
        if package_kind == "directory":
            try:
                package_fd = paths.open_directory_at(dir_fd, leaf)
            except (FileNotFoundError, NotADirectoryError):
                package_fd = None
            except PathRefused as exc:
                return self._refused_entry(fullname, base, [*packages, leaf], exc)
            if package_fd is not None:
                try:
                    found = self._read(
                        root, package_fd, (*packages, leaf, "__init__.py"), True, fullname
                    )
                finally:
                    os.close(package_fd)
                if found is not None:
                    return found
        for suffix in _SOURCE_SUFFIXES:
            found = self._read(root, dir_fd, (*packages, leaf + suffix), False, fullname)
            if found is not None:
                return found
        for suffix in _EXTENSION_SUFFIXES:
            if paths.entry_kind(dir_fd, leaf + suffix) != "missing":
                path = base.joinpath(*packages, leaf + suffix)
                return Refused(
                    f"module {fullname!r} is a C extension ({path}); native code cannot run "
                    f"in the WebAssembly sandbox, only pure-Python modules and packages can "
                    f"be imported"
                )
        if package_kind == "directory":
            # A namespace package: a directory without __init__.py, as Python allows.
            parts = (*packages, leaf)
            origin = str(base.joinpath(*parts))
            return _Served(root, parts, origin, True, ""), ModuleSource(origin, "", True)
        return None

    def _read(
        self, root: int, dir_fd: int, parts: tuple[str, ...], is_package: bool, fullname: str
    ) -> tuple[_Served, ModuleSource] | Refused | None:
        """The source file ``parts[-1]`` in ``dir_fd``, if there is one."""
        if paths.entry_kind(dir_fd, parts[-1]) not in ("file", "symlink"):
            return None
        path = self.roots[root].joinpath(*parts)
        try:
            fd = paths.open_file_at(dir_fd, parts[-1])
        except FileNotFoundError:
            return None
        except PathRefused as exc:
            return self._refused_entry(fullname, self.roots[root], list(parts), exc)
        try:
            data = paths.read_bounded(fd, MAX_SOURCE_BYTES)
            # Newlines as read_text gives them (universal newlines).
            code = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except PathRefused as exc:
            return Refused(f"module {fullname!r}: {path} {exc}")
        except (OSError, UnicodeDecodeError) as exc:
            return Refused(f"cannot read {path}: {exc}")
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()
        record = _Served(root, parts, str(path), is_package, digest)
        return record, ModuleSource(str(path), code, is_package, digest=digest)

    @staticmethod
    def _refused_entry(
        fullname: str, base: Path, parts: list[str] | tuple[str, ...], exc: PathRefused
    ) -> Refused:
        path = base.joinpath(*parts)
        if isinstance(exc, IsSymlink):
            return Refused(
                f"module {fullname!r}: {path} is a symlink; modules are served only from "
                f"real files and directories (a task could make a symlink to reach any "
                f"host file): put the file or directory itself in its place"
            )
        return Refused(f"module {fullname!r}: {path} {exc}")
