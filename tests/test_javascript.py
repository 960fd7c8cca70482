"""TypeScript and JavaScript programs: real runs of the JS runtime component
(built by componentize-js on first use), bundled by esbuild, through the CLI
and the in-process entry point."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    EXAMPLES,
    REPO,
    LocalServer,
    PaymentServer,
    ProgramRunner,
    capsule_cli,
    kill_at_marker,
    killed_in_flight_then_resumed,
)

VENDORED = REPO / "tests" / "js" / "node_modules"


@pytest.fixture(scope="module", autouse=True)
def js_runtime() -> None:
    """Build (or find) the JS runtime once for these tests. Without node and
    npm they skip, except in CI, where they must run."""
    if (shutil.which("node") is None or shutil.which("npm") is None) and not os.environ.get("CI"):
        pytest.skip("node and npm are not installed: JS/TS programs cannot run here")
    from capsule.sandbox.engine import GuestComponent

    GuestComponent(language="javascript")


@pytest.fixture
def run_ts(run_program: ProgramRunner) -> ProgramRunner:
    """Run a TypeScript program's main in process."""

    def runner(source: str, *args: Any, **options: Any) -> Any:
        return run_program(source, *args, name=options.pop("name", "prog.ts"), **options)

    return runner


def test_the_seed_hello_ts_runs_verbatim() -> None:
    done = capsule_cli("run", str(EXAMPLES / "hello.ts"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from Capsule!\n"


def test_the_seed_analyze_example_calls_its_child_task() -> None:
    done = capsule_cli("run", str(EXAMPLES / "analyze.ts"), "--json")
    assert done.returncode == 0, done.stderr
    outcome = done.json()
    assert outcome["result"] == {"processed": 5, "status": "complete"}
    assert outcome["totals"]["tasks"] == 2 and outcome["totals"]["failed"] == 0


def test_the_sdk_types_check_the_examples_and_catch_a_wrong_option(tmp_path: Path) -> None:
    """The shipped declarations (capsule/sandbox/js/sdk/index.d.ts) type the
    seed's programs, and tsc rejects an option the SDK does not have."""
    from capsule.sandbox import js
    from capsule.sandbox.js.toolchain import ensure_toolchain

    wrong = tmp_path / "wrong.ts"
    wrong.write_text(
        'import { task } from "@capsule-run/sdk";\n'
        'export const main = task({ name: "main", maxRetry: 2 }, () => 1);\n'
    )
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "es2022",
            "moduleResolution": "bundler",
            "lib": ["es2022", "dom"],
            "paths": {"@capsule-run/sdk": [str(js.SDK_TYPES)]},
        },
        "files": [str(EXAMPLES / "hello.ts"), str(EXAMPLES / "analyze.ts")],
    }
    tsc = str(ensure_toolchain().tsc)
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    checked = subprocess.run([tsc, "-p", str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout
    config["files"].append(str(wrong))  # type: ignore[attr-defined]
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    checked = subprocess.run([tsc, "-p", str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode != 0 and "'maxRetry' does not exist" in checked.stdout


def test_console_output_goes_to_the_run_output(tmp_path: Path) -> None:
    program = tmp_path / "talk.js"
    program.write_text(
        textwrap.dedent(
            """
            const { task } = require("@capsule-run/sdk");
            exports.main = task({ name: "main" }, () => {
              console.log("to stdout", 1, { a: [2] });
              console.error("to stderr");
              return null;
            });
            """
        )
    )
    done = capsule_cli("run", str(program))
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'to stdout 1 {"a":[2]}\nnull\n'
    assert "to stderr\n" in done.stderr


def test_limits_mean_what_they_mean_for_python(run_ts: ProgramRunner) -> None:
    """Fuel, memory, a deadline with a timer pending, and a promise nothing
    can settle each fail the task with the kind a Python task gets."""
    outcome = run_ts(
        """
        import { task } from "@capsule-run/sdk";

        export const spin = task({ name: "spin", compute: "LOW", maxRetries: 0 }, () => {
          for (;;) {}
        });
        export const slow = task({ name: "slow", timeout: "300ms", maxRetries: 0 }, () =>
          new Promise((resolve) => setTimeout(resolve, 60_000)));
        export const stuck = task({ name: "stuck", maxRetries: 0 }, () => new Promise(() => {}));
        export const hog = task({ name: "hog", ram: "64MB", maxRetries: 0 }, () => {
          const kept: Uint8Array[] = [];
          for (;;) kept.push(new Uint8Array(1 << 20).fill(1));
        });

        export const main = task({ name: "main" }, async () => {
          const kinds: Record<string, string> = {};
          for (const child of [spin, slow, stuck, hog]) {
            try {
              await child();
              kinds[child.taskName] = "returned";
            } catch (error: any) {
              kinds[error.task] = error.kind;
            }
          }
          return kinds;
        });
        """
    )
    assert outcome.value == {
        "spin": "fuel_exhausted",
        "slow": "timeout",
        "stuck": "exception",
        "hog": "memory_limit",
    }
    failed = {event.task: event for event in outcome.of_type("failed")}
    assert "never settles" in failed["stuck"].error.message
    assert failed["slow"].duration_ms < 10_000  # (the 60 s timer did not hold it)


def test_children_spawn_map_gather_and_errors(run_ts: ProgramRunner) -> None:
    outcome = run_ts(
        """
        import { task, gather, current, TaskError } from "@capsule-run/sdk";

        export const square = task({ name: "square" }, (n: number) => n * n);
        export const fail = task({ name: "fail", maxRetries: 0 }, (why: string) => {
          throw new RangeError(why);
        });

        export const main = task({ name: "main" }, async () => {
          const both = await Promise.all([square(2), square(3)]);
          const mapped = await square.map([1, 2, 3]);
          const handles = [square.spawn(4), square.spawn(5)];
          const gathered = await gather(...handles);
          let error: any;
          try {
            await fail("no good");
          } catch (e) {
            error = e;
          }
          return {
            both, mapped, gathered,
            me: current().name,
            isTaskError: error instanceof TaskError,
            kind: error.kind, task: error.task, reason: error.reason,
            stack: String(error.stack).includes("RangeError"),
            retryable: error.retryable,
          };
        });
        """
    )
    assert outcome.value == {
        "both": [4, 9],
        "mapped": [1, 4, 9],
        "gathered": [16, 25],
        "me": "main",
        "isTaskError": True,
        "kind": "exception",
        "task": "fail",
        "reason": "no good",
        "stack": True,
        "retryable": True,
    }


def test_an_unhandled_child_failure_fails_the_caller_naming_the_cause(
    run_ts: ProgramRunner,
) -> None:
    outcome = run_ts(
        """
        import { task, NonRetryable } from "@capsule-run/sdk";
        export const leaf = task({ name: "leaf" }, () => { throw new NonRetryable("bad input"); });
        export const main = task({ name: "main" }, () => leaf());
        """
    )
    error = outcome.error
    assert error.kind == "exception"
    assert error.cause["task"] == "leaf" and error.cause["message"] == "bad input"
    assert not error.retryable
    # NonRetryable: one attempt of each, no retry.
    assert len(outcome.of_type("started")) == 2


def test_messages_between_js_tasks(run_ts: ProgramRunner) -> None:
    outcome = run_ts(
        """
        import { task, receive, send, ask } from "@capsule-run/sdk";

        export const echo = task({ name: "echo" }, async () => {
          for (;;) {
            const message = await receive();
            if (message.body === "stop") return "stopped";
            message.reply({ echoed: message.body, from: message.sender.length > 0 });
          }
        });

        export const main = task({ name: "main" }, async () => {
          const child = echo.spawnWith({ name: "echoer" });
          const first = await ask("echoer", "hi");
          const second = await ask(child, 42, { timeout: 5 });
          await send("echoer", "stop");
          return [first, second, await child];
        });
        """
    )
    assert outcome.value == [
        {"echoed": "hi", "from": True},
        {"echoed": 42, "from": True},
        "stopped",
    ]


def test_timeouts_of_receive_and_ask_stop_what_they_waited_for(run_ts: ProgramRunner) -> None:
    """A receive or an ask that timed out leaves nothing in flight: a promise
    nothing can settle afterwards is still found out at once."""
    outcome = run_ts(
        """
        import { task, receive, ask, sleep, MessageError } from "@capsule-run/sdk";

        export const mute = task({ name: "mute" }, async () => {
          await receive();  // (an ask, never answered)
          await sleep(60);
        });

        export const main = task({ name: "main", timeout: "60s" }, async () => {
          const kinds: string[] = [];
          try { await receive({ timeout: 0.05 }); } catch (error: any) {
            kinds.push(error instanceof MessageError ? error.kind : "other");
          }
          mute.spawnWith({ name: "mute" });
          try { await ask("mute", "hello?", { timeout: 0.05 }); } catch (error: any) {
            kinds.push(error.kind);
          }
          console.log(JSON.stringify(kinds));
          await new Promise(() => {});
        });
        """
    )
    error = outcome.error
    assert "never settles" in error.message
    printed = [event.text for event in outcome.of_type("output") if event.task == "main"]
    assert printed[0] == '["receive_timeout","receive_timeout"]\n'
    failed = [event for event in outcome.of_type("failed") if event.task == "main"]
    assert failed and failed[0].duration_ms < 30_000  # (found out, not its 60 s deadline)


def test_bad_options_and_a_missing_main_are_usage_errors(
    program: Callable[[str, str], Path],
) -> None:
    cases = {
        "bad_compute.ts": ('task({ name: "main", compute: "SUPER" }, () => 1)', "compute"),
        "unknown.ts": ('task({ name: "main", maxRetry: 2 }, () => 1)', "maxRetry"),
        "no_main.ts": ('task({ name: "other" }, () => 1)', "no task named 'main'"),
    }
    for name, (declaration, named) in cases.items():
        path = program(
            f'import {{ task }} from "@capsule-run/sdk";\nexport const t = {declaration};\n', name
        )
        done = capsule_cli("run", str(path))
        assert done.returncode == 2, (name, done.stderr)
        assert named in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["fs", "node:path", "child_process"])
def test_node_builtins_are_refused_naming_the_module(
    program: Callable[[str, str], Path], module: str
) -> None:
    path = program(
        f'import {{ task }} from "@capsule-run/sdk";\nimport * as m from "{module}";\n'
        'export const main = task({ name: "main" }, () => typeof m);\n',
        "builtin.ts",
    )
    done = capsule_cli("run", str(path))
    assert done.returncode == 2, done.stderr
    assert f"imports {module!r}" in done.stderr and "Node.js built-in" in done.stderr


def test_an_npm_package_from_node_modules_is_bundled(tmp_path: Path) -> None:
    shutil.copytree(VENDORED, tmp_path / "node_modules")
    program = tmp_path / "slugs.ts"
    program.write_text(
        'import { task } from "@capsule-run/sdk";\nimport { slug } from "tiny-slug";\n'
        'export const main = task({ name: "main" }, () => slug("  Hello, Capsule World! "));\n'
    )
    done = capsule_cli("run", str(program))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello-capsule-world\n"


def test_an_edit_runs_without_a_rebuild_and_an_unchanged_program_is_not_rebundled(
    tmp_path: Path,
) -> None:
    program = tmp_path / "edit.ts"
    template = 'import {{ task }} from "@capsule-run/sdk";\nexport const main = task({{ name: "main" }}, () => {value});\n'
    program.write_text(template.format(value=1))
    assert capsule_cli("run", str(program)).stdout == "1\n"
    program.write_text(template.format(value=2))
    second = capsule_cli("run", str(program))
    assert second.stdout == "2\n" and "building" not in second.stderr
    from capsule.sandbox.js import bundle

    calls = []
    real = bundle.run_tool
    bundle.run_tool = lambda *args, **kw: calls.append(args) or real(*args, **kw)  # type: ignore[assignment]
    try:
        cached = bundle.bundle_program(program.resolve())
    finally:
        bundle.run_tool = real  # type: ignore[assignment]
    assert calls == [] and "() => 2" in cached.code
    assert str(program.resolve()) in cached.inputs


def test_fetch_and_http_go_through_the_hosts_allow_list(
    run_ts: ProgramRunner, http_server: LocalServer
) -> None:
    outcome = run_ts(
        f"""
        import {{ task, http, HttpError }} from "@capsule-run/sdk";

        export const allowed = task({{ name: "allowed", allowedHosts: ["127.0.0.1"] }}, async () => {{
          const response = await fetch("{http_server.url}/echo", {{ method: "POST", body: "ping" }});
          const echoed = await response.json();
          const viaHttp = await http.get("{http_server.url}/status/201");
          return [response.status, echoed.method, echoed.body_hex, viaHttp.statusCode, viaHttp.ok()];
        }});

        export const denied = task({{ name: "denied" }}, async () => {{
          try {{
            await fetch("{http_server.url}/echo");
            return "sent";
          }} catch (error: any) {{
            return [error instanceof HttpError, error.kind];
          }}
        }});

        export const main = task({{ name: "main" }}, async () => [await allowed(), await denied()]);
        """
    )
    assert outcome.value == [
        [200, "POST", b"ping".hex(), 201, True],
        [True, "host_not_allowed"],
    ]
    assert http_server.hits == {"/echo": 1, "/status/201": 1}


RESUMED = """
import { task, sleep } from "@capsule-run/sdk";

export const pick = task({ name: "pick" }, (n: number) => n + Math.random());

export const main = task({ name: "main" }, async () => {
  const drawn = [Date.now(), Math.random(), await pick(1)];
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  console.log("MARK " + JSON.stringify([...drawn, ...bytes]));
  await sleep(1.5);  // (killed meanwhile; the resume sleeps it)
  return [...drawn, ...bytes];
});
"""


def test_a_js_workflow_killed_with_9_resumes_to_the_same_result(tmp_path: Path) -> None:
    program = tmp_path / "durable.ts"
    program.write_text(RESUMED)
    printed, code = kill_at_marker(["run", str(program)], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed
    before = json.loads(printed.split("MARK ", 1)[1].splitlines()[0])
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    # The clock, the random draws and the child's result are the journal's.
    assert resumed.json()["result"] == before
    # The readers of the journal see a JS run as any other.
    inspected = capsule_cli("inspect", "--last", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    tasks = {task["name"]: task["status"] for task in inspected.json()["tasks"]}
    assert tasks == {"main": "completed", "pick": "completed"}


def test_file_colon_task_starts_a_ts_run_at_another_task(tmp_path: Path) -> None:
    program = tmp_path / "two.ts"
    program.write_text(
        'import { task } from "@capsule-run/sdk";\n'
        'export const main = task({ name: "main" }, () => "main");\n'
        'export const other = task({ name: "other" }, (n: number) => n + 1);\n'
    )
    done = capsule_cli("run", f"{program}:other", "--args-json", "[41]")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"


def test_without_node_a_ts_program_fails_naming_what_is_missing(tmp_path: Path) -> None:
    """A fresh machine without node or npm: a TypeScript program is refused
    with what is missing (exit 3, the runtime's), not a traceback."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {"CAPSULE_HOME": str(tmp_path / "home"), "PATH": str(bare)}
    done = capsule_cli("run", str(EXAMPLES / "hello.ts"), env=env)
    assert done.returncode == 3, done.stderr
    assert "needs Node.js 18+ and npm on PATH" in done.stderr
    assert "node and npm not found" in done.stderr and "Traceback" not in done.stderr


def test_bad_option_values_are_named_as_a_js_program_writes_them(
    program: Callable[[str, str], Path],
) -> None:
    path = program(
        'import { task } from "@capsule-run/sdk";\n'
        'export const main = task({ name: "main", maxRetries: -1, allowedHosts: "x" }, () => 1);\n',
        "options.ts",
    )
    done = capsule_cli("run", str(path))
    assert done.returncode == 2, done.stderr
    assert "option maxRetries=-1 is invalid" in done.stderr
    assert "option allowedHosts='x' is invalid" in done.stderr
    assert "max_retries" not in done.stderr


FETCHED = """
import { task, sleep } from "@capsule-run/sdk";

export const main = task({ name: "main", timeout: "5m", allowedHosts: ["127.0.0.1"] }, async (base: string) => {
  const first = await fetch(base + "/echo?api_key=SECRET-KEY", {
    method: "POST",
    headers: { Authorization: "Bearer SECRET-TOKEN", "Content-Type": "application/json" },
    body: JSON.stringify({ n: 1 }),
  });
  const echoed = await first.json();
  console.log("MARK requested");
  await sleep(1);
  return [echoed.method, echoed.headers.authorization === "Bearer SECRET-TOKEN"];
});
"""


def test_a_fetch_is_journaled_once_replayed_on_resume_and_its_secrets_redacted(
    tmp_path: Path, http_server: LocalServer
) -> None:
    program = tmp_path / "fetcher.ts"
    program.write_text(FETCHED)
    printed, code = kill_at_marker(["run", str(program), http_server.url], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed
    assert http_server.hits == {"/echo": 1}
    resumed = capsule_cli("resume", "--last", "--json", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["result"] == ["POST", True]
    assert http_server.hits == {"/echo": 1}  # exactly once, over both runs
    journal = (tmp_path / ".capsule" / "journal.db").read_bytes().decode("utf-8", "replace")
    assert "SECRET-TOKEN" not in journal and "SECRET-KEY" not in journal


PAYING = """
import { task } from "@capsule-run/sdk";

export const main = task({ name: "main", allowedHosts: ["127.0.0.1"] }, async (url: string) => {
  await fetch(url);
  const key = crypto.randomUUID();
  const response = await fetch(url, {
    method: "POST",
    headers: { "Idempotency-Key": key, "Content-Type": "application/json" },
    body: JSON.stringify({ amount: 5 }),
  });
  return (await response.json()).key;
});
"""


def test_a_fetch_in_flight_at_a_crash_is_sent_again_with_the_same_key(
    payments: PaymentServer, tmp_path: Path
) -> None:
    """The key was drawn from the host (crypto.randomUUID) and is committed
    before the fetch leaves (see test_effect_inputs.py)."""
    killed_in_flight_then_resumed(PAYING, "pay.ts", payments, tmp_path, "--core", "async")


def test_mistakes_in_sdk_calls_are_errors_the_task_can_catch(run_ts: ProgramRunner) -> None:
    """What a task hands the SDK wrongly is a JS error it can catch, never a
    protocol failure that ends it: lone surrogates, a gather of promises or of
    one handle twice, null and absurd timeouts, timers of Infinity, a child
    refused at once (a promise that rejects), thrown values that resist
    being read."""
    outcome = run_ts(
        """
        import { task, gather, receive, ask, send, sleep, TaskError } from "@capsule-run/sdk";

        export const echo = task({ name: "echo" }, (value: unknown) => value);
        export const slow = task({ name: "slow" }, async () => { await sleep(0.2); return "slow"; });
        export const quiet = task({ name: "quiet" }, async () => { await receive(); await sleep(60); });
        export const forged = task({ name: "forged", maxRetries: 0 }, () => {
          throw new TaskError("exception", 123 as any, "boom", { cause: { task: 5, kind: {}, message: null, via: [1] } });
        });
        export const nasty = task({ name: "nasty", maxRetries: 0 }, () => {
          throw new Proxy({}, { get() { throw new Error("no reading me"); } });
        });

        async function outcome(run: () => unknown): Promise<string> {
          try {
            const value = await run();
            return "ok " + JSON.stringify(value);
          } catch (error: any) {
            return `${error?.name}: ${error?.kind ?? ""}`;
          }
        }

        export const main = task({ name: "main", timeout: "60s" }, async () => {
          const lone = "\\ud83d";
          const handle = echo.spawn(1);
          quiet.spawnWith({ name: "quiet" });
          const results: Record<string, string> = {
            loneArgument: await outcome(() => echo(lone)),
            loneMessage: await outcome(() => send("main", lone)),
            gatherTwice: await outcome(() => gather(handle, handle)),
            gatherPromises: await outcome(() => gather(echo(2) as any)),
            receiveNull: await outcome(() =>
              Promise.race([receive({ timeout: null as any }), sleep(0.05).then(() => "waited")])),
            infiniteTimer: await outcome(() => new Promise((resolve) => {
              const timer = setTimeout(resolve, Infinity);
              clearTimeout(timer);
              resolve("cleared");
            })),
            hugeTimeout: await outcome(() =>
              Promise.race([ask("quiet", 1, { timeout: 1e300 }), sleep(0.05).then(() => "waited")])),
            refused: await outcome(() => (echo as any)(1n).catch((error: any) => "caught " + error.name)),
            loneStringObject: await outcome(() => send("main", { s: new String(lone) })),
            loneSpawnName: await outcome(() => echo.spawnWith({ name: "a" + lone }, 1)),
            askBadTimeout: await outcome(() => ask("quiet", "hello", { timeout: "5" as any })),
            madeTaskError: await outcome(() => forged()),
            nastyThrow: await outcome(() => nasty()),
          };
          // A handle's result awaited over and over while it runs starts one wait.
          const pending = slow.spawn();
          for (let i = 0; i < 100; i++) await Promise.race([pending.result(), Promise.resolve()]);
          results.raced = await outcome(() => pending);
          return results;
        });
        """
    )
    value = outcome.value
    assert value["loneArgument"] == "TypeError: "
    assert value["loneMessage"] == "TypeError: "
    assert value["gatherTwice"] == "ok [1,1]"
    assert value["gatherPromises"] == "TypeError: "
    assert value["receiveNull"] == 'ok "waited"'
    assert value["infiniteTimer"] == 'ok "cleared"'
    assert value["hugeTimeout"] == 'ok "waited"'
    assert value["refused"] == 'ok "caught TypeError"'
    assert value["nastyThrow"] == "TaskError: exception"
    assert value["loneStringObject"] == "TypeError: "
    assert value["loneSpawnName"] == "TypeError: "
    assert value["askBadTimeout"] == "TypeError: "
    assert value["madeTaskError"] == "TaskError: exception"
    # (The ask refused for its timeout sent nothing: quiet got the 1e300 one only.)
    asks = [e for e in outcome.of_type("message_sent") if e.task_id == "main" and e.expects_reply]
    assert len(asks) == 1
    assert value["raced"] == 'ok "slow"'


def test_the_bundle_cache_sees_a_new_file_that_changes_an_import(tmp_path: Path) -> None:
    """A file added beside the program that esbuild would now resolve an
    import to (util.ts before util.js), and a changed tsconfig.json, bundle
    the program anew; a file changed while it was bundled is not cached."""
    from capsule.sandbox.js import bundle

    program = tmp_path / "main.ts"
    program.write_text(
        'import { task } from "@capsule-run/sdk";\nimport { where } from "./util";\n'
        'export const main = task({ name: "main" }, () => where);\n'
    )
    (tmp_path / "util.js").write_text('export const where = "util.js";\n')
    assert '"util.js"' in bundle.bundle_program(program).code
    time.sleep(0.01)
    (tmp_path / "util.ts").write_text('export const where: string = "util.ts";\n')
    assert '"util.ts"' in bundle.bundle_program(program).code
    assert '"util.ts"' in bundle.bundle_program(program).code  # (cached now)
    (tmp_path / "tsconfig.json").write_text('{"compilerOptions": {"target": "es2020"}}\n')
    calls: list[Any] = []
    real = bundle.run_tool
    bundle.run_tool = lambda *args, **kw: calls.append(args) or real(*args, **kw)  # type: ignore[assignment]
    try:
        bundle.bundle_program(program)
    finally:
        bundle.run_tool = real  # type: ignore[assignment]
    assert len(calls) == 1

    # An input written while esbuild runs: that bundle is used, not kept.
    def edit_meanwhile(*args: Any, **options: Any) -> Any:
        done = real(*args, **options)
        (tmp_path / "util.ts").write_text('export const where: string = "edited";\n')
        return done

    bundle.run_tool = edit_meanwhile  # type: ignore[assignment]
    (tmp_path / "util.ts").write_text('export const where: string = "before";\n')
    try:
        assert '"before"' in bundle.bundle_program(program).code
    finally:
        bundle.run_tool = real  # type: ignore[assignment]
    assert '"edited"' in bundle.bundle_program(program).code


def test_long_waits_wait_on_the_host_without_turning(tmp_path: Path) -> None:
    """A sleep or receive of a timeout over setTimeout's range (~24.8 days)
    waits on the host: one receive step, not a turn of the loop every
    millisecond (each a journaled step)."""
    program = tmp_path / "long.ts"
    program.write_text(
        'import { task, receive, sleep } from "@capsule-run/sdk";\n'
        'export const main = task({ name: "main" }, async () => {\n'
        '  const first = await Promise.race([sleep(3e6).then(() => "long"), sleep(0.3).then(() => "short")]);\n'
        '  const second = await Promise.race([receive({ timeout: Infinity }).then(() => "got"), sleep(0.5).then(() => "waited")]);\n'
        "  return [first, second];\n"
        "});\n"
    )
    done = capsule_cli("run", str(program), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == '["short", "waited"]\n'
    import sqlite3

    with sqlite3.connect(tmp_path / ".capsule" / "journal.db") as connection:
        steps = dict(
            connection.execute("SELECT kind, COUNT(*) FROM steps GROUP BY kind").fetchall()
        )
    assert steps.get("receive", 0) <= 3 and sum(steps.values()) < 40, steps


def test_a_tsconfig_above_the_sources_is_part_of_the_bundles_cache_key(tmp_path: Path) -> None:
    from capsule.sandbox.js import bundle

    (tmp_path / "src").mkdir()
    for lib in ("lib1", "lib2"):
        (tmp_path / lib).mkdir()
        (tmp_path / lib / "where.ts").write_text(f'export const where = "{lib}";\n')
    config = '{"compilerOptions": {"baseUrl": ".", "paths": {"@lib/*": ["%s/*"]}}}\n'
    (tmp_path / "tsconfig.json").write_text(config % "lib1")
    program = tmp_path / "src" / "main.ts"
    program.write_text('import { where } from "@lib/where";\nexport const main = where;\n')
    assert '"lib1"' in bundle.bundle_program(program).code
    (tmp_path / "tsconfig.json").write_text(config % "lib2")
    assert '"lib2"' in bundle.bundle_program(program).code


def test_a_damaged_bundle_cache_entry_is_bundled_anew(tmp_path: Path) -> None:
    from capsule.sandbox.js import bundle
    from capsule.sandbox.js.toolchain import ensure_toolchain

    program = tmp_path / "main.ts"
    program.write_text('export const main = "fresh";\n')
    entry = bundle._cache_file(program, ensure_toolchain())
    entry.parent.mkdir(parents=True, exist_ok=True)
    damaged = [
        json.dumps({"code": "stale", "inputs": {"a\u0000b": "x"}, "fingerprint": {}}),
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"code": 1, "inputs": [], "fingerprint": None}),
    ]
    for text in damaged:
        entry.write_text(text)
        assert '"fresh"' in bundle.bundle_program(program).code
