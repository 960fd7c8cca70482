"""Importing or using Capsule leaves the interpreter as it found it.

An application that embeds Capsule keeps its own signal handlers, recursion
limit, thread stack size, hooks, gc settings, warning filters, logging,
environment and wasmtime-py: each test runs in a fresh interpreter, snapshots
all of that, does something with Capsule, and compares."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from capsule.sandbox.nesting import (
    HOST_FRAMES_MARGIN,
    HOST_FRAMES_PER_LEVEL,
    nested_call,
    recursion_headroom,
    start_deep_thread,
)

REPO = Path(__file__).resolve().parent.parent

# Prints, as JSON, what differs between a snapshot of process-wide state taken
# before ``ACTION`` and one taken after it.
_PROBE = '''
import atexit, faulthandler, gc, importlib, json, logging, os, pkgutil, signal, socket, sys
import threading, warnings
import wasmtime, wasmtime.component
from wasmtime import _bindings, _ffi
from wasmtime.component import _types as component_types


def handlers():
    found = {}
    for number in signal.valid_signals():
        try:
            found[int(number)] = signal.getsignal(number)
        except (OSError, ValueError):
            pass
    return found


def wasmtime_objects():
    """Every name of wasmtime-py's bindings and converters, and of its
    component types' classes, by identity."""
    objects = {f"_bindings.{k}": id(v) for k, v in vars(_bindings).items()}
    objects.update({f"_ffi.{k}": id(v) for k, v in vars(_ffi).items()})
    for name, cls in vars(component_types).items():
        if isinstance(cls, type):
            objects.update({f"{name}.{k}": id(v) for k, v in vars(cls).items()})
    return objects


def loggers():
    found = {"": (logging.root.level, [id(h) for h in logging.root.handlers])}
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.handlers:
            # (Capsule's own logger may hold a NullHandler, as the logging
            # docs advise a library: what it logs is shown as the app says.)
            if name == "capsule" and all(
                type(h) is logging.NullHandler for h in logger.handlers
            ):
                continue
            found[name] = (logger.level, [id(h) for h in logger.handlers])
    return found


def snapshot():
    return {
        "signal handlers": {k: repr(v) for k, v in handlers().items()},
        "recursion limit": sys.getrecursionlimit(),
        "thread stack size": threading.stack_size(),
        "sys.excepthook": id(sys.excepthook),
        "sys.unraisablehook": id(sys.unraisablehook),
        "threading.excepthook": id(threading.excepthook),
        "sys trace/profile": [id(sys.gettrace()), id(sys.getprofile())],
        "switch interval": sys.getswitchinterval(),
        "standard streams": [id(sys.stdin), id(sys.stdout), id(sys.stderr)],
        "int digits limit": sys.get_int_max_str_digits(),
        "faulthandler": faulthandler.is_enabled(),
        "socket timeout": socket.getdefaulttimeout(),
        "gc": [gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()],
        "warnings filters": [repr(f) for f in warnings.filters],
        "logging": loggers(),
        "os.environ": dict(os.environ),
        "cwd": os.getcwd(),
        "sys.path": list(sys.path),
        "meta path": [id(f) for f in sys.meta_path],
        "atexit callbacks": atexit._ncallbacks(),
        "wasmtime-py": wasmtime_objects(),
        "threads": sorted(t.name for t in threading.enumerate()),
    }


