"""The settings of one run, declared once: what `capsule run`'s flags, the host
API's ``RunOptions(...)`` and a resume (which takes over the run's settings)
all set. ``None`` everywhere means the default.

Each field's name, form, default and help come from
capsule.supervisor.option_specs; here each is validated, and held in its
canonical form (a size as an int of bytes, a duration as seconds). A bad
value is an :class:`OptionError` naming the option, the value and the
accepted forms."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capsule.sandbox.budget import MIN_BUDGET_BYTES
from capsule.sandbox.config import (
    COMPUTE_FORMS,
    RAM_FORMS,
    TIMEOUT_FORMS,
    ConfigError,
    parse_compute,
    parse_ram,
    parse_timeout,
)
from capsule.supervisor.option_specs import (
    CORES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_QUEUED_BYTES,
    MAX_COUNT,
    MAX_RETRY_BACKOFF_S,
    OPTION_SPECS,
    Form,
    Naming,
    parameter_of,
)

COUNT_FORMS = f"a whole number from 1 to {MAX_COUNT:,}"
CORE_FORMS = " or ".join(repr(core) for core in CORES)
TASKS_FORMS = f"a whole number from 0 to {MAX_COUNT:,}"
SECONDS_FORMS = f"a number of seconds from 0 to {MAX_RETRY_BACKOFF_S:g}"


def parse_count(value: Any, least: int = 1) -> int:
    """A count option: a whole number from ``least`` to MAX_COUNT (an int, or
    its digits)."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_COUNT:
        raise ValueError(COUNT_FORMS)
    return value


def parse_tasks(value: Any) -> int:
    """A count of tasks besides the entry task: a whole number from 0."""
    return parse_count(value, least=0)


def parse_seconds(value: Any) -> float:
    """A number of seconds from 0 to MAX_RETRY_BACKOFF_S (a number, or its text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(SECONDS_FORMS)
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise ValueError(SECONDS_FORMS) from None
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_RETRY_BACKOFF_S):
        raise ValueError(SECONDS_FORMS)
    return seconds


def parse_core(value: Any) -> str:
    """The core tasks run on: one of CORES."""
    if value not in CORES:
        raise ValueError(CORE_FORMS)
    return str(value)


def parse_size_or_off(value: Any) -> int | str:
    if value == "off":
        return "off"
    return parse_ram(value)


def parse_duration_or_off(value: Any) -> float | str:
    if value == "off":
        return "off"
    return parse_timeout(value)


#: How each form of option is parsed (ValueError if malformed), and its
#: accepted forms as an error message says them. capsule.toml's [policy] keys
#: that are run options parse with the same.
FORM_PARSERS: dict[Form, tuple[Callable[[Any], Any], str]] = {
    "fuel": (parse_compute, COMPUTE_FORMS),
    "size": (parse_ram, RAM_FORMS),
    "duration": (parse_timeout, TIMEOUT_FORMS),
    "count": (parse_count, COUNT_FORMS),
    "tasks": (parse_tasks, TASKS_FORMS),
    "seconds": (parse_seconds, SECONDS_FORMS),
    "size_or_off": (parse_size_or_off, f"{RAM_FORMS}, or 'off'"),
    "duration_or_off": (parse_duration_or_off, f"{TIMEOUT_FORMS}, or 'off'"),
    "core": (parse_core, CORE_FORMS),
}

#: Most characters of a value an error message quotes.
_SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """A value as an error message quotes it (shortened: it may be anything)."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class OptionError(ConfigError):
    """A run option whose value cannot be used. ``message`` names the option
    as the host API takes it (``max_queued_size``); ``worded(flag_of)`` as the
    CLI does."""

    def __init__(self, option: str, value: Any, describe: Callable[[Naming], str]) -> None:
        self.option = option
        self.value = value
        self._describe = describe
        self.message = describe(parameter_of)
        super().__init__(self.message)

    def worded(self, naming: Naming) -> str:
        """The message, with each option named by ``naming``."""
        return self._describe(naming)


def _unknown(key: Any, value: Any) -> OptionError:
    known = ", ".join(OPTION_SPECS)
    return OptionError(
        str(key),
        value,
        lambda _: f"{shown(key)} is not a run option; the run options are {known}",
    )


def _invalid(option: str, value: Any, forms: str) -> OptionError:
    return OptionError(
        option, value, lambda name: f"{name(option)} {shown(value)} is invalid; expected {forms}"
    )


def _field(name: str) -> Any:
    return Field(None, description=OPTION_SPECS[name].help)


