"""Untrusted text made safe to show on a terminal.

A terminal acts on what it is sent: ESC and the C1 controls (U+0080-U+009F,
U+009B being CSI) start sequences that move the cursor, clear the screen,
restyle text, set the window title or write the clipboard (OSC 52); a carriage
return or a backspace overwrite what is already shown; bidirectional overrides
reorder what follows. Guest text (output, results, error messages, task names,
URLs) is passed through :func:`visible` before it meets a terminal or one of
Capsule's own messages: every such character is shown as a Python-style escape
(``\\x1b``, ``\\r``, ``\\u202e``) and does nothing.
"""

from __future__ import annotations

import re

#: Bidirectional formatting characters (the "Trojan Source" set): embeddings,
#: overrides, isolates and marks.
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
#: C0 controls but tab, line feed and carriage return; DEL; C1 controls; the
#: line and paragraph separators (line breaks for some viewers); lone
#: surrogates (which no UTF-8 stream can carry: JSON can, as "\\ud800").
_UNSAFE = f"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_BIDI}\u2028\u2029\ud800-\udfff"
#: In running text: a carriage return is kept only as part of a CRLF line end.
_IN_TEXT = re.compile(f"[{_UNSAFE}]|\r(?!\n)")
#: On one line: line feeds, carriage returns and tabs too.
_ON_ONE_LINE = re.compile(f"[{_UNSAFE}\t\n\r]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, one_line: bool = False) -> str:
    """``text`` with every character that could act on a terminal shown as an
    escape. Line feeds and tabs are kept, unless ``one_line``: a field quoted in
    one of Capsule's one-line messages (a task name, an error message in a
    lifecycle line) cannot add lines of its own."""
    pattern = _ON_ONE_LINE if one_line else _IN_TEXT
    return pattern.sub(_escape, text)
