"""Errors that are not retried: capsule.NonRetryable, a task's retry_on and
no_retry_on, programming errors the host or the guest detects, and a caller
that fails only because such an error went unhandled in it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from capsule.sandbox.config import ConfigError, validate_task
from capsule.sandbox.engine import ErrorInfo
from tests.conftest import LocalServer, ProgramRunner, capsule_cli

#: Each child fails its every attempt in its own way; main reports, per
#: child, the TaskError it got and how many attempts were made.
CHILDREN = """
import capsule
from capsule import NonRetryable, TaskError, task
from capsule.http import get


class Transient(ConnectionError):
    pass


def counted():
    print("ATTEMPT", capsule.current().name, flush=True)


@task(max_retries=3)
def non_retryable():
    counted()
    raise NonRetryable("the input is invalid")


@task(max_retries=3)
def plain_error():
    counted()
    raise ValueError("flaky")


@task(max_retries=3, retry_on=(ConnectionError,))
def retry_on_other():
    counted()
    raise ValueError("not a connection problem")


@task(max_retries=3, retry_on=ConnectionError)
def retry_on_match():
    counted()
    raise Transient("a subclass of ConnectionError")


@task(max_retries=3, retry_on=[Exception], no_retry_on=(KeyError, ZeroDivisionError))
def no_retry_on_match():
    counted()
    return {}["missing"]


@task(max_retries=3)
def missing_module():
    counted()
    import no_such_module_anywhere  # noqa: F401


@task(max_retries=3)
def syntax_error():
    counted()
    import broken  # noqa: F401


@task(max_retries=3)
def not_json():
    counted()
    return object()


@task(max_retries=3, allowed_hosts=["example.com"])
def host_not_allowed():
    counted()
    get("http://127.0.0.1:9/")


@task(max_retries=3)
def caller_of_non_retryable():
    counted()
    return non_retryable()


@task(max_retries=3)
def caller_of_bad_arguments():
    counted()
    return plain_error("an argument it does not take")


@task(max_retries=3)
def parent_of_spawned():
    counted()
    non_retryable.spawn(link=True)  # linked: its failure fails this task at once
    capsule.receive(timeout=60)


@task(max_retries=3, no_retry_on=TaskError)
def caller_with_no_retry_on_task_error():
    counted()
    return plain_error()


@task(name="main")
def main(names):
    out = {}
    for name in names:
        try:
            globals()[name]()
        except TaskError as error:
            out[name] = [error.kind, error.retryable, error.attempts, error.message]
    return out
"""


def run_children(run_program: ProgramRunner, program: Callable[..., Path], *names: str) -> dict:
    program("x = (\n", "broken.py")  # imported by syntax_error
    outcome = run_program(CHILDREN, list(names), retry_backoff=0.001)
    started: dict[str, int] = {}
    for event in outcome.of_type("output"):
        if event.text.startswith("ATTEMPT "):
            name = event.text.split()[1]
            started[name] = started.get(name, 0) + 1
    return {"errors": outcome.value, "attempts": started}


def test_non_retryable_and_retry_rules(
    run_program: ProgramRunner, program: Callable[..., Path]
) -> None:
    seen = run_children(
        run_program,
        program,
        "non_retryable",
        "plain_error",
        "retry_on_other",
        "retry_on_match",
        "no_retry_on_match",
    )
    errors, attempts = seen["errors"], seen["attempts"]
    assert errors["non_retryable"] == [
        "exception",
        False,
        1,
        "NonRetryable: the input is invalid",
    ]
    assert errors["plain_error"][:3] == ["exception", True, 4]
    assert errors["retry_on_other"][:3] == ["exception", False, 1]
    assert errors["retry_on_match"][:3] == ["exception", True, 4]
    assert errors["no_retry_on_match"][:3] == ["exception", False, 1]
    assert attempts == {
        "non_retryable": 1,
        "plain_error": 4,
        "retry_on_other": 1,
        "retry_on_match": 4,
        "no_retry_on_match": 1,
    }


def test_programming_errors_are_not_retried(
    run_program: ProgramRunner, program: Callable[..., Path]
) -> None:
    names = ("missing_module", "syntax_error", "not_json", "host_not_allowed")
    seen = run_children(run_program, program, *names)
    errors, attempts = seen["errors"], seen["attempts"]
    assert attempts == dict.fromkeys(names, 1)
    for name in names:
        assert errors[name][:3] == ["exception", False, 1], errors[name]
    assert (
        "ModuleNotFoundError: No module named 'no_such_module_anywhere'"
        in (errors["missing_module"][3])
    )
    assert errors["syntax_error"][3].startswith("SyntaxError:")
    assert "not JSON-serializable" in errors["not_json"][3]
    assert errors["host_not_allowed"][3].startswith("HostNotAllowed:")


def test_a_caller_failing_on_a_non_retryable_child_is_not_retried(
    run_program: ProgramRunner, program: Callable[..., Path]
) -> None:
    seen = run_children(
        run_program,
        program,
        "caller_of_non_retryable",
        "caller_of_bad_arguments",
        "caller_with_no_retry_on_task_error",
        "parent_of_spawned",
    )
    errors, attempts = seen["errors"], seen["attempts"]
    kind, retryable_, count, message = errors["caller_of_non_retryable"]
    assert (kind, retryable_, count) == ("exception", False, 1)
    assert "unhandled TaskError: task 'non_retryable' failed (exception)" in message
    kind, retryable_, count, message = errors["caller_of_bad_arguments"]
    assert (kind, retryable_, count) == ("exception", False, 1)
    assert "task 'plain_error' failed (bad_arguments)" in message
    kind, retryable_, count, message = errors["parent_of_spawned"]
    assert (kind, retryable_, count) == ("child_failed", False, 1)
    # Its own no_retry_on=TaskError: the retryable child's 4 attempts, its own 1.
    assert errors["caller_with_no_retry_on_task_error"][:3] == ["exception", False, 1]
    assert attempts == {
        "caller_of_non_retryable": 1,
        "parent_of_spawned": 1,
        "non_retryable": 2,  # called by one, spawned by the other
        "caller_of_bad_arguments": 1,
        "caller_with_no_retry_on_task_error": 1,
        "plain_error": 4,
    }


SIDE_EFFECT_THEN_FAILURE = """
from capsule import NonRetryable, task
from capsule.http import post


