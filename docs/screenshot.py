"""Regenerate docs/tui.svg, the screenshot in docs/tui.md: run examples/agents/main.py
with a journal, open it in the TUI headless, select a worker, export the screen.

    python3 docs/screenshot.py
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capsule.journal.reader import find_run  # noqa: E402
from capsule.tui.app import CapsuleApp  # noqa: E402
from capsule.tui.sources import JournalSource  # noqa: E402


async def shoot(journal: Path, target: Path) -> None:
    app = CapsuleApp(JournalSource(journal, await find_run(journal, None)))
    async with app.run_test(size=(100, 30)) as pilot:
        while app.model.ended_at is None:
            await pilot.pause(0.1)
        await pilot.pause(0.3)
        await pilot.press("down", "down", "down")
        await pilot.pause(0.3)
        app.save_screenshot(str(target.name), path=str(target.parent))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "journal.db"
        subprocess.run(
            [sys.executable, "-m", "capsule.cli", "run", str(ROOT / "examples/agents/main.py"),
             "--journal", str(journal)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        asyncio.run(shoot(journal, ROOT / "docs" / "tui.svg"))
    print("wrote docs/tui.svg")


if __name__ == "__main__":
    main()
