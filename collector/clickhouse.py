"""The one place where a ClickHouse client is made from a DSN.

`chdb:///dir` opens the embedded ClickHouse engine (one process per directory);
`http(s)://user:password@host:8123/db` talks to a server. Callers get a clickhouse-connect
client and must not care which. Queries block (they release the GIL): call them from a
worker thread, never on an event loop.

`https://` (or `clickhouses://`) means TLS whatever the port, the certificate verified against
the system CAs unless the query string says otherwise - `?ca_cert=/path/ca.pem`,
`&verify=false`, `&client_cert=...&client_cert_key=...` go to clickhouse-connect as they are.
`http://` means plain HTTP. Passwords (in the user part or a `password=` parameter) are
redacted wherever a DSN is shown.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

# scheme -> clickhouse-connect interface (None: its own choice, by port)
_INTERFACES: Final[dict[str, str | None]] = {"http": "http", "https": "https",
                                             "clickhouses": "https", "clickhouse": None}
_SECRET_PARAMS: Final = frozenset({"password", "access_token"})


class ClickHouseDsnError(ValueError):
    pass


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (user part or query parameter), for logs."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and not any(name in _SECRET_PARAMS for name, _ in query):
        return dsn
    if parts.password is not None:
        netloc = (f"{parts.username}:***@{parts.hostname}"
                  + (f":{parts.port}" if parts.port else ""))
        parts = parts._replace(netloc=netloc)
    shown = [(name, "***" if name in _SECRET_PARAMS else value) for name, value in query]
    return urlunsplit(parts._replace(query=urlencode(shown, safe="/*")))


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb://")


def make_client(dsn: str) -> Client:
    scheme = dsn.split("://", 1)[0] if "://" in dsn else ""
    if scheme == "chdb":
        directory = Path(dsn[len("chdb://"):])
        if not directory.is_absolute():
            raise ClickHouseDsnError(f"embedded DSN {dsn!r} needs an absolute path: chdb:///dir")
        directory.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=f"chdb://{directory}")
    if scheme in _INTERFACES:
        # The scheme decides TLS: clickhouse-connect alone takes it from the port (443/8443),
        # so https:// on any other port would send the password over plain HTTP.
        return clickhouse_connect.get_client(dsn=dsn, interface=_INTERFACES[scheme],
                                             autogenerate_session_id=False)
    raise ClickHouseDsnError(f"unsupported ClickHouse DSN {redact_dsn(dsn)!r}: use "
                             "http(s)://user:password@host:8123/db or chdb:///absolute/dir")


class SharedClient:
    """A client shared by threads of one process, with calls serialised.

    The embedded engine allows one open store per process; a lock keeps concurrent worker
    threads from interleaving calls on one connection.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.client = make_client(dsn)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.client.close()
