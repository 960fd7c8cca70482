"""Build and cache the generic guest runtime component.

The component (CPython + the Capsule SDK + the guest shim, see ``guest/``) is built
from this package's own sources with componentize-py the first time it is
needed, compiled to native code, and both artifacts are kept in a per-user
cache. The cache key covers every input of the build, so a changed SDK, WIT file,
toolchain version or engine setting builds a new entry instead of loading a stale
one. Concurrent builders are serialised by a file lock and publish with an
atomic rename, so a reader only ever sees a complete entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from capsule import logs
from capsule.interrupts import on_stop, stop_requested
from capsule.sandbox import oom
from capsule.sandbox.distributions import installed_version

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../capsule
GUEST_APP = "capsule_guest"
#: The guest's asyncio event loop, a module of its own beside the app.
GUEST_LOOP = "capsule_loop"
WORLD = "task-runtime"
COMPONENT_FILE = "guest.wasm"
COMPILED_FILE = "guest.cwasm"
#: The logger (below "capsule") the build's progress goes to.
BUILD_LOGGER = "sandbox.build"


class RuntimeBuildError(RuntimeError):
    """The guest runtime could not be built."""


def capsule_home() -> Path:
    """Where Capsule keeps per-user state: ``$CAPSULE_HOME`` or the user cache dir."""
    override = os.environ.get("CAPSULE_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("capsule", appauthor=False))


def wit_dir() -> Path:
    """The WIT package: bundled in the wheel as ``capsule/_wit``, or ``wit/`` in a checkout."""
    bundled = PACKAGE_DIR / "_wit"
    if bundled.is_dir():
        return bundled
    checkout = PACKAGE_DIR.parent / "wit"
    if checkout.is_dir():
        return checkout
    raise RuntimeBuildError(f"the WIT package is missing (looked in {bundled} and {checkout})")


def guest_sources() -> dict[str, Path]:
    """Every file the component is built from, by its path inside the build."""
    files: dict[str, Path] = {
        "capsule/__init__.py": PACKAGE_DIR / "__init__.py",
        "capsule/http.py": PACKAGE_DIR / "http.py",
        f"{GUEST_APP}.py": PACKAGE_DIR / "sandbox" / "guest" / f"{GUEST_APP}.py",
        f"{GUEST_LOOP}.py": PACKAGE_DIR / "sandbox" / "guest" / f"{GUEST_LOOP}.py",
    }
    for path in sorted((PACKAGE_DIR / "sdk").glob("*.py")):
        files[f"capsule/sdk/{path.name}"] = path
    for path in sorted(wit_dir().glob("*.wit")):
        files[f"wit/{path.name}"] = path
    return files


def cache_key(engine_settings: str) -> str:
    """A digest of everything the built and compiled artifacts depend on."""
    return build_digest(
        guest_sources(),
        {
            "componentize-py": installed_version("componentize-py") or "missing",
            "engine": engine_settings,
            "patches": oom.PATCH_VERSION,
        },
    )


def build_digest(files: dict[str, Path], settings: dict[str, str]) -> str:
    """A digest of a build's input files (by their paths inside the build) and
    settings, and of the wasmtime that compiles it."""
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    settings = {"wasmtime": installed_version("wasmtime") or "missing", **settings}
    for key, value in settings.items():
        digest.update(f"{key}={value}\0".encode())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class RuntimeArtifacts:
    directory: Path

    @property
    def component(self) -> Path:
        return self.directory / COMPONENT_FILE

    @property
    def compiled(self) -> Path:
        return self.directory / COMPILED_FILE


class Progress:
    """Progress of the guest runtime's build (a long first step): INFO records
    on the ``capsule.sandbox.build`` logger, never the process's stderr (an
    application shows them as it shows its logs; the `capsule` command, on its
    stderr: capsule.logs.show_on_stderr)."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log if log is not None else logs.logger(BUILD_LOGGER)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        start = time.monotonic()
        self.say(f"{what} ...")
        try:
            yield
        except BaseException:
            self.say(f"{what} failed after {time.monotonic() - start:.1f}s")
            raise
        self.say(f"{what}: done in {time.monotonic() - start:.1f}s")

    def say(self, text: str) -> None:
        self.log.info(text)

    def warn(self, text: str) -> None:
        self.log.warning(text)