@task(max_retries=3)
def validate(order):
    raise {error}("order {{}} is invalid".format(order))


@task(max_retries=2, allowed_hosts=["127.0.0.1"])
def place(base, order):
    post(base + "/echo", json={{"order": order}})  # a side effect, then a failure
    return validate(order)


@task(name="main", max_retries=2, allowed_hosts=["127.0.0.1"])
def main(base):
    post(base + "/echo", json={{"step": "start"}})
    return place(base, 7)
"""


@pytest.mark.parametrize(
    ("error", "requests", "attempts"),
    [
        ("NonRetryable", 2, 1),  # main's request and place's: each once
        # The control: a retryable failure re-runs the callers and their requests.
        ("RuntimeError", 3 + 3 * 3, 3),
    ],
)
def test_a_whole_main_does_not_rerun_its_requests_for_a_non_retryable_failure(
    run_program: ProgramRunner,
    http_server: LocalServer,
    error: str,
    requests: int,
    attempts: int,
    core: str,
) -> None:
    source = SIDE_EFFECT_THEN_FAILURE.format(error=error)
    outcome = run_program(source, http_server.url, retry_backoff=0.001, core=core)
    assert outcome.error.kind == "exception"
    assert outcome.error.retryable is (error != "NonRetryable")
    assert outcome.result.attempts == attempts
    assert http_server.hits["/echo"] == requests


def test_a_guest_cannot_make_a_failure_retryable_that_the_host_never_retries() -> None:
    from capsule.supervisor.retry import retryable

    for kind in ("bad_arguments", "protocol", "output_limit", "cancelled", "divergence"):
        assert not retryable(ErrorInfo(kind, "claimed retryable", retryable=True))
    assert retryable(ErrorInfo("exception", "flaky"))
    assert not retryable(ErrorInfo("exception", "said so", retryable=False))
    assert not retryable(ErrorInfo("timeout", "said so", retryable=False))


def test_retry_on_options_are_checked_by_the_host() -> None:
    config = validate_task("prog.f", "f", {"retry_on": ["builtins.ValueError"]})
    assert config.retry_on == ("builtins.ValueError",)
    for bad in ("builtins.ValueError", ["not a name!"], [1], ["x"] * 65):
        with pytest.raises(ConfigError, match=r"task 'f' \(prog.f\): option no_retry_on="):
            validate_task("prog.f", "f", {"no_retry_on": bad})


def test_retry_on_must_name_exception_classes(run_program: ProgramRunner) -> None:
    outcome = run_program(
        """
        from capsule import task

        @task(name="main", retry_on=("ValueError",))
        def main():
            return 1
        """
    )
    assert outcome.report.usage_error is not None
    assert "@task(retry_on=...) takes exception classes" in outcome.report.usage_error
    assert "not 'ValueError'" in outcome.report.usage_error


def test_the_command_says_a_failure_was_not_retryable(program: Callable[..., Path]) -> None:
    path = program(
        """
        from capsule import NonRetryable, task

        @task(name="main", max_retries=3)
        def main():
            raise NonRetryable("the order does not exist")
        """
    )
    done = capsule_cli("run", str(path), "--verbose", "--no-journal")
    assert done.returncode == 1
    assert "retrying" not in done.stderr
    assert (
        "capsule: failed main (exception, not retryable) after 1 attempt(s): "
        "NonRetryable: the order does not exist"
    ) in done.stderr
    assert (
        "capsule: error: task 'main' failed (exception, not retryable) after 1 attempt(s): "
        "NonRetryable: the order does not exist"
    ) in done.stderr
