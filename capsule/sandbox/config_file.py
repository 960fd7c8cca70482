"""Reading a configuration file beside a program (capsule.toml, .env).

As UTF-8 text, at most a bounded size, and without blocking: the file is opened
non-blocking and checked, through the descriptor that is read, to be a regular
file, so a FIFO (or a device) put in its place is refused, not waited on. Every
problem is a ConfigError naming the file; none quotes its content (a .env holds
secrets).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from capsule.sandbox.config import ConfigError
from capsule.sandbox.paths import PathRefused, read_bounded

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def read_config_text(
    path: Path, max_bytes: int, *, directory_is_absent: bool = False
) -> str | None:
    """The text of ``path``; None if there is no such file (or, with
    ``directory_is_absent``, if it is a directory)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        if directory_is_absent:
            return None
        raise ConfigError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            if directory_is_absent:
                return None
            raise ConfigError(f"{path} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path} is not a regular file (a FIFO, a device or a socket)")
        data = read_bounded(fd, max_bytes)
    except PathRefused:
        raise ConfigError(
            f"{path} is larger than {max_bytes:,} bytes, the most Capsule reads of it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line} is not valid UTF-8") from None
