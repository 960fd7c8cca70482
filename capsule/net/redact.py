"""Secrets kept out of the journal, events and the terminal.

A value is redacted for what it is called or where it stands: the value of a
header or URL parameter whose name says it is a credential, a URL's userinfo
and fragment, URL path segments and parameter values shaped like tokens. And
for what it is: every value known to be secret (``Secrets``: what a task was
granted through ``env=``, and every credential found the first way) is
replaced wherever it appears, in the forms a URL gives it. Values shorter than
``MIN_SECRET_CHARS`` are redacted only the first way: replacing them wherever
they appear would hide too much.

Nothing here parses with a parser that can fail: a URL no parser accepts is
split by its delimiters alone, so that whatever a task sends, its journaled
and shown form is redacted."""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import quote, quote_plus, unquote, unquote_plus

REDACTED = "[redacted]"
#: Shorter values are not replaced where they appear, only where they stand.
MIN_SECRET_CHARS = 8
#: Credentials of requests a run remembers, and the longest (beyond: redacted in
#: their own exchange only).
MAX_LEARNED = 64
MAX_LEARNED_CHARS = 4096

_SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "set-cookie2"}
)
#: A name containing one of these names a credential.
_SENSITIVE_PARTS = (
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "apikey",
    "api-key",
    "api_key",
    "auth",
    "session",
    "signature",
    "credential",
    "bearer",
    "jwt",
    "cookie",
    "private",
)
#: A name with one of these as a word (between separators or at a camelCase step).
_SENSITIVE_WORDS = frozenset({"key", "pwd", "pw", "pass", "sig", "sid", "otp", "csrf", "xsrf"})
_SENSITIVE_PART = re.compile("|".join(map(re.escape, _SENSITIVE_PARTS)))
_SENSITIVE_WORD = re.compile("|".join(map(re.escape, _SENSITIVE_WORDS)))
#: Names too common as words to count there, sensitive as a whole (OAuth's ``code``).
_SENSITIVE_NAMES = frozenset({"code"})
#: Path segments after which the next one is a secret (Slack's, GitHub's, Discord's hooks).
_SECRET_PARENTS = frozenset(
    {"hooks", "hook", "webhooks", "webhook", "token", "tokens", "key", "keys", "secret", "secrets"}
)
#: Headers whose value is a URL, perhaps relative.
_URL_HEADERS = frozenset({"location", "content-location", "referer"})
#: URLs inside URLs' parameters looked into (a redirect_uri's own query).
_MAX_NESTING = 2
#: A Telegram bot's path: /bot<id>:<token>/method.
_BOT_TOKEN = re.compile(r"bot\d+:[A-Za-z0-9_-]+")
_BOT_PREFIX = re.compile(r"^bot\d+:(?=[A-Za-z0-9_-]+$)")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-.~+/=:]{20,}")
_CAMEL_STEP = re.compile(r"([a-z0-9])([A-Z])")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
#: A URL in free text. It starts only where a run of scheme characters starts,
#: and a scheme is at most 32 of them: linear in the text (a run of letters
#: before "://" was scanned again from every letter: seconds for 64 KB).
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,31}:[/\\]{2}[^\s'\"<>]*")
#: What terminals act on, or what could pass for a line break: escaped where shown.
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)
#: Characters a URL may hold as they are (others are percent-encoded in it).
_URL_CHARS = "!#$%&'()*+,-./:;=?@[]_~"


@lru_cache(maxsize=1024)
def is_sensitive(name: str) -> bool:
    """Whether a header or URL parameter of this name carries a credential."""
    lowered = name.lower()
    if lowered in _SENSITIVE_HEADERS or lowered in _SENSITIVE_NAMES:
        return True
    if _SENSITIVE_PART.search(lowered):
        return True
    if not _SENSITIVE_WORD.search(lowered):  # (the words are not even in it)
        return False
    words = re.split(r"[^a-z0-9]+", _CAMEL_STEP.sub(r"\1_\2", name).lower())
    return not _SENSITIVE_WORDS.isdisjoint(words)


