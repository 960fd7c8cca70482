"""Where a journal is: an SQLite file (a path), or a PostgreSQL database (a
``postgresql://`` URL). Parsing only: nothing here opens either."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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


def journal_at(text: str | Path) -> Journal:
    """The journal ``text`` names: a ``postgresql://`` URL, else a file path."""
    if isinstance(text, str) and is_postgres_url(text):
        return PostgresJournal(text)
    return Path(text)


def redacted_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``; a URL that cannot
    be parsed is shown as its scheme alone (it may hold a password anywhere)."""
    try:
        parts = urlsplit(url)
        hostinfo = parts.netloc.rpartition("@")
        if hostinfo[1] and ":" in hostinfo[0]:
            user = hostinfo[0].split(":", 1)[0]
            netloc = f"{user}:***@{hostinfo[2]}"
        else:
            netloc = parts.netloc
        # A password may also be given as a query parameter.
        query = "&".join(
            "password=***" if field.lower().startswith("password=") else field
            for field in parts.query.split("&")
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return f"{url.partition(':')[0]}://..."
