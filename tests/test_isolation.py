"""Guest code is hostile by assumption: it reaches nothing it was not given."""

from __future__ import annotations

import hashlib
import os

from tests.conftest import ProgramRunner

PROBES = """
    import os
    from capsule import task

    def attempt(action):
        try:
            return ["allowed", repr(action())[:80]]
        except BaseException as error:
            return ["denied", type(error).__name__]

    @task(name="main", compute="HIGH")
    def main(secret_path):
        import socket
        return {
            "read_secret": attempt(lambda: open(secret_path).read()),
            "read_etc": attempt(lambda: open("/etc/passwd").read()),
            "list_root": attempt(lambda: os.listdir("/")),
            "write_file": attempt(lambda: open("/tmp/capsule-escape", "w").write("x")),
            "env": dict(os.environ),
            "socket": attempt(lambda: socket.create_connection(("127.0.0.1", 80), timeout=1)),
            "argv": __import__("sys").argv,
        }
"""


def test_no_files_env_or_sockets(run_program: ProgramRunner, tmp_path: os.PathLike[str]) -> None:
    secret = os.path.join(str(tmp_path), "secret.txt")
    with open(secret, "w") as handle:
        handle.write("top secret")
    os.environ["CAPSULE_TEST_SECRET"] = "leak-me"
    try:
        outcome = run_program(PROBES, secret)
    finally:
        del os.environ["CAPSULE_TEST_SECRET"]
    probes = outcome.value
    assert probes["read_secret"][0] == "denied"
    assert probes["read_etc"][0] == "denied"
    assert probes["list_root"][0] == "denied"
    assert probes["write_file"][0] == "denied"
    assert probes["socket"][0] == "denied"
    assert probes["env"] == {}
    assert not os.path.exists("/tmp/capsule-escape")


def test_common_stdlib_is_available(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        import importlib
        from capsule import task

        REQUIRED = (
            "json re math random datetime time collections itertools functools dataclasses "
            "enum typing statistics decimal fractions string textwrap hashlib base64 uuid "
            "urllib.parse html csv io copy heapq bisect operator traceback logging "
            "contextlib abc"
        ).split()

        @task(name="main")
        def main():
            missing = []
            for name in REQUIRED:
                try:
                    importlib.import_module(name)
                except ImportError as error:
                    missing.append(f"{name}: {error}")
            import hashlib, statistics, uuid, decimal
            return {
                "missing": missing,
                "sha": hashlib.sha256(b"capsule").hexdigest()[:12],
                "mean": statistics.mean([1, 2, 3, 4]),
                "uuid_len": len(str(uuid.uuid4())),
                "decimal": str(decimal.Decimal("1.1") + decimal.Decimal("2.2")),
            }
        """
    )
    assert outcome.value == {
        "missing": [],
        "sha": hashlib.sha256(b"capsule").hexdigest()[:12],
        "mean": 2.5,
        "uuid_len": 36,
        "decimal": "3.3",
    }