def looks_like_token(text: str) -> bool:
    """Long, of the characters of keys and tokens, with lower and upper case
    letters and digits: a generated credential (not a word, a UUID or a hash)."""
    return (
        len(text) >= 20
        and _TOKEN_CHARS.fullmatch(text) is not None
        and any(c.islower() for c in text)
        and any(c.isupper() for c in text)
        and any(c.isdigit() for c in text)
    )


class Secrets:
    """Values known to be secret (those of at least ``MIN_SECRET_CHARS``),
    replaced wherever they appear, as they are and percent-encoded."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = frozenset(v for v in values if _long_enough(v))
        texts: set[str] = set()
        datas: set[bytes] = set()
        for value in self.values:
            encoded = _utf8(value)
            forms = {
                value,
                repr(value)[1:-1],
                quote(encoded, safe=""),
                quote(encoded, safe="/"),
                quote(encoded, safe=_URL_CHARS),
                quote_plus(encoded, safe=""),
            }
            texts |= forms
            datas |= {encoded} | {form.encode() for form in forms if form.isascii()}
        # Longest first: a form inside another is replaced after it.
        self._texts = sorted(texts, key=len, reverse=True)
        self._datas = sorted(datas, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.values)

    def union(self, values: Iterable[str]) -> Secrets:
        return Secrets(self.values | frozenset(values))

    def text(self, text: str) -> str:
        for form in self._texts:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def data(self, data: bytes) -> bytes:
        """``data`` with every secret replaced (``data`` itself if none is in it).
        One search per form: a few for most runs."""
        for form in self._datas:
            if form in data:
                data = data.replace(form, REDACTED.encode())
        return data

    def found_in(self, text: str) -> bool:
        return any(form in text for form in self._texts)


NO_SECRETS = Secrets()


class KnownSecrets:
    """What a run knows to be secret: the values granted to its tasks, and the
    credentials its tasks' requests carried (the first ``MAX_LEARNED``)."""

    def __init__(self, granted: Iterable[str]) -> None:
        self.granted = Secrets(granted)
        self._known = self.granted
        self._lock = threading.Lock()

    def learn(self, credentials: frozenset[str]) -> Secrets:
        """Every known secret, ``credentials`` among them."""
        with self._lock:
            known = self._known
            new = {value for value in credentials if _long_enough(value)} - known.values
            room = MAX_LEARNED - (len(known.values) - len(self.granted.values))
            kept = [value for value in new if len(value) <= MAX_LEARNED_CHARS][: max(room, 0)]
            if kept:
                known = self._known = known.union(kept)
        return known if new <= known.values else known.union(new)


