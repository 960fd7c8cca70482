"""Where the host's own troubles go: a logger per package ("capsule.sandbox",
"capsule.journal", "capsule.supervisor"), never the embedding application's
stderr. The "capsule" logger has a NullHandler, so nothing is shown until the
application configures logging (docs/host-api.md); the `capsule` command shows
them on its stderr (:func:`show_on_stderr`)."""

from __future__ import annotations

import logging
import sys

ROOT = "capsule"

logging.getLogger(ROOT).addHandler(logging.NullHandler())


def logger(package: str) -> logging.Logger:
    """The logger of ``package`` ("sandbox", "journal", ...)."""
    return logging.getLogger(f"{ROOT}.{package}")


def show_on_stderr() -> None:
    """Show warnings and errors of every package on this process's stderr, as
    ``capsule: ...`` lines (for the `capsule` command, which owns its stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{ROOT}: %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger(ROOT).addHandler(handler)
