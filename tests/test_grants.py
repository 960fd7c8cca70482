"""Grants and escapes: a hostile task tries to reach what it was not given
(files, environment, sockets, processes, native code, other hosts); each try
fails cleanly and the host stays up. Grants on @task and in capsule.toml."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import LocalServer, ProgramRunner, capsule_cli, on_core


@pytest.fixture
def run_program(run_program: ProgramRunner, core: str) -> ProgramRunner:
    """Each program of this module runs on each core (they must answer alike)."""
    return on_core(run_program, core)


HOSTILE = """
import os
from capsule import task

def attempt(action):
    try:
        return ["done", repr(action())[:200]]
    except BaseException as exc:
        return [type(exc).__name__, str(exc)[:200]]

def read(path):
    with open(path, "rb") as handle:
        return handle.read(64)

def write(path):
    with open(path, "w") as handle:
        return handle.write("pwned")

def connect():
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(("127.0.0.1", int(os.environ.get("PORT", "80"))))
    return "connected"

@task(name="main", allowed_files=["data", "out:rw"], env=["GRANTED_VAR"])
def main(port: int, home: str, cache: str, journal: str) -> dict:
    os.environ["PORT"] = str(port)
    return {
        "etc_passwd": attempt(lambda: read("/etc/passwd")),
        "home": attempt(lambda: os.listdir(home)),
        "cache": attempt(lambda: os.listdir(cache)),
        "journal": attempt(lambda: read(journal)),
        "journal_relative": attempt(lambda: read(".capsule/journal.db")),
        "env_granted": os.environ.get("GRANTED_VAR"),
        "env_secret": os.environ.get("NOT_GRANTED_SECRET"),
        "socket": attempt(connect),
        "subprocess": attempt(lambda: __import__("subprocess").run(["id"])),
        "ctypes": attempt(lambda: __import__("ctypes").CDLL(None)),
        "os_system": attempt(lambda: os.system("id")),
        "read_granted": attempt(lambda: read("data/notes.txt")),
        "read_granted_absolute": attempt(lambda: read("/data/notes.txt")),
        "write_read_only": attempt(lambda: write("data/new.txt")),
        "write_rw": attempt(lambda: write("out/result.txt")),
        "write_elsewhere": attempt(lambda: write("/tmp/capsule-escape.txt")),
        "escape_dotdot": attempt(lambda: read("data/../secret.txt")),
        "escape_symlink": attempt(lambda: read("data/link-out/passwd")),
        "escape_symlink_file": attempt(lambda: read("data/secret-link")),
    }
