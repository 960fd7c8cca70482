"""Bundle a JS/TS program into the one script the JS runtime evaluates.

esbuild resolves the program's imports (its own files, npm packages from its
``node_modules``) into one CommonJS script; ``@capsule-run/sdk`` stays an
import, which the runtime answers with its SDK. A bundle is cached by the
digests of every file it was made from, so running an unchanged program again
does not start esbuild. The files a bundle holds are what the journal records
as the program's code (a resume can tell it changed) and what a task's granted
directories may not contain (a task could write code that later runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule.sandbox.js.toolchain import Toolchain, ensure_toolchain
from capsule.sandbox.modules import ModuleSource
from capsule.sandbox.runtime import Progress, capsule_home, run_tool

SDK_MODULE = "@capsule-run/sdk"
#: Largest bundle handed to the sandbox.
MAX_BUNDLE_BYTES = 64 * 1024**2
ESBUILD_FLAGS = (
    "--bundle",
    "--format=cjs",
    "--platform=neutral",
    # (neutral resolves no package.json fields by default)
    "--main-fields=module,main",
    "--conditions=import,default",
    "--target=es2022",
    "--keep-names",
    "--charset=utf8",
    "--log-level=error",
    "--color=false",
    f"--external:{SDK_MODULE}",
)
#: Node.js's built-in modules: none exists in the sandbox.
NODE_BUILTINS = frozenset(
    "assert async_hooks buffer child_process cluster console constants crypto dgram "
    "diagnostics_channel dns domain events fs http http2 https inspector module net os "
    "path perf_hooks process punycode querystring readline repl stream string_decoder "
    "sys timers tls trace_events tty url util v8 vm wasi worker_threads zlib".split()
)
_UNRESOLVED = re.compile(r'Could not resolve "([^"]+)"')
_LOCATION = re.compile(r"^\s+(\S+:\d+:\d+):", re.MULTILINE)


class BundleError(Exception):
    """The program cannot be bundled (a syntax error, an import not found or
    not available in the sandbox); the message says where and why."""


@dataclass(frozen=True)
class Bundle:
    code: str
    #: Every file it was made from: absolute path -> SHA-256 (hex).
    inputs: Mapping[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.code.encode()).hexdigest()


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except (OSError, ValueError):  # (ValueError: a NUL in a cache entry's name)
        return None


#: Files beside a program's sources that change how esbuild resolves or
#: compiles them without being inputs of the bundle themselves.
RESOLUTION_FILES = ("package.json", "tsconfig.json", "jsconfig.json")


def _cache_file(path: Path, toolchain: Toolchain) -> Path:
    key = hashlib.sha256(f"{path}\0{toolchain.version_key}\0{ESBUILD_FLAGS}".encode())
    return capsule_home() / "bundles" / f"{key.hexdigest()[:24]}.json"


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        return None


def _ancestors(directory: str) -> Iterator[str]:
    while True:
        yield directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory = parent


def _fingerprint(inputs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """What a bundle of these inputs (path -> digest) depends on beyond them:
    each directory holding one (a file added or removed there may resolve an
    import elsewhere: its mtime), and the files that configure esbuild in it
    and above it, where esbuild looks for them (their digests; "" for none).
    (A tsconfig.json's "extends" of a file elsewhere is not followed.)"""
    directories = sorted({os.path.dirname(name) for name in inputs})
    above = sorted({ancestor for directory in directories for ancestor in _ancestors(directory)})
    return {
        "directories": {directory: _mtime_ns(directory) for directory in directories},
        "configs": {
            os.path.join(directory, name): _sha256(os.path.join(directory, name)) or ""
            for directory in above
            for name in RESOLUTION_FILES
        },
    }


def _cached(entry: Path) -> Bundle | None:
    try:
        with open(entry, encoding="utf-8") as file:
            cached = json.load(file)
        code, inputs, fingerprint = cached["code"], cached["inputs"], cached["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # (whatever is there: bundled anew)
    if not isinstance(code, str) or not isinstance(inputs, dict) or not inputs:
        return None
    for name, digest in inputs.items():
        if _sha256(name) != digest:
            return None
    if _fingerprint(inputs) != fingerprint:
        return None
    return Bundle(code, inputs)


def _store(entry: Path, bundle: Bundle, fingerprint: dict[str, dict[str, Any]]) -> None:
    """Keep ``bundle`` for the next run, code and digests in one file replaced
    at once (best effort: a cache that cannot be written only costs a
    bundling the next time)."""
    record = {
        "code": bundle.code,
        "inputs": dict(bundle.inputs),
        "fingerprint": fingerprint,
    }
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=entry.parent, delete=False, suffix=".tmp", encoding="utf-8"
        ) as file:
            json.dump(record, file)
        os.replace(file.name, entry)
    except OSError:
        pass


def bundle_program(path: Path, progress: Progress | None = None) -> Bundle:
    """The program at ``path`` (absolute) bundled, from the cache if none of
    its files changed. BundleError if it cannot be bundled; RuntimeBuildError
    if the toolchain cannot be installed or run."""
    toolchain = ensure_toolchain(progress)
    entry = _cache_file(path, toolchain)
    cached = _cached(entry)
    if cached is not None:
        return cached
    started = time.time_ns()
    with tempfile.TemporaryDirectory(prefix="capsule-bundle-") as tmp:
        out, meta = Path(tmp) / "bundle.js", Path(tmp) / "meta.json"
        command = [
            str(toolchain.esbuild),
            str(path),
            *ESBUILD_FLAGS,
            f"--outfile={out}",
            f"--metafile={meta}",
        ]
        returncode, stdout, stderr = run_tool(command, path.parent, dict(os.environ), guarded=False)
        if returncode != 0:
            raise BundleError(_explain(stderr or stdout, path))
        if out.stat().st_size > MAX_BUNDLE_BYTES:
            raise BundleError(
                f"the program bundled with its imports is {out.stat().st_size:,} bytes; "
                f"the most a program may be is {MAX_BUNDLE_BYTES:,}"
            )
        code = out.read_text(encoding="utf-8")
        listed = json.loads(meta.read_text())["inputs"]
    inputs: dict[str, str] = {}
    settled = True
    for name in listed:
        absolute = os.path.normpath(os.path.join(path.parent, name))
        digest = _sha256(absolute)
        if digest is not None:
            inputs[absolute] = digest
        changed = _mtime_ns(absolute)
        if changed is None or changed >= started:
            # It may have changed while esbuild read it: the bundle is not
            # kept. (On a file system whose mtimes are coarser than the time
            # a bundling takes, such a change can go unseen.)
            settled = False
    bundle = Bundle(code, inputs)
    fingerprint = _fingerprint(inputs)
    # (A directory changed since the bundling began may hold a file esbuild
    # would now resolve an import to.)
    if settled and all(
        changed is not None and changed < started for changed in fingerprint["directories"].values()
    ):
        _store(entry, bundle, fingerprint)
    return bundle


def _explain(output: str, path: Path) -> str:
    """esbuild's errors, with a Node built-in named as what it is."""
    text = output.strip()
    for module in dict.fromkeys(_UNRESOLVED.findall(text)):
        name = module.removeprefix("node:").split("/")[0]
        if name in NODE_BUILTINS:
            where = _LOCATION.search(text)
            at = f" ({where.group(1)})" if where else ""
            return (
                f"the program imports {module!r}{at}, a Node.js built-in module: tasks run "
                f"in a WebAssembly sandbox, where Node's modules (fs, path, os, net, "
                f"child_process, ...) do not exist. Use what the sandbox offers instead: "
                f"fetch or http from {SDK_MODULE!r} for HTTP, messages and child tasks to "
                f"share data"
            )
    return f"bundling the program failed (esbuild):\n{text[-4000:]}"


class ScriptFinder:
    """The program source of a sandbox running a JS/TS program: its bundle,
    served under the program's module name (the JS runtime asks for nothing
    else)."""

    def __init__(self, module: str, path: Path, bundle: Bundle) -> None:
        self.module = module
        self.bundle = bundle
        self._source = ModuleSource(
            origin=str(path), code=bundle.code, is_package=False, digest=bundle.digest
        )

    def find(self, fullname: str) -> ModuleSource | None:
        return self._source if fullname == self.module else None

    def watch(self, on_source: Callable[[str, str], None]) -> None:
        for name, digest in sorted(self.bundle.inputs.items()):
            on_source(name, digest)

    def forbid_below(self, granted: Mapping[Path, str]) -> list[str]:
        problems = []
        directories = {os.path.realpath(path): who for path, who in granted.items()}
        for name in sorted(self.bundle.inputs):
            real = os.path.realpath(name)
            for directory, who in directories.items():
                if real == directory or real.startswith(directory + os.sep):
                    problems.append(
                        f"the program's file {name} is in {directory}, which is granted to "
                        f"{who}; a task could change code that later runs: move the file "
                        f"out of that directory (or grant a directory that holds no code)"
                    )
        return problems

    def remember_compiled(self, origin: str, compiled: str) -> None:
        """(The JS runtime offers no compiled forms.)"""
