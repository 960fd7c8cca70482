"""The installed version of a distribution, found cheaply: every `capsule run`
asks for wasmtime's and componentize-py's (the guest runtime's cache key, the
wasmtime-py internals Capsule may use), and importlib.metadata's way (a scan of
every path entry, then a parse of the metadata file) costs milliseconds of it."""

from __future__ import annotations

import importlib.util
import os

_DIST_INFO = ".dist-info"


def installed_version(dist: str) -> str | None:
    """The version of the installed distribution ``dist`` (None: not installed):
    the name of its ``.dist-info`` directory beside its top-level package of the
    same name, else (another layout) what importlib.metadata finds."""
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        site_dir = os.path.dirname(next(iter(spec.submodule_search_locations)))
        prefix = f"{module}-"
        try:
            names = os.listdir(site_dir)
        except OSError:
            names = []
        for name in names:
            if name.startswith(prefix) and name.endswith(_DIST_INFO):
                return name[len(prefix) : -len(_DIST_INFO)]
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
