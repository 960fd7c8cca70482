""".env beside a program: the variables its tasks may be granted.

Read with python-dotenv's parser, as ``dotenv_values`` reads it, within bounds:
the file is read as capsule.toml is (a regular file, UTF-8, bounded: see
config_file), and the ${VAR} references in its values are expanded here, in
linear time and to a bounded size, as dotenv's pattern matches them: dotenv's
own expansion copies every variable for each line, and its pattern backtracks
over every unclosed "${" (both quadratic), and a line may double the one
before (2**60 bytes from a few hundred). Errors name the file and the line,
never a value: a .env holds secrets.
"""

from __future__ import annotations

import io
import os
import re
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

from capsule.sandbox.config import ConfigError
from capsule.sandbox.config_file import read_config_text

#: Largest .env read, in bytes and lines (python-dotenv's parser takes ~40 us a
#: line), and most its values may add up to once ${VAR} references are
#: expanded (each line may double the one before).
MAX_DOTENV_BYTES = 256 * 1024
MAX_DOTENV_LINES = 10_000
MAX_DOTENV_EXPANDED_BYTES = 4 * 1024**2


def read_env_file(path: Path) -> dict[str, str]:
    """The variables ``path`` sets (none if there is no such file, or if it is a
    directory: .env is the usual name of a virtualenv too)."""
    text = read_config_text(path, MAX_DOTENV_BYTES, directory_is_absent=True)
    return {} if text is None else _dotenv_values(path, text)


def _dotenv_values(path: Path, text: str) -> dict[str, str]:
    """What python-dotenv's ``dotenv_values`` gives, but bounded: ${VAR} and
    ${VAR:-default} are expanded from earlier lines, then the environment."""
    from dotenv.parser import parse_stream

    if text.count("\n") >= MAX_DOTENV_LINES:
        raise ConfigError(
            f"{path} has more than {MAX_DOTENV_LINES:,} lines, the most Capsule reads"
        )
    values: dict[str, str | None] = {}
    environment: dict[str, str | None] = dict(os.environ)
    lookup = ChainMap(values, environment)
    expanded = 0
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            raise ConfigError(f"{path}: line {line} cannot be parsed (expected NAME=value)")
        if binding.key is None:
            continue  # a comment or a blank line
        if binding.value is None:
            values[binding.key] = None  # a bare NAME: unset, as dotenv has it
            continue
        parts = expand_variables(binding.value, lookup)
        expanded += sum(map(len, parts))
        if expanded > MAX_DOTENV_EXPANDED_BYTES:
            raise ConfigError(
                f"{path}: line {line}: its values expand to more than "
                f"{MAX_DOTENV_EXPANDED_BYTES:,} characters (${{VAR}} references)"
            )
        value = "".join(parts)
        if "\0" in value:
            raise ConfigError(
                f"{path}: line {line}: the value of {binding.key} holds a NUL character, "
                f"which no environment variable can"
            )
        values[binding.key] = value
    return {name: value for name, value in values.items() if value is not None}


_NAME_END = re.compile(r"[}:]")


def expand_variables(value: str, lookup: Mapping[str, str | None]) -> list[str]:
    r"""The pieces of ``value`` with each ${NAME} or ${NAME:-default} replaced
    from ``lookup``, exactly as python-dotenv's pattern
    ``\$\{([^}:]*)(?::-([^}]*))?\}`` matches them, in one pass: the positions
    of the next "}" and ":" are found once and reused by later candidates."""
    parts: list[str] = []
    end = len(value)
    literal_from = 0
    name_end = close = -1
    start = value.find("${")
    while start >= 0:
        if name_end < start + 2:
            found = _NAME_END.search(value, start + 2)
            name_end = found.start() if found is not None else end
        if name_end == end:
            break  # no "}" nor ":" is left: no later "${" can match either
        matched_to = -1
        default: str | None = None
        if value[name_end] == "}":
            matched_to = name_end + 1
        elif value.startswith("-", name_end + 1):
            if close < name_end + 2:
                close = value.find("}", name_end + 2)
                close = end if close < 0 else close
            if close < end:
                default, matched_to = value[name_end + 2 : close], close + 1
        if matched_to < 0:
            start = value.find("${", start + 1)
            continue
        found_value = lookup.get(value[start + 2 : name_end], default or "")
        parts += [value[literal_from:start], found_value or ""]
        literal_from = matched_to
        start = value.find("${", matched_to)
    parts.append(value[literal_from:])
    return parts