def _componentize(staging: Path, output: Path) -> None:
    # A subprocess, not the in-process API: the build peaks at ~400 MB and prints
    # its own chatter, neither of which belongs in the host process.
    command = [
        sys.executable,
        "-c",
        "import sys, componentize_py; sys.argv[0] = 'componentize-py'; componentize_py.script()",
        "-d",
        str(staging / "wit"),
        "-w",
        WORLD,
        "componentize",
        GUEST_APP,
        "-p",
        str(staging),
        "-o",
        str(output),
    ]
    # An empty VIRTUAL_ENV stops componentize-py from adding the host's
    # site-packages to the build: the component holds exactly our sources.
    env = {**os.environ, "VIRTUAL_ENV": str(staging / "no-venv")}
    returncode, stdout, stderr = run_tool(command, staging, env)
    if returncode != 0:
        raise RuntimeBuildError(
            "componentize-py failed to build the guest runtime:\n"
            + (stderr or stdout).strip()[-4000:]
        )


def run_tool(
    command: list[str], cwd: Path, env: dict[str, str], guarded: bool = True
) -> tuple[int, str, str]:
    """Run a build tool to its end, out of the reach of stop signals but
    killed if this thread's run is interrupted (see detached): its exit
    status, stdout and stderr. ``guarded``: through tool_guard, so that the
    tool and all it started die with this process, even of kill -9 (a long
    build's; a tool of milliseconds, esbuild's, need not pay for the guard)."""
    if guarded:
        # (By its file, isolated: a build's directory may hold a package named
        # capsule, and the guard needs the standard library alone.)
        guard = [sys.executable, "-I", str(TOOL_GUARD), str(os.getpid())]
        command = [*guard, *command]
    try:
        started = detached(command, cwd=cwd, env=env)
    except OSError as exc:  # (missing, not executable, on a noexec mount)
        raise RuntimeBuildError(f"cannot run {command[0]}: {exc}") from None
    with started as process:
        try:
            stdout, stderr = communicate_interruptibly(process, kill_group=True)
        except BaseException:
            _kill_group(process)
            raise
    if guarded and process.returncode == 127 and stderr.startswith("cannot run "):
        raise RuntimeBuildError(stderr.strip())
    return process.returncode, stdout, stderr


