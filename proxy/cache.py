"""Response cache per route (GET/HEAD), an in-process LRU bounded in bytes (RFC 9111 rules
for a shared cache, the subset an API gateway needs).

Key: route, path, query, the auth principal when the route is authenticated, and the
values of the request headers the stored response's `Vary` names (plus `vary_headers` from
the config). HEAD is answered from a stored GET.

Not served from cache: request `Cache-Control: no-store` (bypass, not stored either),
`no-cache` / `max-age=0` / `Pragma: no-cache` (fetched again and stored: a miss).
Not stored: statuses outside `statuses`, response `no-store`, `private`, `Vary: *`,
`Set-Cookie`, bodies over `max_entry_bytes` (those stream through), responses to a request
carrying `Authorization` on a route the gateway does not authenticate unless the response
says `public` or `s-maxage`. Freshness: `s-maxage`, else `max-age`, else `Expires`, else
`default_ttl_s`, capped by `max_ttl_s`; a response with a validator (`ETag`,
`Last-Modified`) is kept even when it arrives stale, and a stale entry is revalidated with
`If-None-Match` / `If-Modified-Since`: an upstream 304 refreshes it and it is served (HIT).
The client's own `If-None-Match` / `If-Modified-Since` is answered from the entry (304).

`X-Cache: HIT | MISS | BYPASS` on the response, `cache_outcome` hit | miss | bypass in the
event (a non-GET request on a cached route is a bypass). Each worker has its own cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Final

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.config import Route
    from proxy.response_filter import BufferedResponse
    from proxy.routing import CompiledRoute

CACHE_REQUESTS = Counter("apigw_cache_requests_total", "Requests on cached routes by outcome",
                         ["route_id", "outcome"])
CACHE_BYTES = Gauge("apigw_cache_bytes", "Bytes held by the response cache",
                    ["route_id"], multiprocess_mode="livesum")
CACHE_EVICTIONS = Counter("apigw_cache_evictions_total", "Entries evicted to stay in bounds",
                          ["route_id"])

ENTRY_OVERHEAD: Final = 256  # bytes counted per entry besides body and headers
_CONDITIONAL: Final = ("If-None-Match", "If-Modified-Since")
_NOT_STORED_HEADERS: Final = frozenset({"x-request-id", "x-cache", "age", "set-cookie"})


class CacheConfig(BaseModel):
    """Per route: `cache: {default_ttl_s: 30, max_bytes: 67108864}`."""

    model_config = ConfigDict(extra="forbid")

    default_ttl_s: float = Field(default=0, ge=0, le=86_400,
                                 description="Freshness when the response gives none; 0 = "
                                             "not stored without Cache-Control/Expires.")
    max_ttl_s: float = Field(default=3600, gt=0, le=86_400 * 7)
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0, le=16 * 1024 ** 3,
                           description="Bound of this route's cache (bodies + headers).")
    max_entry_bytes: int = Field(default=1024 * 1024, gt=0, le=256 * 1024 * 1024,
                                 description="Larger responses stream through, not stored.")
    statuses: list[int] = Field(default_factory=lambda: [200, 203, 204, 300, 301, 308, 404,
                                                         410])
    vary_headers: list[str] = Field(default_factory=list,
                                    description="Request headers always part of the key.")


@dataclass(slots=True)
class Entry:
    primary: tuple[str, ...]
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes
    stored_at: float  # monotonic
    age_at_store: float  # the upstream's Age header
    ttl_s: float
    etag: str
    last_modified: str
    size: int

    def age(self, now: float) -> float:
        return self.age_at_store + (now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.ttl_s


class LruStore:
    """Entries by key, least recently used evicted first once over `max_bytes`."""

    def __init__(self, route_id: str, max_bytes: int) -> None:
        self.route_id = route_id
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, ...], Entry] = OrderedDict()
        self._vary: dict[tuple[str, ...], tuple[str, ...]] = {}  # primary -> Vary'd names

    def __len__(self) -> int:
        return len(self._entries)

    def vary_of(self, primary: tuple[str, ...]) -> tuple[str, ...] | None:
        return self._vary.get(primary)

    def get(self, key: tuple[str, ...]) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, ...], vary: tuple[str, ...], entry: Entry) -> None:
        self.remove(key)
        self._entries[key] = entry
        self._vary[entry.primary] = vary
        self.bytes += entry.size
        while self.bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size
            self._vary.pop(old.primary, None)
            CACHE_EVICTIONS.labels(self.route_id).inc()
        CACHE_BYTES.labels(self.route_id).set(self.bytes)

    def remove(self, key: tuple[str, ...]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
            CACHE_BYTES.labels(self.route_id).set(self.bytes)


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


def _seconds(value: str | None) -> float | None:
    if value is None or not value.isdigit():
        return None
    return float(value)


def freshness(directives: dict[str, str], headers: CIMultiDict[str],
              config: CacheConfig) -> float:
    """Seconds this response stays fresh in a shared cache."""
    ttl = _seconds(directives.get("s-maxage"))
    if ttl is None:
        ttl = _seconds(directives.get("max-age"))
    if ttl is None and "Expires" in headers:
        try:
            expires = parsedate_to_datetime(headers["Expires"]).timestamp()
            date = (parsedate_to_datetime(headers["Date"]).timestamp() if "Date" in headers
                    else time.time())
            ttl = max(0.0, expires - date)
        except (TypeError, ValueError, IndexError):
            ttl = 0.0  # an invalid Expires means "already expired" (RFC 9111 5.3)
    if ttl is None:
        ttl = config.default_ttl_s
    if "no-cache" in directives:
        ttl = 0.0
    return min(ttl, config.max_ttl_s)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2)."""
    if not etag:
        return False
    if if_none_match.strip() == "*":
        return True
    plain = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == plain for tag in if_none_match.split(","))


