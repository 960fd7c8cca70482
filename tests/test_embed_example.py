"""The embedding example (examples/embed/): a Starlette service running a
workflow per request, driven through Starlette's test client."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from starlette.testclient import TestClient

EXAMPLE = Path(__file__).parent.parent / "examples" / "embed" / "app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capsule_embed_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("CAPSULE_JOURNAL", str(tmp_path / "journal.db"))
    with TestClient(load_example().app) as client:  # (runs the lifespan: the Runtime)
        yield client


def test_the_test_client_runs_on_the_http_client_starlette_supports() -> None:
    """Starlette's TestClient is built on httpx2 (the test extra's); on httpx
    it still works, with a deprecation warning, an error here."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import starlette.testclient"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, checking each event's
    name is its type."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == name.removeprefix("event: ")
        events.append(event)
    return events


def test_a_workflow_per_request_with_a_human_verdict(client: TestClient) -> None:
    started = client.post(
        "/runs", json={"topic": "otters"}, headers={"Idempotency-Key": "otters-1"}
    )
    assert started.status_code == 202 and started.json() == {"run_id": "otters-1"}
    # A retried request (same key) is the same run.
    again = client.post("/runs", json={"topic": "otters"}, headers={"Idempotency-Key": "otters-1"})
    assert again.json() == {"run_id": "otters-1"}
    # The human's verdict waits in main's mailbox until main receives it.
    sent = client.post("/runs/otters-1/messages", json={"approved": True})
    assert sent.status_code == 202 and sent.json()["message_id"]

    events = sse_events(client.get("/runs/otters-1/events").text)
    assert events[0]["type"] == "run_started" and events[-1]["type"] == "run_ended"
    printed = "".join(e["text"] for e in events if e["type"] == "output")
    assert "waiting for a verdict on: A short note about otters." in printed
    assert {e["task"] for e in events if e["type"] == "completed"} == {"draft", "main"}
    expected = {"text": "A short note about otters.", "approved": True}
    assert events[-1]["envelope"]["result"] == expected

    result = client.get("/runs/otters-1").json()
    assert result["status"] == "completed" and result["value"] == expected


def test_a_cancelled_run_is_interrupted_and_bad_requests_are_refused(client: TestClient) -> None:
    run_id = client.post("/runs", json={"topic": "tides"}).json()["run_id"]
    assert client.post(f"/runs/{run_id}/cancel").json() == {"cancelled": True}
    events = sse_events(client.get(f"/runs/{run_id}/events").text)
    assert events[-1] == {**events[-1], "type": "run_ended", "status": "interrupted"}
    assert client.get(f"/runs/{run_id}").json()["status"] == "interrupted"
    # A message to a run that ended cannot be delivered.
    assert client.post(f"/runs/{run_id}/messages", json={"approved": True}).status_code == 409

    assert client.post("/runs", json={"topic": ""}).status_code == 400
    assert client.post("/runs", content=b"not json").status_code == 400
    refused = client.post("/runs", json={"topic": "x"}, headers={"Idempotency-Key": "../etc"})
    assert refused.status_code == 400
    assert client.get("/runs/nope/events").status_code == 404
    assert client.post("/runs/nope/cancel").status_code == 404


def test_hostile_request_bodies_and_keys_are_refused_not_server_errors(
    client: TestClient,
) -> None:
    """A key the Runtime refuses ("_x"), a verdict that is NaN or nested
    deeper than a task takes, a body of megabytes, JSON nested past Python's
    recursion: each a 4xx, and the service goes on."""
    started = client.post("/runs", json={"topic": "x"}, headers={"Idempotency-Key": "_x"})
    assert started.status_code == 400
    run_id = client.post("/runs", json={"topic": "kites"}).json()["run_id"]
    for body in (b'{"approved": NaN}', b"[" * 300 + b"]" * 300):
        refused = client.post(
            f"/runs/{run_id}/messages", content=body, headers={"content-type": "application/json"}
        )
        assert refused.status_code == 400, refused.text
    assert client.post("/runs", content=b"[" * 50_000).status_code == 400
    huge = json.dumps({"topic": "x" * 1024**2})
    assert client.post("/runs", content=huge).status_code == 413
    assert client.post(f"/runs/{run_id}/messages", json={"approved": True}).status_code == 202
    assert sse_events(client.get(f"/runs/{run_id}/events").text)[-1]["status"] == "completed"
    assert client.get(f"/runs/{run_id}").json()["value"]["approved"] is True


def test_the_service_bounds_the_runs_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request started a run whose handle the service kept forever."""
    monkeypatch.setenv("CAPSULE_JOURNAL", str(tmp_path / "journal.db"))
    example = load_example()
    example.MAX_LIVE_RUNS, example.MAX_ENDED_RUNS = 2, 1
    with TestClient(example.app) as client:
        first, second = (client.post("/runs", json={"topic": t}).json()["run_id"] for t in "ab")
        assert client.post("/runs", json={"topic": "c"}).status_code == 503
        client.post(f"/runs/{first}/cancel")
        third = client.post("/runs", json={"topic": "c"}).json()["run_id"]
        client.post(f"/runs/{second}/cancel")
        client.post(f"/runs/{third}/cancel")
        client.post("/runs", json={"topic": "d"})  # (the two oldest ended are let go)
        assert client.get(f"/runs/{first}").status_code == 404
        assert client.get(f"/runs/{second}").status_code == 404
        assert client.get(f"/runs/{third}").json()["status"] == "interrupted"
