"""The HTTP caching rules the response cache applies (RFC 9111 for a shared cache, RFC 9110
for validators): Cache-Control parsing, freshness, conditional requests, which headers an
entry keeps and serves, and which URIs an unsafe request invalidates (RFC 9111 section 4.4).

Pure functions of headers and numbers: no store, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import urljoin, urlsplit

from multidict import CIMultiDict

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CONDITIONAL: Final = ("If-None-Match", "If-Modified-Since")
NOT_STORED_HEADERS: Final = frozenset({"x-request-id", "x-cache", "age", "set-cookie"})
_304_KEEP: Final = frozenset({"cache-control", "content-location", "date", "etag", "expires",
                              "vary", "age", "x-cache", "x-request-id", "via", "last-modified"})
_LOCATION_HEADERS: Final = ("Location", "Content-Location")


def cache_control(value: str | None) -> dict[str, str]:
    """Directives of a Cache-Control header, names lowercased, values unquoted."""
    directives: dict[str, str] = {}
    if not value:
        return directives
    for part in value.split(","):
        name, _, arg = part.strip().partition("=")
        if name:
            directives[name.lower()] = arg.strip().strip('"')
    return directives


def seconds(value: str | None) -> float | None:
    """A delta-seconds value, or None when absent or not a non-negative integer."""
    if value is None or not value.isdigit():
        return None
    return float(value)


def freshness(directives: dict[str, str], headers: CIMultiDict[str], default_ttl_s: float,
              max_ttl_s: float) -> float:
    """Seconds this response stays fresh in a shared cache."""
    ttl = seconds(directives.get("s-maxage"))
    if ttl is None:
        ttl = seconds(directives.get("max-age"))
    if ttl is None and "Expires" in headers:
        try:
            expires = parsedate_to_datetime(headers["Expires"]).timestamp()
            date = (parsedate_to_datetime(headers["Date"]).timestamp() if "Date" in headers
                    else time.time())
            ttl = max(0.0, expires - date)
        except (TypeError, ValueError, IndexError):
            ttl = 0.0  # an invalid Expires means "already expired" (RFC 9111 5.3)
    if ttl is None:
        ttl = default_ttl_s
    if "no-cache" in directives:
        ttl = 0.0
    return min(ttl, max_ttl_s)


def request_no_cache(directives: dict[str, str], headers: Mapping[str, str]) -> bool:
    """The client asks for a response validated with the origin (not served from cache)."""
    return ("no-cache" in directives or directives.get("max-age") == "0"
            or (not directives and headers.get("Pragma", "").lower() == "no-cache"))


def vary_names(headers: CIMultiDict[str]) -> tuple[str, ...]:
    """The request headers a response's `Vary` names, lowercased and sorted ("*" kept)."""
    return tuple(sorted({name.strip().lower() for value in headers.getall("Vary", ())
                         for name in value.split(",") if name.strip()}))


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2)."""
    if not etag:
        return False
    if if_none_match.strip() == "*":
        return True
    plain = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == plain for tag in if_none_match.split(","))


def not_modified_since(if_modified_since: str, last_modified: str) -> bool:
    if not last_modified:
        return False
    try:
        return parsedate_to_datetime(last_modified) <= parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError, IndexError):
        return False


def client_not_modified(request_headers: Mapping[str, str], status: int, etag: str,
                        last_modified: str) -> bool:
    """The client's own validator matches a stored 200: answer it 304."""
    if status != 200:
        return False
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    if_modified_since = request_headers.get("If-Modified-Since")
    if if_modified_since is not None:
        return not_modified_since(if_modified_since, last_modified)
    return False


def not_modified_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The headers a 304 carries (RFC 9110 15.4.5)."""
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() in _304_KEEP)


def stored_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """What an entry keeps of a response's headers."""
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in NOT_STORED_HEADERS
                       and name.lower() != "content-length")


def refreshable(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The headers of an upstream 304 that update a stored entry (RFC 9111 4.3.4)."""
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in NOT_STORED_HEADERS
                       and name.lower() not in ("content-length", "content-type"))


def invalidates(status: int) -> bool:
    """An unsafe request invalidates only when its response is not an error (2xx, 3xx)."""
    return 200 <= status < 400


def location_targets(headers: CIMultiDict[str], request_path: str,
                     request_host: str) -> list[tuple[str, str]]:
    """(path, query) of each `Location` / `Content-Location` naming this host: a relative
    reference (resolved against the request path) or an absolute URI whose authority is the
    request's Host (RFC 9111 4.4: other hosts are not invalidated, against cache poisoning)."""
    targets: list[tuple[str, str]] = []
    host = request_host.lower()
    for name in _LOCATION_HEADERS:
        for value in headers.getall(name, ()):
            try:
                parts = urlsplit(value.strip())
                if parts.scheme or parts.netloc:
                    if parts.scheme not in ("http", "https") or parts.netloc.lower() != host:
                        continue
                    path, query = parts.path or "/", parts.query
                else:
                    resolved = urlsplit(urljoin(request_path, value.strip()))
                    path, query = resolved.path, resolved.query
            except ValueError:  # not a URI reference: nothing to invalidate
                continue
            if path.startswith("/"):
                targets.append((path, query))
    return targets


def with_bare_paths(targets: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each (path, query) and its path without the query, once each, in order."""
    seen: dict[tuple[str, str], None] = {}
    for path, query in targets:
        seen[(path, query)] = None
        seen[(path, "")] = None
    return list(seen)
