"""Resilience: per-route timeouts, retries with backoff and a budget, circuit breakers.

Retries (`retry:` on a route). A failed attempt is retried when its class is listed in
`retry_on` and either the method is idempotent (GET HEAD OPTIONS PUT DELETE TRACE) or the
upstream never received the request (`connect-failure`: the connection was never made).
Classes: `connect-failure`, `reset` (connection closed before a response), `timeout`,
`gateway-error` (502/503/504 from the upstream), `5xx` (any 5xx). A request body is replayed
only when it was small enough to hold (`max_body_bytes`); a larger body is retried only after
connect failures, since nothing of it was sent. Backoff is exponential with full jitter:
sleep uniform(0, min(backoff_max_ms, backoff_base_ms * 2**n)). The retry budget (per route
and worker, Finagle's shape) allows retries up to `budget_percent` of the requests plus
`min_retries_per_s`; a retry beyond it is not made (`budget_exhausted`).

Circuit breaker (`circuit_breaker:` on an upstream): `failure_threshold` failed requests in a
row (transport error or 5xx) open it; while open, requests fail fast with 503
`circuit_open` and Retry-After; after `open_s` it lets `half_open_requests` probes through:
that many successes close it, any failure opens it again.
"""

from __future__ import annotations

import math
import random
import time
from typing import Final, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RetryOn = Literal["connect-failure", "reset", "timeout", "gateway-error", "5xx"]


_DEFAULT_RETRY_ON: Final[tuple[RetryOn, ...]] = ("connect-failure", "reset", "gateway-error")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouteTimeouts(_Strict):
    """Per-route overrides of the upstream's timeouts (unset: the upstream's value)."""

    connect_s: float | None = Field(default=None, gt=0, le=300)
    read_s: float | None = Field(default=None, gt=0, le=3600)
    total_s: float | None = Field(default=None, gt=0, le=3600)


class Retry(_Strict):
    attempts: int = Field(default=2, ge=1, le=10, description="Retries after the first try.")
    retry_on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    backoff_base_ms: float = Field(default=25.0, ge=0, le=10_000)
    backoff_max_ms: float = Field(default=250.0, ge=0, le=60_000)
    budget_percent: float = Field(default=20.0, ge=0, le=100)
    min_retries_per_s: float = Field(default=3.0, ge=0, le=10_000)
    max_body_bytes: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)


class CircuitBreakerConfig(_Strict):
    failure_threshold: int = Field(default=5, ge=1, le=10_000)
    open_s: float = Field(default=10.0, gt=0, le=3600)
    half_open_requests: int = Field(default=1, ge=1, le=1000)


def timeout_for(upstream: aiohttp.ClientTimeout,
                route: RouteTimeouts | None) -> aiohttp.ClientTimeout:
    if route is None:
        return upstream
    return aiohttp.ClientTimeout(
        total=route.total_s if route.total_s is not None else upstream.total,
        connect=route.connect_s if route.connect_s is not None else upstream.connect,
        sock_read=route.read_s if route.read_s is not None else upstream.sock_read)


def failure_class(error_type: str, status: int) -> str:
    """The retry class of an attempt's outcome ("" when it succeeded)."""
    if error_type:
        if error_type == "upstream_connect_error" or error_type == "upstream_connect_timeout":
            return "connect-failure"
        if error_type == "upstream_timeout":
            return "timeout"
        return "reset"
    if status in (502, 503, 504):
        return "gateway-error"
    if status >= 500:
        return "5xx"
    return ""


class RetryPolicy:
    """One route's retry rules and budget."""

    def __init__(self, config: Retry) -> None:
        self.config = config
        self.retry_on = frozenset(config.retry_on)
        self._ratio = config.budget_percent / 100.0
        self._cap = max(10.0, config.min_retries_per_s * 10.0)
        self._balance = config.min_retries_per_s  # one second's reserve to start with
        self._refilled = time.monotonic()

    def deposit(self) -> None:
        """Each request earns a fraction of a retry."""
        self._balance = min(self._cap, self._balance + self._ratio)

    def allows(self, method: str, failure: str, replayable: bool) -> bool:
        if failure == "gateway-error" and "5xx" in self.retry_on:
            failure_listed = True
        else:
            failure_listed = failure in self.retry_on
        if not failure_listed:
            return False
        if failure == "connect-failure":
            return True
        return replayable and method in IDEMPOTENT

    def withdraw(self) -> bool:
        now = time.monotonic()
        elapsed, self._refilled = now - self._refilled, now
        self._balance = min(self._cap, self._balance + elapsed * self.config.min_retries_per_s)
        if self._balance < 1.0:
            return False
        self._balance -= 1.0
        return True

    def backoff_s(self, retry: int) -> float:
        ceiling = min(self.config.backoff_max_ms, self.config.backoff_base_ms * (2 ** retry))
        return random.uniform(0, ceiling) / 1000.0


CLOSED: Final = "closed"
HALF_OPEN: Final = "half_open"
OPEN: Final = "open"
_STATE_VALUE: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    """Closed / open / half-open per upstream (per worker)."""

    def __init__(self, upstream: str, config: CircuitBreakerConfig) -> None:
        self.upstream = upstream
        self.config = config
        self.state = CLOSED
        self.failures = 0
        self.open_until = 0.0
        self.probes = 0  # half-open requests in flight
        self.probe_successes = 0
        from proxy.metrics import CIRCUIT_STATE  # lazily: config.py imports this module

        CIRCUIT_STATE.labels(upstream).set(0)

    def _enter(self, state: str) -> None:
        from proxy.metrics import CIRCUIT_STATE, CIRCUIT_TRANSITIONS

        self.state = state
        CIRCUIT_STATE.labels(self.upstream).set(_STATE_VALUE[state])
        CIRCUIT_TRANSITIONS.labels(self.upstream, state).inc()

    def allow(self) -> bool:
        """May a request go through now? A True in half-open must be followed by record()."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if time.monotonic() < self.open_until:
                return False
            self._enter(HALF_OPEN)
            self.probes = 0
            self.probe_successes = 0
        if self.probes >= self.config.half_open_requests:
            return False
        self.probes += 1
        return True

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.open_until - time.monotonic()))

    def record(self, success: bool) -> None:
        if self.state == CLOSED:
            if success:
                self.failures = 0
                return
            self.failures += 1
            if self.failures >= self.config.failure_threshold:
                self._open()
            return
        if self.state == HALF_OPEN:
            self.probes = max(0, self.probes - 1)
            if not success:
                self._open()
                return
            self.probe_successes += 1
            if self.probe_successes >= self.config.half_open_requests:
                self.failures = 0
                self._enter(CLOSED)

    def _open(self) -> None:
        self.open_until = time.monotonic() + self.config.open_s
        self.failures = 0
        self._enter(OPEN)
