"""The npm packages JS/TS programs need (componentize-js, esbuild), installed
once at the versions ``toolchain/package-lock.json`` pins, into Capsule's cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from capsule.sandbox.runtime import (
    Progress,
    RuntimeBuildError,
    capsule_home,
    prune_builds,
    run_tool,
)

MANIFEST_DIR = Path(__file__).resolve().parent / "toolchain"
MANIFEST_FILES = ("package.json", "package-lock.json")
#: The oldest Node.js componentize-js 0.23 runs on.
MIN_NODE_MAJOR = 18
NEEDS = (
    "a TypeScript or JavaScript program needs Node.js {min}+ and npm on PATH (Capsule "
    "uses them to build its JavaScript runtime once and to bundle the program): {why}; "
    "install Node.js (https://nodejs.org, or your system's package, e.g. `apt install "
    "nodejs npm`)"
)


@dataclass(frozen=True)
class Toolchain:
    #: The directory the packages are installed in (its node_modules).
    directory: Path

    @property
    def node(self) -> str:
        """The node executable (componentize-js runs on it; esbuild does not)."""
        return _node()[0]

    @property
    def componentize_js(self) -> Path:
        return (
            self.directory
            / "node_modules"
            / "@bytecodealliance"
            / "componentize-js"
            / "src"
            / "cli.js"
        )

    @property
    def esbuild(self) -> Path:
        """esbuild's native binary (its npm wrapper would start node first)."""
        found = sorted((self.directory / "node_modules" / "@esbuild").glob("*/bin/esbuild"))
        if found:
            return found[0]
        return self.directory / "node_modules" / "esbuild" / "bin" / "esbuild"

    @property
    def tsc(self) -> Path:
        """TypeScript's compiler (a type checker only: programs are bundled by esbuild)."""
        return self.directory / "node_modules" / ".bin" / "tsc"

    @property
    def version_key(self) -> str:
        return self.directory.name


def manifest_digest() -> str:
    digest = hashlib.sha256()
    for name in MANIFEST_FILES:
        digest.update(name.encode() + b"\0" + (MANIFEST_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def _node() -> tuple[str, str]:
    """The node and npm executables, or RuntimeBuildError saying what is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
    if node is None or npm is None:
        raise RuntimeBuildError(
            NEEDS.format(min=MIN_NODE_MAJOR, why=f"{' and '.join(missing)} not found")
        )
    return node, npm


def _check_node_version(node: str) -> None:
    import subprocess

    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise RuntimeBuildError(
            NEEDS.format(min=MIN_NODE_MAJOR, why=f"`node --version` failed ({exc})")
        ) from None
    if major < MIN_NODE_MAJOR:
        raise RuntimeBuildError(
            NEEDS.format(min=MIN_NODE_MAJOR, why=f"this machine's node is {version}")
        )


def ensure_toolchain(progress: Progress | None = None) -> Toolchain:
    """The installed toolchain, installed first if needed (npm ci: the lock's
    exact packages, checked against their integrity hashes)."""
    home = capsule_home() / "js-toolchain"
    toolchain = Toolchain(home / manifest_digest())
    if (toolchain.directory / ".complete").is_file():
        return toolchain
    node, npm = _node()
    _check_node_version(node)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeBuildError(f"cannot create the toolchain cache at {home}: {exc}") from exc
    from filelock import FileLock

    progress = progress or Progress()
    with FileLock(str(home / f"{toolchain.directory.name}.lock")):
        if (toolchain.directory / ".complete").is_file():
            return toolchain
        for leftover in home.glob(f".install-{toolchain.directory.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # (a killed install's; the lock is ours)
        prefix = f".install-{toolchain.directory.name}-"
        with tempfile.TemporaryDirectory(dir=home, prefix=prefix) as tmp:
            work = Path(tmp)
            for name in MANIFEST_FILES:
                shutil.copyfile(MANIFEST_DIR / name, work / name)
            with progress.step("npm ci: installing componentize-js and esbuild (once, about 20 s)"):
                _npm_ci(npm, work)
            (work / ".complete").touch()
            if toolchain.directory.exists():
                shutil.rmtree(toolchain.directory)
            os.replace(work, toolchain.directory)
            work.mkdir()  # (for TemporaryDirectory's cleanup)
        prune_builds(home, keep=toolchain.directory)
    return toolchain


def _npm_ci(npm: str, directory: Path) -> None:
    # --ignore-scripts: esbuild's postinstall only checks its binary, which is
    # found here by its path; no package of the toolchain needs a script.
    command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    env = {**os.environ, "npm_config_update_notifier": "false"}
    returncode, stdout, stderr = run_tool(command, directory, env)
    if returncode != 0:
        raise RuntimeBuildError(
            "npm could not install Capsule's JavaScript toolchain (componentize-js, esbuild; "
            "it needs the npm registry, or a registry set in npm's config):\n"
            + (stderr or stdout).strip()[-4000:]
        )
