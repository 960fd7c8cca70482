"""Polyglot runs: Python and TypeScript tasks calling, spawning and messaging
each other in one run (one sandbox, one journal, one tree), the programs
listed in capsule.toml's [program] modules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from capsule.supervisor.options import RunOptions
from capsule.supervisor.program import RunRequest, run_program
from tests.conftest import EXAMPLES, capsule_cli, kill_at_marker
from tests.test_javascript import js_runtime  # noqa: F401  (builds the JS runtime once)

HEADLINES = {
    "headlines": [
        {"slug": "capsule-runs-typescript", "loud": "CAPSULE RUNS TYPESCRIPT!"},
        {"slug": "and-python-in-one-run", "loud": "AND PYTHON, IN ONE RUN!"},
    ]
}


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))


def run(path: Path, *args: Any, **options: Any) -> tuple[Any, list[Any]]:
    events: list[Any] = []
    report = run_program(
        RunRequest(path=path, args=list(args), options=RunOptions(**options)), events.append
    )
    return report, events


def test_the_polyglot_example_calls_typescript_from_python_and_back(core: str) -> None:
    report, events = run(EXAMPLES / "polyglot" / "main.py", core=core)
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == HEADLINES
    started = [event.task for event in events if event.type == "started"]
    assert sorted(started) == ["headline", "headline", "main", "shout", "shout"]


def test_a_typescript_main_spawns_and_messages_a_python_actor(tmp_path: Path, core: str) -> None:
    write(
        tmp_path,
        {
            "capsule.toml": '[program]\nmodules = ["counter.py"]\n',
            "counter.py": """
                import capsule
                from capsule import task

                @task(name="counter")
                def counter() -> int:
                    total = 0
                    while True:
                        message = capsule.receive()
                        if message.body == "stop":
                            return total
                        total += message.body
                        if message.expects_reply:
                            message.reply(total)
            """,
            "main.ts": """
                import { task, taskRef, send, ask } from "@capsule-run/sdk";
                const counter = taskRef<[], number>("counter");
                export const main = task({ name: "main" }, async () => {
                  const actor = counter.spawnWith({ name: "counter" });
                  await send("counter", 2);
                  const seen = await ask("counter", 3);
                  await send(actor, "stop");
                  return [seen, await actor];
                });
            """,
        },
    )
    report, _ = run(tmp_path / "main.ts", core=core)
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == [5, 5]


def test_a_failure_in_the_other_language_arrives_as_a_task_error(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "capsule.toml": '[program]\nmodules = ["tools.ts"]\n',
            "tools.ts": """
                import { task } from "@capsule-run/sdk";
                export const parse = task({ name: "parse", maxRetries: 0 }, (text: string) =>
                  JSON.parse(text));
            """,
            "main.py": """
                import capsule
                from capsule import task

                parse = capsule.task_ref("parse")

                @task(name="main")
                def main() -> list:
                    try:
                        parse("{not json")
                    except capsule.TaskError as error:
                        return [error.kind, error.task, "SyntaxError" in (error.traceback or "")]
                    return ["no error"]
            """,
        },
    )
    report, _ = run(tmp_path / "main.py")
    assert report.result is not None and report.result.ok, report
    assert report.result.value() == ["exception", "parse", True]


@pytest.mark.parametrize(
    ("toml", "files", "named"),
    [
        ('[program]\nmodules = ["missing.ts"]\n', {}, "missing.ts"),
        ('[program]\nmodules = "tools.ts"\n', {}, "[program] modules"),
        ('[program]\nmodule = ["tools.ts"]\n', {}, "unknown key [program] 'module'"),
        (
            '[program]\nmodules = ["tools.ts"]\n',
            {
                "tools.ts": 'import { task } from "@capsule-run/sdk";\n'
                'export const m = task({ name: "main" }, () => 2);\n'
            },
            "declares the task 'main'",
        ),
        ('[program]\nmodules = ["data.txt"]\n', {"data.txt": "x"}, "data.txt"),
        ('[program]\nmodules = ["' + "a" * 300 + '.ts"]\n', {}, "cannot be reached"),
    ],
)
def test_a_bad_module_list_is_a_usage_error(
    tmp_path: Path, toml: str, files: dict[str, str], named: str
) -> None:
    write(tmp_path, {"capsule.toml": toml, **files})
    (tmp_path / "main.py").write_text(
        'from capsule import task\n\n\n@task(name="main")\ndef main() -> int:\n    return 1\n'
    )
    done = capsule_cli("run", str(tmp_path / "main.py"))
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr


def test_the_host_api_runs_typescript_and_polyglot_programs() -> None:
    from capsule import Runtime

    async def main() -> list[Any]:
        async with Runtime(journal=False) as rt:
            hello = await rt.run(EXAMPLES / "hello.ts")
            polyglot = await rt.run(EXAMPLES / "polyglot" / "main.py")
            again = await rt.run(EXAMPLES / "analyze.py")
            return [hello.value, polyglot.value, again.value]

    assert anyio.run(main) == [
        "Hello from Capsule!",
        HEADLINES,
        {"processed": 5, "status": "complete"},
    ]


def test_a_polyglot_run_killed_with_9_resumes_to_the_same_result(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "polyglot", tmp_path / "polyglot")
    main = tmp_path / "polyglot" / "main.py"
    main.write_text(
        main.read_text().replace(
            '    return {"headlines": headline.map(titles)}',
            "    found = headline.map(titles)\n"
            '    print("MARK", flush=True)\n'
            "    capsule.sleep(1.5)\n"
            '    return {"headlines": found}',
        )
    )
    printed, code = kill_at_marker(["run", str(main)], "MARK", main.parent)
    assert code == -signal.SIGKILL, printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=main.parent, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"] == HEADLINES


def test_a_program_lists_itself_and_any_file_of_the_run_can_start_it(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "polyglot", tmp_path / "polyglot")
    directory = tmp_path / "polyglot"
    (directory / "capsule.toml").write_text('[program]\nmodules = ["main.py", "tools.ts"]\n')
    done = capsule_cli("run", str(directory / "tools.ts:headline"), "Hi there")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"slug": "hi-there", "loud": "HI THERE!"}


def test_a_module_that_fails_to_bundle_leaves_nothing_open(tmp_path: Path) -> None:
    """The sandbox is made only once every program of the run is bundled: a
    module that cannot be leaves no files or threads of a sandbox behind."""
    write(
        tmp_path,
        {
            "capsule.toml": '[program]\nmodules = ["broken.ts"]\n',
            "broken.ts": "export const = ;\n",
            "main.py": 'from capsule import task\n\n\n@task(name="main")\ndef main() -> int:\n    return 1\n',
        },
    )

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    report, _ = run(tmp_path / "main.py")
    assert report.usage_error is not None and "broken.ts" in report.usage_error
    before = descriptors()
    for _ in range(5):
        report, _ = run(tmp_path / "main.py")
        assert report.usage_error is not None
    assert descriptors() <= before


def test_shared_guests_build_each_language_apart_on_one_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host application's Python runs do not wait while the JS runtime is
    being built for another run, and the guests of a core share its engine
    (so one run can hold both) whichever is made first."""
    import threading

    from capsule.sandbox.guests import SharedGuests
    from capsule.sandbox.js import build

    building, release = threading.Event(), threading.Event()
    real = build.ensure_js_runtime

    def slow_build(*args: Any, **kwargs: Any) -> Any:
        building.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "ensure_js_runtime", slow_build)
    guests = SharedGuests()
    made: dict[str, Any] = {}
    js = threading.Thread(target=lambda: made.update(js=guests.for_core("async", "javascript")))
    js.start()
    try:
        assert building.wait(60)
        python = guests.for_core("async", "python")  # (while the JS build waits)
        assert js.is_alive()
    finally:
        release.set()
        js.join()
    assert made["js"].engine is python.engine and made["js"].component is not python.component
    assert guests.for_core("async", "javascript") is made["js"]


