"""Where a journal is: an SQLite file (a path), or a PostgreSQL database (a
``postgresql://`` URL). Parsing only: nothing here opens either."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

#: The URL schemes of a PostgreSQL journal (libpq's).
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class PostgresJournal:
    """A journal in a PostgreSQL database, by its libpq URL. Shown (in every
    message, log and listing) without its password."""

    url: str

    def __str__(self) -> str:
        return redacted_url(self.url)

    def __repr__(self) -> str:
        return f"PostgresJournal({str(self)!r})"


#: A journal's location: a file, or a database.
Journal = Path | PostgresJournal


def is_postgres_url(text: str) -> bool:
    scheme, _, _ = text.partition("://")
    return scheme.lower() in POSTGRES_SCHEMES and "://" in text


class NotAJournal(ValueError):
    """A journal setting that names neither a file nor a PostgreSQL database."""


#: What looks like a URL's scheme (a mistyped one would be taken for a file).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\- ]+:/")


def journal_at(text: str | Path) -> Journal:
    """The journal ``text`` names: a ``postgresql://`` URL, else a file path.
    NotAJournal for another URL (``postgresql:/...``, ``mysql://...``): made a
    file of, it would journal somewhere nobody looks."""
    if isinstance(text, str) and is_postgres_url(text):
        return PostgresJournal(text)
    if isinstance(text, str) and _SCHEME.match(text):
        raise NotAJournal(
            f"the journal {redacted_url(text)!r} looks like a URL but is not a "
            f"postgresql:// one; a journal is a file path or a postgresql://USER@HOST/DATABASE URL"
        )
    return Path(text)


def redacted_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: the credentials
    run up to the last ``@`` (as libpq reads a password holding ``/``, ``?``
    or ``#``), and a query that sets a password anywhere is hidden whole."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return f"{url.partition(':')[0][:20]}:..."
    at = rest.rfind("@")
    if at >= 0:
        credentials, host = rest[:at], rest[at + 1 :]
        user = credentials.split(":", 1)[0]
        if not re.fullmatch(r"[\w.%+-]{0,64}", user):
            user = "***"
        rest = f"{user}:***@{host}" if ":" in credentials else f"{user}@{host}"
    address, question, query = rest.partition("?")
    if question and "password" in unquote(query).lower():
        rest = f"{address}?***"
    return f"{scheme}://{rest}"


def url_secrets(url: str) -> list[str]:
    """The password a URL holds, as written and percent-decoded (to scrub
    from a driver's message that quotes it)."""
    _, _, rest = url.partition("://")
    found = []
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        found.append(rest[:at].split(":", 1)[1])
    for field in rest.partition("?")[2].split("&"):
        key, _, value = field.partition("=")
        if unquote(key).lower() == "password":
            found.append(value)
    return [text for raw in found if raw for text in {raw, unquote(raw)} if text]
