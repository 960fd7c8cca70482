"""Serve module source text to the guest: the user's program and pure-Python packages.

The guest's import system asks for modules by dotted name; this finder answers
from an explicit list of roots (the program's directory, then the host
environment's site-packages), never from the host's standard library (the guest
has its own, for its own CPython version). Only source files are served: a C
extension module is refused with an explanation, since native code cannot run
in the sandbox.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import site
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

_SOURCE_SUFFIXES = tuple(importlib.machinery.SOURCE_SUFFIXES)
_EXTENSION_SUFFIXES = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd")


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
    """Resolves dotted module names against a fixed list of root directories."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots
        # Each module is read once per run, so every instance of the run sees the
        # same source even if the file is edited meanwhile.
        self._cache: dict[str, ModuleSource | Refused | None] = {}
        self._compiled: dict[str, str] = {}
        self._on_source: Callable[[str, str], None] | None = None

    def watch(self, on_source: Callable[[str, str], None]) -> None:
        """Call ``on_source(path, sha256)`` for every source file served so far
        and for each one served from now on (once per file: the journal keeps
        them, so that a resume can tell whether the program's code changed)."""
        self._on_source = on_source
        for found in list(self._cache.values()):
            if isinstance(found, ModuleSource) and found.digest:
                on_source(found.origin, found.digest)

    def find(self, fullname: str) -> ModuleSource | Refused | None:
        if fullname not in self._cache:
            found = self._cache[fullname] = self._find(fullname)
            on_source = self._on_source
            if on_source is not None and isinstance(found, ModuleSource) and found.digest:
                on_source(found.origin, found.digest)
        found = self._cache[fullname]
        if isinstance(found, ModuleSource) and found.compiled is None:
            compiled = self._compiled.get(found.origin)
            if compiled is not None:
                found = self._cache[fullname] = replace(found, compiled=compiled)
        return found

    def remember_compiled(self, origin: str, compiled: str) -> None:
        """Keep a module's compiled form (from the guest) to serve with its source."""
        if any(
            isinstance(found, ModuleSource) and found.origin == origin
            for found in self._cache.values()
        ):
            self._compiled.setdefault(origin, compiled)

    def _find(self, fullname: str) -> ModuleSource | Refused | None:
        parts = fullname.split(".")
        if any(not part.isidentifier() for part in parts):
            return None
        for root in self.roots:
            found = self._find_in(root, parts, fullname)
            if found is not None:
                return found
        return None

    def _find_in(
        self, root: Path, parts: list[str], fullname: str
    ) -> ModuleSource | Refused | None:
        directory = root
        for package in parts[:-1]:
            directory = directory / package
            if not directory.is_dir():
                return None
        leaf = parts[-1]
        package_dir = directory / leaf
        init = package_dir / "__init__.py"
        if init.is_file():
            return self._read(root, init, is_package=True)
        for suffix in _SOURCE_SUFFIXES:
            candidate = directory / f"{leaf}{suffix}"
            if candidate.is_file():
                return self._read(root, candidate, is_package=False)
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name.startswith(f"{leaf}.") and entry.name.endswith(_EXTENSION_SUFFIXES):
                    return Refused(
                        f"module {fullname!r} is a C extension ({entry}); native code cannot run "
                        f"in the WebAssembly sandbox, only pure-Python modules and packages can "
                        f"be imported"
                    )
        if package_dir.is_dir():
            # A namespace package: a directory without __init__.py, as Python allows.
            return ModuleSource(origin=str(package_dir), code="", is_package=True)
        return None

    @staticmethod
    def _read(root: Path, path: Path, is_package: bool) -> ModuleSource | Refused:
        # A guest that may write a directory of the program could plant a symlink
        # named like a module: only Python sources inside the root are served.
        resolved = path.resolve()
        inside = root.resolve()
        if (
            inside not in resolved.parents
            or resolved.suffix != ".py"
            or ".capsule" in resolved.relative_to(inside).parts
        ):
            return Refused(
                f"{path} leads to {resolved}: only Python source files inside "
                f"{root} are served to the sandbox"
            )
        try:
            data = path.read_bytes()
            # Newlines as read_text gives them (universal newlines).
            code = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except (OSError, UnicodeDecodeError) as exc:
            return Refused(f"cannot read {path}: {exc}")
        return ModuleSource(
            origin=str(path),
            code=code,
            is_package=is_package,
            digest=hashlib.sha256(data).hexdigest(),
        )
