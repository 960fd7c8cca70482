"""The one use of Textual's private names, checked against the versions it was
written for.

Whoever runs the TUI must tell a failure of the TUI from a quit: a failed run
quits with its own non-zero exit code, and the run must go on when the TUI
fails. Textual's public API says *that* the app failed: ``App.return_code``
is 1 after an unhandled exception ("a fatal error", as documented), and the
app quits with return code 0 (the run's exit code is its return value). It
has no public way to say *what* failed; ``App._exception`` (the first
unhandled exception, which ``run_test`` raises again) has, so it is read here
and nowhere else, on the Textual versions it was checked against
(``SUPPORTED_MAJOR``, pyproject allows ``textual>=1.0,<9``).

On another version, or if the name is gone, the failure is told from the
public return code alone: :class:`TuiFailed` says the TUI failed and that
Textual printed its traceback, without the exception's type and message.
Nothing in Textual is changed.
"""

from __future__ import annotations

from typing import Any

from capsule.sandbox.distributions import installed_version

#: The Textual major version ``App._exception`` was checked against.
SUPPORTED_MAJOR = 8
#: Textual's installed version (None: not known to the package metadata).
VERSION = installed_version("textual")
#: Whether the installed Textual is one this module was checked against.
SUPPORTED = VERSION is not None and VERSION.split(".")[0] == str(SUPPORTED_MAJOR)


class TuiFailed(RuntimeError):
    """The TUI ended with a non-zero return code, on a Textual version whose
    record of the exception is not read (Textual printed its traceback)."""

    def __init__(self, return_code: int) -> None:
        super().__init__(
            f"it exited with return code {return_code}; Textual printed its traceback "
            f"(Textual {VERSION or '(unknown version)'}: capsule names the error itself "
            f"on textual {SUPPORTED_MAJOR}.x: pip install 'textual>={SUPPORTED_MAJOR},"
            f"<{SUPPORTED_MAJOR + 1}')"
        )


def failure_of(app: Any) -> BaseException | None:
    """What made ``app`` (a Textual App that quits with return code 0) fail, if
    something did; None while it runs, or after a quit."""
    if SUPPORTED:
        error = getattr(app, "_exception", None)
        if isinstance(error, BaseException):
            return error
    code = app.return_code
    if code is None or code == 0:
        return None
    return TuiFailed(code)