"""


def test_a_hostile_task_reaches_only_what_it_was_granted(
    tmp_path: Path, http_server: LocalServer, core: str
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("granted notes")
    (tmp_path / "out").mkdir()
    (tmp_path / "secret.txt").write_text("program-dir secret")
    (tmp_path / "data" / "link-out").symlink_to("/etc")
    (tmp_path / "data" / "secret-link").symlink_to(tmp_path / "secret.txt")
    (tmp_path / ".env").write_text("GRANTED_VAR=from-dotenv\nOTHER=x\n")
    program = tmp_path / "hostile.py"
    program.write_text(textwrap.dedent(HOSTILE))
    home = str(Path.home())
    cache = str(Path.home() / ".cache" / "capsule")
    journal = str(tmp_path / ".capsule" / "journal.db")
    port = str(http_server.server_address[1])
    done = capsule_cli(
        "run",
        str(program),
        "--args-json",
        json.dumps([int(port), home, cache, journal]),
        "--json",
        "--core",
        core,
        cwd=tmp_path,
        env={"NOT_GRANTED_SECRET": "hunter2"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    for escape in (
        "etc_passwd",
        "home",
        "cache",
        "journal",
        "journal_relative",
        "socket",
        "subprocess",
        "ctypes",
        "os_system",
        "write_read_only",
        "write_elsewhere",
        "escape_dotdot",
        "escape_symlink",
        "escape_symlink_file",
    ):
        assert result[escape][0] != "done", (escape, result[escape])
    # subprocess is importable (asyncio imports it), but no process can start.
    assert result["subprocess"][0] == "OSError", result["subprocess"]
    assert "wasi does not support processes" in result["subprocess"][1]
    assert result["ctypes"][0] == "ModuleNotFoundError"
    assert result["env_granted"] == "from-dotenv"
    assert result["env_secret"] is None
    assert result["read_granted"] == ["done", "b'granted notes'"]
    assert result["read_granted_absolute"] == ["done", "b'granted notes'"]
    assert result["write_rw"][0] == "done"
    assert (tmp_path / "out" / "result.txt").read_text() == "pwned"
    assert not (tmp_path / "data" / "new.txt").exists()
    assert not Path("/tmp/capsule-escape.txt").exists()
    assert http_server.hits == {}  # the socket never reached the server
    assert "hunter2" not in done.stdout + done.stderr


def test_the_process_environment_wins_over_dotenv(
    run_program: ProgramRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text('API_TOKEN="from file"\n')
    monkeypatch.setenv("API_TOKEN", "from process")
    source = """
    import os
    from capsule import task

    @task(name="main", env=["API_TOKEN", "UNSET_VAR"])
    def main() -> list:
        return [os.environ.get("API_TOKEN"), "UNSET_VAR" in os.environ]
    """
    assert run_program(source).value == ["from process", False]


@pytest.mark.parametrize(
    ("grant", "message"),
    [
        ('allowed_files=["../elsewhere"]', "expected a list of directories inside"),
        ('allowed_files=["/etc"]', "expected a list of directories inside"),
        ('allowed_files=["data:rwx"]', "expected a list of directories inside"),
        ('allowed_files=["linked"]', "is a symlink"),
        ('allowed_files=["./linked/x"]', "is a symlink"),
        ('allowed_files=["."]', "would expose the program's directory itself"),
        ('allowed_files=["missing"]', "is not a directory"),
        ('allowed_hosts=["http://x.com/path"]', "expected a list of hosts"),
        ('allowed_hosts="x.com"', "expected a list of hosts"),
        ('env=["NOT-A-NAME"]', "expected a list of environment variable names"),
    ],
)
def test_bad_grants_are_refused_at_load(tmp_path: Path, grant: str, message: str) -> None:
    (tmp_path / "linked").symlink_to("/etc")
    program = tmp_path / "grants.py"
    program.write_text(
        f"from capsule import task\n@task(name='main', {grant})\ndef main():\n    return 1\n"
    )
    done = capsule_cli("run", str(program), "--no-journal")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "'main'" in done.stderr


def test_capsule_toml_sets_defaults_and_caps(
    tmp_path: Path, http_server: LocalServer, core: str
) -> None:
    (tmp_path / "capsule.toml").write_text(
        textwrap.dedent(
            """
            [tasks]
            compute = "LOW"
            max_retries = 0
            allowed_hosts = ["127.0.0.1"]

            [policy]
            max_ram = "64MB"
            allowed_hosts = ["127.0.0.1", "*.example.com"]
            """
        )
    )
    program = tmp_path / "defaults.py"
    program.write_text(
        textwrap.dedent(
            """
            from capsule import current, task
            from capsule.http import get

            @task(name="main", ram="1GB")
            def main(url: str) -> list:
                info = current()
                return [get(url).status_code, info.max_attempts]
            """
        )
    )
    url = f"{http_server.url}/status/200"
    done = capsule_cli("run", str(program), url, "--json", "-v", "--core", core)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == [200, 1]  # hosts and retries from [tasks]
    fuel = json.loads(done.stdout)["execution"]["fuel_consumed"]
    assert 0 < fuel < 100_000_000

    # A task may not declare hosts outside the policy.
    program.write_text(program.read_text().replace('ram="1GB"', 'allowed_hosts=["evil.org"]'))
    refused = capsule_cli("run", str(program), http_server.url, "--no-journal")
    assert refused.returncode == 2
    assert "'evil.org' is outside the policy of capsule.toml" in refused.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[tasks]\ncompute = 'ULTRA'\n", "[tasks] option compute='ULTRA' is invalid; expected LOW"),
        ("[tasks]\ncolour = 'blue'\n", "unknown key [tasks] 'colour'; accepted keys are"),
        ("[policy]\nmax_ram = 'lots'\n", "[policy] max_ram = 'lots' is invalid; expected a size"),
        ("[policy]\nallowed_hosts = 'x.com'\n", "[policy] allowed_hosts = 'x.com' is invalid"),
        ("[policy]\nmax_cpu = 1\n", "unknown key [policy] 'max_cpu'"),
        ("[runtime]\nx = 1\n", "unknown section or key 'runtime'"),
        ("[tasks\n", "cannot be read as TOML"),
    ],
)
def test_a_bad_capsule_toml_names_file_key_and_forms(
    tmp_path: Path, toml: str, message: str
) -> None:
    (tmp_path / "capsule.toml").write_text(toml)
    program = tmp_path / "p.py"
    program.write_text("from capsule import task\n@task(name='main')\ndef main():\n    return 1\n")
    done = capsule_cli("run", str(program), "--no-journal")
    assert done.returncode == 2
    assert str(tmp_path / "capsule.toml") in done.stderr
    assert message in done.stderr, done.stderr


def test_os_environ_is_empty_without_grants(run_program: ProgramRunner) -> None:
    source = """
    import os
    from capsule import task

    @task(name="main")
    def main() -> dict:
        return dict(os.environ)
    """
    os.environ.setdefault("SOME_HOST_VAR", "1")
    assert run_program(source).value == {}


def test_policy_caps_bound_what_a_task_declares(tmp_path: Path) -> None:
    (tmp_path / "capsule.toml").write_text('[policy]\nmax_fuel = "LOW"\nmax_ram = "64MB"\n')
    program = tmp_path / "greedy.py"
    program.write_text(
        textwrap.dedent(
            """
            from capsule import task

            @task(name="spin", compute="HIGH", max_retries=0)
            def spin() -> int:
                total = 0
                for i in range(50_000_000):
                    total += i
                return total

            @task(name="hog", ram="2GB", max_retries=0)
            def hog() -> int:
                return len(bytearray(200 * 1024 * 1024))

            @task(name="main")
            def main() -> list:
                kinds = []
                for child in (spin, hog):
                    try:
                        child()
                        kinds.append("finished")
                    except Exception as exc:
                        kinds.append(exc.kind)
                return kinds
            """
        )
    )
    done = capsule_cli("run", str(program), "--no-journal")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["fuel_exhausted", "memory_limit"]


def test_a_symlink_planted_in_a_writable_grant_cannot_be_imported_to_read_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / ".env").write_text("SECRET_TOKEN=sk-live-123456\n")
    program = tmp_path / "planter.py"
    program.write_text(
        textwrap.dedent(
            """
            import os
            from capsule import task

            def try_import(name):
                try:
                    __import__(name)
                    return "imported"
                except BaseException as exc:
                    return f"{type(exc).__name__}: {exc}"

            @task(name="main", allowed_files=["out:rw"])
            def main() -> list:
                os.symlink("../.env", "/out/leak.py")
                os.symlink("../../../../../../../../etc/passwd", "/out/passwd.py")
                return [try_import("out.leak"), try_import("out.passwd")]
            """
        )
    )
    done = capsule_cli("run", str(program), "--no-journal")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert all("granted to task 'main' (allowed_files 'out:rw')" in r for r in results), results
    assert "sk-live" not in done.stdout + done.stderr
    assert "root:" not in done.stdout + done.stderr


def test_a_file_outside_allowed_files_fails_with_a_hint_naming_them(
    tmp_path: Path, run_program: ProgramRunner
) -> None:
    (tmp_path / "data").mkdir()
    source = """
    from capsule import task

    @task(name="main", allowed_files=["data"], max_retries=0)
    def main(path):
        return open(path).read()
    """
    outside = run_program(source, "notes.txt").error
    assert outside.message.startswith("FileNotFoundError: ")
    assert "allowed_files" in outside.message and "'data'" in outside.message
    # Inside a granted directory a missing file is just missing.
    inside = run_program(source, "data/missing.txt").error
    assert inside.message.startswith("FileNotFoundError: ")
    assert "allowed_files" not in inside.message
