"""Build and cache the JavaScript guest runtime component (see the package)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from capsule.sandbox.js.toolchain import Toolchain, ensure_toolchain, manifest_digest
from capsule.sandbox.runtime import (
    WORLD,
    Progress,
    RuntimeArtifacts,
    RuntimeBuildError,
    build_digest,
    cached_build,
    capsule_home,
    run_tool,
    wit_dir,
)

GUEST_DIR = Path(__file__).resolve().parent / "guest"
ENTRY = "runtime.js"
#: StarlingMonkey's features the runtime leaves out: its own fetch (wasi:http,
#: with no allow-list of the host's; `fetch` is Capsule's, on its http import).
DISABLED_FEATURES = ("http", "fetch-event")


def guest_sources() -> dict[str, Path]:
    """Every file the component is built from, by its path inside the build."""
    files = {path.name: path for path in sorted(GUEST_DIR.glob("*.js"))}
    for path in sorted(wit_dir().glob("*.wit")):
        files[f"wit/{path.name}"] = path
    return files


def cache_key(engine_settings: str) -> str:
    """A digest of everything the built and compiled artifacts depend on."""
    settings = {
        "toolchain": manifest_digest(),
        "disabled": ",".join(DISABLED_FEATURES),
        "engine": engine_settings,
    }
    return "js-" + build_digest(guest_sources(), settings)


def ensure_js_runtime(
    engine: object, engine_settings: str, progress: Progress | None = None
) -> RuntimeArtifacts:
    """The cached JS runtime for these settings, built first if needed
    (installing the toolchain first if needed)."""

    def build(staging: Path, component: Path, progress: Progress) -> None:
        toolchain = ensure_toolchain(progress)  # (only a build needs node)
        for name, source in guest_sources().items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        with progress.step("componentize-js: StarlingMonkey + Capsule's JS SDK -> component"):
            _componentize(toolchain, staging, component)

    return cached_build(
        capsule_home() / "runtime",
        cache_key(engine_settings),
        "the JavaScript runtime",
        "about 30 s",
        build,
        engine,
        progress,
    )


def _componentize(toolchain: Toolchain, staging: Path, output: Path) -> None:
    command = [
        toolchain.node,
        str(toolchain.componentize_js),
        str(staging / ENTRY),
        "--wit",
        str(staging / "wit"),
        "--world-name",
        WORLD,
        "--out",
        str(output),
    ]
    for feature in DISABLED_FEATURES:
        command += ["--disable", feature]
    returncode, stdout, stderr = run_tool(command, staging, dict(os.environ))
    if returncode != 0 or not output.is_file():
        raise RuntimeBuildError(
            "componentize-js failed to build the JavaScript runtime:\n"
            + (stderr or stdout).strip()[-4000:]
        )
