"""The Redis backend of the response cache: entries shared by every worker and replica.

Layout (proxy.policy.RedisKeys, under the gateway's prefix): per resource (route + path +
query) an index set, per primary key the Vary'd header names, per variant the entry, all under
one hash tag. An entry is one string, `PX` = its freshness lifetime plus the revalidation
window (`stale_keep_s`, entries with a validator only), at most `max_entry_bytes`. Writing an
entry and invalidating a resource are one script each (atomic, one round trip); a lookup is
two GETs. The total is bounded by Redis itself: set `maxmemory` with an LRU policy
(docs/data-plane.md).

Redis down or slow: every operation has one time budget (`APIGW_REDIS_TIMEOUT_S`); a failure
raises CacheUnavailable (the request bypasses the cache, counted) and Redis is not tried
again for a backoff (1 s doubling to 10 s), after which one request probes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import orjson
import redis.asyncio as aioredis
from multidict import CIMultiDict
from prometheus_client import Counter, Gauge

from proxy.cache_store import CacheUnavailable, Entry, Key, Resource, variant_key
from proxy.degrade import DegradeGate
from proxy.policy import RedisKeys

log = logging.getLogger(__name__)

CACHE_BACKEND_ERRORS = Counter("apigw_cache_backend_errors_total",
                               "Response-cache Redis operations that failed, timed out or were "
                               "skipped while Redis is considered down",
                               ["route_id", "operation"])
CACHE_BACKEND_DEGRADED = Gauge("apigw_cache_backend_degraded",
                               "1 while the Redis response cache is bypassed (Redis unavailable)",
                               multiprocess_mode="max")

FORMAT: Final = b"\x01"  # entry encoding version
_LENGTH_BYTES: Final = 4
_DIGEST_CHARS: Final = 32

STORE_SCRIPT: Final = """
-- KEYS: entry, vary, index; ARGV: encoded entry, Vary'd names, px
local px = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
if redis.call('PTTL', KEYS[2]) < px then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', px)
else
  redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
end
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2])
if redis.call('PTTL', KEYS[3]) < px then
  redis.call('PEXPIRE', KEYS[3], px)