def changes(before, after):
    out = {}
    for key, old in before.items():
        new = after[key]
        if isinstance(old, dict):
            keys = set(old) | set(new)
            diff = sorted(str(k) for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>"))
            if diff:
                out[key] = diff[:20]
        elif old != new:
            out[key] = [repr(old), repr(new)]
    return out


before = snapshot()
modules_before = set(sys.modules)
ACTION
print(json.dumps(changes(before, snapshot())))
'''

# Every host module (the guest's run only inside the sandbox).
_IMPORT_ALL = """
import capsule
for info in pkgutil.walk_packages(capsule.__path__, "capsule."):
    if not info.name.startswith("capsule.sandbox.guest"):
        importlib.import_module(info.name)
"""

_RUN = """
from pathlib import Path
from capsule.supervisor.program import RunRequest, run_program
events = []
report = run_program(RunRequest(path=Path(PROGRAM), args=[DEPTH]), events.append)
assert report.result is not None and report.result.ok, report
print(json.dumps(report.result.value()))
"""


def _probe(action: str, cwd: Path) -> list[str]:
    """Run the probe with ``action`` in a fresh interpreter: its output lines."""
    script = _PROBE.replace("ACTION", textwrap.dedent(action))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_importing_every_module_changes_nothing_process_wide(tmp_path: Path) -> None:
    (changes,) = _probe(_IMPORT_ALL, tmp_path)
    assert json.loads(changes) == {}


def test_plain_import_of_capsule_loads_no_event_loop_library(tmp_path: Path) -> None:
    action = """
    import capsule
    gained = sorted(
        m for m in set(sys.modules) - modules_before
        if m.split(".")[0] in ("asyncio", "anyio", "wasmtime", "pydantic", "aiosqlite")
    )
    assert not gained, gained
    """
    (changes,) = _probe(action, tmp_path)
    assert json.loads(changes) == {}


def test_a_run_in_process_leaves_everything_as_it_was(tmp_path: Path) -> None:
    program = tmp_path / "prog.py"
    program.write_text(
        textwrap.dedent(
            """
            from capsule import task

            @task
            def depth(n: int) -> int:
                return 0 if n == 0 else 1 + depth(n - 1)

            @task
            def main(n: int) -> int:
                return depth(n)
            """
        )
    )
    # Deep enough that the recursion limit is raised for a while (nested_call).
    action = _RUN.replace("PROGRAM", repr(str(program))).replace("DEPTH", "30")
    value, changes = _probe(action, tmp_path)
    assert json.loads(value) == 30
    assert json.loads(changes) == {}


# -- the recursion headroom nested task calls need ----------------------------


def test_recursion_headroom_is_raised_while_held_and_restored_after() -> None:
    original = sys.getrecursionlimit()
    with recursion_headroom(original + 500):
        assert sys.getrecursionlimit() == original + 500
    assert sys.getrecursionlimit() == original


def test_recursion_headroom_of_overlapping_holders_lasts_until_the_last_ends() -> None:
    original = sys.getrecursionlimit()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def second() -> None:
        first_in.wait()
        with recursion_headroom(original + 300):
            second_in.set()
            first_out.wait()
            seen.append(sys.getrecursionlimit())  # the first holder has left

    thread = threading.Thread(target=second)
    thread.start()
    with recursion_headroom(original + 700):
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert seen == [original + 700]
    assert sys.getrecursionlimit() == original


def test_recursion_headroom_leaves_a_limit_the_application_set_meanwhile() -> None:
    original = sys.getrecursionlimit()
    try:
        with recursion_headroom(original + 500):
            sys.setrecursionlimit(original + 2000)
        assert sys.getrecursionlimit() == original + 2000
    finally:
        sys.setrecursionlimit(original)


def test_recursion_headroom_keeps_a_limit_set_between_two_holders_raising_it() -> None:
    original = sys.getrecursionlimit()
    release_first = threading.Event()
    first_in = threading.Event()

    def first() -> None:
        with recursion_headroom(original + 500):
            first_in.set()
            release_first.wait()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait()
    try:
        sys.setrecursionlimit(original + 1000)  # the application's own
        with recursion_headroom(original + 3000):
            release_first.set()
            thread.join()
        assert sys.getrecursionlimit() == original + 1000
    finally:
        release_first.set()
        thread.join()
        sys.setrecursionlimit(original)


def test_recursion_headroom_never_lowers_the_limit() -> None:
    original = sys.getrecursionlimit()
    with recursion_headroom(original - 100):
        assert sys.getrecursionlimit() == original
    assert sys.getrecursionlimit() == original


@pytest.mark.parametrize("stack", [0, 1024 * 1024])
def test_deep_stack_threads_leave_the_stack_size_as_it_was(stack: int) -> None:
    previous = threading.stack_size(stack)
    try:
        ran = threading.Event()
        thread = start_deep_thread(ran.set, "capsule-test")
        thread.join()
        assert ran.is_set()
        assert threading.stack_size() == stack
    finally:
        threading.stack_size(previous)


def test_nested_calls_raise_the_recursion_limit_only_while_they_nest_deep() -> None:
    original = sys.getrecursionlimit()
    limits: list[int] = []

    def nest(levels: int) -> None:
        with nested_call():
            limits.append(sys.getrecursionlimit())
            if levels > 1:
                nest(levels - 1)

    thread = threading.Thread(target=nest, args=(64,))  # (levels count per thread)
    thread.start()
    thread.join()
    assert len(limits) == 64
    assert limits[0] == original  # a shallow call leaves it alone
    assert limits[-1] >= 65 * HOST_FRAMES_PER_LEVEL + HOST_FRAMES_MARGIN
    assert sys.getrecursionlimit() == original


# -- who may change process-wide settings at all ------------------------------

#: Calls that change the process for everyone, and the only modules that make
#: them: the command line (it owns its process) and the nesting helpers.
_PROCESS_WIDE_CALLS = {
    "signal.signal": {"capsule/cli.py"},
    "signal.set_wakeup_fd": set(),
    "signal.setitimer": set(),
    # (tool_guard.py is a program of its own, which the host runs, never imports.)
    "sys.exit": {"capsule/cli.py", "capsule/sandbox/tool_guard.py"},
    "os._exit": {"capsule/cli.py"},
    "sys.setrecursionlimit": {"capsule/sandbox/nesting.py"},
    "threading.stack_size": {"capsule/sandbox/nesting.py"},
    "sys.setswitchinterval": set(),
    "gc.disable": {"capsule/cli.py"},
    "gc.freeze": {"capsule/cli.py"},
    "gc.set_threshold": set(),
    "warnings.filterwarnings": set(),
    "warnings.simplefilter": set(),
    "logging.basicConfig": set(),
    "faulthandler.enable": set(),
}


def test_only_the_command_line_and_the_nesting_helpers_change_process_wide_settings() -> None:
    import ast

    found: list[str] = []
    for path in sorted((REPO / "capsule").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("capsule/sandbox/guest/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
            ):
                called = f"{node.func.value.id}.{node.func.attr}"
                allowed = _PROCESS_WIDE_CALLS.get(called)
                if allowed is not None and relative not in allowed:
                    found.append(f"{relative}:{node.lineno} {called}")
    assert found == []
