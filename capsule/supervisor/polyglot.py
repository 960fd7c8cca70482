"""A run's programs: the one it was started with and the other program files
its ``capsule.toml`` lists (``[program] modules``), each of either language.

Their tasks share one run: one tree, one journal, one namespace of task names.
All of them run in one sandbox, on one engine: each program's instances are of
its language's runtime (Sandbox.add_program)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from capsule.sandbox import js
from capsule.sandbox.engine import GuestComponent, Sandbox
from capsule.sandbox.modules import ModuleFinder, ProgramFinder, site_package_dirs
from capsule.supervisor.loading import (
    ProgramError,
    program_language,
    program_module,
    script_finder,
)

if TYPE_CHECKING:
    from capsule.sandbox.guests import SharedGuests
    from capsule.sandbox.project import Project


@dataclass(frozen=True)
class ProgramFile:
    path: Path
    #: The module name its instances import it under.
    module: str
    #: "python" or "javascript".
    language: str

    @classmethod
    def at(cls, path: Path) -> ProgramFile:
        return cls(path, program_module(path), program_language(path))

    def options(self, error: Exception) -> str:
        """An error about its tasks' options, naming them as its language does."""
        return str(error) if self.language == "python" else js.js_option_names(str(error))

    def finder(self) -> ProgramFinder:
        """Where its instances get its code (bundling a JS/TS program now)."""
        if self.language == "python":
            return ModuleFinder([self.path.parent, *site_package_dirs()])
        return script_finder(self.module, self.path)


def other_programs(main: ProgramFile, project: Project) -> list[ProgramFile]:
    """The other program files ``project`` lists, checked: ProgramError if one
    is missing, of no known language, or named as another is. (The program
    itself, listed too, is left out: it may be started from any of them.)"""
    others: list[ProgramFile] = []
    modules = {main.module: main.path}
    for relative in project.modules:
        try:
            path = (main.path.parent / relative).resolve()
            is_file = path.is_file()
        except (OSError, RuntimeError) as exc:  # (a name too long, a symlink loop)
            raise ProgramError(
                f"capsule.toml lists the module {relative[:200]!r} ([program] modules), "
                f"which cannot be reached: {exc}"
            ) from None
        if not is_file:
            raise ProgramError(
                f"capsule.toml lists the module {relative!r} ([program] modules), but "
                f"{path} is not a file"
            )
        if path == main.path:
            continue
        other = ProgramFile.at(path)
        if other.module in modules:
            raise ProgramError(
                f"capsule.toml lists {relative!r}, named {other.module!r} as "
                f"{modules[other.module]} is: each program file needs a name of its own"
            )
        modules[other.module] = path
        others.append(other)
    return others


class Guests:
    """The guests of one run's languages, on one engine (the first's, or the
    core's of ``shared``)."""

    def __init__(self, core: str, shared: SharedGuests | None) -> None:
        self.core = core
        self.shared = shared
        self._made: dict[str, GuestComponent] = {}

    def of(self, language: str) -> GuestComponent:
        guest = self._made.get(language)
        if guest is not None:
            return guest
        if self.shared is not None:
            guest = self.shared.for_core(self.core, language)
        elif self._made:
            guest = GuestComponent(language=language, on=next(iter(self._made.values())).parts)
        else:
            make_engine = None
            if self.core == "async":
                from capsule.sandbox.async_sandbox import AsyncSandbox

                make_engine = AsyncSandbox._make_engine
            guest = GuestComponent(make_engine=make_engine, language=language)
        self._made[language] = guest
        return guest


@dataclass(frozen=True)
class LoadedProgram:
    """Another program file, bundled (or found) and its runtime built: what
    a sandbox needs to run its tasks (made before the sandbox: nothing of
    this can fail once the sandbox is open)."""

    file: ProgramFile
    guest: GuestComponent
    finder: ProgramFinder


def prepare_others(others: list[ProgramFile], guests: Guests) -> list[LoadedProgram]:
    return [LoadedProgram(other, guests.of(other.language), other.finder()) for other in others]


def add_others(sandbox: Sandbox, others: list[LoadedProgram]) -> None:
    for other in others:
        sandbox.add_program(other.file.module, other.guest, other.finder)
