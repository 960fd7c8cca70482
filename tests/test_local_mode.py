"""Outside `capsule run`, a task is a plain function call (for unit tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import capsule
from capsule import task
from capsule.sdk.task import TaskDefinitionError
from tests.conftest import LocalServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _import(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_runs_directly() -> None:
    module = _import(EXAMPLES / "analyze.py")
    assert module.main() == {"processed": 5, "status": "complete"}  # type: ignore[attr-defined]
    assert module.analyze_data([1, 2]) == {"processed": 2, "status": "complete"}  # type: ignore[attr-defined]


def test_bare_decorator_keeps_function_name_and_current() -> None:
    @task
    def local_leaf(x: int, *, times: int = 1) -> dict[str, object]:
        info = capsule.current()
        return {"value": x * times, "name": info.name, "id": info.id}

    @task(name="local_parent")
    def parent() -> list[dict[str, object]]:
        return [local_leaf(2, times=3)]

    assert local_leaf.name == "local_leaf"
    assert local_leaf.__name__ == "local_leaf"
    assert parent() == [{"value": 6, "name": "local_leaf", "id": "local_parent/local_leaf"}]


def test_current_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="outside a running task"):
        capsule.current()


def test_duplicate_task_names_are_refused() -> None:
    @task(name="dup_local")
    def first() -> None: ...

    with pytest.raises(TaskDefinitionError, match="two tasks are named 'dup_local'"):

        @task(name="dup_local")
        def second() -> None: ...


def test_exceptions_propagate_unchanged_locally() -> None:
    @task
    def fails_locally() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        fails_locally()


def test_spawn_map_gather_and_sleep_run_directly() -> None:
    @task
    def double_local(x: int) -> int:
        return x * 2

    @task
    def broken_local(x: int) -> int:
        raise ValueError(f"no {x}")

    handle = double_local.spawn(4)
    assert handle.result() == 8
    assert double_local.map([1, 2, 3]) == [2, 4, 6]
    results = capsule.gather(double_local.spawn(1), broken_local.spawn(2), return_exceptions=True)
    assert results[0] == 2
    assert isinstance(results[1], capsule.TaskError) and results[1].message == "ValueError: no 2"
    with pytest.raises(capsule.TaskError):
        broken_local.spawn(3).result()
    capsule.sleep(0)


def test_http_works_as_a_plain_function(http_server: LocalServer) -> None:
    from capsule.http import ConnectionFailed, get, post

    @task(allowed_hosts=["127.0.0.1"])
    def fetch(base: str) -> list:
        echoed = post(base + "/echo", json={"x": 1}).json()
        return [get(base + "/status/404").status_code, echoed["method"]]

    assert fetch(http_server.url) == [404, "POST"]
    with pytest.raises(ConnectionFailed):
        get("http://127.0.0.1:1/", timeout=2)


def test_retry_rules_are_the_task_functions_own_locally() -> None:
    class Transient(ConnectionError):
        pass

    @task(retry_on=(ConnectionError,), no_retry_on=Transient)
    def picky_local() -> None: ...

    assert picky_local.options["retry_on"] == ["builtins.ConnectionError"]
    assert picky_local.options["no_retry_on"] == [f"{__name__}.{Transient.__qualname__}"]
    assert picky_local.retries(ConnectionRefusedError())
    assert not picky_local.retries(Transient())  # no_retry_on wins
    assert not picky_local.retries(ValueError())  # not in retry_on
    assert not picky_local.retries(capsule.NonRetryable("never"))

    @task
    def refuses_local() -> None:
        raise capsule.NonRetryable("invalid input")

    (error,) = capsule.gather(refuses_local.spawn(), return_exceptions=True)
    assert (error.kind, error.retryable) == ("exception", False)
    assert capsule.TaskError.from_dict(error.to_dict()).retryable is False

    with pytest.raises(TaskDefinitionError, match="takes exception classes"):
        task(no_retry_on=(ValueError, "KeyError"))  # type: ignore[arg-type]
