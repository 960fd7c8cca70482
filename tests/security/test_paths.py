"""Hostile programs against every path the host opens for a task: granted
directories (preopened for each task) and module files (served to the guest's
import). A guest with a writable grant can make symlinks, hard links and files
there and race them against the host; none of it may lead the host to read or
write anything outside what the user granted, or to run code a task wrote."""

from __future__ import annotations

import json
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import capsule
from tests.conftest import Completed, capsule_cli

SECRET = "host-secret-5bd1f0"
HOST_CODE = str(Path(capsule.__file__).resolve().parent)

HELPERS = """
import os
from capsule import TaskError, ReceiveTimeout, current, receive, send, task

def attempt(action):
    try:
        return ["done", repr(action())[:300]]
    except BaseException as exc:
        return [type(exc).__name__, str(exc)[:300]]

def read(path):
    with open(path) as handle:
        return handle.read()

def write(path, text="pwned"):
    with open(path, "w") as handle:
        return handle.write(text)

def failure(call, *args):
    try:
        return ["done", call(*args)]
    except TaskError as error:
        return [error.kind, error.message]
"""


def make_program(tmp_path: Path, source: str, name: str = "hostile.py") -> Path:
    """A program directory ``prog`` beside ``outside`` (a host directory no task
    is granted, holding a secret), with an ``out`` directory and a ``.env``."""
    program_dir = tmp_path / "prog"
    (program_dir / "out").mkdir(parents=True, exist_ok=True)
    (program_dir / ".env").write_text(f"TOKEN={SECRET}-env\n")
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.py").write_text(f"VALUE = {SECRET!r}\n")
    program = program_dir / name
    program.write_text(textwrap.dedent(HELPERS) + textwrap.dedent(source))
    return program


def run(program: Path, *args: str) -> Completed:
    return capsule_cli("run", str(program), "--no-journal", "--json", *args, cwd=program.parent)


def assert_contained(done: Completed, tmp_path: Path) -> None:
    """Nothing outside the program's grants was read or written, and the host
    reported what happened without a traceback of its own."""
    output = done.stdout + done.stderr
    assert SECRET not in output, output
    outside = tmp_path / "outside"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.py", "secret.txt"]
    assert (outside / "secret.txt").read_text() == SECRET
    assert HOST_CODE not in done.stderr, done.stderr
    assert "internal error" not in output, output


def result_of(done: Completed) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["result"]


# -- Granted directories ---------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "made", "target", "reason"),
    [
        # The granted directory itself becomes a symlink to a host directory.
        ("out/sub", "sub", "../../outside", "symlink"),
        # A directory above it does: out/sub -> the parent of the program's
        # directory, so out/sub/outside is the host's directory.
        ("out/sub/outside", "sub", "../..", "symlink"),
        # It becomes a file (a FIFO or device could not be made through WASI).
        ("out/sub", "sub", None, "not a directory"),
    ],
)
def test_a_grant_replaced_by_a_symlink_is_refused_at_task_start(
    tmp_path: Path, granted: str, made: str, target: str | None, reason: str
) -> None:
    # `plant` may write out/ and replaces what `victim` is granted there; the
    # host must not hand `victim` whatever that leads to.
    program = make_program(
        tmp_path,
        f"""
        @task(name="plant", allowed_files=["out:rw"], max_retries=0)
        def plant() -> str:
            os.rename("/out/{made}", "/out/moved")
            if {target!r} is None:
                write("/out/{made}")
            else:
                os.symlink({target!r}, "/out/{made}")
            return "planted"

        @task(name="victim", allowed_files=["{granted}:rw"], max_retries=0)
        def victim() -> list:
            return [attempt(lambda: read("/{granted}/secret.txt")),
                    attempt(lambda: write("/{granted}/pwned.txt"))]

        @task(name="main")
        def main() -> list:
            return [plant(), failure(victim)]
        """,
    )
    (program.parent / granted).mkdir(parents=True)
    done = run(program)
    assert_contained(done, tmp_path)
    planted, (kind, message) = result_of(done)
    assert planted == "planted"
    assert kind == "limit", message
    assert f"allowed_files '{granted}:rw'" in message and reason in message, message


