"""A throwaway PostgreSQL cluster for the tests: ``initdb`` and ``pg_ctl``
in a temporary directory, on a free loopback port, trust authentication, as
an unprivileged user when the tests run as root (the server refuses root).

Without the server binaries the tests that need it skip, saying why; under
CI (``CI=true``) they fail instead: CI's machine has them, so their absence
is a broken machine, not a reason to test less."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Where Debian puts each version's server binaries.
_DEBIAN_BINARIES = Path("/usr/lib/postgresql")


def server_binaries() -> Path | None:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres`` (the newest
    Debian's, else those on PATH); None if there are none."""
    if _DEBIAN_BINARIES.is_dir():
        for version in sorted(_DEBIAN_BINARIES.iterdir(), key=_version_key, reverse=True):
            if (version / "bin" / "initdb").is_file():
                return version / "bin"
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    return None


def _version_key(path: Path) -> tuple[int, str]:
    return (int(path.name) if path.name.isdigit() else 0, path.name)


def need_server_binaries() -> Path:
    binaries = server_binaries()
    if binaries is None:
        reason = (
            "the PostgreSQL server binaries (initdb, pg_ctl) are not on this machine: "
            "install Debian's postgresql package to run the PostgreSQL journal's tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (required under CI)")
        pytest.skip(reason)
    return binaries


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """One PostgreSQL server, its data in ``root``; start, stop, and make
    databases on it."""

    def __init__(self, root: Path, binaries: Path) -> None:
        self.root = root
        self.binaries = binaries
        self.data = root / "data"
        self.port = _free_port()
        #: The user the server runs as: the tests' own, or when that is
        #: root, an unprivileged one.
        self.run_as: str | None = None
        if os.geteuid() == 0:
            self.run_as = _unprivileged_user()
            owner = pwd.getpwnam(self.run_as)
            os.chown(root, owner.pw_uid, owner.pw_gid)
        root.chmod(0o700)
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "capsule",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def _pg(self, program: str, *args: str) -> None:
        command = [str(self.binaries / program), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            # (A test cluster: durability against an OS crash is not tested.)
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._pg(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://capsule@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("no unprivileged user (postgres, nobody) to run the server as")


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A started cluster in a new directory, stopped and removed after.
    (Under /tmp, not pytest's directories: those are the tests' user's alone,
    and the server may run as another.)"""
    root = Path(tempfile.mkdtemp(prefix="capsule-postgres-"))
    try:
        cluster = Cluster(root, need_server_binaries())
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
