"""HTTP requests the host performs for tasks, with httpx on an event loop the
client owns: every hop (redirects too) checked against the task's allowed
hosts, the response body capped while it streams, a timeout on the whole
exchange, and cancellation that reaches a request in flight."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from capsule.net.redact import (
    KnownSecrets,
    Secrets,
    credentials,
    is_sensitive,
    redact_headers,
    redact_text,
    redact_url,
)
from capsule.sandbox import guest_data
from capsule.sandbox.grants import DEFAULT_PORTS, url_parts
from capsule.sandbox.guest_data import ProtocolError

if TYPE_CHECKING:  # imported when the first request starts: most runs make none
    import httpx
    from anyio.from_thread import BlockingPortal

#: Redirects followed before giving up.
MAX_REDIRECTS = 10
#: Largest request body a task may send.
MAX_REQUEST_BYTES = 64 * 1024**2
#: The longest timeout a request may ask for.
MAX_TIMEOUT_S = 600.0
#: The longest URL a task may request.
MAX_URL_CHARS = 16 * 1024
#: Headers a request may have, their size in all (names and values), and the
#: longest name.
MAX_HEADERS = 128
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_NAME_CHARS = 256
#: The longest request a guest may hand over: its body in base64, and room for
#: the rest with every character escaped.
MAX_REQUEST_JSON_CHARS = (
    4 * (MAX_REQUEST_BYTES // 3 + 1)
    + 6 * (MAX_URL_CHARS + MAX_HEADER_BYTES + 8 * MAX_HEADERS)
    + 4096
)
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_FIELDS = frozenset({"method", "url", "headers", "body", "timeout_s"})
#: Headers that say where a request goes, to the server or to a proxy or CDN in
#: front of it (domain fronting): the URL, checked against the task's
#: allowed_hosts, decides that alone.
_ROUTING_HEADERS = frozenset(
    {
        "host",
        "forwarded",
        "x-forwarded-host",
        "x-forwarded-server",
        "x-host",
        "x-http-host-override",
        "x-original-host",
        "x-original-url",
        "x-rewrite-url",
    }
)
#: Headers that frame the request on its connection (a length that disagrees
#: with the body smuggles a second request): httpx sets them from the body.
_FRAMING_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


class HttpFailure(Exception):
    """No response: ``kind`` is host_not_allowed, timeout, connection_failed,
    too_large or invalid_request."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "message": self.message})

    def redacted(self, secrets: Secrets) -> HttpFailure:
        """The failure as the task, the journal and the terminal see it: what it
        quotes (URLs, httpx's and h11's texts) redacted."""
        return HttpFailure(self.kind, redact_text(self.message, secrets))


async def _sent_after(after: Future[None]) -> None:
    """Return once ``after`` is done; HttpFailure (connection_failed) if it
    failed: the request is not sent."""
    try:
        if not after.done():
            import asyncio

            # (The client's loop is asyncio's, its own or the run's: the
            # future's end wakes it through call_soon_threadsafe.)
            await asyncio.wrap_future(after)
        after.result()
    except Exception as exc:
        raise HttpFailure("connection_failed", f"the request was not sent: {exc}") from None


def _invalid(message: str) -> HttpFailure:
    return HttpFailure("invalid_request", message)


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    timeout_s: float

    @classmethod
    def from_json(cls, text: str) -> HttpRequest:
        """The request a guest sent, checked; HttpFailure(invalid_request) if bad.
        Its messages name what is wrong, never quote what the guest sent."""
        if len(text) > MAX_REQUEST_JSON_CHARS:
            raise _invalid(f"the request is larger than {MAX_REQUEST_JSON_CHARS:,} characters")
        try:
            data = guest_data.json_value(text, "the request")
        except ProtocolError as exc:  # (says where, never quotes what)
            raise _invalid(str(exc)) from None
        if not isinstance(data, dict):
            raise _invalid("the request is not a JSON object")
        if not data.keys() <= _FIELDS:
            raise _invalid("the request has fields other than " + ", ".join(sorted(_FIELDS)))
        method = data.get("method")
        if not isinstance(method, str) or method.upper() not in _METHODS:
            raise _invalid("the method is not one of " + ", ".join(sorted(_METHODS)))
        url = data.get("url")
        if not isinstance(url, str):
            raise _invalid("the URL is not a string")
        if len(url) > MAX_URL_CHARS:
            raise _invalid(f"the URL is longer than {MAX_URL_CHARS:,} characters")
        return cls(
            method.upper(),
            url,
            _headers(data.get("headers", [])),
            _body(data.get("body", "")),
            _timeout(data.get("timeout_s", 30.0)),
        )

    @cached_property
    def credentials(self) -> frozenset[str]:
        """The credentials the request carries (see redact.credentials)."""
        return credentials(self.url, self.headers)

    def journal_form(self, granted: Secrets) -> str:
        """The request as the journal keeps it, and as a replay compares it:
        secrets redacted, the body by its digest. It depends on the request and
        the granted values alone, so that a replay makes it alike."""
        secrets = granted.union(self.credentials)
        return json.dumps(
            {
                "method": self.method,
                "url": redact_url(self.url, secrets),
                "headers": redact_headers(self.headers, secrets),
                "body_sha256": hashlib.sha256(self.body).hexdigest(),
            }
        )