def test_a_retry_does_not_fall_into_the_trap_its_first_attempt_set(tmp_path: Path) -> None:
    program = make_program(
        tmp_path,
        """
        @task(name="main", allowed_files=["out:rw", "out/sub"], max_retries=1)
        def main() -> list:
            if current().attempt == 1:
                # (named through /out: "/out/sub" is the read-only preopen)
                os.rmdir("/out/./sub")
                os.symlink("../../outside", "/out/./sub")
                raise RuntimeError("again")
            return attempt(lambda: read("/out/sub/secret.txt"))
        """,
    )
    (program.parent / "out" / "sub").mkdir()
    done = run(program)
    assert_contained(done, tmp_path)
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "limit" and "symlink" in error["message"], error


def test_a_symlink_in_a_grant_path_is_refused_at_load(tmp_path: Path) -> None:
    program = make_program(
        tmp_path,
        """
        @task(name="main", allowed_files=["via/sub"])
        def main() -> str:
            return read("/via/sub/secret.txt")
        """,
    )
    (program.parent / "real" / "sub").mkdir(parents=True)
    (program.parent / "via").symlink_to("real")
    done = run(program)
    assert_contained(done, tmp_path)
    assert done.returncode == 2, done.stderr
    message = json.loads(done.stdout)["error"]["message"]
    for part in ("task 'main'", "allowed_files 'via/sub'", "is a symlink", "grant"):
        assert part in message, message


def test_a_grant_swapped_while_it_is_being_opened_keeps_the_directory_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worst moment for a swap: after the host checked the grant, before
    # wasmtime opens it (and once more after). The task still gets the directory
    # the host checked, since wasmtime is handed that directory's open file.
    import wasmtime

    from capsule.supervisor.program import RunRequest, run_program

    program = make_program(
        tmp_path,
        """
        @task(name="main", allowed_files=["data:rw"])
        def main() -> list:
            return [attempt(lambda: read("/data/inside.txt")),
                    attempt(lambda: read("/data/secret.txt")),
                    attempt(lambda: write("/data/pwned.txt"))]
        """,
    )
    data = program.parent / "data"
    data.mkdir()
    (data / "inside.txt").write_text("inside")
    original = wasmtime.WasiConfig.preopen_dir

    def swap() -> None:
        if not data.is_symlink():
            data.rename(program.parent / "data-moved")
            data.symlink_to(tmp_path / "outside")

    def racing_preopen(self: Any, path: str, guest_path: str, fs_mutable: bool = True) -> None:
        swap()
        original(self, path, guest_path, fs_mutable)
        swap()

    monkeypatch.setattr(wasmtime.WasiConfig, "preopen_dir", racing_preopen)
    report = run_program(RunRequest(path=program, args=[]), lambda event: None)
    assert report.result is not None, report
    inside, secret, written = report.result.value()
    assert inside == ["done", "'inside'"]
    assert secret[0] == "FileNotFoundError", secret
    assert written[0] == "done"
    assert (program.parent / "data-moved" / "pwned.txt").exists()
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == [
        "secret.py",
        "secret.txt",
    ]


