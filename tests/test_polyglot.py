"""Polyglot runs: Python and TypeScript tasks calling, spawning and messaging
each other in one run (one sandbox, one journal, one tree), the programs
listed in capsule.toml's [program] modules."""

from __future__ import annotations

import json
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
            "    capsule.sleep(3)\n"
            '    return {"headlines": found}',
        )
    )
    printed, code = kill_at_marker(["run", str(main)], "MARK", main.parent)
    assert code == -signal.SIGKILL, printed
    resumed = capsule_cli("resume", "--last", "--json", cwd=main.parent, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"] == HEADLINES