def credentials(url: str, headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The credentials a request carries: values of credential headers (with
    their tokens, Basic passwords and cookies), the URL's userinfo (with the
    Basic credentials httpx makes of it), values of key-like parameters (in its
    query, fragment, path parameters and nested URLs), and token-like path
    segments and values. (Not a fragment as a whole: it is hidden where it
    stands, but anchors are no secret elsewhere.)"""
    found = _url_credentials(url, 0)
    for name, value in headers:
        if is_sensitive(name):
            found |= _header_credentials(value)
    return frozenset(found)


def _url_credentials(url: str, depth: int) -> set[str]:
    found: set[str] = set()
    parts = _Parts(url)
    if parts.userinfo:
        user, _, password = parts.userinfo.partition(":")
        found |= {parts.userinfo, unquote(parts.userinfo), password, unquote(password)}
        basic = f"{unquote(user)}:{unquote(password)}"
        found.add(base64.b64encode(_utf8(basic)).decode())
    for segment, previous in _segments(parts.path):
        if _is_secret_segment(segment, previous, depth):
            # The token of /bot<id>:<token>, the value of ;name=value, or all of it.
            matrix = _parameters_credentials(segment.partition(";")[2], depth)
            secret = _BOT_PREFIX.sub("", segment.partition(";")[0])
            found |= matrix or {secret, _plain(secret)}
    for query in (parts.query, parts.fragment):
        found |= _parameters_credentials(query or "", depth)
    return found


def _parameters_credentials(query: str, depth: int) -> set[str]:
    found: set[str] = set()
    for name, value in _parameters(query):
        found |= _parameter_credentials(name, value, depth)
    return found


def _parameter_credentials(name: str, value: str, depth: int) -> set[str]:
    """The credentials of one parameter (none: it is not secret): its value if
    its name or shape says so, and those of a URL in it (next=, redirect_uri=)."""
    if not value:
        return set()
    plain = _plain(value, plus=True)
    if is_sensitive(_plain(name, plus=True)) or looks_like_token(plain):
        return {value, plain}
    if _is_url(plain) and depth < _MAX_NESTING:
        nested = _url_credentials(plain, depth + 1)
        return nested | {value, plain} if nested else set()
    return set()


def redact_url(url: str, secrets: Secrets = NO_SECRETS) -> str:
    """The URL as it may be journaled or shown, whatever it is: userinfo,
    fragment, key-like parameter values, token-like segments and values, and
    known secrets replaced; what a terminal would act on percent-encoded."""
    return _percent_unprintable(secrets.text(_redact_by_place(url)))


@lru_cache(maxsize=32)  # (an exchange shows its URL in the journal, an event, errors)
def _redact_by_place(url: str) -> str:
    parts = _Parts(url)
    redacted = [parts.scheme, parts.slashes]
    if parts.userinfo is not None:
        redacted.append(f"{REDACTED}@")
    redacted.append(parts.host)
    for separator, segment, previous in _path_pieces(parts.path):
        redacted.append(
            separator + (REDACTED if _is_secret_segment(segment, previous) else segment)
        )
    if parts.query is not None:
        redacted.append("?" + _redact_parameters(parts.query))
    if parts.fragment is not None:
        redacted.append("#" + (REDACTED if parts.fragment else ""))
    return "".join(redacted)


def redact_headers(
    headers: Iterable[tuple[str, str]], secrets: Secrets = NO_SECRETS
) -> list[tuple[str, str]]:
    """Headers as they may be journaled: credential headers' values replaced,
    URLs in the others (Location, Referer, Link) redacted, known secrets too."""
    return [(secrets.text(name), _redact_header(name, value, secrets)) for name, value in headers]


def _redact_header(name: str, value: str, secrets: Secrets) -> str:
    if is_sensitive(name):
        return REDACTED
    if name.lower() in _URL_HEADERS:  # (relative URLs too)
        return redact_url(value, secrets)
    return _redact_urls(value, secrets)


def redact_text(text: str, secrets: Secrets = NO_SECRETS) -> str:
    """A message (an error, which may quote URLs and header values) as it may
    be journaled or shown."""
    return _UNPRINTABLE.sub(lambda match: repr(match.group(0))[1:-1], _redact_urls(text, secrets))


def _redact_urls(text: str, secrets: Secrets) -> str:
    """``text`` with the URLs in it redacted (see redact_url), and known secrets."""
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0), secrets), text)
    return secrets.text(text)


# -- splitting without failing --------------------------------------------------


class _Parts:
    """A URL split at its delimiters: ``scheme + slashes + userinfo@ + host + path
    + ?query + #fragment`` is the URL (None: the delimiter is absent)."""

    def __init__(self, url: str) -> None:
        scheme = _SCHEME.match(url)
        self.scheme = scheme.group(0) if scheme else ""
        rest = url[len(self.scheme) :]
        after_slashes = rest.lstrip("/\\")
        self.slashes = rest[: len(rest) - len(after_slashes)]
        end = _first_of(after_slashes, "/\\?#")
        authority = after_slashes[:end]
        self.userinfo: str | None = None
        self.host = ""
        if len(self.slashes) >= 2 or "@" in authority:
            # An authority: with "//", or userinfo however the slashes go.
            userinfo, at, self.host = authority.rpartition("@")
            self.userinfo = userinfo if at else None
            rest = after_slashes[end:]
        else:
            rest = url[len(self.scheme) :]
            self.slashes = ""
        rest, hash_sign, fragment = rest.partition("#")
        self.fragment = fragment if hash_sign else None
        self.path, question, query = rest.partition("?")
        self.query = query if question else None


