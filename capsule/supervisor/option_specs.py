"""The run options as plain data: each one's name, form, default and help.

Importing it costs nothing (no pydantic): the CLI builds its run flags from it
at start-up, ``RunOptions`` (capsule.supervisor.options) declares a validated
field for each, and the run's settings take their defaults from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

#: How an option's value is written and parsed: ``fuel`` LOW/MEDIUM/HIGH or an
#: int; ``size`` "256MB" or an int of bytes; ``duration`` "30s" or seconds;
#: ``count`` a whole number; ``tasks`` the same, or 0; ``seconds`` a number
#: of seconds; ``*_or_off`` the same, or "off"; ``core`` one of CORES.
Form = Literal[
    "fuel",
    "size",
    "duration",
    "count",
    "tasks",
    "seconds",
    "size_or_off",
    "duration_or_off",
    "core",
]

DEFAULT_MAX_LIVE_TASKS = 512
DEFAULT_MAX_CHILDREN = 256
DEFAULT_MAILBOX_CAPACITY = 1000
DEFAULT_MAX_MESSAGE_BYTES = 1024**2
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024**2
DEFAULT_MAX_TASK_OUTPUT_BYTES = 64 * 1024**2
DEFAULT_MAX_RUN_JOURNAL_BYTES = 1024**3
DEFAULT_HIBERNATE_AFTER_S = 1.0
DEFAULT_RETRY_BACKOFF_S = 0.05
#: Largest value of a count option (cpu_slots, max_live_tasks, ...).
MAX_COUNT = 1_000_000_000
#: Largest retry_backoff, in seconds.
MAX_RETRY_BACKOFF_S = 3600.0

_METAVARS: dict[Form, str] = {
    "fuel": "FUEL",
    "size": "SIZE",
    "duration": "DURATION",
    "count": "N",
    "tasks": "N",
    "seconds": "SECONDS",
    "size_or_off": "SIZE",
    "duration_or_off": "DURATION",
    "core": "CORE",
}

#: The cores a run may run its tasks on: a thread per live task, or call
#: futures on a few poll threads (a task waiting holds no thread).
CORES = ("threads", "async")
#: The core a run runs on unless its options name one.
DEFAULT_CORE = "async"


def size_text(size: int) -> str:
    """A size in the largest unit that divides it ("1MB", "256MB", "1GB")."""
    for unit, scale in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


@dataclass(frozen=True)
class OptionSpec:
    """One run option, as users see it."""

    name: str
    form: Form
    #: What it sets, with its default.
    help: str
    #: `capsule resume` may give it a new value, with this help (None: it may not).
    resume_help: str | None = None

    @property
    def flag(self) -> str:
        """Its command-line flag (``--max-queued-size``)."""
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        return _METAVARS[self.form]


RUN_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("max_fuel", "fuel", "cap on any task's fuel (LOW/MEDIUM/HIGH or an int)"),
    OptionSpec("max_ram", "size", 'cap on any task\'s memory (e.g. "256MB")'),
    OptionSpec("max_timeout", "duration", 'cap on any task\'s timeout (e.g. "30s")'),
    OptionSpec(
        "cpu_slots",
        "count",
        "instances running wasm at once, shared round-robin (default: CPU cores)",
    ),
    OptionSpec(
        "max_live_tasks",
        "tasks",
        f"tasks alive at once in the run besides its entry task ({DEFAULT_MAX_LIVE_TASKS}) "
        "(0: it starts none)",
    ),
    OptionSpec("max_children", "count", f"running children per task ({DEFAULT_MAX_CHILDREN})"),
    OptionSpec(
        "mailbox_capacity",
        "count",
        f"messages a mailbox holds before send waits ({DEFAULT_MAILBOX_CAPACITY})",
    ),
    OptionSpec(
        "max_message_size",
        "size",
        f'largest message, as JSON (default "{size_text(DEFAULT_MAX_MESSAGE_BYTES)}")',
    ),
    OptionSpec(
        "max_queued_size",
        "size",
        "messages sent and not yet received, in all (default "
        f'"{size_text(DEFAULT_MAX_QUEUED_BYTES)}"); a send over it fails',
    ),
    OptionSpec(
        "max_total_ram",
        "size_or_off",
        "memory of the whole run: over it, the task holding the most is stopped "
        '(default: half the machine\'s memory; "off": no bound)',
    ),
    OptionSpec(
        "max_task_output",
        "size",
        "what one attempt of a task may make the host record: output, messages, "
        f'random bytes, HTTP exchanges (default "{size_text(DEFAULT_MAX_TASK_OUTPUT_BYTES)}"); '
        "past it the task fails (kind output_limit)",
        resume_help="a new limit on what one attempt of a task may make the host record",
    ),
    OptionSpec(
        "max_run_journal",
        "size",
        "what the run may write to its journal (default "
        f'"{size_text(DEFAULT_MAX_RUN_JOURNAL_BYTES)}"); past it the run stops, resumable '
        "with a larger limit",
        resume_help="a new limit on what the run may write to its journal (one it stopped at)",
    ),
    OptionSpec(
        "hibernate_after",
        "duration_or_off",
        "a task blocked this long gives back the memory pages it only read "
        f'(default {DEFAULT_HIBERNATE_AFTER_S:g}s; "500ms", "2m"; "off": never)',
    ),
    OptionSpec(
        "retry_backoff",
        "seconds",
        "delay in seconds before the first retry, doubled for each further one "
        f"(default {DEFAULT_RETRY_BACKOFF_S:g})",
    ),
    OptionSpec(
        "core",
        "core",
        'how tasks run: "async" (default), a few poll threads in all, a waiting '
        'task holding none, or "threads", a thread per live task',
        resume_help="the core to resume on (default: the one the run ran on; the "
        "journal replays alike on both)",
    ),
)

OPTION_SPECS: dict[str, OptionSpec] = {spec.name: spec for spec in RUN_OPTIONS}


#: What a message may name besides the run options: the journal's settings
#: (where, where by default, or none), resume's (anyway; with an option
#: changed, see resume_with) and the ways to read a journal, as the host API
#: has them and as the CLI's flags and commands. (RUN_ID: the run's.)
OTHER_SETTINGS: dict[str, tuple[str, str]] = {
    "journal": ("Runtime(journal=PATH)", "--journal PATH"),
    "default_journal": (
        "a Runtime keeps it as .capsule/journal.db in the current directory",
        "`capsule run` keeps it as .capsule/journal.db beside the program",
    ),
    "no_journal": ("Runtime(journal=False)", "--no-journal"),
    "force": ("resume(..., force=True)", "--force"),
    "resume_with": (
        "Runtime.resume({run_id!r}, options=RunOptions({option}={value}))",
        "`capsule resume {run_id} {option} {value}`",
    ),
    "runs": ("Runtime.runs()", "`capsule runs`"),
    "inspect": ("Runtime.inspect('RUN_ID')", "`capsule inspect RUN_ID`"),
}

#: How a message names a setting (``parameter_of``, ``flag_of``).
Naming = Callable[[str], str]
#: A message that names settings, made for a Naming.
Wording = Callable[[Naming], str]


def parameter_of(name: str) -> str:
    """A setting as the host API takes it: a run option as RunOptions' field."""
    other = OTHER_SETTINGS.get(name)
    return name if other is None else other[0]


