"""Where cached responses live: the entry, the store protocol, and the in-process LRU store.

A key is a tuple of strings: the primary key (path, query, principal, the route's
`vary_headers` values) followed by the values of the request headers the stored response's
`Vary` names. The first two parts, (path, query), name the resource: invalidation removes
every variant of a resource at once. Backends: `LruStore` here (per worker, bounded in
bytes), `proxy.cache_redis.RedisStore` (shared by workers and replicas).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from multidict import CIMultiDict
from prometheus_client import Counter, Gauge

Key = tuple[str, ...]
Resource = tuple[str, str]  # (path, query)

CACHE_BYTES = Gauge("apigw_cache_bytes", "Bytes held by the in-process response cache",
                    ["route_id"], multiprocess_mode="livesum")
CACHE_EVICTIONS = Counter("apigw_cache_evictions_total", "Entries evicted to stay in bounds",
                          ["route_id"])

ENTRY_OVERHEAD: Final = 256  # bytes counted per entry besides body and headers


class CacheUnavailable(Exception):
    """The store cannot be used now (Redis down or slow): the request bypasses the cache."""


@dataclass(slots=True)
class Entry:
    primary: Key
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes
    stored_at: float  # monotonic, in this process
    age_at_store: float  # the response's age when stored (its Age header, or older)
    ttl_s: float  # freshness lifetime
    keep_s: float  # kept this long past freshness to be revalidated (0 without a validator)
    etag: str
    last_modified: str
    size: int

    def age(self, now: float) -> float:
        return self.age_at_store + (now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.ttl_s

    def expired(self, now: float) -> bool:
        """Past freshness and the revalidation window: of no use any more."""
        return self.age(now) >= self.ttl_s + self.keep_s

    def remaining_s(self, now: float) -> float:
        """How long a store should keep it."""
        return self.ttl_s + self.keep_s - self.age(now)


def variant_key(primary: Key, vary: tuple[str, ...], headers: Mapping[str, str]) -> Key:
    return primary + tuple(headers.get(name, "") for name in vary)


class CacheStore(Protocol):
    async def lookup(self, primary: Key, headers: Mapping[str, str],
                     now: float) -> tuple[Key | None, Entry | None]:
        """The key of this request's variant (None: nothing known for `primary`, so the
        Vary'd names are unknown) and its entry if one is stored and not expired."""
        ...

    async def put(self, key: Key, vary: tuple[str, ...], entry: Entry) -> None: ...

    async def remove(self, key: Key) -> None: ...

    async def invalidate(self, resource: Resource) -> None:
        """Remove every variant of one resource."""
        ...


class LruStore:
    """Entries by key, least recently used evicted first once over `max_bytes`."""

    def __init__(self, route_id: str, max_bytes: int) -> None:
        self.route_id = route_id
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._vary: dict[Key, tuple[str, ...]] = {}  # primary -> Vary'd names
        self._variants: dict[Key, int] = {}  # primary -> entries stored under it
        self._resources: dict[Resource, set[Key]] = {}  # (path, query) -> keys stored

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, primary: Key, headers: Mapping[str, str],
                     now: float) -> tuple[Key | None, Entry | None]:
        vary = self._vary.get(primary)
        if vary is None:
            return None, None
        key = variant_key(primary, vary, headers)
        entry = self._entries.get(key)
        if entry is None:
            return key, None
        if entry.expired(now):
            self._drop(key)
            return key, None
        self._entries.move_to_end(key)
        return key, entry

    async def put(self, key: Key, vary: tuple[str, ...], entry: Entry) -> None:
        self._drop(key)
        self._entries[key] = entry
        self._vary[entry.primary] = vary
        self._variants[entry.primary] = self._variants.get(entry.primary, 0) + 1
        self._resources.setdefault((key[0], key[1]), set()).add(key)
        self.bytes += entry.size
        while self.bytes > self.max_bytes and self._entries:
            old_key = next(iter(self._entries))
            self._drop(old_key)
            CACHE_EVICTIONS.labels(self.route_id).inc()
        CACHE_BYTES.labels(self.route_id).set(self.bytes)

    async def remove(self, key: Key) -> None:
        self._drop(key)
        CACHE_BYTES.labels(self.route_id).set(self.bytes)

    async def invalidate(self, resource: Resource) -> None:
        for key in list(self._resources.get(resource, ())):
            self._drop(key)
        CACHE_BYTES.labels(self.route_id).set(self.bytes)

    def _drop(self, key: Key) -> None:
        old = self._entries.pop(key, None)
        if old is None:
            return
        self.bytes -= old.size
        resource = (key[0], key[1])
        keys = self._resources.get(resource)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._resources[resource]
        left = self._variants.pop(old.primary, 1) - 1
        if left:
            self._variants[old.primary] = left
        else:
            self._vary.pop(old.primary, None)
