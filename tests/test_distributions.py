"""The installed version of a distribution, read from its .dist-info directory."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from capsule.sandbox import distributions
from capsule.sandbox.distributions import installed_version


@pytest.mark.parametrize("dist", ["wasmtime", "componentize-py", "pydantic", "anyio"])
def test_the_version_is_the_one_importlib_metadata_reads(dist: str) -> None:
    assert installed_version(dist) == metadata.version(dist)


def test_a_distribution_that_is_not_installed_has_no_version() -> None:
    assert installed_version("capsule-no-such-distribution") is None


def test_a_package_without_a_dist_info_beside_it_asks_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lonely_package").mkdir()
    (tmp_path / "lonely_package" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    asked: list[str] = []

    def version(dist: str) -> str:
        asked.append(dist)
        return "1.2.3"

    monkeypatch.setattr(metadata, "version", version)
    assert distributions.installed_version("lonely-package") == "1.2.3"
    assert asked == ["lonely-package"]