def _not_modified_since(if_modified_since: str, last_modified: str) -> bool:
    if not last_modified:
        return False
    try:
        return parsedate_to_datetime(last_modified) <= parsedate_to_datetime(if_modified_since)
    except (TypeError, ValueError, IndexError):
        return False


class RouteCache:
    """One route's cache: config, store, and the response filter of one request."""

    def __init__(self, route_id: str, config: CacheConfig) -> None:
        self.route_id = route_id
        self.config = config
        self.store = LruStore(route_id, config.max_bytes)
        self.vary_extra = tuple(name.lower() for name in config.vary_headers)


class CacheStep:
    """Chain step (after rate limiting): answer from the cache, or arrange to store."""

    @classmethod
    def when_used(cls, routes: Sequence[Route]) -> list[CacheStep]:
        """The step, when some route uses it (else the chain does without)."""
        return [cls()] if any(route.cache is not None for route in routes) else []

    def __init__(self) -> None:
        self._caches: dict[str, RouteCache] = {}

    def cache_for(self, route: CompiledRoute) -> RouteCache | None:
        config = route.route.cache
        if config is None:
            return None
        cache = self._caches.get(route.id)
        if cache is None:
            cache = self._caches[route.id] = RouteCache(route.id, config)
        return cache

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route = ex.route
        if route is None:
            return None
        cache = self.cache_for(route)
        if cache is None:
            return None
        request = ex.request
        headers = request.headers
        directives = cache_control(headers.get("Cache-Control"))
        if request.method not in ("GET", "HEAD") or "no-store" in directives:
            self._bypass(ex, cache)
            return None
        primary = self._primary(ex, route, cache)
        vary = cache.store.vary_of(primary)
        entry = None
        key: tuple[str, ...] = ()
        if vary is not None:
            key = primary + tuple(headers.get(name, "") for name in vary)
            entry = cache.store.get(key)
        no_cache = ("no-cache" in directives or directives.get("max-age") == "0"
                    or (not directives and headers.get("Pragma", "").lower() == "no-cache"))
        now = time.monotonic()
        if entry is not None and not no_cache and entry.fresh(now):
            return self._hit(ex, cache, entry, now)
        upstream_headers = CIMultiDict(headers)
        changed = False
        for name in _CONDITIONAL:  # the cache, not the client, decides what to ask
            if name in upstream_headers:
                del upstream_headers[name]
                changed = True
        revalidating = entry if entry is not None and not no_cache else None
        if revalidating is not None:
            if revalidating.etag:
                upstream_headers["If-None-Match"] = revalidating.etag
                changed = True
            elif revalidating.last_modified:
                upstream_headers["If-Modified-Since"] = revalidating.last_modified
                changed = True
        if changed:
            ex.request = request.clone(headers=upstream_headers)
        ex.response_filters.append(_Store(cache, primary, revalidating, key, headers))
        ex.event.cache_outcome = "miss"
        return None

    def _primary(self, ex: Exchange, route: CompiledRoute,
                 cache: RouteCache) -> tuple[str, ...]:
        principal = ""
        if route.route.auth is not None:
            caller = ex.caller
            found = caller.principal if caller is not None else None
            principal = ("anonymous" if found is None else
                         f"{found.method}:{found.issuer}:{found.client_id}:{found.api_key_id}")
        headers = ex.request.headers
        return (ex.path, ex.query, principal,
                *(headers.get(name, "") for name in cache.vary_extra))

    def _bypass(self, ex: Exchange, cache: RouteCache) -> None:
        ex.event.cache_outcome = "bypass"
        ex.response_headers["X-Cache"] = "BYPASS"
        CACHE_REQUESTS.labels(cache.route_id, "bypass").inc()

    def _hit(self, ex: Exchange, cache: RouteCache, entry: Entry,
             now: float) -> web.Response:
        ex.event.cache_outcome = "hit"
        CACHE_REQUESTS.labels(cache.route_id, "hit").inc()
        headers = served_headers(entry, now)
        headers.update(ex.response_headers)
        headers["X-Cache"] = "HIT"
        if client_not_modified(ex.request.headers, entry):
            return web.Response(status=304, headers=_not_modified_headers(headers))
        return web.Response(status=entry.status, reason=entry.reason, headers=headers,
                            body=entry.body)