def _headers(given: object) -> list[tuple[str, str]]:
    if not isinstance(given, list):
        raise _invalid("the headers are not a list of [name, value] pairs")
    if len(given) > MAX_HEADERS:
        raise _invalid(f"a request has at most {MAX_HEADERS} headers")
    headers: list[tuple[str, str]] = []
    size = 0
    for number, pair in enumerate(given, 1):
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], str)
        ):
            raise _invalid(f"header {number} is not a [name, value] pair of strings")
        name, value = pair
        size += len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            raise _invalid(f"the headers are larger than {MAX_HEADER_BYTES:,} characters in all")
        if len(name) > MAX_HEADER_NAME_CHARS or not _HEADER_NAME.fullmatch(name):
            raise _invalid(
                f"the name of header {number} is not an HTTP header name (up to "
                f"{MAX_HEADER_NAME_CHARS} letters, digits and !#$%&'*+-.^_`|~)"
            )
        lowered = name.lower()
        if lowered in _ROUTING_HEADERS:
            raise _invalid(
                f"a task cannot set the {lowered!r} header: where a request goes is "
                f"its URL's host, checked against the task's allowed_hosts"
            )
        if lowered in _FRAMING_HEADERS:
            raise _invalid(
                f"a task cannot set the {lowered!r} header: the host frames the request "
                f"(its length from its body) and manages the connection"
            )
        value = value.strip(" \t")
        if not _HEADER_VALUE.fullmatch(value):
            raise _invalid(
                f"the value of header {lowered!r} has a character HTTP does not allow "
                f"there (a line break, a control character or non-ASCII)"
            )
        headers.append((name, value))
    return headers


