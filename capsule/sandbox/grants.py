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

_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"only http and https URLs can be requested, not {url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"the URL {url!r} has no host")
    if ":" in host:  # urlsplit strips the brackets of an IPv6 literal
        host = f"[{host}]"
    return scheme, host, parts.port or _DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class FileGrant:
    """A directory of the program, as the guest sees it (``/`` + its relative path)."""

    host_path: Path
    guest_path: str
    writable: bool


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
    files = []
    for grant in config.allowed_files:
        relative, _, mode = grant.partition(":")
        candidate = program_dir / relative
        resolved = candidate.resolve()
        if resolved != root and root not in resolved.parents:
            raise ConfigError(
                f"{where}: allowed_files {grant!r} leads outside the program's directory "
                f"{root} (through a symlink); grant a directory inside it"
            )
        if resolved == root or ".capsule" in resolved.relative_to(root).parts:
            raise ConfigError(
                f"{where}: allowed_files {grant!r} would expose the program's directory "
                f"itself, with its journal (.capsule) and .env; grant a subdirectory"
            )
        if not resolved.is_dir():
            raise ConfigError(f"{where}: allowed_files {grant!r}: {candidate} is not a directory")
        guest = "/" + resolved.relative_to(root).as_posix()
        files.append(FileGrant(resolved, guest, writable=mode == "rw"))
    env = {name: environment[name] for name in config.env if name in environment}
    return Grants(hosts, env, tuple(files))