def test_symlinks_a_guest_makes_never_lead_out_of_its_preopens(tmp_path: Path) -> None:
    # wasmtime resolves the guest's own paths inside each preopened directory:
    # a symlink that leaves the directory it was opened through is refused, even
    # where it stays inside another of the task's grants or the program directory.
    program = make_program(
        tmp_path,
        """
        @task(name="plant", allowed_files=["out:rw"], max_retries=0)
        def plant() -> list:
            links = {"up": "..", "top": "../../..", "env": "../../.env",
                     "abs": "/etc/passwd", "outside": "../../../outside/secret.txt"}
            made = []
            for name, target in links.items():
                made.append(attempt(lambda: os.symlink(target, f"/out/sub/{name}")))
            return made

        @task(name="victim", allowed_files=["out/sub", "out:rw"], max_retries=0)
        def victim() -> dict:
            return {name: attempt(lambda: read(f"/out/sub/{path}"))
                    for name, path in [("up", "up/sub/up"), ("top", "top/outside/secret.txt"),
                                       ("env", "env"), ("abs", "abs"), ("outside", "outside")]}

        @task(name="main")
        def main() -> list:
            return [plant(), victim()]
        """,
    )
    (program.parent / "out" / "sub").mkdir()
    done = run(program)
    assert_contained(done, tmp_path)
    _, reads = result_of(done)
    assert all(outcome[0] != "done" for outcome in reads.values()), reads


def test_a_file_of_a_read_only_grant_cannot_be_linked_or_moved_into_a_writable_one(
    tmp_path: Path,
) -> None:
    # A hard link or rename needs both directories writable (wasmtime checks the
    # preopen the source is named through): a task granted `in` (read-only) and
    # `out:rw` cannot make a writable name for a file of `in`.
    program = make_program(
        tmp_path,
        """
        @task(name="main", allowed_files=["in", "out:rw"])
        def main() -> dict:
            return {
                "link": attempt(lambda: os.link("/in/notes.txt", "/out/linked.txt")),
                "rename": attempt(lambda: os.rename("/in/notes.txt", "/out/moved.txt")),
                "symlink": attempt(lambda: os.symlink("../in/notes.txt", "/out/sym.txt")),
                "through_symlink": attempt(lambda: write("/out/sym.txt")),
                "write_in": attempt(lambda: write("/in/notes.txt")),
                "link_inside_out": attempt(lambda: (write("/out/a.txt", "a"),
                                                    os.link("/out/a.txt", "/out/b.txt"))),
            }
        """,
    )
    notes = program.parent / "in" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("read-only notes")
    done = run(program)
    assert_contained(done, tmp_path)
    outcome = result_of(done)
    for name in ("link", "rename", "through_symlink", "write_in"):
        assert outcome[name][0] == "PermissionError", (name, outcome[name])
    assert outcome["link_inside_out"][0] == "done"  # within one writable grant: allowed
    assert notes.read_text() == "read-only notes" and notes.stat().st_nlink == 1
    assert not (program.parent / "out" / "linked.txt").exists()
    assert not (program.parent / "out" / "moved.txt").exists()


# -- Module files -------------------------------------------------------------------

RACE = """
LINKS = ("d", "e")

@task(name="flip", allowed_files=["out:rw"], max_retries=0, timeout="60s")
def flip() -> int:
    for name in LINKS:
        os.symlink(".", f"/out/{name}")
    flips = 0
    while True:
        write("/out/tmp.py", "VALUE = 'harmless'\\n")
        os.replace("/out/tmp.py", "/out/x.py")
        os.symlink("../../outside/secret.txt", "/out/tmp-link")
        os.replace("/out/tmp-link", "/out/x.py")
        flips += 1
        if flips % 16 == 0:
            try:
                receive(timeout=0)
                return flips
            except ReceiveTimeout:
                pass

@task(name="probe", max_retries=0, timeout="60s")
def probe(count: int) -> dict:
    # No grants at all: only the raw import the guest's finder uses.
    from wit_world.imports import modules
    seen = {}
    for i in range(2, count + 2):
        # A fresh name each time (out.e.d.x, out.e.e.x, ...), all one file.
        name = "out." + ".".join(LINKS[int(bit)] for bit in format(i, "b")[1:]) + ".x"
        found = modules.find(name)
        kind = type(found).__name__
        if kind.endswith("Found") and not kind.endswith("NotFound"):
            kind = "leaked" if "host-secret" in found.value.code else "found"
        seen[kind] = seen.get(kind, 0) + 1
    seen["huge"] = type(modules.find("a" * 1_000_000)).__name__
    seen["dots"] = type(modules.find("." * 100_000)).__name__
    return seen

@task(name="main", timeout="120s", max_retries=0)
def main(count: int) -> list:
    flipper = flip.spawn()
    seen = probe(count)
    send(flipper, "stop")
    return [seen, flipper.result() > 0]
"""


