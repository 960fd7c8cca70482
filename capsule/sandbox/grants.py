"""What a task may reach outside its sandbox, as the host resolves and checks it:
hosts for HTTP, environment variables, directories of the program. Nothing by
default; each task gets what its own declaration grants, within the policy of
``capsule.toml``, and never what a guest asks for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from capsule.sandbox.config import ConfigError, TaskConfig
from capsule.sandbox.paths import (
    IsSymlink,
    PathRefused,
    can_hand_over_directories,
    open_directory_beneath,
)

#: The port of each scheme a task may request, when its URL names none.
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HostRule:
    """One allowed-hosts pattern: ``host``, ``*.domain`` or ``*``, with an
    optional scheme and port (absent: any of http/https, any port)."""

    pattern: str
    scheme: str | None
    host: str
    port: int | None

    @classmethod
    def parse(cls, pattern: str) -> HostRule:
        # Patterns were validated (config.parse_host_pattern); split them here.
        scheme, _, rest = pattern.rpartition("://")
        host, port = rest, None
        if rest.startswith("["):  # an IPv6 literal
            end = rest.index("]")
            host, tail = rest[: end + 1], rest[end + 1 :]
            port = int(tail[1:]) if tail.startswith(":") else None
        elif ":" in rest:
            host, _, number = rest.partition(":")
            port = int(number)
        return cls(pattern, scheme or None, host, port)

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and scheme != self.scheme:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def covers(self, other: HostRule) -> bool:
        """Whether every URL ``other`` allows is allowed by this rule too."""
        if self.scheme is not None and other.scheme != self.scheme:
            return False
        if self.port is not None and other.port != self.port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return other.host != "*" and other.host.endswith(self.host[1:])
        return other.host == self.host


def url_parts(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ValueError if it is not one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"only http and https URLs can be requested, not {url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"the URL {url!r} has no host")
    if ":" in host:  # urlsplit strips the brackets of an IPv6 literal
        host = f"[{host}]"
    return scheme, host, parts.port or DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class FileGrant:
    """A directory of the program granted to a task, as the guest sees it
    (``/`` + its relative path). It is reached from the program's directory one
    component at a time, never through a symlink (see paths.py)."""

    #: The program's directory, as resolved when the program loaded.
    root: Path
    #: The directory's components below ``root`` (none is "", "." or "..").
    parts: tuple[str, ...]
    writable: bool
    #: The grant as the task declared it, for messages ("out:rw").
    declared: str = ""

    @property
    def host_path(self) -> Path:
        return self.root.joinpath(*self.parts)

    @property
    def guest_path(self) -> str:
        return "/" + "/".join(self.parts)

    def open(self) -> int:
        """The granted directory, open (the caller closes it); PathRefused
        naming the grant if it cannot be reached without following a symlink."""
        try:
            return open_directory_beneath(self.root, self.parts)
        except (FileNotFoundError, NotADirectoryError):
            raise PathRefused(
                f"allowed_files {self.declared!r}: {self.host_path} is not a directory"
            ) from None
        except IsSymlink as exc:
            raise PathRefused(
                f"allowed_files {self.declared!r}: {exc}; the host follows no symlink in "
                f"a granted directory (a task that may write there could have made it)"
            ) from None
        except PathRefused as exc:
            raise PathRefused(f"allowed_files {self.declared!r}: {exc}") from None


@dataclass(frozen=True)
class Grants:
    hosts: tuple[HostRule, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    files: tuple[FileGrant, ...] = ()

    def allows(self, url: str) -> bool:
        scheme, host, port = url_parts(url)
        return any(rule.matches(scheme, host, port) for rule in self.hosts)


NO_GRANTS = Grants()


def program_environment(program_dir: Path) -> dict[str, str]:
    """Variables a task may be granted: ``.env`` beside the program, overridden
    by the environment of ``capsule run``. ConfigError if ``.env`` cannot be
    read, parsed or expanded within bounds (see capsule.sandbox.env_file)."""
    from capsule.sandbox.env_file import read_env_file

    return {**read_env_file(program_dir / ".env"), **os.environ}


def resolve_grants(
    config: TaskConfig,
    program_dir: Path,
    environment: Mapping[str, str],
    policy_hosts: tuple[HostRule, ...] | None,
) -> Grants:
    """The grants of one task; ConfigError if it declares what the policy does not
    allow or a directory that is not inside the program's directory."""
    where = f"task {config.name!r} ({config.function})"
    hosts = tuple(HostRule.parse(pattern) for pattern in config.allowed_hosts)
    if policy_hosts is not None:
        for rule in hosts:
            if not any(allowed.covers(rule) for allowed in policy_hosts):
                allowed_text = ", ".join(r.pattern for r in policy_hosts) or "none"
                raise ConfigError(
                    f"{where}: allowed_hosts {rule.pattern!r} is outside the policy of "
                    f"capsule.toml (allowed_hosts = {allowed_text})"
                )
    root = program_dir.resolve()
    files = tuple(_file_grant(where, grant, root) for grant in config.allowed_files)
    env = {name: environment[name] for name in config.env if name in environment}
    return Grants(hosts, env, files)


def _file_grant(where: str, grant: str, root: Path) -> FileGrant:
    """One ``allowed_files`` entry, checked as each task start will open it."""
    relative, _, mode = grant.partition(":")
    parts = tuple(part for part in relative.split("/") if part not in ("", "."))
    if relative.startswith("/") or ".." in parts:  # (refused by the config already)
        raise ConfigError(
            f"{where}: allowed_files {grant!r} leads outside the program's directory "
            f"{root}; grant a directory inside it"
        )
    if not parts or ".capsule" in parts:
        raise ConfigError(
            f"{where}: allowed_files {grant!r} would expose the program's directory "
            f"itself, with its journal (.capsule) and .env; grant a subdirectory"
        )
    if not can_hand_over_directories():
        raise ConfigError(
            f"{where}: allowed_files {grant!r}: directories can be granted only on Linux "
            f"with /proc mounted, where the host hands the sandbox the very directory it "
            f"checked (/proc/self/fd); this system cannot, so grant no directories"
        )
    granted = FileGrant(root, parts, writable=mode == "rw", declared=grant)
    try:
        os.close(open_directory_beneath(root, parts))
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(
            f"{where}: allowed_files {grant!r}: {granted.host_path} is not a directory"
        ) from None
    except IsSymlink as exc:
        raise ConfigError(
            f"{where}: allowed_files {grant!r}: {exc}. A granted directory is reached "
            f"without following symlinks (a task could make one to reach any host file): "
            f"grant the real directory inside {root}, or put the directory itself in "
            f"place of the symlink"
        ) from None
    except PathRefused as exc:
        raise ConfigError(f"{where}: allowed_files {grant!r}: {exc}") from None
    return granted
