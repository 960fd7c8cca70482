"""A web service that runs a Capsule workflow per request (Starlette).

    pip install -e '.[embed]' uvicorn
    uvicorn app:app --app-dir examples/embed

Runs are journaled where ``$CAPSULE_JOURNAL`` says (else
``.capsule/journal.db``), so ``capsule tui`` and ``capsule inspect`` see them.

- ``POST /runs`` ``{"topic": "..."}``: start a run (an ``Idempotency-Key``
  header makes a retried request return the same run); answers its id.
- ``GET /runs/{id}/events``: the run's events as server-sent events, one JSON
  object each (docs/events.md), from ``run_started`` to ``run_ended``.
- ``POST /runs/{id}/messages`` ``{"approved": true}``: a human's verdict,
  delivered to the run's ``main`` task (human in the loop).
- ``POST /runs/{id}/cancel``: cancel the run (it stays resumable).
- ``GET /runs/{id}``: the result once the run ended.

Its clients are not trusted: a request body is read up to MAX_BODY_BYTES, at
most MAX_LIVE_RUNS runs run at once, and the service keeps the handles of
the last MAX_ENDED_RUNS runs that ended (older ones: ``capsule inspect``).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from capsule.host import DeliveryError, InvalidRequest, RunError, RunHandle, Runtime
from capsule.supervisor.events import event_json

WORKFLOW = Path(__file__).with_name("workflow.py")
#: What a client may send as an Idempotency-Key (it becomes the run id).
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: The largest request body read (a topic, a verdict).
MAX_BODY_BYTES = 64 * 1024
#: Runs running at once; past it, POST /runs answers 503.
MAX_LIVE_RUNS = 64
#: Ended runs whose handles (events, result) are kept, newest first.
MAX_ENDED_RUNS = 256


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    # One Runtime for the whole service: its runs share one compiled sandbox,
    # and leaving it (shutdown) stops them resumably.
    async with Runtime() as runtime:
        yield {"runtime": runtime, "runs": {}}


async def start_run(request: Request) -> JSONResponse:
    body = await _json(request)
    topic = body.get("topic") if isinstance(body, dict) else None
    if not isinstance(topic, str) or not topic:
        return JSONResponse({"error": 'expected {"topic": "..."}'}, status_code=400)
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.fullmatch(key):
        return JSONResponse(
            {"error": "Idempotency-Key: 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit"},
            400,
        )
    runs: dict[str, RunHandle] = request.state.runs
    _forget_ended(runs)
    if key not in runs and sum(not handle.done for handle in runs.values()) >= MAX_LIVE_RUNS:
        return JSONResponse({"error": "too many runs at once; try again later"}, 503)
    runtime: Runtime = request.state.runtime
    try:
        handle = await runtime.start(WORKFLOW, topic, run_id=key)
    except InvalidRequest as exc:  # (a key another process runs, say)
        return JSONResponse({"error": str(exc)}, status_code=409)
    runs[handle.run_id] = handle
    return JSONResponse({"run_id": handle.run_id}, status_code=202)


def _forget_ended(runs: dict[str, RunHandle]) -> None:
    """Let go of the oldest ended runs' handles past MAX_ENDED_RUNS."""
    ended = [run_id for run_id, handle in runs.items() if handle.done]
    for run_id in ended[: max(0, len(ended) - MAX_ENDED_RUNS)]:
        del runs[run_id]


async def events(request: Request) -> StreamingResponse | JSONResponse:
    handle = _handle(request)
    if handle is None:
        return _not_found(request)

    async def stream() -> AsyncIterator[str]:
        # Each event is one line of JSON (the encoder escapes any newline a
        # task put in its output), so it is one SSE data line.
        async for event in handle.events():
            yield f"event: {event.type}\ndata: {event_json(event)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def send_message(request: Request) -> JSONResponse:
    handle = _handle(request)
    if handle is None:
        return _not_found(request)
    body = await _json(request)
    try:
        message_id = await handle.send("main", body)
    except DeliveryError as exc:
        return JSONResponse({"error": str(exc), "kind": exc.kind}, status_code=409)
    except InvalidRequest as exc:  # (NaN, nested too deep: not a message a task takes)
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse({"message_id": message_id}, status_code=202)


async def cancel(request: Request) -> JSONResponse:
    handle = _handle(request)
    if handle is None:
        return _not_found(request)
    await handle.cancel()
    return JSONResponse({"cancelled": True})


async def result(request: Request) -> JSONResponse:
    handle = _handle(request)
    if handle is None:
        return _not_found(request)
    if not handle.done:
        return JSONResponse({"run_id": handle.run_id, "status": "running"})
    try:
        outcome = await handle.result()
    except RunError as exc:
        return JSONResponse({"run_id": handle.run_id, "error": str(exc)}, status_code=500)
    return JSONResponse(outcome.model_dump(mode="json"))


def _handle(request: Request) -> RunHandle | None:
    handle: RunHandle | None = request.state.runs.get(request.path_params["run_id"])
    return handle


def _not_found(request: Request) -> JSONResponse:
    return JSONResponse({"error": f"no run {request.path_params['run_id']!r}"}, 404)


async def _json(request: Request) -> Any:
    """The request's JSON body (None if it is not JSON); 413 past MAX_BODY_BYTES."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is over {MAX_BODY_BYTES:,} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # (UnicodeDecodeError too)
        return None


app = Starlette(
    routes=[
        Route("/runs", start_run, methods=["POST"]),
        Route("/runs/{run_id}", result, methods=["GET"]),
        Route("/runs/{run_id}/events", events, methods=["GET"]),
        Route("/runs/{run_id}/messages", send_message, methods=["POST"]),
        Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
    ],
    lifespan=lifespan,
)
