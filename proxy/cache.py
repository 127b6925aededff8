"""Response cache per route (GET/HEAD): its configuration, and what it does (RFC 9111 rules
for a shared cache, the subset an API gateway needs). The chain step is
proxy/cache_step.py; the header rules proxy/cache_rules.py.

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
`Last-Modified`) is kept even when it arrives stale (for `stale_keep_s` past freshness), and
a stale entry is revalidated with `If-None-Match` / `If-Modified-Since`: an upstream 304
refreshes it and it is served (HIT). The client's own `If-None-Match` / `If-Modified-Since`
is answered from the entry (304).

Concurrent misses for one key send one request upstream (proxy/cache_coalesce.py). An
unsafe request (POST, PUT, PATCH, DELETE, ...) answered 2xx/3xx invalidates its resource
and those its `Location` / `Content-Location` name (proxy/cache_filter.py). Entries live in
the worker (`backend: memory`, proxy/cache_store.py) or in Redis (`backend: redis`,
proxy/cache_redis.py, shared by workers and replicas).

`X-Cache: HIT | MISS | BYPASS` on the response; `cache_outcome` in the event: hit | miss |
bypass (not GET/HEAD, an Upgrade, or `no-store` asked), coalesced (served from another request's
fetch; X-Cache HIT), unavailable (the Redis backend could not be reached; X-Cache BYPASS).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CacheConfig(BaseModel):
    """Per route: `cache: {default_ttl_s: 30, max_bytes: 67108864, backend: memory}`."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["memory", "redis"] = Field(
        default="memory", description="memory: per worker process, LRU bounded by max_bytes; "
                                      "redis: the gateway's Redis, shared by every worker and "
                                      "replica, bounded by Redis maxmemory.")
    default_ttl_s: float = Field(default=0, ge=0, le=86_400,
                                 description="Freshness when the response gives none; 0 = "
                                             "not stored without Cache-Control/Expires.")
    max_ttl_s: float = Field(default=3600, gt=0, le=86_400 * 7)
    stale_keep_s: float = Field(default=300, ge=0, le=86_400 * 7,
                                description="How long past freshness an entry with a "
                                            "validator (ETag, Last-Modified) is kept to be "
                                            "revalidated.")
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0, le=16 * 1024 ** 3,
                           description="Bound of this route's memory cache (bodies + "
                                       "headers); with backend redis, Redis maxmemory is.")
    max_entry_bytes: int = Field(default=1024 * 1024, gt=0, le=256 * 1024 * 1024,
                                 description="Larger responses stream through, not stored.")
    statuses: list[int] = Field(default_factory=lambda: [200, 203, 204, 300, 301, 308, 404,
                                                         410])
    vary_headers: list[str] = Field(default_factory=list,
                                    description="Request headers always part of the key.")
    coalesce: bool = Field(default=True,
                           description="Concurrent misses for one key: one upstream request, "
                                       "the others wait for it (per worker).")
    lock_timeout_s: float = Field(default=5.0, gt=0, le=600,
                                  description="Longest wait for that request; then a waiting "
                                              "request goes upstream itself.")