class RunOptions(BaseModel):
    """Every setting of a run. Limits cap what tasks declare (a task never gets
    more than these allow); the rest size the run's shared resources.

    Values may be given in any accepted form (``max_ram="256MB"``,
    ``max_ram=268435456``); the model holds each in its canonical form."""

    # (Its schema is built when first needed: from_mapping never needs it.)
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    max_fuel: str | int | None = _field("max_fuel")
    max_ram: str | int | None = _field("max_ram")
    max_timeout: str | float | None = _field("max_timeout")
    cpu_slots: int | None = _field("cpu_slots")
    max_live_tasks: int | None = _field("max_live_tasks")
    max_children: int | None = _field("max_children")
    mailbox_capacity: int | None = _field("mailbox_capacity")
    max_message_size: str | int | None = _field("max_message_size")
    max_queued_size: str | int | None = _field("max_queued_size")
    max_total_ram: str | int | None = _field("max_total_ram")
    max_task_output: str | int | None = _field("max_task_output")
    max_run_journal: str | int | None = _field("max_run_journal")
    hibernate_after: str | float | None = _field("hibernate_after")
    retry_backoff: float | None = _field("retry_backoff")
    core: str | None = _field("core")

    if not TYPE_CHECKING:  # (type checkers keep the fields' signature)

        def __init__(self, **values: Any) -> None:
            try:
                super().__init__(**values)
            except ValidationError as exc:
                raise _option_error(exc) from None

        @classmethod
        def model_validate(cls, *args: Any, **kwargs: Any) -> RunOptions:
            try:
                return super().model_validate(*args, **kwargs)
            except ValidationError as exc:
                raise _option_error(exc) from None

        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> RunOptions:
            try:
                return super().model_validate_json(*args, **kwargs)
            except ValidationError as exc:
                raise _option_error(exc) from None

        def model_copy(self, *, update: Any = None, deep: bool = False) -> RunOptions:
            # (pydantic's would take the update unchecked)
            if not update:
                return super().model_copy(deep=deep)
            return RunOptions.from_mapping({**self.given(), **update})

    @model_validator(mode="before")
    @classmethod
    def _parsed(cls, values: Any) -> Any:
        return checked_options(values)

    @classmethod
    def from_mapping(cls, values: Any) -> RunOptions:
        """Options from a mapping of names to values (a journal's, a config's);
        OptionError if a name is not an option or a value is not valid."""
        # (Checked here, the values need no second look from pydantic: the
        # CLI's start-up never builds the model's schema.)
        return cls.model_construct(**checked_options(values))

    def given(self) -> dict[str, Any]:
        """The settings given (not left to their default), by name."""
        return {
            name: getattr(self, name)
            for name in RunOptions.model_fields
            if getattr(self, name) is not None
        }

    def replaced(self, other: RunOptions) -> RunOptions:
        """These options, with those ``other`` gives in their place."""
        return RunOptions.from_mapping({**self.given(), **other.given()})


def checked_options(values: Any) -> dict[str, Any]:
    """The options ``values`` gives, by name, each in its canonical form;
    OptionError if a name is not an option or a value cannot be used."""
    if not isinstance(values, Mapping):
        raise OptionError(
            "", values, lambda _: f"run options are given by name, not as {shown(values)}"
        )
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        spec = OPTION_SPECS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise _unknown(name, value)
        if value is None:
            continue
        parse, forms = FORM_PARSERS[spec.form]
        # (Digits of other scripts, "١٢", are not the forms a user reads.)
        if isinstance(value, str) and not value.isascii():
            raise _invalid(name, value, forms)
        try:
            parsed[name] = parse(value)
        except ValueError:
            raise _invalid(name, value, forms) from None
    if _below(parsed, "max_total_ram", MIN_BUDGET_BYTES):
        ram = values["max_total_ram"]
        raise OptionError(
            "max_total_ram",
            ram,
            lambda name: (
                f"{name('max_total_ram')} {shown(ram)} is below {MIN_BUDGET_BYTES // 1024**2} "
                "MB, the least Capsule itself needs with a few tasks running"
            ),
        )
    queued = parsed.get("max_queued_size", DEFAULT_MAX_QUEUED_BYTES)
    largest = parsed.get("max_message_size", DEFAULT_MAX_MESSAGE_BYTES)
    if queued < largest:
        raise OptionError(
            "max_queued_size",
            values.get("max_queued_size"),
            lambda name: (
                f"{name('max_queued_size')} ({queued:,} bytes) is below the largest message "
                f"({name('max_message_size')}, {largest:,} bytes): such a message could never "
                "be sent"
            ),
        )
    return parsed


def _below(parsed: Mapping[str, Any], name: str, least: int) -> bool:
    value = parsed.get(name)
    return isinstance(value, int) and value < least


def _option_error(exc: ValidationError) -> OptionError:
    """The OptionError a validator raised, or one worded from pydantic's own
    first error (which validators leave no room for)."""
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, OptionError):  # (pydantic wraps what validators raise)
            return cause
    first = exc.errors()[0]
    option = ".".join(str(part) for part in first["loc"])
    value, message = first["input"], first["msg"]
    return OptionError(option, value, lambda name: f"{name(option)} {shown(value)}: {message}")
