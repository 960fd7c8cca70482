"""Task config validation on the host: accepted forms, clear errors, host caps."""

from __future__ import annotations

import pytest

from capsule.sandbox.config import (
    COMPUTE_LEVELS,
    ConfigError,
    HostCaps,
    Limits,
    parse_compute,
    parse_ram,
    parse_timeout,
    validate_program,
    validate_task,
)


@pytest.mark.parametrize(
    ("value", "fuel"),
    [
        ("LOW", 100_000_000),
        ("medium", 2_000_000_000),
        ("High", 50_000_000_000),
        (12345, 12345),
        ("777", 777),
    ],
)
def test_compute_forms(value: object, fuel: int) -> None:
    assert parse_compute(value) == fuel


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64KB", 64 * 1024),
        ("512MB", 512 * 1024**2),
        ("2GB", 2 * 1024**3),
        (4096, 4096),
        ("1.5 GiB", int(1.5 * 1024**3)),
    ],
)
def test_ram_forms(value: object, size: int) -> None:
    assert parse_ram(value) == size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (2, 2.0),
        (0.25, 0.25),
        ("10", 10.0),
    ],
)
def test_timeout_forms(value: object, seconds: float) -> None:
    assert parse_timeout(value) == seconds


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("compute", "ULTRA", "LOW, MEDIUM or HIGH"),
        ("compute", -5, "LOW, MEDIUM or HIGH"),
        ("compute", True, "LOW, MEDIUM or HIGH"),
        ("compute", "1e9", "LOW, MEDIUM or HIGH"),
        ("ram", "lots", '"512MB"'),
        ("ram", "12XB", '"512MB"'),
        ("ram", 0, '"512MB"'),
        ("timeout", "soon", '"30s"'),
        ("timeout", -1, '"30s"'),
        ("timeout", "5 days", '"30s"'),
        ("max_retries", -1, "integer from 0"),
        ("max_retries", "3", "integer from 0"),
        ("max_retries", 2.5, "integer from 0"),
        ("name", "", "non-empty string"),
        ("name", "a/b", "non-empty string"),
    ],
)
def test_bad_values_name_task_option_value_and_forms(
    option: str, value: object, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_task("prog.worker", "worker", {option: value})
    message = str(caught.value)
    assert "task 'worker'" in message
    assert f"option {option}={value!r}" in message
    assert expected in message


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_program(
            [
                {"name": "a", "function": "m.a", "options": {"compute": "x"}},
                {"name": "b", "function": "m.b", "options": {"ram": "y"}},
            ]
        )
    assert "task 'a'" in str(caught.value) and "task 'b'" in str(caught.value)


def test_duplicate_names_are_an_error() -> None:
    with pytest.raises(ConfigError, match="declared twice"):
        validate_program(
            [
                {"name": "a", "function": "m.a", "options": {}},
                {"name": "a", "function": "m.b", "options": {}},
            ]
        )


def test_defaults() -> None:
    config = validate_task("m.f", "f", {})
    assert config.fuel == COMPUTE_LEVELS["MEDIUM"]
    assert config.max_retries == 1
    assert config.timeout_s is None


def test_host_caps_bound_declared_limits() -> None:
    config = validate_task("m.f", "f", {"compute": "HIGH", "ram": "2GB", "timeout": "1h"})
    caps = HostCaps(parse_compute("LOW"), parse_ram("64MB"), parse_timeout("2s"))
    limits = Limits.for_task(config, caps)
    assert limits == Limits(fuel=100_000_000, ram_bytes=64 * 1024**2, timeout_s=2.0)
    # A task with no timeout gets the host's.
    assert Limits.for_task(validate_task("m.g", "g", {}), caps).timeout_s == 2.0
    # Caps never raise a smaller declared limit.
    small = validate_task("m.h", "h", {"compute": 10, "ram": "20MB", "timeout": "1s"})
    assert Limits.for_task(small, caps) == Limits(fuel=10, ram_bytes=20 * 1024**2, timeout_s=1.0)


def test_bad_host_cap_is_a_config_error() -> None:
    from capsule.supervisor.options import RunOptions

    with pytest.raises(ConfigError, match="max_ram 'huge' is invalid"):
        RunOptions(max_ram="huge")


def test_dotenv_references_expand_as_python_dotenv_expands_them() -> None:
    """capsule.sandbox.env_file expands ${VAR} in linear time: the same values
    as python-dotenv's own pattern, on every string of these pieces."""
    import itertools

    from dotenv.variables import parse_variables

    from capsule.sandbox.env_file import expand_variables

    env: dict[str, str | None] = {"A": "1", "B": None, "": "empty", "A:": "x", "C-": "y"}
    pieces = ["$", "{", "}", ":", "-", "A", "B", "x", "${", ":-", "${A}", "${B:-d}"]
    for size in range(6):
        for combination in itertools.product(pieces, repeat=size):
            value = "".join(combination)
            expected = "".join(atom.resolve(env) for atom in parse_variables(value))
            assert "".join(expand_variables(value, env)) == expected, value
