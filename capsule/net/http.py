"""HTTP requests the host performs for tasks, with httpx on an event loop the
client owns: every hop (redirects too) checked against the task's allowed
hosts, the response body capped while it streams, a timeout on the whole
exchange, and cancellation that reaches a request in flight."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from capsule.net.redact import is_sensitive, redact_headers, redact_url

if TYPE_CHECKING:  # imported when the first request starts: most runs make none
    import httpx
    from anyio.from_thread import BlockingPortal

#: Redirects followed before giving up.
MAX_REDIRECTS = 10
#: Largest request body a task may send.
MAX_REQUEST_BYTES = 64 * 1024**2
#: The longest timeout a request may ask for.
MAX_TIMEOUT_S = 600.0
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class HttpFailure(Exception):
    """No response: ``kind`` is host_not_allowed, timeout, connection_failed,
    too_large or invalid_request."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "message": self.message})


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    timeout_s: float

    @classmethod
    def from_json(cls, text: str) -> HttpRequest:
        """The request a guest sent, checked; HttpFailure(invalid_request) if bad."""
        try:
            data = json.loads(text)
            method = str(data["method"]).upper()
            url = str(data["url"])
            headers = [(str(name), str(value)) for name, value in data.get("headers", [])]
            body = base64.b64decode(data.get("body", ""), validate=True)
            timeout = float(data.get("timeout_s", 30.0))
        except (ValueError, KeyError, TypeError) as exc:
            raise HttpFailure(
                "invalid_request", f"malformed request from the guest: {exc}"
            ) from None
        if method not in _METHODS:
            raise HttpFailure("invalid_request", f"unsupported HTTP method {method!r}")
        if len(body) > MAX_REQUEST_BYTES:
            raise HttpFailure(
                "invalid_request",
                f"a request body of {len(body):,} bytes exceeds the limit of "
                f"{MAX_REQUEST_BYTES:,} bytes",
            )
        if not 0 < timeout <= MAX_TIMEOUT_S:
            raise HttpFailure(
                "invalid_request", f"timeout {timeout!r} is not within (0, {MAX_TIMEOUT_S:g}] s"
            )
        return cls(method, url, headers, body, timeout)

    def journal_form(self) -> str:
        """The request as the journal keeps it, and as a replay compares it:
        secrets redacted, the body by its digest."""
        return json.dumps(
            {
                "method": self.method,
                "url": redact_url(self.url),
                "headers": redact_headers(self.headers),
                "body_sha256": hashlib.sha256(self.body).hexdigest(),
            }
        )


@dataclass(frozen=True)
class HttpResponse:
    status: int
    url: str
    headers: list[tuple[str, str]]
    body: bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "status": self.status,
                "url": self.url,
                "headers": self.headers,
                "body": base64.b64encode(self.body).decode(),
            }
        )


#: Whether a URL may be requested (raises ValueError for one that is not http(s)).
HostCheck = Callable[[str], bool]


