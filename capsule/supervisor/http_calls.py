"""The HTTP host calls: a request performed on the run's client (blocking, or
started as an operation), journaled with its secrets redacted, and reported as
an HttpExchange event."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from capsule.net.http import HttpClient, HttpFailure, HttpRequest, HttpResponse, Transfer
from capsule.net.redact import Secrets, redact_url
from capsule.sandbox.engine import Invocation
from capsule.supervisor.events import EventStream, HttpExchange
from capsule.supervisor.ids import EventIds
from capsule.supervisor.journaled import JournaledSteps, StepDriver
from capsule.supervisor.live import LiveTree
from capsule.supervisor.operation_calls import OperationCalls
from capsule.supervisor.operations import Operation, http_operation
from capsule.supervisor.waits import Answer, Wait


class HttpCalls:
    """HTTP requests of a run's tasks."""

    def __init__(
        self,
        client: HttpClient,
        journal: JournaledSteps,
        tree: LiveTree,
        operations: OperationCalls,
        events: EventStream,
        run_id: str,
        before_reporting: Callable[[str], None],
        drive: StepDriver,
    ) -> None:
        self.client = client
        self.journal = journal
        self.tree = tree
        self.operations = operations
        self.events = events
        self.run_id = run_id
        #: Called with the task's id before an exchange of its is reported
        #: (its output is shown first).
        self.before_reporting = before_reporting
        #: Runs the steps that may wait (a blocking request), as the run's core does.
        self.drive = drive

    def _request(
        self, caller: Invocation, kind: str, request_json: str
    ) -> HttpRequest | tuple[bool, str]:
        """The guest's request, parsed; or, for a malformed one, the answer of
        its step (recorded by its digest: it may still carry secrets)."""
        try:
            return HttpRequest.from_json(request_json)
        except HttpFailure as exc:
            invalid = (False, exc.redacted(self.client.secrets.granted).to_json())
            digest = hashlib.sha256(request_json.encode()).hexdigest()
            return self.journal.step(caller, kind, json.dumps({"invalid": digest}), lambda: invalid)

    def http(self, caller: Invocation, request_json: str) -> Any:
        """A blocking request: returns as the run's StepDriver does."""
        attempt = self.tree.attempts[caller]
        known = self.client.secrets
        request = self._request(caller, "http", request_json)
        if not isinstance(request, HttpRequest):
            return request
        secrets = known.learn(request.credentials)
        # The response, for its journaled form (made only if it is journaled).
        received: list[HttpResponse] = []

        def perform() -> Wait:
            started = time.monotonic()
            attempt.transfer = Transfer()
            future = self.client.start(
                request, caller.grants.allows, secrets, attempt.transfer, self.journal.committed()
            )
            future.add_done_callback(lambda _: attempt.wake())

            def finish(done: bool) -> Answer:
                attempt.transfer = None
                if not done:
                    future.cancel()  # the caller must stop; the request is abandoned
                    return False, "{}"
                return self._ended(caller, request, secrets, future, started, received)

            return Wait(attempt, "http", future.done, finish)

        def for_journal(answer: str) -> str:
            return received[0].journal_json(secrets) if received else answer

        # Sent once what the task did before it is committed (a crash cannot
        # lose its inputs: a resume sends it again, the same); durable: once
        # its response was seen, a crash must not send it again.
        return self.drive(
            caller,
            "http",
            request.journal_form(known.granted),
            perform,
            durable=True,
            for_journal=for_journal,
        )

    def _ended(
        self,
        caller: Invocation,
        request: HttpRequest,
        secrets: Secrets,
        future: Future[HttpResponse],
        started: float,
        received: list[HttpResponse],
    ) -> tuple[bool, str]:
        """The answer of a request that ended (its response is added to
        ``received``), reported as an HttpExchange event."""
        status: int | None = None
        error_kind: str | None = None
        try:
            response = future.result()
            received.append(response)
            status = response.status
            answer = True, response.to_json()
        except HttpFailure as exc:  # (its message redacted by the client)
            error_kind = exc.kind
            answer = False, exc.to_json()
        self.before_reporting(caller.task_id)
        self.events.emit(
            HttpExchange(
                **EventIds(run_id=self.run_id, task_id=caller.task_id, task=caller.task),
                method=request.method,
                url=redact_url(request.url, secrets),
                status=status,
                error_kind=error_kind,
                duration_ms=(time.monotonic() - started) * 1000,
                request_bytes=len(request.body),
                response_bytes=len(received[0].body) if received else 0,
            )
        )
        return answer

    def start_http(self, caller: Invocation, request_json: str) -> tuple[bool, str]:
        """Start a request as an operation (see operations.py)."""
        known = self.client.secrets
        request = self._request(caller, "http_start", request_json)
        if not isinstance(request, HttpRequest):
            return request
        secrets = known.learn(request.credentials)

        # Sent once what the task did before it is committed, as a blocking
        # request is.
        def operation(handle: int) -> Operation:
            return http_operation(
                handle,
                lambda transfer: self.client.start(
                    request, caller.grants.allows, secrets, transfer, self.journal.committed()
                ),
                lambda future, started, received: self._ended(
                    caller, request, secrets, future, started, received
                ),
                secrets,
            )

        return self.operations.start(
            self.tree.attempts[caller], "http_start", request.journal_form(known.granted), operation
        )