def test_a_file_flipped_to_a_symlink_is_never_served_as_a_module(tmp_path: Path) -> None:
    program = make_program(tmp_path, RACE)
    done = run(program, "--args-json", "[3000]", "--cpu-slots", "2")
    assert_contained(done, tmp_path)
    seen, flipped = result_of(done)
    assert flipped
    assert "leaked" not in seen and "found" not in seen, seen
    assert seen.get("Lookup_Refused") == 3000, seen
    assert seen["huge"] == seen["dots"] == "Lookup_NotFound"


def test_a_module_in_a_writable_grant_is_not_imported(tmp_path: Path) -> None:
    # Code in a directory a task may write is code a task may have written (in
    # this run or an earlier one): neither the program's import nor a task's
    # gets it.
    program = make_program(
        tmp_path,
        """
        @task(name="writer", allowed_files=["out:rw"])
        def writer() -> str:
            write("/out/fresh.py", "VALUE = 'from a task'")
            return "written"

        @task(name="main")
        def main() -> list:
            writer()
            return [attempt(lambda: __import__("out.fresh")),
                    attempt(lambda: __import__("out.planted"))]
        """,
    )
    (program.parent / "out" / "planted.py").write_text("VALUE = 'from an earlier run'\n")
    done = run(program)
    assert_contained(done, tmp_path)
    results = result_of(done)
    for kind, message in results:
        assert kind == "SandboxImportError", (kind, message)
        assert "task 'writer'" in message and "'out:rw'" in message, message

    # The program importing it at load: refused before any task runs (exit 2).
    program.write_text(
        program.read_text().replace("import os\n", "import os\nimport out.planted\n", 1)
    )
    done = run(program)
    assert_contained(done, tmp_path)
    assert done.returncode == 2, done.stderr
    message = json.loads(done.stdout)["error"]["message"]
    for part in ("'out.planted'", "task 'writer'", "allowed_files 'out:rw'", "move"):
        assert part in message, message


def test_a_module_in_a_read_only_grant_is_not_imported_by_other_tasks(tmp_path: Path) -> None:
    # Only `reader` may read data/; an import must not hand its .py files to
    # every task (nor to `reader`: a granted directory holds data, not code).
    program = make_program(
        tmp_path,
        """
        @task(name="reader", allowed_files=["data"])
        def reader() -> str:
            return read("/data/private.py")[:5]

        @task(name="main")
        def main() -> list:
            from wit_world.imports import modules
            return [reader(), attempt(lambda: __import__("data.private")),
                    type(modules.find("data.private")).__name__]
        """,
    )
    (program.parent / "data").mkdir()
    (program.parent / "data" / "private.py").write_text(f"KEY = {SECRET!r}\n")
    done = run(program)
    assert_contained(done, tmp_path)
    granted_read, imported, raw = result_of(done)
    assert granted_read == "KEY ="
    assert imported[0] == "SandboxImportError" and "task 'reader'" in imported[1], imported
    assert raw == "Lookup_Refused"


