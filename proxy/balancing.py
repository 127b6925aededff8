"""Load balancing across the targets of one upstream pool.

Config (on an upstream): `targets: [{url, weight}]` and `balancing: {algorithm, hash_on,
hash_header}`. Algorithms:

- `round_robin`: smooth weighted round-robin (nginx's): a target of weight 3 gets 3 of every
  `sum(weights)` picks, interleaved rather than in bursts.
- `least_request`: the target with the fewest outstanding requests relative to its weight;
  ties rotate so equal targets share the load.
- `consistent_hash`: a hash ring (100 points per unit of weight) keyed by a header, the
  client id or the client IP; a key keeps its target while the target is available, and only
  the keys of a target that leaves move.

A target is `available` when its active health check passes and outlier detection has not
ejected it (proxy/health.py flips the flag, so picking never reads a clock). When no target
is available the balancer picks among all of them (Envoy's "panic" routing): failing every
request outright is worse than trying a target that may have recovered.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Sequence
from typing import Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

_URL: Final = re.compile(r"^https?://[^/\s]+(/[^\s]*)?$")
_RING_POINTS: Final = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_url(value: str) -> str:
    if not _URL.match(value):
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


class Target(_Strict):
    url: str = Field(description="Base URL of one instance, e.g. http://10.0.0.7:8000")
    weight: int = Field(default=1, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_url(value)


class Balancing(_Strict):
    algorithm: Literal["round_robin", "least_request", "consistent_hash"] = "round_robin"
    hash_on: Literal["ip", "client_id", "header"] = Field(
        default="ip", description="consistent_hash key: client IP, client id or a header.")
    hash_header: str | None = Field(default=None, description="Header for hash_on: header.")

    @model_validator(mode="after")
    def _header_named(self) -> Balancing:
        if self.hash_on == "header" and not self.hash_header:
            raise ValueError("hash_on: header needs hash_header")
        return self


class Endpoint:
    """One target at run time: where it is and what the pool knows about it."""

    __slots__ = ("address", "available", "base", "consecutive_5xx", "consecutive_errors",
                 "current", "ejected", "ejections", "healthy", "host_header", "index",
                 "outstanding", "released_at", "weight")

    def __init__(self, index: int, url: str, weight: int) -> None:
        parsed = URL(url)
        self.index = index
        self.base = url
        self.host_header = parsed.raw_authority
        self.address = f"{parsed.host}:{parsed.port}"
        self.weight = weight
        self.outstanding = 0
        self.current = 0  # smooth weighted round-robin state
        self.healthy = True  # active health check verdict
        self.ejected = False  # outlier detection verdict
        self.available = True  # healthy and not ejected
        self.consecutive_5xx = 0
        self.consecutive_errors = 0
        self.ejections = 0  # ejection multiplier (grows with repeats, decays when quiet)
        self.released_at = 0.0

    def refresh(self) -> None:
        self.available = self.healthy and not self.ejected


class Balancer(Protocol):
    def pick(self, key: str) -> Endpoint: ...


class RoundRobin:
    """Smooth weighted round-robin over the available endpoints."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)

    def pick(self, key: str) -> Endpoint:
        candidates = [ep for ep in self.endpoints if ep.available] or self.endpoints
        total = 0
        best = candidates[0]
        for ep in candidates:
            ep.current += ep.weight
            total += ep.weight
            if ep.current > best.current:
                best = ep
        best.current -= total
        return best


class LeastRequest:
    """Fewest outstanding requests per unit of weight; ties rotate."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._turn = 0

    def pick(self, key: str) -> Endpoint:
        endpoints = self.endpoints
        count = len(endpoints)
        self._turn = (self._turn + 1) % count
        best: Endpoint | None = None
        best_load = 0.0
        panic = not any(ep.available for ep in endpoints)
        for offset in range(count):
            ep = endpoints[(self._turn + offset) % count]
            if not (ep.available or panic):
                continue
            load = (ep.outstanding + 1) / ep.weight
            if best is None or load < best_load:
                best, best_load = ep, load
        assert best is not None
        return best


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    """A hash ring; the key's point walks clockwise to the first available endpoint."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        ring = sorted((_hash(f"{ep.base}#{point}"), ep.index)
                      for ep in endpoints for point in range(_RING_POINTS * ep.weight))
        self._points = [point for point, _ in ring]
        self._owners = [self.endpoints[index] for _, index in ring]

    def pick(self, key: str) -> Endpoint:
        owners = self._owners
        start = bisect.bisect(self._points, _hash(key)) % len(owners)
        for offset in range(len(owners)):
            ep = owners[(start + offset) % len(owners)]
            if ep.available:
                return ep
            if offset > 4 * len(self.endpoints) * _RING_POINTS:
                break
        return owners[start]


def make_balancer(config: Balancing, endpoints: Sequence[Endpoint]) -> Balancer:
    if config.algorithm == "least_request":
        return LeastRequest(endpoints)
    if config.algorithm == "consistent_hash":
        return ConsistentHash(endpoints)
    return RoundRobin(endpoints)
