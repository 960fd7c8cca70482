"""The guest runtime: built once from the repo's sources, cached outside the repo,
keyed on every input, safe to build from two processes at once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsule.sandbox import runtime
from tests.conftest import EXAMPLES, REPO


def test_cache_key_covers_sources_versions_and_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = runtime.cache_key("settings-a")
    assert runtime.cache_key("settings-a") == base
    assert runtime.cache_key("settings-b") != base

    sources = runtime.guest_sources()
    assert "capsule_guest.py" in sources and "capsule/sdk/task.py" in sources
    assert any(name.startswith("wit/") for name in sources)

    edited = tmp_path / "task.py"
    edited.write_text(sources["capsule/sdk/task.py"].read_text() + "\n# edited\n")
    monkeypatch.setattr(
        runtime, "guest_sources", lambda: {**sources, "capsule/sdk/task.py": edited}
    )
    assert runtime.cache_key("settings-a") != base
    monkeypatch.undo()

    monkeypatch.setattr(runtime, "installed_version", lambda dist: "9.9.9")
    assert runtime.cache_key("settings-a") != base
    monkeypatch.undo()

    # A runtime built without the current patches to its binary is rebuilt.
    monkeypatch.setattr(runtime.oom, "PATCH_VERSION", "another")
    assert runtime.cache_key("settings-a") != base


def test_capsule_home_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAPSULE_HOME", str(tmp_path / "home"))
    assert runtime.capsule_home() == tmp_path / "home"
    monkeypatch.delenv("CAPSULE_HOME")
    assert runtime.capsule_home() != tmp_path / "home"
    assert REPO not in runtime.capsule_home().parents


def test_two_processes_build_a_fresh_cache_at_once(tmp_path: Path) -> None:
    home = tmp_path / "capsule-home"
    env = {**os.environ, "CAPSULE_HOME": str(home)}
    command = [sys.executable, "-m", "capsule.cli", "run", str(EXAMPLES / "hello.py")]
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    second = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert [out for out, _ in outputs] == ["Hello from Capsule!\n"] * 2
    # Exactly one of them built; the build reported its steps and time.
    builders = [err for _, err in outputs if "building the guest runtime" in err]
    assert len(builders) == 1, outputs
    assert "componentize-py" in builders[0] and "done in" in builders[0]
    assert "guest runtime ready in" in builders[0]
    entries = [p for p in (home / "runtime").iterdir() if p.is_dir()]
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == ["guest.cwasm", "guest.wasm"]
    # No build leftovers.
    assert not [p for p in (home / "runtime").iterdir() if p.name.startswith(".build-")]

    # A warm start reuses the cache and builds nothing.
    warm = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert warm.returncode == 0 and warm.stderr == ""


def test_the_build_starts_deaf_to_the_signals_that_interrupt_the_run(tmp_path: Path) -> None:
    """Ctrl-C signals the whole process group, and the build's process is in
    it until it makes a session of its own: it must not die of the signal
    meanwhile (the run would fail instead of being interrupted). It starts
    with them blocked; this thread's mask is as it was."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    show = (
        "import signal; print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"
    )
    with runtime.detached([sys.executable, "-c", show], tmp_path, dict(os.environ)) as process:
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    blocked = set(json.loads(stdout))
    assert {int(signal.SIGINT), int(signal.SIGTERM)} <= blocked
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_the_build_progress_is_logged_never_written_to_stderr(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """An application's stderr is its own: the build's progress goes to the
    "capsule.sandbox.build" logger, at INFO."""
    progress = runtime.Progress()
    with caplog.at_level(logging.INFO, logger="capsule.sandbox.build"):
        with progress.step("compiling"):
            pass
        with pytest.raises(RuntimeError), progress.step("linking"):
            raise RuntimeError("no")
        progress.warn("an odd shape")
    assert capsys.readouterr().err == ""
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert [(name, level) for name, level, _ in records] == [
        ("capsule.sandbox.build", logging.INFO)
    ] * 4 + [("capsule.sandbox.build", logging.WARNING)]
    texts = [text for _, _, text in records]
    assert texts[0] == "compiling ..." and texts[1].startswith("compiling: done in ")
    assert texts[2] == "linking ..." and texts[3].startswith("linking failed after ")
    assert texts[4] == "an odd shape"


def test_the_command_shows_the_build_progress_on_its_stderr() -> None:
    """What `capsule` does with its logs (capsule.logs.show_on_stderr): the
    build's steps as `capsule: ...` lines, a warning once, nothing else at INFO."""
    script = """if True:
        import logging
        from capsule.logs import logger, show_on_stderr
        from capsule.sandbox.runtime import Progress

        show_on_stderr()
        progress = Progress()
        with progress.step("compiling"):
            pass
        progress.warn("an odd shape")
        logger("journal").info("not progress")
    """
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "capsule: compiling ..."
    assert lines[1].startswith("capsule: compiling: done in ")
    assert lines[2:] == ["capsule: an odd shape"]


def test_old_builds_are_pruned(tmp_path: Path) -> None:
    home = tmp_path / "runtime"
    home.mkdir()
    for age, name in enumerate(["a", "b", "c", "d", "e"]):
        entry = home / name
        entry.mkdir()
        (entry / "guest.cwasm").write_bytes(b"x")
        os.utime(entry, (1000 + age, 1000 + age))
    (home / "a.lock").write_text("")
    (home / "b.lock").write_text("")
    runtime.prune_builds(home, keep=home / "a")
    assert sorted(p.name for p in home.iterdir()) == ["a", "a.lock", "c", "d", "e"]


def test_builds_of_one_runtime_do_not_prune_the_others(tmp_path: Path) -> None:
    """The JS runtime's builds ("js-" keys) and the Python runtime's are kept
    apart: building one never removes the other's newest builds."""
    home = tmp_path / "runtime"
    home.mkdir()
    names = ["0a", "0b", "0c", "js-1", "js-2", "js-3", "js-4"]
    for age, name in enumerate(names):
        (home / name).mkdir()
        os.utime(home / name, (1000 + age, 1000 + age))
    runtime.prune_builds(home, keep=home / "js-4")
    assert sorted(p.name for p in home.iterdir()) == ["0a", "0b", "0c", "js-2", "js-3", "js-4"]


def _processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


def test_a_build_killed_with_9_leaves_no_tool_running_and_no_leftovers(tmp_path: Path) -> None:
    """kill -9 of the process building the runtime ends the build's tool too
    (componentize-py built on for ~20 s, an orphan), and the next build
    removes the directory the killed one left."""
    home = tmp_path / "capsule-home"
    env = {**os.environ, "CAPSULE_HOME": str(home)}
    building = subprocess.Popen(
        [sys.executable, "-m", "capsule.cli", "run", str(EXAMPLES / "hello.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert building.stderr is not None
    for line in building.stderr:
        if "componentize-py" in line:
            break
    deadline = time.monotonic() + 30
    while not _processes_naming(str(home)):
        assert time.monotonic() < deadline, "the build's tool never started"
        time.sleep(0.05)
    building.kill()
    building.wait(timeout=30)
    # (The guard looks at its parent 5 times a second. Without it, the tool
    # went on until its next write to the pipe failed, if it wrote.)
    deadline = time.monotonic() + 2
    while _processes_naming(str(home)):
        assert time.monotonic() < deadline, _processes_naming(str(home))
        time.sleep(0.1)
    assert [p.name for p in (home / "runtime").iterdir() if p.name.startswith(".build-")]

    done = subprocess.run(
        [sys.executable, "-m", "capsule.cli", "run", str(EXAMPLES / "hello.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert not [p for p in (home / "runtime").iterdir() if p.name.startswith(".build-")]
