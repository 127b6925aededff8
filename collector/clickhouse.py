"""The one place where a ClickHouse client is made from a DSN.

`chdb:///dir` opens the embedded ClickHouse engine (one process per directory);
`http(s)://user:password@host:8123/db` talks to a server. Callers get a clickhouse-connect
client and must not care which. Queries block (they release the GIL): call them from a
worker thread, never on an event loop.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client


class ClickHouseDsnError(ValueError):
    pass


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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
    if scheme in ("http", "https", "clickhouse", "clickhouses"):
        return clickhouse_connect.get_client(dsn=dsn, autogenerate_session_id=False)
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
