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


#: Packages whose progress (INFO records) the `capsule` command shows too:
#: the guest runtime's first build, which takes a while.
SHOWN_PROGRESS = (f"{ROOT}.sandbox.build",)


def show_on_stderr() -> None:
    """Show warnings and errors of every package, and the progress of the
    long steps (SHOWN_PROGRESS), on this process's stderr, as ``capsule: ...``
    lines (for the `capsule` command, which owns its stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{ROOT}: %(message)s"))
    handler.setLevel(logging.INFO)
    handler.addFilter(_warnings_or_progress)
    logging.getLogger(ROOT).addHandler(handler)
    # psycopg warns as it drops a connection the server ended; the journal
    # reports why it failed, in words of its own (else Python's last-resort
    # handler prints the warning bare).
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    for name in SHOWN_PROGRESS:
        logging.getLogger(name).setLevel(logging.INFO)


def _warnings_or_progress(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name in SHOWN_PROGRESS
