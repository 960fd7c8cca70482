"""HTTP from tasks: ``get``, ``post``, ``put``, ``delete``, ``patch``, ``head``,
and for async code ``get_async`` and the others (awaited together, they are in
flight together).

Under ``capsule run`` the host performs the request, and only to the hosts the
task was granted (``@task(allowed_hosts=[...])``); redirects are followed only
to granted hosts, the response size is capped, and the exchange is journaled
(a resumed run gets the journaled response instead of sending it again).
In local mode (outside ``capsule run``), the request is made directly.
"""

from __future__ import annotations

import base64
import json as _json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from capsule.sdk import task as _task

#: Seconds a request may take, unless ``timeout=`` says otherwise.
DEFAULT_TIMEOUT_S = 30.0


class HttpError(Exception):
    """A request that got no response: ``kind`` says why."""

    kind = "http_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HostNotAllowed(HttpError):
    """The host (or a redirect's) was not granted to the task."""

    kind = "host_not_allowed"


class HttpTimeout(HttpError, TimeoutError):
    kind = "timeout"


class ConnectionFailed(HttpError):
    kind = "connection_failed"


class ResponseTooLarge(HttpError):
    kind = "too_large"


class InvalidRequest(HttpError, ValueError):
    kind = "invalid_request"


class TooManyRequests(HttpError):
    """The task has as many requests in flight as it may (async code): await
    some before starting more."""

    kind = "limit"


_ERRORS: dict[str, type[HttpError]] = {
    cls.kind: cls
    for cls in (
        HostNotAllowed,
        HttpTimeout,
        ConnectionFailed,
        ResponseTooLarge,
        InvalidRequest,
        TooManyRequests,
    )
}


def http_error(data: Mapping[str, Any]) -> HttpError:
    """The HttpError for an error the host reported."""
    return _ERRORS.get(str(data.get("kind")), HttpError)(str(data.get("message", "")))


class Headers(Mapping[str, str]):
    """Response headers: a mapping with case-insensitive names (repeated
    headers joined with ", ", as HTTP allows)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for name, value in pairs:
            key = name.lower()
            if key in self._items:
                value = f"{self._items[key][1]}, {value}"
            self._items[key] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


class Response:
    """An HTTP response: ``status_code``, ``headers``, ``content`` (bytes),
    ``text()``, ``json()`` and ``ok()``."""

    def __init__(self, status_code: int, headers: Headers, content: bytes, url: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.url = url

    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status_code < 300

    def text(self) -> str:
        charset = "utf-8"
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        return self.content.decode(charset, errors="replace")

    def json(self) -> Any:
        return _json.loads(self.content)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}] {self.url}>"


def request(
    method: str,
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    data: str | bytes | None = None,
    timeout: float | None = None,
) -> Response:
    """Send a request and return its response (any status); raises HttpError
    subclasses when there is no response."""
    payload = _payload(method, url, params, headers, json, data, timeout)
    return _response(_task.active_backend().http(payload))


async def request_async(
    method: str,
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    data: str | bytes | None = None,
    timeout: float | None = None,
) -> Response:
    """``request`` for async code: awaiting it lets the task's other coroutines
    run meanwhile, and requests awaited together (``asyncio.gather``) are in
    flight together, on the host."""
    payload = _payload(method, url, params, headers, json, data, timeout)
    return _response(await _task.active_backend().http_async(payload))


def _payload(
    method: str,
    url: str,
    params: Mapping[str, Any] | None,
    headers: Mapping[str, str] | None,
    json: Any,
    data: str | bytes | None,
    timeout: float | None,
) -> dict[str, Any]:
    """The request as the host takes it (see wit/capsule.wit, http.request)."""
    if json is not None and data is not None:
        raise InvalidRequest("give json= or data=, not both")
    sent_headers = [(str(k), str(v)) for k, v in (headers or {}).items()]
    body = b""
    if json is not None:
        body = _json.dumps(json).encode()
        if not any(k.lower() == "content-type" for k, _ in sent_headers):
            sent_headers.append(("Content-Type", "application/json"))
    elif isinstance(data, str):
        body = data.encode()
    elif isinstance(data, bytes | bytearray):
        body = bytes(data)
    elif data is not None:
        raise InvalidRequest(f"data= is str or bytes, not {type(data).__name__}")
    if params:
        parts = urlsplit(url)
        query = urlencode([(k, str(v)) for k, v in params.items()])
        url = urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))
    if timeout is not None and not timeout > 0:
        raise InvalidRequest(f"timeout= is a positive number of seconds, not {timeout!r}")
    return {
        "method": method.upper(),
        "url": url,
        "headers": sent_headers,
        "body": base64.b64encode(body).decode(),
        "timeout_s": DEFAULT_TIMEOUT_S if timeout is None else float(timeout),
    }


def _response(reply: dict[str, Any]) -> Response:
    return Response(
        int(reply["status"]),
        Headers([(str(k), str(v)) for k, v in reply["headers"]]),
        base64.b64decode(reply["body"]),
        str(reply["url"]),
    )


def get(url: str, **options: Any) -> Response:
    return request("GET", url, **options)


def post(url: str, **options: Any) -> Response:
    return request("POST", url, **options)


def put(url: str, **options: Any) -> Response:
    return request("PUT", url, **options)


def delete(url: str, **options: Any) -> Response:
    return request("DELETE", url, **options)


def patch(url: str, **options: Any) -> Response:
    return request("PATCH", url, **options)


def head(url: str, **options: Any) -> Response:
    return request("HEAD", url, **options)


async def get_async(url: str, **options: Any) -> Response:
    return await request_async("GET", url, **options)


async def post_async(url: str, **options: Any) -> Response:
    return await request_async("POST", url, **options)


async def put_async(url: str, **options: Any) -> Response:
    return await request_async("PUT", url, **options)


async def delete_async(url: str, **options: Any) -> Response:
    return await request_async("DELETE", url, **options)


async def patch_async(url: str, **options: Any) -> Response:
    return await request_async("PATCH", url, **options)


async def head_async(url: str, **options: Any) -> Response:
    return await request_async("HEAD", url, **options)


def request_directly(payload: dict[str, Any]) -> dict[str, Any]:
    """Local mode's request (outside ``capsule run``): made directly, no grants apply."""
    import urllib.error
    import urllib.request

    body = base64.b64decode(payload["body"])
    outgoing = urllib.request.Request(
        payload["url"],
        data=body or None,
        headers=dict(payload["headers"]),
        method=payload["method"],
    )
    try:
        with urllib.request.urlopen(outgoing, timeout=payload["timeout_s"]) as response:
            status, headers, content = response.status, response.getheaders(), response.read()
            url = response.url
    except urllib.error.HTTPError as exc:
        status, headers, content, url = exc.code, list(exc.headers.items()), exc.read(), exc.url
    except TimeoutError as exc:
        raise HttpTimeout(f"{payload['method']} {payload['url']} timed out: {exc}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionFailed(f"{payload['method']} {payload['url']} failed: {exc}") from None
    return {
        "status": status,
        "headers": headers,
        "body": base64.b64encode(content).decode(),
        "url": url,
    }
