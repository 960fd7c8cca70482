"""``capsule.toml`` beside a program: ``[tasks]`` defaults for every option of
``@task``, and ``[policy]`` caps no task may exceed. Every problem is reported
with the file, the key and the accepted forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule.sandbox.config import (
    COMPUTE_FORMS,
    HOSTS_FORMS,
    RAM_FORMS,
    TASK_OPTIONS,
    TIMEOUT_FORMS,
    ConfigError,
    HostCaps,
    parse_compute,
    parse_host_pattern,
    parse_ram,
    parse_timeout,
    validate_task,
)
from capsule.sandbox.config_file import read_config_text
from capsule.sandbox.grants import HostRule

PROJECT_FILE = "capsule.toml"
#: Options of @task that [tasks] may set: all but the name, and the exception
#: classes of retry_on/no_retry_on (which the guest needs as classes).
TASK_DEFAULT_KEYS = tuple(
    option for option in TASK_OPTIONS if option not in ("name", "retry_on", "no_retry_on")
)
#: [policy] keys: caps on the run options of the same names (parsed as
#: capsule.supervisor.options parses those), and the largest HTTP response.
_POLICY_KEYS = {
    "max_fuel": (parse_compute, COMPUTE_FORMS),
    "max_ram": (parse_ram, RAM_FORMS),
    "max_timeout": (parse_timeout, TIMEOUT_FORMS),
    "max_response_size": (parse_ram, RAM_FORMS),
    "max_task_output": (parse_ram, RAM_FORMS),
    "max_run_journal": (parse_ram, RAM_FORMS),
}
#: Largest capsule.toml read (a few hundred bytes is usual).
MAX_PROJECT_FILE_BYTES = 1024**2
#: Deepest nesting of tables and arrays in capsule.toml: its deepest value, a
#: list in [tasks], is 3 levels down.
MAX_PROJECT_DEPTH = 8
#: Largest HTTP response body a task may receive, unless [policy] says otherwise.
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024**2


@dataclass(frozen=True)
class Project:
    """What capsule.toml says (everything empty when there is none)."""

    task_defaults: dict[str, Any] = field(default_factory=dict)
    caps: HostCaps = field(default_factory=HostCaps)
    #: Hosts any task may be granted; None: no policy on hosts.
    allowed_hosts: tuple[HostRule, ...] | None = None
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    #: What one attempt may make the host record (None: the run's default).
    max_task_output_bytes: int | None = None
    #: What a run may write to its journal (None: the default).
    max_run_journal_bytes: int | None = None
    #: Other program files whose tasks run in the same runs ([program]
    #: modules): paths relative to the program's directory.
    modules: tuple[str, ...] = ()


def load_project(program_dir: Path) -> Project:
    path = program_dir / PROJECT_FILE
    text = read_config_text(path, MAX_PROJECT_FILE_BYTES)
    if text is None:
        return Project()
    import tomllib  # (most programs have no capsule.toml: not loaded for them)

    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of over 4,300 digits
        raise ConfigError(f"{path}: cannot be read as TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(_too_deep(path)) from None
    if not _nested_at_most(data, MAX_PROJECT_DEPTH):
        raise ConfigError(_too_deep(path))
    problems: list[str] = []
    unknown = sorted(set(data) - {"tasks", "policy", "program"})
    if unknown:
        problems.append(
            f"{path}: unknown section or key {unknown[0]!r}; accepted sections are [tasks] "
            f"(defaults for @task options), [policy] (caps no task may exceed) and "
            f"[program] (modules: other program files whose tasks the run runs)"
        )
    modules = _modules(path, _table(path, data, "program", problems), problems)
    defaults = _table(path, data, "tasks", problems)
    for key in sorted(set(defaults) - set(TASK_DEFAULT_KEYS)):
        problems.append(
            f"{path}: unknown key [tasks] {key!r}; accepted keys are {', '.join(TASK_DEFAULT_KEYS)}"
        )
        defaults.pop(key)
    if defaults:
        try:
            validate_task(str(path), "[tasks]", defaults)
        except ConfigError as exc:
            problems.extend(
                f"{path}: " + line.replace("task '[tasks]' (" + str(path) + "): ", "[tasks] ")
                for line in str(exc).splitlines()
            )
    policy = _table(path, data, "policy", problems)
    values: dict[str, Any] = {}
    for key, raw in policy.items():
        if key == "allowed_hosts":
            try:
                if isinstance(raw, str) or not isinstance(raw, list):
                    raise ValueError(HOSTS_FORMS)
                values[key] = tuple(HostRule.parse(parse_host_pattern(str(p))) for p in raw)
            except ValueError:
                problems.append(
                    f"{path}: [policy] allowed_hosts = {raw!r} is invalid; expected {HOSTS_FORMS}"
                )
            continue
        if key not in _POLICY_KEYS:
            problems.append(
                f"{path}: unknown key [policy] {key!r}; accepted keys are "
                f"{', '.join([*_POLICY_KEYS, 'allowed_hosts'])}"
            )
            continue
        parse, forms = _POLICY_KEYS[key]
        try:
            values[key] = parse(raw)
        except ValueError:
            problems.append(f"{path}: [policy] {key} = {raw!r} is invalid; expected {forms}")
    if problems:
        raise ConfigError("\n".join(problems))
    return Project(
        task_defaults=defaults,
        caps=HostCaps(values.get("max_fuel"), values.get("max_ram"), values.get("max_timeout")),
        allowed_hosts=values.get("allowed_hosts"),
        max_response_bytes=values.get("max_response_size", DEFAULT_MAX_RESPONSE_BYTES),
        max_task_output_bytes=values.get("max_task_output"),
        max_run_journal_bytes=values.get("max_run_journal"),
        modules=modules,
    )


#: Most other program files a program may list.
MAX_MODULES = 16
MODULES_FORMS = (
    f"a list of at most {MAX_MODULES} relative paths of program files (.py, .ts, .js), "
    f'e.g. modules = ["tools.ts"]'
)


def _modules(path: Path, program: dict[str, Any], problems: list[str]) -> tuple[str, ...]:
    """[program] modules: other program files, relative to the program's directory."""
    for key in sorted(set(program) - {"modules"}):
        problems.append(f"{path}: unknown key [program] {key!r}; the accepted key is modules")
    raw = program.get("modules", [])
    if (
        not isinstance(raw, list)
        or len(raw) > MAX_MODULES
        or not all(isinstance(item, str) and item and len(item) <= 4096 for item in raw)
        or any(Path(item).is_absolute() or "\0" in item for item in raw)
    ):
        problems.append(
            f"{path}: [program] modules = {raw!r:.200} is invalid; expected {MODULES_FORMS}"
        )
        return ()
    return tuple(raw)


def _table(path: Path, data: dict[str, Any], name: str, problems: list[str]) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        problems.append(f"{path}: {name} must be a table ([{name}]), not {table!r}")
        return {}
    return dict(table)


def _nested_at_most(data: dict[str, Any], limit: int) -> bool:
    """Whether no value of ``data`` is nested deeper than ``limit`` (walked
    without recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return True


def _too_deep(path: Path) -> str:
    return (
        f"{path}: arrays or tables are nested too deeply (more than {MAX_PROJECT_DEPTH} "
        f"levels); capsule.toml needs [tasks] and [policy] with plain values and lists"
    )
