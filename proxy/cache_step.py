"""The cache's chain step (its configuration and rules: proxy/cache.py): answer a GET/HEAD
from the route's store, lead or follow a miss in flight, register the response filters that
store (a miss) or invalidate (an unsafe request) - proxy/cache_filter.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict

from proxy.cache_coalesce import COALESCE_WAITS, Coalescer, Flight, Landed
from proxy.cache_filter import (
    CACHE_REQUESTS,
    InvalidateFilter,
    StoreFilter,
    Targets,
    entry_not_modified,
    served_headers,
)
from proxy.cache_redis import RedisCacheBackend, RedisStore
from proxy.cache_rules import (
    CONDITIONAL,
    SAFE_METHODS,
    cache_control,
    not_modified_headers,
    request_no_cache,
)
from proxy.cache_store import (
    CacheStore,
    CacheUnavailable,
    Entry,
    Key,
    LruStore,
    Resource,
    variant_key,
)
from proxy.policy import RedisKeys
from proxy.routing import MatchContext, PathError, split_path

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.cache import CacheConfig
    from proxy.config import Route
    from proxy.routing import CompiledRoute, Router
    from proxy.settings import ProxySettings


class RouteCache:
    """One route's cache: config, store, and the misses in flight."""

    def __init__(self, route_id: str, config: CacheConfig, store: CacheStore) -> None:
        self.route_id = route_id
        self.config = config
        self.store = store
        self.vary_extra = tuple(name.lower() for name in config.vary_headers)
        self.flights = Coalescer()


class CacheStep:
    """Chain step (after rate limiting): answer from the cache, or arrange to store; arrange
    for unsafe requests to invalidate."""

    @classmethod
    def when_used(cls, routes: Sequence[Route], router: Router, redis: aioredis.Redis,
                  settings: ProxySettings) -> list[CacheStep]:
        """The step, when some route uses it (else the chain does without)."""
        if not any(route.cache is not None for route in routes):
            return []
        backend = None
        if any(route.cache is not None and route.cache.backend == "redis" for route in routes):
            backend = RedisCacheBackend(redis, RedisKeys(settings.key_prefix),
                                        settings.redis_timeout_s)
        return [cls(routes, router, backend)]

    def __init__(self, routes: Sequence[Route], router: Router,
                 backend: RedisCacheBackend | None = None) -> None:
        self.router = router
        self._caches: dict[str, RouteCache] = {}
        for route in routes:
            config = route.cache
            if config is None:
                continue
            store: CacheStore
            if config.backend == "redis":
                assert backend is not None, "a redis-backed cache needs the Redis backend"
                store = RedisStore(route.id, backend)
            else:
                store = LruStore(route.id, config.max_bytes)
            self._caches[route.id] = RouteCache(route.id, config, store)

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route = ex.route
        if route is None:
            return None
        request = ex.request
        method = request.method
        if method not in SAFE_METHODS:
            ex.response_filters.append(InvalidateFilter(self._targets))
        cache = self._caches.get(route.id)
        if cache is None:
            return None
        headers = request.headers
        directives = cache_control(headers.get("Cache-Control"))
        if method not in ("GET", "HEAD") or "no-store" in directives or "Upgrade" in headers:
            self._bypass(ex, cache, "bypass")  # an upgrade (WebSocket) is a session
            return None
        primary = self._primary(ex, route, cache)
        now = time.monotonic()
        try:
            key, entry = await cache.store.lookup(primary, headers, now)
        except CacheUnavailable:
            self._bypass(ex, cache, "unavailable")
            return None
        no_cache = request_no_cache(directives, headers)
        if entry is not None and not no_cache and entry.fresh(now):
            return hit_response(ex, cache, entry, now, "hit")
        flight: Flight | None = None
        if cache.config.coalesce and not no_cache:
            lock = key if key is not None else primary
            leader = cache.flights.joinable(lock)
            if leader is not None:
                served = await self._follow(ex, cache, primary, leader)
                if served is not None:
                    return served
            elif method == "GET":
                flight = cache.flights.lead(lock)
        revalidating = entry if entry is not None and not no_cache else None
        _ask_upstream(ex, revalidating)
        ex.response_filters.append(StoreFilter(cache, primary, revalidating, key or (),
                                               headers, flight))
        ex.event.cache_outcome = "miss"
        return None

    def log(self, ex: Exchange) -> None:
        """A leading request that ended without a response to store (upstream failure, the
        client gone) still wakes its followers: they go upstream themselves."""
        for response_filter in ex.response_filters:
            if isinstance(response_filter, StoreFilter):
                response_filter.release()

    async def _follow(self, ex: Exchange, cache: RouteCache, primary: Key,
                      leader: Flight) -> web.StreamResponse | None:
        landed: Landed | None = await leader.wait(cache.config.lock_timeout_s)
        route_id = cache.route_id
        if landed is None:
            COALESCE_WAITS.labels(route_id, "not_stored" if leader.landed else "timeout").inc()
            return None
        key, vary, entry = landed
        now = time.monotonic()
        if variant_key(primary, vary, ex.request.headers) != key or not entry.fresh(now):
            COALESCE_WAITS.labels(route_id, "not_stored").inc()
            return None
        COALESCE_WAITS.labels(route_id, "served").inc()
        return hit_response(ex, cache, entry, now, "coalesced")

    def _targets(self, ex: Exchange, resources: list[Resource]) -> Targets:
        """The cache holding each resource: that of the route a GET for it would take."""
        router = self.router
        headers = ex.request.headers
        targets: Targets = []
        for path, query in resources:
            try:
                segments = ex.segments if path == ex.path else split_path(path)[1]
            except PathError:
                continue
            context = (MatchContext(headers.get("Host", ""), headers, query)
                       if router.conditional else None)
            route = router.find("GET", segments, context)
            cache = self._caches.get(route.id) if route is not None else None
            if cache is not None:
                targets.append((cache, (path, query)))
        return targets

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

    def _bypass(self, ex: Exchange, cache: RouteCache, outcome: str) -> None:
        ex.event.cache_outcome = outcome
        ex.response_headers["X-Cache"] = "BYPASS"
        CACHE_REQUESTS.labels(cache.route_id, outcome).inc()


def _ask_upstream(ex: Exchange, revalidating: Entry | None) -> None:
    """The cache, not the client, decides what to ask: the client's validators are dropped,
    the stale entry's are sent."""
    headers = ex.request.headers
    upstream_headers = CIMultiDict(headers)
    changed = False
    for name in CONDITIONAL:
        if name in upstream_headers:
            del upstream_headers[name]
            changed = True
    if revalidating is not None:
        if revalidating.etag:
            upstream_headers["If-None-Match"] = revalidating.etag
            changed = True
        elif revalidating.last_modified:
            upstream_headers["If-Modified-Since"] = revalidating.last_modified
            changed = True
    if changed:
        ex.request = ex.request.clone(headers=upstream_headers)


def hit_response(ex: Exchange, cache: RouteCache, entry: Entry, now: float,
                 outcome: str) -> web.Response:
    """The answer from a stored entry (X-Cache: HIT), 304 when the client's validator
    matches."""
    ex.event.cache_outcome = outcome
    CACHE_REQUESTS.labels(cache.route_id, outcome).inc()
    headers = served_headers(entry, now)
    headers.update(ex.response_headers)
    headers["X-Cache"] = "HIT"
    if entry_not_modified(ex.request.headers, entry):
        return web.Response(status=304, headers=not_modified_headers(headers))
    return web.Response(status=entry.status, reason=entry.reason, headers=headers,
                        body=entry.body)
