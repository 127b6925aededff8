"""The response phase of the cache (proxy/response_filter.py): storing what a miss fetched,
and invalidating what an unsafe request changed.

`on_response` decides (and rewrites the response: X-Cache, a revalidated entry, a 304 for
the client's own validator); `settle` does the store work before the response is sent, so
a client that reads right after its own write sees the change, on every worker with the
Redis backend. A store that is unavailable there is counted and skipped, never an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from prometheus_client import Counter

from proxy.cache_coalesce import Flight, Landed
from proxy.cache_rules import (
    cache_control,
    client_not_modified,
    freshness,
    invalidates,
    location_targets,
    not_modified_headers,
    refreshable,
    seconds,
    stored_headers,
    vary_names,
    with_bare_paths,
)
from proxy.cache_store import ENTRY_OVERHEAD, CacheUnavailable, Entry, Key, Resource

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.cache_step import RouteCache
    from proxy.response_filter import BufferedResponse

CACHE_REQUESTS = Counter("apigw_cache_requests_total", "Requests on cached routes by outcome",
                         ["route_id", "outcome"])
CACHE_INVALIDATIONS = Counter("apigw_cache_invalidations_total",
                              "Resources invalidated by unsafe requests (RFC 9111 4.4)",
                              ["route_id"])

Targets = list[tuple["RouteCache", Resource]]


def served_headers(entry: Entry, now: float) -> CIMultiDict[str]:
    headers = CIMultiDict(entry.headers)
    headers["Age"] = str(int(entry.age(now)))
    return headers


def entry_not_modified(request_headers: Mapping[str, str], entry: Entry) -> bool:
    return client_not_modified(request_headers, entry.status, entry.etag, entry.last_modified)


class StoreFilter:
    """The response filter of a GET/HEAD that missed (or is revalidating a stale entry)."""

    def __init__(self, cache: RouteCache, primary: Key, revalidating: Entry | None, key: Key,
                 client_headers: Mapping[str, str], flight: Flight | None) -> None:
        self.cache = cache
        self.primary = primary
        self.revalidating = revalidating
        self.key = key  # of the revalidated variant; () when the Vary'd names are unknown
        self.client_headers = client_headers  # as the client sent them
        self.flight = flight  # when this request leads others waiting for the same key
        self._put: Landed | None = None
        self._remove: Key | None = None

    def body_limit(self, ex: Exchange, status: int, headers: CIMultiDict[str]) -> int:
        return self.cache.config.max_entry_bytes

    def on_response(self, ex: Exchange, response: BufferedResponse) -> None:
        cache = self.cache
        client_headers = self.client_headers
        now = time.monotonic()
        entry = self.revalidating
        if entry is not None and response.status == 304:
            entry.headers.update(refreshable(response.headers))
            directives = cache_control(entry.headers.get("Cache-Control"))
            entry.ttl_s = freshness(directives, entry.headers, cache.config.default_ttl_s,
                                    cache.config.max_ttl_s)
            entry.stored_at, entry.age_at_store = now, 0.0
            self._put = (self.key, vary_names(entry.headers), entry)
            self.release(self._put)
            self._serve(ex, response, entry, now, "hit")
            return
        stored = self._storable(ex, response)
        self.release(stored)
        if stored is not None:
            self._put = stored
            if entry_not_modified(client_headers, stored[2]):
                self._serve(ex, response, stored[2], now, "miss")
                return
        elif entry is not None:
            self._remove = self.key
        response.headers["X-Cache"] = "MISS"
        CACHE_REQUESTS.labels(cache.route_id, "miss").inc()

    async def settle(self, ex: Exchange) -> None:
        store = self.cache.store
        try:
            if self._put is not None:
                await store.put(*self._put)
            elif self._remove is not None:
                await store.remove(self._remove)
        except CacheUnavailable:
            pass  # counted by the backend; the next request misses
        self._put = self._remove = None

    def release(self, result: Landed | None = None) -> None:
        """Wake the requests waiting for this one (the log hook calls it for failures)."""
        if self.flight is not None:
            self.cache.flights.land(self.flight, result)
            self.flight = None

    def _serve(self, ex: Exchange, response: BufferedResponse, entry: Entry, now: float,
               outcome: str) -> None:
        ex.event.cache_outcome = outcome
        CACHE_REQUESTS.labels(self.cache.route_id, outcome).inc()
        headers = served_headers(entry, now)
        headers["X-Cache"] = "HIT" if outcome == "hit" else "MISS"
        if entry_not_modified(self.client_headers, entry):
            response.status, response.reason = 304, None
            response.headers = not_modified_headers(headers)
            response.body = None
            return
        response.status, response.reason = entry.status, entry.reason
        response.headers = headers
        response.body = entry.body

    def _storable(self, ex: Exchange, response: BufferedResponse) -> Landed | None:
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
        if (route.route.auth is None and self.client_headers.get("Authorization") is not None
                and "public" not in directives and "s-maxage" not in directives):
            return None
        vary = vary_names(headers)
        if "*" in vary:
            return None
        ttl = freshness(directives, headers, config.default_ttl_s, config.max_ttl_s)
        etag = headers.get("ETag", "")
        last_modified = headers.get("Last-Modified", "")
        if ttl <= 0 and not etag and not last_modified:
            return None
        kept = stored_headers(headers)
        size = ENTRY_OVERHEAD + len(body) + sum(len(n) + len(v) for n, v in kept.items())
        if size > config.max_entry_bytes:
            return None
        age = seconds(headers.get("Age")) or 0.0
        keep = config.stale_keep_s if etag or last_modified else 0.0
        key = self.primary + tuple(self.client_headers.get(name, "") for name in vary)
        entry = Entry(self.primary, response.status, response.reason, kept, body,
                      time.monotonic(), age, ttl, keep, etag, last_modified, size)
        return key, vary, entry


class InvalidateFilter:
    """The response filter of an unsafe request (POST, PUT, PATCH, DELETE, ...): a non-error
    response invalidates the request's resource (with and without its query) and those its
    `Location` / `Content-Location` name on this host, in the cache of the route a GET for
    each would take."""

    def __init__(self, resolve: Callable[[Exchange, list[Resource]], Targets]) -> None:
        self.resolve = resolve
        self._targets: Targets = []

    def body_limit(self, ex: Exchange, status: int, headers: CIMultiDict[str]) -> int:
        return 0

    def on_response(self, ex: Exchange, response: BufferedResponse) -> None:
        if not invalidates(response.status):
            return
        named = location_targets(response.headers, ex.path,
                                 ex.request.headers.get("Host", ""))
        self._targets = self.resolve(ex, with_bare_paths([(ex.path, ex.query), *named]))

    async def settle(self, ex: Exchange) -> None:
        targets, self._targets = self._targets, []
        for cache, resource in targets:
            try:
                await cache.store.invalidate(resource)
            except CacheUnavailable:
                continue  # counted by the backend
            CACHE_INVALIDATIONS.labels(cache.route_id).inc()
