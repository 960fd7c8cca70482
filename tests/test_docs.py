"""Every code block of the README and of docs/ does what the page says.

- A ``python`` block is a program: it must compile, and one that declares a ``main``
  task must run to a successful end with ``capsule run``, unless the line before
  the block says why not (``<!-- not run: it waits for a human -->``). A block
  whose first line names a file of the repository (``# examples/analyze.py``) must
  be that file, word for word; one that names another file (``# hello.py``) is
  written under that name for the console blocks of the same page.
- A ``console`` block's ``$ capsule ...`` and ``$ python ...`` lines are run, and
  what they print must be what the block shows: the same lines (those of
  concurrent tasks may interleave otherwise; the result is last), durations and
  fuel figures in ``capsule:`` lines aside.
- A ``toml`` block is a ``capsule.toml`` that Capsule accepts.

And every relative link of those pages, of BENCHMARKS.md and of SECURITY.md leads
to a file that exists, and to a heading of it when it names one (``#anchor``, as
GitHub makes them).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, REPO / "BENCHMARKS.md", REPO / "SECURITY.md"]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: Figures that differ from run to run in a `capsule:` line: "1.5 ms", "fuel 173,196".
VARYING = re.compile(r"\d[\d,]*(\.\d+)?")


@dataclass(frozen=True)
class Block:
    page: Path
    language: str
    text: str
    line: int
    #: Why the block is not run, as the comment before it says.
    not_run: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """The file a python block says it is (``# hello.py``), if any."""
        first = self.text.split("\n", 1)[0]
        match = re.fullmatch(r"# ([\w./-]+\.py)", first)
        return match.group(1) if match else None


def blocks(language: str) -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
                reason = re.fullmatch(r"<!-- not run: (.+) -->", before)
                found.append(
                    Block(page, language, match.group(2), line, reason and reason.group(1))
                )
    return found


def declares_main(source: str) -> bool:
    return bool(re.search(r'^def main\(|name="main"', source, re.MULTILINE))


def capsule_env(tmp_path: Path) -> dict[str, str]:
    # The command's own journal, away from the user's; the runtime cache stays
    # shared. The commands run elsewhere than the checkout: they import this one.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "CAPSULE_JOURNAL": str(tmp_path / "journal.db"), "PYTHONPATH": path}


def capsule_run(program: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "capsule.cli", "run", str(program)],
        capture_output=True,
        text=True,
        env=capsule_env(tmp_path),
        timeout=120,
    )


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.id)
def test_python_block_is_a_program_that_runs(block: Block, tmp_path: Path) -> None:
    compile(block.text, block.id, "exec")
    name = block.file_name
    if name is not None and (REPO / name).is_file():
        shown = block.text.split("\n", 1)[1]  # (its first line names the file)
        assert shown == (REPO / name).read_text(), f"{block.id} differs from {name}"
    if not declares_main(block.text) or block.not_run:
        return
    path = tmp_path / Path(name or "prog.py").name
    if name is not None and (REPO / name).is_file():
        path = REPO / name  # (run where it is: beside its capsule.toml and modules)
    else:
        path.write_text(block.text)
    done = capsule_run(path, tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("block", blocks("typescript"), ids=lambda b: b.id)
def test_typescript_block_is_the_example_it_names(block: Block) -> None:
    """A TypeScript block that names a file (``// examples/hello.ts``) shows
    that file as it is (the console blocks run it)."""
    first, _, shown = block.text.partition("\n")
    match = re.fullmatch(r"// ([\w./-]+\.ts)", first)
    assert match is not None, f"{block.id}: a TypeScript block names its file first"
    assert shown == (REPO / match.group(1)).read_text(), f"{block.id} differs from the file"


def console_commands(block: Block) -> list[tuple[str, list[str]]]:
    """The block's commands, each with the lines it should print."""
    commands: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    return commands


CONSOLE = [
    block for block in blocks("console") if console_commands(block) and block.not_run is None
]


def normalized(line: str) -> str:
    return VARYING.sub("N", line) if line.startswith("capsule:") else line


@pytest.mark.parametrize("block", CONSOLE, ids=lambda b: b.id)
def test_console_block_prints_what_it_shows(block: Block, tmp_path: Path) -> None:
    # Files the page's python blocks name (hello.py) exist where the command runs,
    # and so does the repository's examples/ directory.
    for python in blocks("python"):
        name = python.file_name
        if python.page == block.page and name is not None and not (REPO / name).exists():
            (tmp_path / name).write_text(python.text)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    for command, expected in console_commands(block):
        argv = shlex.split(command)
        assert argv[0] in ("capsule", "python"), f"{block.id}: cannot run {command!r}"
        program = ["-m", "capsule.cli"] if argv[0] == "capsule" else []
        done = subprocess.run(
            [sys.executable, *program, *argv[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=capsule_env(tmp_path),
            timeout=120,
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
        shown = [
            line
            for line in (done.stderr + done.stdout).splitlines()
            if not line.startswith("capsule: building") and "runtime ready" not in line
        ]
        if any(line.startswith("capsule:") for line in expected):
            # Standard error and output interleave: compare each stream's lines alone.
            want_err = [normalized(x) for x in expected if x.startswith("capsule:")]
            got_err = [normalized(x) for x in shown if x.startswith("capsule:")]
            assert got_err == want_err, f"{block.id}: {command}"
            expected = [x for x in expected if not x.startswith("capsule:")]
            shown = [x for x in shown if not x.startswith("capsule:")]
        # Tasks running concurrently print in any interleaving; the result comes last.
        assert sorted(shown) == sorted(expected), f"{block.id}: {command}"
        assert shown[-1:] == expected[-1:], f"{block.id}: {command}"


@pytest.mark.parametrize("block", blocks("toml"), ids=lambda b: b.id)
def test_toml_block_is_a_config_capsule_accepts(block: Block, tmp_path: Path) -> None:
    (tmp_path / "capsule.toml").write_text(block.text)
    # The program files it lists exist (declaring no tasks).
    for module in tomllib.loads(block.text).get("program", {}).get("modules", []):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text("" if module.endswith(".py") else "export {};\n")
    program = tmp_path / "prog.py"
    program.write_text(
        'from capsule import task\n\n\n@task(name="main")\ndef main() -> int:\n    return 1\n'
    )
    done = capsule_run(program, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


#: A markdown link or image: ``[text](target)``, ``![alt](target)``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where a link is text."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation
    dropped, spaces as hyphens, a repeated one numbered (``-1``, ``-2``)."""
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        base = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        anchor, n = base, 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # https:, mailto:
    ]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_link_check_sees_links_and_headings() -> None:
    # The check above passes trivially if it finds no links or no anchors.
    readme = REPO / "README.md"
    assert any(link.startswith("docs/") for link in relative_links(readme))
    assert "quick-start" in anchors(readme)