class HttpClient:
    """One run's HTTP client: an event loop thread (anyio's blocking portal) and
    an httpx client with its connection pool, both closed with it."""

    def __init__(self, max_response_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()
        #: Starting the loop and client ahead of the first request (see warm_up).
        self._warming: threading.Thread | None = None

    def _started(self) -> BlockingPortal:
        # The event loop starts with the first request (most runs make none),
        # once, however many tasks make their first request at the same time.
        with self._lock:
            if self._portal is None:
                from anyio.from_thread import start_blocking_portal

                portal_cm = start_blocking_portal(name="capsule-http")
                portal = portal_cm.__enter__()
                try:
                    self._client = portal.call(_new_client)
                except BaseException:
                    portal_cm.__exit__(None, None, None)  # its loop thread stops
                    raise
                self._portal_cm, self._portal = portal_cm, portal
            return self._portal

    def warm_up(self) -> None:
        """Start the event loop and the client now, on a thread of their own
        (joined by close): the first request would wait for them, ~0.2 - 0.5 s
        (importing httpx, and the TLS context loading its CA bundle)."""
        with self._lock:
            if self._portal is not None or self._warming is not None:
                return
            self._warming = threading.Thread(
                target=self._warm, name="capsule-http-start", daemon=True
            )
            self._warming.start()

    def _warm(self) -> None:
        try:
            self._started()
        except Exception:
            pass  # the first request starts it again, and reports what fails then

    def close(self) -> None:
        """Close the connections and stop the event loop (if it ever started);
        safe to call again."""
        warming = self._warming
        if warming is not None:
            warming.join()
        with self._lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            assert self._client is not None
            portal.call(self._client.aclose)
            self._portal_cm.__exit__(None, None, None)

    def start(self, request: HttpRequest, allowed: HostCheck) -> Future[HttpResponse]:
        """Begin a request on the client's loop; cancel the future to abort it."""
        return self._started().start_task_soon(self._perform, request, allowed)

    async def _perform(self, request: HttpRequest, allowed: HostCheck) -> HttpResponse:
        import anyio
        import httpx

        assert self._client is not None
        client = self._client
        outgoing = _build(client, request)
        try:
            with anyio.fail_after(request.timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    _check_host(str(outgoing.url), allowed, request.url)
                    response = await client.send(outgoing, stream=True)
                    try:
                        next_request = response.next_request
                        if response.is_redirect and next_request is not None:
                            if _origin(next_request.url) != _origin(outgoing.url):
                                # httpx drops Authorization across origins; API keys
                                # and cookies must not follow either.
                                for name in list(next_request.headers):
                                    if is_sensitive(name):
                                        del next_request.headers[name]
                            outgoing = next_request
                            continue
                        body = await self._read(response, request)
                        return HttpResponse(
                            response.status_code,
                            str(response.url),
                            [(k, v) for k, v in response.headers.multi_items()],
                            body,
                        )
                    finally:
                        await response.aclose()
                raise HttpFailure(
                    "connection_failed",
                    f"{request.method} {redact_url(request.url)}: more than {MAX_REDIRECTS} redirects",
                )
        except TimeoutError:
            raise HttpFailure(
                "timeout",
                f"{request.method} {redact_url(request.url)} took longer than {request.timeout_s:g}s",
            ) from None
        except httpx.TimeoutException:
            raise HttpFailure(
                "timeout",
                f"{request.method} {redact_url(request.url)} took longer than {request.timeout_s:g}s",
            ) from None
        except httpx.InvalidURL as exc:
            raise HttpFailure(
                "invalid_request", f"invalid URL {redact_url(request.url)!r}: {exc}"
            ) from None
        except httpx.HTTPError as exc:
            raise HttpFailure(
                "connection_failed",
                f"{request.method} {redact_url(request.url)} failed: {type(exc).__name__}: "
                + str(exc).replace(request.url, redact_url(request.url)),
            ) from None

    async def _read(self, response: httpx.Response, request: HttpRequest) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_response_bytes:
            raise _too_large(request, self.max_response_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise _too_large(request, self.max_response_bytes)
            chunks.append(chunk)
        return b"".join(chunks)


def _new_client() -> httpx.AsyncClient:
    from http.cookiejar import CookieJar, DefaultCookiePolicy

    import httpx

    # No proxies or .netrc from the host's environment: a task reaches exactly the
    # hosts it was granted. No cookie is kept: a cookie one task received must never
    # go out with another task's request (grants are per task), nor differ between
    # a run and its replay.
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(MAX_TIMEOUT_S),
        cookies=jar,
    )


def _build(client: httpx.AsyncClient, request: HttpRequest) -> httpx.Request:
    import httpx

    try:
        headers = httpx.Headers(request.headers)
        if not any(name.lower() == "accept-encoding" for name, _ in request.headers):
            headers["accept-encoding"] = "identity"  # bodies as the server sent them
        return client.build_request(
            request.method,
            request.url,
            headers=headers,
            content=request.body or None,
            timeout=request.timeout_s,
        )
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError, TypeError) as exc:
        raise HttpFailure(
            "invalid_request", f"invalid request to {redact_url(request.url)!r}: {exc}"
        ) from None


def _check_host(url: str, allowed: HostCheck, first: str) -> None:
    try:
        ok = allowed(url)
    except ValueError as exc:
        raise HttpFailure("invalid_request", str(exc)) from None
    if not ok:
        via = "" if url == first else f" (a redirect from {redact_url(first)})"
        raise HttpFailure(
            "host_not_allowed",
            f"{redact_url(url)}{via}: the host is not in the task's allowed_hosts; grant it with "
            f"@task(allowed_hosts=[...])",
        )


def _origin(url: Any) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def _too_large(request: HttpRequest, limit: int) -> HttpFailure:
    return HttpFailure(
        "too_large",
        f"the response to {request.method} {redact_url(request.url)} is larger than the limit of "
        f"{limit:,} bytes ([policy] max_response_size in capsule.toml)",
    )
