"""Request coalescing (collapsed forwarding, Varnish's waiting list, nginx `proxy_cache_lock`):
concurrent misses for one key send one request upstream; the others wait for its outcome.

The first miss leads: it goes upstream and lands the flight with what it stored (or None
when the response was not storable, or the request failed). Followers wait at most
`lock_timeout_s`; then, or when the flight landed with nothing they can use, they go
upstream themselves. Per worker process: N workers send at most N requests for one key.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prometheus_client import Counter

if TYPE_CHECKING:
    from proxy.cache_store import Entry, Key

COALESCE_WAITS = Counter("apigw_cache_coalesce_waits_total",
                         "Cache misses that waited for another request to the same key, "
                         "by result (served, uncacheable, timeout)", ["route_id", "result"])

Landed = tuple["Key", tuple[str, ...], "Entry"]  # key, Vary'd names, entry


class Flight:
    """One upstream request others wait for."""

    __slots__ = ("_done", "key", "result")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.result: Landed | None = None
        self._done = asyncio.Event()

    @property
    def landed(self) -> bool:
        return self._done.is_set()

    async def wait(self, timeout_s: float) -> Landed | None:
        """What the leader stored; None when it stored nothing or took too long."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._done.wait()
        except TimeoutError:
            return None
        return self.result


class Coalescer:
    """The flights in the air for one route's cache, by key."""

    def __init__(self) -> None:
        self._flights: dict[Key, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def joinable(self, key: Key) -> Flight | None:
        return self._flights.get(key)

    def lead(self, key: Key) -> Flight:
        flight = self._flights[key] = Flight(key)
        return flight

    def land(self, flight: Flight, result: Landed | None) -> None:
        """Wake the followers (once; later calls do nothing)."""
        if flight.landed:
            return
        flight.result = result
        flight._done.set()
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