def flag_of(name: str) -> str:
    """The command-line flag of a setting (``max_queued_size`` -> ``--max-queued-size``)."""
    other = OTHER_SETTINGS.get(name)
    return "--" + name.replace("_", "-") if other is None else other[1]


def resume_with(naming: Naming, run_id: str, option: str, value: str) -> str:
    """How to resume ``run_id`` with the run option ``option`` set to
    ``value`` (a placeholder such as SIZE), as ``naming`` names settings:
    resume's call in the host API, its command in the CLI."""
    return naming("resume_with").format(run_id=run_id, option=naming(option), value=value)


class Worded(Protocol):
    """An error whose message names settings of a run (WordedError, OptionError)."""

    def worded(self, naming: Naming) -> str: ...


class WordedError(Exception):
    """An error whose message names settings of a run: ``str()`` as the host API
    takes them, ``worded(flag_of)`` as the CLI's flags."""

    def __init__(self, wording: str | Wording) -> None:
        self.wording: Wording = wording if callable(wording) else _fixed(wording)
        super().__init__(self.wording(parameter_of))

    def worded(self, naming: Naming) -> str:
        """The message, with each setting named by ``naming``."""
        return self.wording(naming)


def _fixed(text: str) -> Wording:
    return lambda _naming: text


def options_table() -> str:
    """The run options as a Markdown table (docs/cli.md holds it)."""
    rows = [
        "| flag | option | what it sets |",
        "|---|---|---|",
        *(
            f"| `{spec.flag} {spec.metavar}` | `{spec.name}` | {spec.help} |"
            for spec in RUN_OPTIONS
        ),
    ]
    return "\n".join(rows) + "\n"