def _kill_group(process: subprocess.Popen[str]) -> None:
    """Kill the tool's process group (it leads one: detached), which holds
    what it started too."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


#: Runs a build tool so that it dies with this process (see run_tool).
TOOL_GUARD = Path(__file__).resolve().with_name("tool_guard.py")

#: The signals Ctrl-C and `kill` send: a build must not die of them (see detached).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def detached(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``command`` (its output piped) beyond the reach of the signals
    that interrupt this process. Ctrl-C at a terminal signals the whole
    process group, and a build killed by it would fail the run (status
    "error", not resumable) instead of interrupting it; Capsule stops it
    itself (an interrupt in the wait for it kills it, see capsule.interrupts).

    A session of its own is not enough: the child leaves the group only
    after it reset its signal handlers (subprocess's vfork path), and a
    signal in between kills it, failing the build before the interrupt
    reaches the run. So the child starts with the stop signals blocked (it
    inherits this thread's mask) and keeps them blocked: SIGKILL stops it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def communicate_interruptibly(
    process: subprocess.Popen[str], kill_group: bool = False
) -> tuple[str, str]:
    """The process's output once it ended; KeyboardInterrupt if this thread's
    run is interrupted meanwhile (a signal, or its owner's stop request, which
    kills the process, or ``kill_group``: the process group it leads)."""
    kill = (lambda: _kill_group(process)) if kill_group else process.kill
    with on_stop(kill):
        stdout, stderr = process.communicate()
    if stop_requested():
        raise KeyboardInterrupt
    return stdout, stderr


def _patch_refused_growth(component: Path, progress: Progress) -> None:
    """Make a refused memory growth trap where the host can tell (see oom.py)."""
    patched = oom.patch_refused_growth(component.read_bytes())
    if patched is None:
        # (The host then tells from the memory's size alone, less surely.)
        progress.warn(
            "the guest runtime's sbrk is not of the expected shape; "
            "running out of memory is reported less reliably"
        )
        return
    component.write_bytes(patched)


def ensure_runtime(
    engine: object, engine_settings: str, progress: Progress | None = None
) -> RuntimeArtifacts:
    """Return the cached runtime for these settings, building it first if needed.

    ``engine`` is the wasmtime Engine the compiled artifact must match.
    """

    def build(staging: Path, component: Path, progress: Progress) -> None:
        for name, source in guest_sources().items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        with progress.step("componentize-py: CPython + Capsule SDK -> component"):
            _componentize(staging, component)
        _patch_refused_growth(component, progress)

    return cached_build(
        capsule_home() / "runtime",
        cache_key(engine_settings),
        "the guest runtime",
        "about 20 s",
        build,
        engine,
        progress,
    )


def cached_build(
    home: Path,
    key: str,
    name: str,
    duration: str,
    build: Callable[[Path, Path, Progress], None],
    engine: object,
    progress: Progress | None = None,
) -> RuntimeArtifacts:
    """The artifacts cached in ``home`` under ``key``; if there are none,
    ``build(staging, component, progress)`` writes the component (``staging``:
    an empty directory for its inputs), which is compiled for ``engine``, and
    both are published at once. Concurrent builders are serialised by a file
    lock; a reader only ever sees a complete entry. ``name`` and ``duration``
    are for its progress: "the guest runtime", "about 20 s"."""
    from wasmtime.component import Component

    artifacts = RuntimeArtifacts(home / key)
    if artifacts.compiled.is_file():
        _touch(artifacts.directory)
        return artifacts
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeBuildError(f"cannot create the runtime cache at {home}: {exc}") from exc
    from filelock import FileLock  # only a build needs it

    progress = progress or Progress()
    with FileLock(str(home / f"{key}.lock")):
        if artifacts.compiled.is_file():  # another process built it while we waited
            return artifacts
        # What a build of this key left when it was killed (the lock is
        # ours: no build of it runs now).
        for leftover in home.glob(f".build-{key}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        started = time.monotonic()
        progress.say(f"building {name} once ({duration}); cached in {artifacts.directory}")
        with tempfile.TemporaryDirectory(dir=home, prefix=f".build-{key}-") as tmp:
            work = Path(tmp)
            staging = work / "staging"
            staging.mkdir()
            out = work / "out"
            out.mkdir()
            build(staging, out / COMPONENT_FILE, progress)
            with progress.step("compiling the component to native code (Cranelift)"):
                component = Component.from_file(engine, str(out / COMPONENT_FILE))  # type: ignore[arg-type]
                (out / COMPILED_FILE).write_bytes(bytes(component.serialize()))
            if artifacts.directory.exists():
                shutil.rmtree(artifacts.directory)
            os.replace(out, artifacts.directory)
        progress.say(f"{name} ready in {time.monotonic() - started:.1f}s")
        prune_builds(home, keep=artifacts.directory)
    return artifacts


#: Runtime builds kept in the cache (each ~65 MB): the newest few, so that
#: switching between a couple of Capsule versions does not rebuild every time.
KEEP_BUILDS = 3


def _touch(directory: Path) -> None:
    """Mark a cache entry as used (its mtime orders pruning)."""
    try:
        os.utime(directory)
    except OSError:  # a read-only cache still works
        pass


def _family(name: str) -> str:
    """The runtime a build is of: its key's prefix ("js" for "js-1a2b..."; the
    Python runtime's keys have none)."""
    return name.rpartition("-")[0]


def prune_builds(home: Path, keep: Path) -> None:
    """Remove all but the KEEP_BUILDS most recently used builds of the same
    runtime as ``keep``."""
    family = _family(keep.name)
    entries = sorted(
        (
            entry
            for entry in home.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and _family(entry.name) == family
        ),
        key=lambda entry: entry.stat().st_mtime,
        reverse=True,
    )
    for entry in entries[KEEP_BUILDS:]:
        if entry != keep:
            # A process still using an old build has it mapped already; removing
            # the files does not disturb it.
            shutil.rmtree(entry, ignore_errors=True)
            (home / f"{entry.name}.lock").unlink(missing_ok=True)