@pytest.mark.parametrize("prefault", ["1", "0"])
def test_the_memory_budget_measures_js_tasks_and_stops_the_hog_whatever_its_language(
    tmp_path: Path, prefault: str
) -> None:
    """The run's budget sees a JS task's memory as a Python task's: a JS hog
    is stopped, not the idle tasks beside it, of either language; also where
    instances are not prefaulted (the host then finds a JS instance's memory
    among all the runtime's mappings)."""

    write(
        tmp_path,
        {
            "capsule.toml": '[program]\nmodules = ["tasks.ts"]\n',
            "tasks.ts": """
                import { task, sleep } from "@capsule-run/sdk";
                export const hog = task({ name: "hog", ram: "1GB", maxRetries: 0 }, async () => {
                  const kept: Uint8Array[] = [];
                  for (let i = 0; i < 200; i++) {
                    kept.push(new Uint8Array(4 << 20).fill(1));
                    await sleep(0.01);
                  }
                  return kept.length * 4;
                });
                export const idleJs = task({ name: "idle_js" }, async () => {
                  await sleep(3);
                  return "idle";
                });
            """,
            "main.py": """
                import capsule
                from capsule import task

                hog = capsule.task_ref("hog")
                idle_js = capsule.task_ref("idle_js")

                @task
                def idle_py() -> str:
                    capsule.sleep(3)
                    return "idle"

                @task(name="main", timeout="2m")
                def main() -> list:
                    handles = [idle_py.spawn(), *(idle_js.spawn() for _ in range(4)), hog.spawn()]
                    outcomes = capsule.gather(*handles, return_exceptions=True)
                    return [o if isinstance(o, (int, str)) else [o.kind, o.message] for o in outcomes]
            """,
        },
    )
    # (In a process of its own: the budget counts the whole process's memory.)
    done = capsule_cli(
        "run",
        str(tmp_path / "main.py"),
        "--max-total-ram",
        "300MB",
        "--no-journal",
        env={"CAPSULE_PREFAULT": prefault},
    )
    assert done.returncode == 0, done.stderr
    *idle, (kind, message) = json.loads(done.stdout)
    assert idle == ["idle"] * 5 and kind == "memory_limit"
    # (Measured: a task whose memory the host cannot find is stopped first.)
    assert "this task held the most of any (" in message and "could not be found" not in message


def test_a_bad_grant_names_the_file_that_declared_it_as_it_wrote_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(
        tmp_path,
        {
            "capsule.toml": '[program]\nmodules = ["sub/tools.ts"]\n',
            "sub/tools.ts": """
                import { task } from "@capsule-run/sdk";
                export const reader = task({ name: "reader", allowedFiles: ["missing"] }, () => 1);
            """,
            "main.py": 'from capsule import task\n\n\n@task(name="main")\ndef main() -> int:\n    return 1\n',
        },
    )
    done = capsule_cli("run", str(tmp_path / "main.py"))
    assert done.returncode == 2, done.stderr
    assert "sub/tools.ts: invalid task config" in done.stderr
    assert "allowedFiles" in done.stderr and "allowed_files" not in done.stderr
    assert str(tmp_path / "sub" / "missing") in done.stderr