def test_a_symlinked_module_is_refused(tmp_path: Path) -> None:
    program = make_program(
        tmp_path,
        """
        @task(name="main")
        def main() -> list:
            return [attempt(lambda: __import__(name).VALUE)
                    for name in ("inner", "escape", "linked_pkg.mod", "real_pkg.mod")]
        """,
    )
    directory = program.parent
    (directory / "real_inner.py").write_text("VALUE = 'inner'\n")
    (directory / "inner.py").symlink_to("real_inner.py")
    (directory / "escape.py").symlink_to(tmp_path / "outside" / "secret.py")
    (directory / "real_pkg").mkdir()
    (directory / "real_pkg" / "__init__.py").write_text("")
    (directory / "real_pkg" / "mod.py").write_text("VALUE = 'real'\n")
    (directory / "linked_pkg").symlink_to("real_pkg")
    done = run(program)
    assert_contained(done, tmp_path)
    inner, escape, linked, real = result_of(done)
    for kind, message in (inner, escape, linked):
        assert kind == "SandboxImportError" and "symlink" in message, (kind, message)
    assert real == ["done", "'real'"] or real[0] == "AttributeError", real


def test_a_module_swapped_for_a_symlink_between_look_and_read_is_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race at its worst moment, in the host's own process: right after the
    # finder looked at the file, it becomes a symlink to a host secret.
    from capsule.sandbox import paths
    from capsule.sandbox.modules import ModuleFinder, ModuleSource

    root = tmp_path / "root"
    root.mkdir()
    module = root / "victim.py"
    module.write_text("VALUE = 'fine'\n")
    (tmp_path / "secret.py").write_text(f"VALUE = {SECRET!r}\n")
    original = paths.entry_kind

    def racing_kind(dir_fd: int, name: str) -> str:
        kind = original(dir_fd, name)
        if name == "victim.py" and not module.is_symlink():
            module.unlink()
            module.symlink_to(tmp_path / "secret.py")
        return kind

    monkeypatch.setattr(paths, "entry_kind", racing_kind)
    found = ModuleFinder([root]).find("victim")
    assert not isinstance(found, ModuleSource) or SECRET not in found.code, found


def test_a_served_module_changed_on_disk_is_refused_not_served_anew(tmp_path: Path) -> None:
    from capsule.sandbox.modules import ModuleFinder, ModuleSource, Refused

    (tmp_path / "mod.py").write_text("VALUE = 1\n")
    finder = ModuleFinder([tmp_path], cached_source_bytes=0)
    first = finder.find("mod")
    assert isinstance(first, ModuleSource) and first.code == "VALUE = 1\n"
    (tmp_path / "mod.py").write_text("VALUE = 2\n")
    again = finder.find("mod")
    assert isinstance(again, Refused) and "changed" in again.reason, again


def test_lookups_of_fresh_names_do_not_grow_the_hosts_memory(tmp_path: Path) -> None:
    from capsule.sandbox.modules import ModuleFinder

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    finder = ModuleFinder([tmp_path])
    finder.find("pkg")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5_000):
            finder.find(f"pkg.missing_{i}")
            finder.find(f"absent_{i}.deeper")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # (The finder that kept every name grew by 2.7 MB here.)
    assert grown < 64 * 1024, grown


def test_compiled_forms_offered_are_bounded(tmp_path: Path) -> None:
    from capsule.sandbox.modules import ModuleFinder, ModuleSource

    for index in range(4):
        (tmp_path / f"m{index}.py").write_text(f"VALUE = {index}\n")
    finder = ModuleFinder([tmp_path], cached_compiled_bytes=1000)  # two of ~450 bytes
    origins = []
    for index in range(4):
        found = finder.find(f"m{index}")
        assert isinstance(found, ModuleSource)
        origins.append(found.origin)
    for origin in origins:
        finder.remember_compiled(origin, "c" * 400)
        finder.remember_compiled(origin, "d" * 400)  # a second offer is not kept
    finder.remember_compiled(str(tmp_path / "never-served.py"), "e" * 10)
    kept = [finder.find(f"m{index}") for index in range(4)]
    compiled = [found.compiled for found in kept if isinstance(found, ModuleSource)]
    assert compiled[:2] == ["c" * 400] * 2 and compiled[2:] == [None, None], compiled
