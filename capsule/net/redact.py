"""Secrets kept out of the journal, events and the TUI: credential headers and
key-like URL parameters are replaced by a marker."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "[redacted]"
_SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "set-cookie2"}
)
#: A header or parameter whose name contains one of these carries a credential.
_SENSITIVE_WORDS = (
    "token",
    "secret",
    "password",
    "passwd",
    "api-key",
    "apikey",
    "api_key",
    "auth",
    "session",
    "signature",
    "credential",
)


def is_sensitive(name: str) -> bool:
    lowered = name.lower()
    return (
        lowered in _SENSITIVE_HEADERS
        or any(word in lowered for word in _SENSITIVE_WORDS)
        or (lowered in ("key", "x-key") or lowered.endswith(("-key", "_key")))
    )


def redact_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, REDACTED if is_sensitive(name) else value) for name, value in headers]


def redact_url(url: str) -> str:
    """The URL with the values of key-like query parameters (and any password in
    it) replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_sensitive(name) for name, _ in pairs):
            query = urlencode(
                [(name, REDACTED if is_sensitive(name) else value) for name, value in pairs],
                safe="[]",
            )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_response_json(answer: str) -> str:
    """An HTTP response (HttpResponse.to_json) with credential headers and its URL
    redacted; anything else as it is."""
    try:
        data = json.loads(answer)
    except ValueError:
        return answer
    if isinstance(data, dict) and "headers" in data:
        data["headers"] = redact_headers([(k, v) for k, v in data["headers"]])
        data["url"] = redact_url(str(data.get("url", "")))
        return json.dumps(data)
    return answer