end
return 1
"""

# The members share the index's hash tag (one slot), so deleting them is cluster-safe.
INVALIDATE_SCRIPT: Final = """
local members = redis.call('SMEMBERS', KEYS[1])
for first = 1, #members, 500 do
  redis.call('DEL', unpack(members, first, math.min(first + 499, #members)))
end
redis.call('DEL', KEYS[1])
return #members
"""

T = TypeVar("T")


def digest(parts: Key) -> str:
    joined = "\x00".join(parts).encode("utf-8", "backslashreplace")
    return hashlib.sha256(joined).hexdigest()[:_DIGEST_CHARS]


def encode_entry(entry: Entry, now: float) -> bytes:
    meta = orjson.dumps({
        "p": entry.primary, "s": entry.status, "r": entry.reason,
        "h": list(entry.headers.items()), "g": entry.age(now), "w": time.time(),
        "t": entry.ttl_s, "k": entry.keep_s, "e": entry.etag, "l": entry.last_modified,
        "z": entry.size})
    return FORMAT + len(meta).to_bytes(_LENGTH_BYTES, "big") + meta + entry.body


def decode_entry(blob: bytes, now: float) -> Entry:
    """The entry as this process sees it (its age carried over by wall clock); ValueError
    when the bytes are not an entry of this format."""
    head = len(FORMAT) + _LENGTH_BYTES
    if blob[:len(FORMAT)] != FORMAT or len(blob) < head:
        raise ValueError("not a cache entry of this format")
    size = int.from_bytes(blob[len(FORMAT):head], "big")
    try:
        meta: dict[str, Any] = orjson.loads(blob[head:head + size])
        headers: CIMultiDict[str] = CIMultiDict((str(name), str(value))
                                                for name, value in meta["h"])
        carried = max(0.0, time.time() - float(meta["w"]))
        return Entry(tuple(str(part) for part in meta["p"]), int(meta["s"]),
                     None if meta["r"] is None else str(meta["r"]), headers,
                     blob[head + size:], now, float(meta["g"]) + carried, float(meta["t"]),
                     float(meta["k"]), str(meta["e"]), str(meta["l"]), int(meta["z"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed cache entry: {exc}") from exc


class RedisCacheBackend:
    """The gateway's Redis client as seen by the cache: a time budget per operation and a
    backoff after a failure (as FailoverRateLimiter in proxy/ratelimit.py)."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, timeout_s: float, *,
                 min_backoff_s: float = 1.0, max_backoff_s: float = 10.0) -> None:
        self.redis = redis
        self.keys = keys
        self.timeout_s = timeout_s
        self._gate = DegradeGate(CACHE_BACKEND_DEGRADED, log,
                                 "response cache bypassed: Redis unavailable",
                                 "response cache recovered: Redis reachable again",
                                 min_backoff_s=min_backoff_s, max_backoff_s=max_backoff_s)
        self.store_script = redis.register_script(STORE_SCRIPT)
        self.invalidate_script = redis.register_script(INVALIDATE_SCRIPT)

    async def run(self, route_id: str, operation: str,
                  command: Callable[[], Awaitable[T]]) -> T:
        """`command()` within the time budget; CacheUnavailable when Redis cannot serve."""
        gate = self._gate
        if gate.skipping():
            CACHE_BACKEND_ERRORS.labels(route_id, operation).inc()
            raise CacheUnavailable("Redis unavailable (backing off)")
        probing = gate.begin()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await command()
        except Exception as exc:  # Redis, network, timeout, or a bad reply: same remedy
            CACHE_BACKEND_ERRORS.labels(route_id, operation).inc()
            gate.failed(exc, probing)
            raise CacheUnavailable(type(exc).__name__) from exc
        gate.succeeded()
        return result


class RedisStore:
    """One route's entries in Redis (the CacheStore protocol of proxy/cache_store.py)."""

    def __init__(self, route_id: str, backend: RedisCacheBackend) -> None:
        self.route_id = route_id
        self.backend = backend

    async def lookup(self, primary: Key, headers: Mapping[str, str],
                     now: float) -> tuple[Key | None, Entry | None]:
        return await self.backend.run(self.route_id, "lookup",
                                      lambda: self._lookup(primary, headers, now))

    async def _lookup(self, primary: Key, headers: Mapping[str, str],
                      now: float) -> tuple[Key | None, Entry | None]:
        redis, keys, route_id = self.backend.redis, self.backend.keys, self.route_id
        resource = digest(primary[:2])
        names = await redis.get(keys.cache_vary(route_id, resource, digest(primary)))
        if not isinstance(names, bytes):
            return None, None
        vary = tuple(name for name in names.decode("latin-1").split(",") if name)
        key = variant_key(primary, vary, headers)
        blob = await redis.get(keys.cache_entry(route_id, resource, digest(key)))
        if not isinstance(blob, bytes):
            return key, None
        try:
            entry = decode_entry(blob, now)
        except ValueError:
            CACHE_BACKEND_ERRORS.labels(route_id, "decode").inc()
            return key, None
        if entry.primary != primary or entry.expired(now):
            return key, None
        return key, entry

    async def put(self, key: Key, vary: tuple[str, ...], entry: Entry) -> None:
        now = time.monotonic()
        px = int(entry.remaining_s(now) * 1000)
        if px <= 0:
            return
        keys, route_id = self.backend.keys, self.route_id
        resource = digest(key[:2])
        blob = encode_entry(entry, now)
        await self.backend.run(route_id, "store", lambda: self.backend.store_script(
            keys=[keys.cache_entry(route_id, resource, digest(key)),
                  keys.cache_vary(route_id, resource, digest(entry.primary)),
                  keys.cache_index(route_id, resource)],
            args=[blob, ",".join(vary), px]))

    async def remove(self, key: Key) -> None:
        keys, route_id = self.backend.keys, self.route_id
        entry_key = keys.cache_entry(route_id, digest(key[:2]), digest(key))
        await self.backend.run(route_id, "remove", lambda: self.backend.redis.delete(entry_key))

    async def invalidate(self, resource: Resource) -> None:
        keys, route_id = self.backend.keys, self.route_id
        index = keys.cache_index(route_id, digest(resource))
        await self.backend.run(route_id, "invalidate",
                               lambda: self.backend.invalidate_script(keys=[index]))