def _first_of(text: str, delimiters: str) -> int:
    found = [i for i in (text.find(d) for d in delimiters) if i >= 0]
    return min(found, default=len(text))


def _path_pieces(path: str) -> list[tuple[str, str, str]]:
    """(separator, segment, previous segment) along a path."""
    pieces = re.split(r"([/\\])", path)
    out = [("", pieces[0], "")]
    for i in range(1, len(pieces), 2):
        out.append((pieces[i], pieces[i + 1], pieces[i - 1]))
    return out


def _segments(path: str) -> list[tuple[str, str]]:
    return [(segment, previous) for _, segment, previous in _path_pieces(path)]


def _is_secret_segment(segment: str, previous: str, depth: int = 0) -> bool:
    # (Cheap tests first: a path may have thousands of segments.)
    if not segment:
        return False
    if len(previous) <= 32 and _plain(previous).lower() in _SECRET_PARENTS:
        return True
    if len(segment) >= 20 or segment.startswith("bot"):
        plain = _plain(segment)
        if _BOT_TOKEN.fullmatch(plain) or looks_like_token(plain):
            return True
    # Matrix parameters: /path;jsessionid=...
    return ";" in segment and any(
        _is_secret_parameter(name, value, depth)
        for name, value in _parameters(segment.partition(";")[2])
    )


def _parameters(query: str) -> list[tuple[str, str]]:
    """(name, value) of each ``name=value`` of a query, split at ``&`` and ``;``."""
    pairs = []
    for part in re.split(r"[&;]", query):
        name, equals, value = part.partition("=")
        if equals:
            pairs.append((name, value))
    return pairs


def _is_secret_parameter(name: str, value: str, depth: int = 0) -> bool:
    return bool(_parameter_credentials(name, value, depth))


def _plain(text: str, plus: bool = False) -> str:
    """``text`` percent-decoded (and ``+`` as a space, in a query)."""
    if plus:
        return unquote_plus(text) if "%" in text or "+" in text else text
    return unquote(text) if "%" in text else text


def _is_url(text: str) -> bool:
    return "://" in text or "?" in text or "#" in text


def _redact_parameters(query: str) -> str:
    pieces = re.split(r"([&;])", query)
    for i in range(0, len(pieces), 2):
        name, equals, value = pieces[i].partition("=")
        if equals and _is_secret_parameter(name, value):
            pieces[i] = f"{name}={REDACTED}"
        elif not equals and looks_like_token(_plain(name, plus=True)):
            pieces[i] = REDACTED
    return "".join(pieces)


def _header_credentials(value: str) -> set[str]:
    """A credential header's value, its token (``Bearer <token>``), a Basic
    password, and the values of cookies."""
    found = {value.strip()}
    scheme, space, token = value.strip().partition(" ")
    if space:
        token = token.strip()
        found.add(token)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(token, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            found |= {decoded, decoded.partition(":")[2]}
    for cookie in value.split(";"):
        _, equals, cookie_value = cookie.strip().partition("=")
        if equals:
            found.add(cookie_value.strip().strip('"'))
    return found


def _long_enough(value: str) -> bool:
    return len(value.strip()) >= MIN_SECRET_CHARS


def _utf8(text: str) -> bytes:
    # Environment values hold undecodable bytes as surrogates (PEP 383).
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _percent_unprintable(url: str) -> str:
    return _UNPRINTABLE.sub(
        lambda match: "".join(f"%{byte:02X}" for byte in _utf8(match.group(0))), url
    )
