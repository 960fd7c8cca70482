"""Task configs as the host validates them, and the limits derived from them.

User code declares options on ``@task`` as plain values; the guest runtime reports
them when it loads the program, and this module turns them into a validated
:class:`TaskConfig`. Everything the host enforces (fuel, memory, deadline,
retries) comes from here, capped by the :class:`HostCaps` of the run, and never
from what a guest sends at call time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

# (The options local mode reads too; the host's other modules take them from here.)
from capsule.sdk.options import (
    DEFAULT_MAX_RETRIES,
    parse_max_retries,
)
from capsule.sdk.options import TIMEOUT_FORMS as TIMEOUT_FORMS
from capsule.sdk.options import parse_timeout as parse_timeout

#: Fuel granted per compute level (the original system's values).
COMPUTE_LEVELS: dict[str, int] = {
    "LOW": 100_000_000,
    "MEDIUM": 2_000_000_000,
    "HIGH": 50_000_000_000,
}
DEFAULT_COMPUTE = "MEDIUM"
DEFAULT_RAM_BYTES = 256 * 1024**2

_RAM_UNITS = {
    "B": 1,
    "KB": 1024,
    "KIB": 1024,
    "MB": 1024**2,
    "MIB": 1024**2,
    "GB": 1024**3,
    "GIB": 1024**3,
    "TB": 1024**4,
    "TIB": 1024**4,
}
_RAM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

#: The most fuel a task may have (wasmtime counts fuel in a signed 64-bit integer).
MAX_FUEL = 2**63 - 1
#: The largest memory cap (far past what a 32-bit wasm memory can use).
MAX_RAM_BYTES = 2**62
COMPUTE_FORMS = (
    "LOW, MEDIUM or HIGH (any case), or a positive integer amount of fuel below 2**63 "
    '(e.g. compute="MEDIUM", compute=5000000 or compute="5000000")'
)
RAM_FORMS = 'a size such as "64KB", "512MB", "2GB" (units B, KB, MB, GB, TB; 1KB = 1024 bytes) or a positive int of bytes'
NAME_FORMS = "a non-empty string without '/' (defaults to the function name)"
RESTART_TYPES = ("transient", "permanent", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_FORMS = '"transient" (the default), "permanent" or "temporary"'
STRATEGY_FORMS = '"one_for_one" (the default), "one_for_all" or "rest_for_one"'
MAX_RESTARTS_FORMS = "an integer from 0 to 1000"
HOSTS_FORMS = (
    'a list of hosts: "api.example.com" (that host), "*.example.com" (its subdomains), '
    '"*" (every host), optionally with a scheme and a port ("https://api.example.com:8443")'
)
ENV_FORMS = (
    "a list of environment variable names (letters, digits and _, not starting with a digit)"
)
FILES_FORMS = (
    "a list of directories inside the program's directory, as relative paths; read-only, "
    'or read-write with the suffix ":rw" (e.g. ["data", "out:rw"])'
)
EXCEPTION_TYPES_FORMS = (
    "exception classes: one (ValueError), or a tuple of them (ValueError, KeyError)"
)
#: Most exception classes retry_on or no_retry_on may name.
MAX_EXCEPTION_TYPES = 64
#: A qualified class name as the SDK records it ("builtins.ValueError",
#: "prog.Outer.Error"; "<locals>" appears for classes defined in a function).
_QUALIFIED_RE = re.compile(r"^[A-Za-z_<][A-Za-z0-9_<>]*(?:\.[A-Za-z_<][A-Za-z0-9_<>]*)*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_RE = re.compile(
    r"^(?:(?P<scheme>https?)://)?(?P<host>\*|(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>\d{1,5}))?/?$"
)
#: Restart intensity defaults. OTP's 1 restart in 5 s escalates on the second
#: crash of any child, which with a few retrying children is almost at once;
#: 3 in 5 s lets each of a few children retry while a crash loop still escalates
#: within seconds.
DEFAULT_MAX_RESTARTS = 3
DEFAULT_RESTART_WINDOW_S = 5.0


class ConfigError(ValueError):
    """A task config or host setting that cannot be used; stops the run before it starts."""


def parse_compute(value: Any) -> int:
    """Fuel for a compute option: a level name, or an int / digit string of fuel."""
    if isinstance(value, bool):
        raise ValueError(COMPUTE_FORMS)
    if isinstance(value, int):
        if not 0 < value <= MAX_FUEL:
            raise ValueError(COMPUTE_FORMS)
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in COMPUTE_LEVELS:
            return COMPUTE_LEVELS[text.upper()]
        if text.isdigit() and len(text) <= 19 and 0 < int(text) <= MAX_FUEL:
            return int(text)
    raise ValueError(COMPUTE_FORMS)


def parse_ram(value: Any) -> int:
    """Bytes for a ram option such as ``"512MB"`` or an int of bytes."""
    if isinstance(value, bool):
        raise ValueError(RAM_FORMS)
    if isinstance(value, int):
        if not 0 < value <= MAX_RAM_BYTES:
            raise ValueError(RAM_FORMS)
        return value
    if isinstance(value, str):
        match = _RAM_RE.match(value)
        if match:
            number, unit = float(match.group(1)), (match.group(2) or "B").upper()
            size = number * _RAM_UNITS.get(unit, 0)
            # At least a byte, and finite ("9" * 400 + "TB" is a float infinity).
            if 1 <= size <= MAX_RAM_BYTES:
                return int(size)
    raise ValueError(RAM_FORMS)


def _string_list(value: Any, forms: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(forms)
    if not all(isinstance(item, str) for item in value):
        raise ValueError(forms)
    return list(value)


def parse_host_pattern(value: str) -> str:
    """A host pattern in its normal form (lower case); ValueError if malformed."""
    text = value.strip().lower()
    if not _HOST_RE.match(text):
        raise ValueError(HOSTS_FORMS)
    return text.rstrip("/")


def parse_file_grant(value: str) -> str:
    """A file grant ``dir`` or ``dir:rw`` (or ``dir:ro``), checked for form: a
    relative path with no ``..``. Symlinks are checked when the program loads."""
    path, _, mode = value.partition(":")
    parts = path.replace("\\", "/").split("/")
    if (
        not path.strip()
        or mode not in ("", "ro", "rw")
        or path.startswith(("/", "~"))
        or ".." in parts
    ):
        raise ValueError(FILES_FORMS)
    return value


class TaskConfig(BaseModel):
    """A task's validated config: what the host enforces for every invocation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    function: str = ""
    fuel: int = COMPUTE_LEVELS[DEFAULT_COMPUTE]
    ram_bytes: int = DEFAULT_RAM_BYTES
    timeout_s: float | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    restart: str = "transient"
    strategy: str = "one_for_one"
    max_restarts: int = DEFAULT_MAX_RESTARTS
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S
    #: Hosts the task may send HTTP requests to (default: none).
    allowed_hosts: tuple[str, ...] = ()
    #: Host environment variables the task may read (default: none).
    env: tuple[str, ...] = ()
    #: Directories of the program it may read (``name:rw``: and write).
    allowed_files: tuple[str, ...] = ()
    #: The exception classes worth a retry (none: any), and those never
    #: retried, by qualified name: the guest decides with the classes; the
    #: host checks and shows them.
    retry_on: tuple[str, ...] = ()
    no_retry_on: tuple[str, ...] = ()

    @field_validator("retry_on", "no_retry_on", mode="before")
    @classmethod
    def _exception_types(cls, value: Any) -> tuple[str, ...]:
        names = _string_list(value, EXCEPTION_TYPES_FORMS)
        if len(names) > MAX_EXCEPTION_TYPES or not all(
            len(name) <= 300 and _QUALIFIED_RE.match(name) for name in names
        ):
            raise ValueError(f"at most {MAX_EXCEPTION_TYPES} {EXCEPTION_TYPES_FORMS}")
        return tuple(names)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> tuple[str, ...]:
        return tuple(parse_host_pattern(item) for item in _string_list(value, HOSTS_FORMS))

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> tuple[str, ...]:
        names = _string_list(value, ENV_FORMS)
        if not all(_ENV_NAME_RE.match(name) for name in names):
            raise ValueError(ENV_FORMS)
        return tuple(names)

    @field_validator("allowed_files", mode="before")
    @classmethod
    def _files(cls, value: Any) -> tuple[str, ...]:
        return tuple(parse_file_grant(item) for item in _string_list(value, FILES_FORMS))

    @field_validator("restart", mode="before")
    @classmethod
    def _restart(cls, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in RESTART_TYPES:
            raise ValueError(RESTART_FORMS)
        return value.lower()

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in STRATEGIES:
            raise ValueError(STRATEGY_FORMS)
        return value.lower()

    @field_validator("max_restarts", mode="before")
    @classmethod
    def _max_restarts(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise ValueError(MAX_RESTARTS_FORMS)
        return value

    @field_validator("restart_window_s", mode="before")
    @classmethod
    def _restart_window(cls, value: Any) -> float:
        return parse_timeout(value)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or "/" in value:
            raise ValueError(NAME_FORMS)
        return value

    @field_validator("fuel", mode="before")
    @classmethod
    def _fuel(cls, value: Any) -> int:
        return parse_compute(value)

    @field_validator("ram_bytes", mode="before")
    @classmethod
    def _ram(cls, value: Any) -> int:
        return parse_ram(value)

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        return None if value is None else parse_timeout(value)

    @field_validator("max_retries", mode="before")
    @classmethod
    def _retries(cls, value: Any) -> int:
        return parse_max_retries(value)


# Declared option name -> TaskConfig field.
_FIELD_OF_OPTION = {
    "name": "name",
    "compute": "fuel",
    "ram": "ram_bytes",
    "timeout": "timeout_s",
    "max_retries": "max_retries",
    "restart": "restart",
    "strategy": "strategy",
    "max_restarts": "max_restarts",
    "restart_window": "restart_window_s",
    "allowed_hosts": "allowed_hosts",
    "env": "env",
    "allowed_files": "allowed_files",
    "retry_on": "retry_on",
    "no_retry_on": "no_retry_on",
}
_OPTION_OF_FIELD = {field: option for option, field in _FIELD_OF_OPTION.items()}
#: Every option @task accepts.
TASK_OPTIONS = tuple(_FIELD_OF_OPTION)


def validate_task(
    function: str,
    name: str,
    options: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> TaskConfig:
    """Validate one task's declared options (over ``defaults``, from capsule.toml);
    raises ConfigError naming task, option, bad value and the accepted forms."""
    data: dict[str, Any] = {"name": name, "function": function}
    for option, value in {**(defaults or {}), **options}.items():
        field = _FIELD_OF_OPTION.get(option)
        if field is None:
            raise ConfigError(
                f"task {name!r} ({function}): unknown option {option!r}; "
                f"accepted options are {', '.join(_FIELD_OF_OPTION)}"
            )
        data[field] = value
    try:
        return TaskConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            option = _OPTION_OF_FIELD.get(field, field)
            accepted = str(error.get("ctx", {}).get("error", error["msg"]))
            problems.append(
                f"task {name!r} ({function}): option {option}={error['input']!r} is invalid; "
                f"expected {accepted}"
            )
        raise ConfigError("\n".join(problems)) from None


def validate_program(
    declared: Iterable[Mapping[str, Any]], defaults: Mapping[str, Any] | None = None
) -> dict[str, TaskConfig]:
    """Validate every task a program declares; all problems are reported at once."""
    configs: dict[str, TaskConfig] = {}
    problems: list[str] = []
    for entry in declared:
        name = str(entry.get("name", "?"))
        function = str(entry.get("function", "?"))
        try:
            config = validate_task(function, name, entry.get("options", {}), defaults)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if config.name in configs:
            problems.append(
                f"task {config.name!r} is declared twice ({configs[config.name].function} and "
                f"{function}); task names must be unique"
            )
            continue
        configs[config.name] = config
    if problems:
        raise ConfigError("\n".join(problems))
    return configs


@dataclass(frozen=True)
class HostCaps:
    """Limits no task can exceed, whatever it declares (the run options max_fuel,
    max_ram and max_timeout, and capsule.toml's [policy])."""

    max_fuel: int | None = None
    max_ram_bytes: int | None = None
    max_timeout_s: float | None = None

    def tightened(self, other: HostCaps) -> HostCaps:
        """The stricter of two sets of caps (command line and capsule.toml)."""

        def least(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else min(a, b)

        return HostCaps(
            least(self.max_fuel, other.max_fuel),
            least(self.max_ram_bytes, other.max_ram_bytes),
            least(self.max_timeout_s, other.max_timeout_s),
        )


@dataclass(frozen=True)
class Limits:
    """What one invocation of a task gets: its config capped by the host."""

    fuel: int
    ram_bytes: int
    timeout_s: float | None

    @classmethod
    def for_task(cls, config: TaskConfig, caps: HostCaps) -> Limits:
        def capped(value: Any, cap: Any) -> Any:
            if cap is None:
                return value
            return cap if value is None else min(value, cap)

        return cls(
            fuel=capped(config.fuel, caps.max_fuel),
            ram_bytes=capped(config.ram_bytes, caps.max_ram_bytes),
            timeout_s=capped(config.timeout_s, caps.max_timeout_s),
        )