def served_headers(entry: Entry, now: float) -> CIMultiDict[str]:
    headers = CIMultiDict(entry.headers)
    headers["Age"] = str(int(entry.age(now)))
    return headers


def client_not_modified(request_headers: Mapping[str, str], entry: Entry) -> bool:
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        return entry.status == 200 and _etag_matches(if_none_match, entry.etag)
    if_modified_since = request_headers.get("If-Modified-Since")
    if if_modified_since is not None:
        return entry.status == 200 and _not_modified_since(if_modified_since,
                                                           entry.last_modified)
    return False


_304_KEEP: Final = frozenset({"cache-control", "content-location", "date", "etag", "expires",
                              "vary", "age", "x-cache", "x-request-id", "via", "last-modified"})


def _not_modified_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() in _304_KEEP)


_Stored = tuple[tuple[str, ...], tuple[str, ...], "Entry"]  # key, Vary'd names, entry


class _Store:
    """The response filter of a request that missed (or is revalidating)."""

    def __init__(self, cache: RouteCache, primary: tuple[str, ...], revalidating: Entry | None,
                 key: tuple[str, ...], client_headers: Mapping[str, str]) -> None:
        self.cache = cache
        self.primary = primary
        self.revalidating = revalidating
        self.key = key
        self.client_headers = client_headers  # as the client sent them

    def body_limit(self, ex: Exchange, status: int, headers: CIMultiDict[str]) -> int:
        return self.cache.config.max_entry_bytes

    def on_response(self, ex: Exchange, response: BufferedResponse) -> None:
        cache = self.cache
        client_headers = self.client_headers
        now = time.monotonic()
        entry = self.revalidating
        if entry is not None and response.status == 304:
            entry.headers.update(_refreshable(response.headers))
            directives = cache_control(entry.headers.get("Cache-Control"))
            entry.ttl_s = freshness(directives, entry.headers, cache.config)
            entry.stored_at, entry.age_at_store = now, 0.0
            self._serve(ex, response, entry, now, client_headers, "hit")
            return
        stored = self._storable(ex, response, client_headers)
        outcome = "miss"
        if stored is not None:
            key, vary, new = stored
            cache.store.put(key, vary, new)
            if client_not_modified(client_headers, new):
                self._serve(ex, response, new, now, client_headers, outcome)
                return
        elif entry is not None:
            cache.store.remove(self.key)
        response.headers["X-Cache"] = "MISS"
        CACHE_REQUESTS.labels(cache.route_id, outcome).inc()

    def _serve(self, ex: Exchange, response: BufferedResponse, entry: Entry, now: float,
               client_headers: Mapping[str, str], outcome: str) -> None:
        ex.event.cache_outcome = outcome
        CACHE_REQUESTS.labels(self.cache.route_id, outcome).inc()
        headers = served_headers(entry, now)
        headers["X-Cache"] = "HIT" if outcome == "hit" else "MISS"
        if client_not_modified(client_headers, entry):
            response.status, response.reason = 304, None
            response.headers = _not_modified_headers(headers)
            response.body = None
            return
        response.status, response.reason = entry.status, entry.reason
        response.headers = headers
        response.body = entry.body

    def _storable(self, ex: Exchange, response: BufferedResponse,
                  client_headers: Mapping[str, str]) -> _Stored | None:
        config = self.cache.config
        body = response.body
        headers = response.headers
        if (ex.request.method != "GET" or body is None or response.status not in config.statuses
                or "Set-Cookie" in headers):
            return None
        directives = cache_control(headers.get("Cache-Control"))
        if "no-store" in directives or "private" in directives:
            return None
        route = ex.route
        assert route is not None
        if (route.route.auth is None and client_headers.get("Authorization") is not None
                and "public" not in directives and "s-maxage" not in directives):
            return None
        vary_names = tuple(sorted({name.strip().lower() for value in headers.getall("Vary", ())
                                   for name in value.split(",") if name.strip()}))
        if "*" in vary_names:
            return None
        ttl = freshness(directives, headers, config)
        etag = headers.get("ETag", "")
        last_modified = headers.get("Last-Modified", "")
        if ttl <= 0 and not etag and not last_modified:
            return None
        kept: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in headers.items()
            if name.lower() not in _NOT_STORED_HEADERS and name.lower() != "content-length")
        size = ENTRY_OVERHEAD + len(body) + sum(len(n) + len(v) for n, v in kept.items())
        if size > config.max_entry_bytes:
            return None
        age = _seconds(headers.get("Age")) or 0.0
        key = self.primary + tuple(client_headers.get(name, "") for name in vary_names)
        entry = Entry(self.primary, response.status, response.reason, kept, body,
                      time.monotonic(), age, ttl, etag, last_modified, size)
        return key, vary_names, entry


def _refreshable(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in _NOT_STORED_HEADERS
                       and name.lower() not in ("content-length", "content-type"))