def _body(given: object) -> bytes:
    if not isinstance(given, str):
        raise _invalid("the body is not a base64 string")
    if len(given) > 4 * (MAX_REQUEST_BYTES // 3 + 1):
        raise _too_big_body()
    try:
        body = base64.b64decode(given, validate=True)
    except ValueError:
        raise _invalid("the body is not valid base64") from None
    if len(body) > MAX_REQUEST_BYTES:
        raise _too_big_body()
    return body


def _too_big_body() -> HttpFailure:
    return _invalid(f"a request body may have at most {MAX_REQUEST_BYTES:,} bytes")


def _timeout(given: object) -> float:
    # (Compared before any conversion: an int too large for a float is just too large.)
    if (
        isinstance(given, bool)
        or not isinstance(given, int | float)
        or not 0 < given <= MAX_TIMEOUT_S
    ):
        raise _invalid(f"timeout_s is not a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return float(given)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    url: str
    headers: list[tuple[str, str]]
    body: bytes

    def to_json(self) -> str:
        """The response as the task gets it."""
        return self._json(self.url, self.headers, self._body_base64)

    def journal_json(self, secrets: Secrets) -> str:
        """The response as the journal keeps it: its URL, headers and body with
        secrets redacted (the body searched for known secrets only)."""
        body = secrets.data(self.body)
        return self._json(
            redact_url(self.url, secrets),
            redact_headers(self.headers, secrets),
            self._body_base64 if body is self.body else base64.b64encode(body).decode(),
        )

    @cached_property
    def _body_base64(self) -> str:
        return base64.b64encode(self.body).decode()

    def _json(self, url: str, headers: list[tuple[str, str]], body: str) -> str:
        return json.dumps({"status": self.status, "url": url, "headers": headers, "body": body})


@dataclass
class Transfer:
    """What an exchange in flight makes the host hold: the request's body and
    the response's so far (the run's memory budget counts it for the task)."""

    bytes: int = 0


#: Whether a URL may be requested (raises ValueError for one that is not http(s)).
HostCheck = Callable[[str], bool]


class HttpClient:
    """One run's HTTP client: an httpx client with its connection pool, whose
    requests run on an event loop (``portal``: the run's, given as a way to
    reach it; else one of its own, on a thread it starts with the first
    request), closed with it."""

    def __init__(
        self,
        max_response_bytes: int,
        granted: Iterable[str] = (),
        portal: Callable[[], BlockingPortal] | None = None,
    ) -> None:
        self.max_response_bytes = max_response_bytes
        #: What the run knows to be secret: ``granted`` (the values of its tasks'
        #: env grants), and the credentials its requests carry.
        self.secrets = KnownSecrets(granted)
        self._loop_portal = portal
        #: The portal its requests went through, once one did (the run's
        #: loop's, or its own loop thread's: then ``_portal_cm`` stops it).
        self._portal: BlockingPortal | None = None
        self._portal_cm: Any = None
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()
        #: Making the client ahead of the first request (see warm_up).
        self._warming: threading.Thread | None = None

    def _made(self) -> httpx.AsyncClient:
        # Made with the first request (most runs make none), once, however
        # many tasks make their first request at the same time; on the
        # calling thread, never on the loop (importing httpx and loading the
        # CA bundle take long).
        with self._lock:
            if self._client is None:
                self._client = _new_client()
            return self._client

    def _started(self) -> BlockingPortal:
        """The portal requests are started through (its own loop thread
        started now, if it has no run's loop and none started yet)."""
        self._made()
        with self._lock:
            if self._portal is None:
                if self._loop_portal is not None:
                    self._portal = self._loop_portal()
                else:
                    from anyio.from_thread import start_blocking_portal

                    portal_cm = start_blocking_portal(name="capsule-http")
                    self._portal, self._portal_cm = portal_cm.__enter__(), portal_cm
            return self._portal

    def warm_up(self) -> None:
        """Make the client now, on a thread of its own (joined by close): the
        first request would wait for it, ~0.2 - 0.5 s (importing httpx, and
        the TLS context loading its CA bundle)."""
        with self._lock:
            if self._client is not None or self._warming is not None:
                return
            self._warming = threading.Thread(
                target=self._warm, name="capsule-http-start", daemon=True
            )
            self._warming.start()

    def _warm(self) -> None:
        try:
            self._made()
        except Exception:
            pass  # the first request makes it again, and reports what fails then

    def close(self) -> None:
        """Close the connections, and stop its own event loop (if it ever
        started one); before the run's loop closes. Safe to call again."""
        warming = self._warming
        if warming is not None:
            warming.join()
        with self._lock:
            # (A client no request used holds no connection: let go as it is.)
            client, self._client = self._client, None
            portal, self._portal = self._portal, None
            portal_cm, self._portal_cm = self._portal_cm, None
        if client is not None and portal is not None:
            # (A run's loop that ended took its connections' tasks with it.)
            with contextlib.suppress(RuntimeError):
                portal.call(client.aclose)
        if portal_cm is not None:
            portal_cm.__exit__(None, None, None)

    def start(
        self,
        request: HttpRequest,
        allowed: HostCheck,
        secrets: Secrets,
        held: Transfer | None = None,
        after: Future[None] | None = None,
    ) -> Future[HttpResponse]:
        """Begin a request on the client's loop; cancel the future to abort it.
        A failure's message has ``secrets`` (and what redact_text finds) redacted.
        ``held`` counts what the exchange makes the host hold meanwhile.
        ``after``: the request is sent once it is done (what it depends on is
        committed to the journal), no thread waiting meanwhile; if it failed,
        the request fails (connection_failed), unsent."""
        return self._started().start_task_soon(
            self._perform, request, allowed, secrets, held or Transfer(), after
        )

    async def _perform(
        self,
        request: HttpRequest,
        allowed: HostCheck,
        secrets: Secrets,
        held: Transfer,
        after: Future[None] | None,
    ) -> HttpResponse:
        held.bytes = len(request.body)
        try:
            if after is not None:
                await _sent_after(after)
            return await self._exchange(request, allowed, secrets, held)
        except HttpFailure as failure:
            raise failure.redacted(secrets) from None

    async def _exchange(
        self, request: HttpRequest, allowed: HostCheck, secrets: Secrets, held: Transfer
    ) -> HttpResponse:
        import anyio
        import httpx

        assert self._client is not None
        client = self._client
        shown = redact_url(request.url, secrets)
        outgoing = _build(client, request, shown)
        try:
            with anyio.fail_after(request.timeout_s):
                for hop in range(MAX_REDIRECTS + 1):
                    _check_destination(outgoing.url, allowed, secrets, shown if hop else None)
                    response = await client.send(outgoing, stream=True)
                    try:
                        next_request = response.next_request
                        if response.is_redirect and next_request is not None:
                            if _origin(next_request.url) != _origin(outgoing.url):
                                # httpx drops Authorization across origins; API keys,
                                # cookies and anything carrying a secret must not
                                # follow either.
                                for name, value in list(next_request.headers.items()):
                                    if is_sensitive(name) or secrets.found_in(value):
                                        del next_request.headers[name]
                            outgoing = next_request
                            continue
                        body = await self._read(response, request, shown, held)
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
                    f"{request.method} {shown}: more than {MAX_REDIRECTS} redirects",
                )
        except (TimeoutError, httpx.TimeoutException):
            raise HttpFailure(
                "timeout", f"{request.method} {shown} took longer than {request.timeout_s:g}s"
            ) from None
        except httpx.InvalidURL as exc:
            raise _invalid(f"invalid URL {shown}: {exc}") from None
        except (httpx.HTTPError, ValueError) as exc:
            # (ValueError: from httpx or h11 on what a server sent, or a URL httpx
            # could build but not send.)
            raise HttpFailure(
                "connection_failed", f"{request.method} {shown} failed: {type(exc).__name__}: {exc}"
            ) from None

    async def _read(
        self, response: httpx.Response, request: HttpRequest, shown: str, held: Transfer
    ) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_response_bytes:
            raise _too_large(request, shown, self.max_response_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise _too_large(request, shown, self.max_response_bytes)
            chunks.append(chunk)
            held.bytes = len(request.body) + size
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


def _build(client: httpx.AsyncClient, request: HttpRequest, shown: str) -> httpx.Request:
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
        raise _invalid(f"invalid request to {shown}: {exc}") from None


def _check_destination(
    url: httpx.URL, allowed: HostCheck, secrets: Secrets, redirected_from: str | None
) -> None:
    """Refuse a hop whose host the task was not granted. The host checked is
    the one httpx connects to (its parse of the URL, not another parser's): a
    URL two parsers read differently cannot pass one check and go elsewhere."""
    shown = redact_url(str(url), secrets)
    scheme = url.scheme
    if scheme not in DEFAULT_PORTS:
        raise _invalid(f"only http and https URLs can be requested, not {shown}")
    host = url.raw_host.decode("ascii", "replace").lower()
    if not host:
        raise _invalid(f"the URL {shown} has no host")
    port = url.port or DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise _invalid(f"the port of {shown} is not between 1 and 65535")
    if ":" in host:  # an IPv6 literal, in brackets in a URL
        host = f"[{host}]"
    canonical = f"{scheme}://{host}:{port}/"
    try:
        ok = url_parts(canonical) == (scheme, host, port) and allowed(canonical)
    except ValueError:
        ok = False
    if not ok:
        via = "" if redirected_from is None else f" (a redirect from {redirected_from})"
        raise HttpFailure(
            "host_not_allowed",
            f"{shown}{via}: the host is not in the task's allowed_hosts; grant it with "
            f"@task(allowed_hosts=[...])",
        )


def _origin(url: Any) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def _too_large(request: HttpRequest, shown: str, limit: int) -> HttpFailure:
    return HttpFailure(
        "too_large",
        f"the response to {request.method} {shown} is larger than the limit of "
        f"{limit:,} bytes ([policy] max_response_size in capsule.toml)",
    )
