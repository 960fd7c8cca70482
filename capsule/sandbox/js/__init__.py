"""JavaScript and TypeScript programs: the JS guest runtime and the program's bundle.

A JS/TS task runs in an instance of one generic component (StarlingMonkey, built
by componentize-js from ``guest/``) that exports the same ``runner`` world as
the Python runtime, so the host runs both alike. The user's program reaches it
as one script, bundled by esbuild on the host (npm packages from the program's
``node_modules`` included, Node built-ins refused) and evaluated at load: an
edit needs no rebuild. Both tools are npm packages, installed once, at pinned
versions, into Capsule's cache (``toolchain/``); only JS/TS programs need node
and npm.
"""

import re
from pathlib import Path

#: The file name endings of TypeScript and JavaScript programs.
SUFFIXES = (".ts", ".mts", ".cts", ".js", ".mjs", ".cjs")
#: The SDK's TypeScript declarations, for editors and tsc (see docs/javascript.md).
SDK_TYPES = Path(__file__).resolve().parent / "sdk" / "index.d.ts"
#: The task options whose JS name differs from the host's (Python's) name.
CAMEL_CASE_OPTIONS = {
    "max_retries": "maxRetries",
    "max_restarts": "maxRestarts",
    "restart_window": "restartWindow",
    "allowed_hosts": "allowedHosts",
    "allowed_files": "allowedFiles",
}
#: An option's name where a message names it: before "=" or a quoted value.
_OPTION = re.compile(r"\b(" + "|".join(CAMEL_CASE_OPTIONS) + r")(?==| ')")


def js_option_names(text: str) -> str:
    """A message about task options, with each named as a JS program writes it."""
    return _OPTION.sub(lambda match: CAMEL_CASE_OPTIONS[match.group(1)], text)
