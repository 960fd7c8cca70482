"""What a caller hands the host API, checked once where it enters: a program
path, arguments, options, a run id, a journal setting. Each check raises
InvalidRequest naming the parameter, the value and the fix."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from capsule.host.errors import InvalidRequest
from capsule.journal.location import (
    Journal,
    NotAJournal,
    PostgresJournal,
    is_postgres_url,
    journal_at,
)
from capsule.journal.run_ids import RUN_ID_PATTERN
from capsule.sandbox import js
from capsule.supervisor.options import RunOptions

if TYPE_CHECKING:
    from capsule.supervisor.program import RunRequest


JournalSetting = str | os.PathLike[str] | PostgresJournal | Literal[False] | None


def run_request(
    program: Path,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    entry: str,
    options: RunOptions,
) -> RunRequest:
    """The supervisor's request for a run of ``program`` with ``options``."""
    from capsule.supervisor.program import RunRequest

    return RunRequest(
        path=program, args=list(args), kwargs=dict(kwargs), entry=entry, options=options
    )


def journal_path(journal: JournalSetting) -> Journal | None:
    """The journal a Runtime uses: a file, or a ``postgresql://`` URL's
    database (None: none)."""
    if journal is False:
        return None  # (without loading the journal's modules, and sqlite3)
    if journal is None:
        from capsule.journal.schema import default_journal

        try:
            default = default_journal()
        except NotAJournal as exc:
            raise InvalidRequest(f"CAPSULE_JOURNAL: {exc}") from None
        if not isinstance(default, Path):
            return default
        path = default
    elif isinstance(journal, PostgresJournal):
        return journal
    elif isinstance(journal, str) and is_postgres_url(journal):
        return PostgresJournal(journal)
    elif isinstance(journal, str) and journal:
        try:
            journal_at(journal)
        except NotAJournal as exc:
            raise InvalidRequest(str(exc)) from None
    elif isinstance(journal, (str, os.PathLike)) and str(journal):
        path = Path(journal)
    else:
        raise InvalidRequest(
            f"journal {journal!r:.80} is invalid; expected a file path, a postgresql:// URL, "
            f"None (the default "
            f"journal) or False (no journal)"
        )
    path = path.absolute()
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return path  # (missing: made on the first run)
    if not stat.S_ISREG(mode):
        raise InvalidRequest(
            f"journal {str(path)!r} is not a regular file (a directory, FIFO or device); "
            f"pass the path of a journal file"
        )
    return path


def program_path(program: Any) -> Path:
    """The program file to run, resolved."""
    if not isinstance(program, (str, os.PathLike)) or not str(program):
        raise InvalidRequest(
            f"program {program!r:.80} is invalid; expected the path of a .py, .ts or .js file"
        )
    path = Path(program)
    if not path.is_file():
        raise InvalidRequest(f"program {str(path)!r} does not exist (or is not a file)")
    if path.suffix != ".py" and path.suffix not in js.SUFFIXES:
        raise InvalidRequest(
            f"program {str(path)!r} is not a Python file (.py), nor a TypeScript or "
            f"JavaScript file ({', '.join(js.SUFFIXES)})"
        )
    return path.resolve()


def arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any] | None
) -> tuple[list[Any], dict[str, Any]]:
    """The arguments, as JSON values; InvalidRequest if they are not."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidRequest(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    call_args, call_kwargs = list(args), dict(kwargs or {})
    if not all(isinstance(key, str) for key in call_kwargs):
        raise InvalidRequest("the keys of kwargs must be strings")
    json_text([call_args, call_kwargs], "the arguments")
    return call_args, call_kwargs


def json_text(value: Any, what: str) -> str:
    """``value`` as JSON text, if it is a JSON value the run's tasks can hand
    back (guests' JSON is held to the same rules: no lone surrogates, at most
    MAX_JSON_DEPTH deep); InvalidRequest naming ``what`` if it is not."""
    from capsule.sandbox import guest_data

    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
        guest_data.json_value(text, what)
    except (TypeError, ValueError, RecursionError, guest_data.ProtocolError) as exc:
        why = str(exc)
        raise InvalidRequest(
            f"{what}: not a JSON value a task can take ({type(exc).__name__}: {why:.300}); "
            f"pass dicts, lists, strings, numbers, booleans or None, nested at most "
            f"{guest_data.MAX_JSON_DEPTH} deep"
        ) from None
    return text


def run_options(options: Any) -> RunOptions:
    """The run's options (None: every default)."""
    if options is None:
        return RunOptions.model_validate({})
    if not isinstance(options, RunOptions):
        raise InvalidRequest(
            f"options must be a RunOptions (capsule.RunOptions(max_fuel=...)), "
            f"not {type(options).__name__}"
        )
    return options


def checked_run_id(run_id: Any) -> str:
    """A caller's run id, if it is one (see RUN_ID_PATTERN)."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidRequest(
            f"run_id {run_id!r:.80} is invalid; expected 1 to 64 letters, digits, '_' or "
            f"'-', starting with a letter or digit"
        )
    return run_id
