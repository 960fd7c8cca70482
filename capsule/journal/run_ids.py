"""What a run id may be."""

import re

#: A run id: letters, digits, ``_`` and ``-``, starting with a letter or digit
#: (it names files: the run's socket, its secrets, a worker's directory; and
#: appears in commands), at most 64 characters. One read from a journal that
#: is not one is a damaged (or forged) record.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
