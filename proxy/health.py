"""Target health: passive outlier ejection and active health checks (Envoy is the model).

Outlier detection (`outlier_detection:` on an upstream) watches real traffic: after
`consecutive_5xx` 5xx answers in a row, or `consecutive_errors` transport failures in a row
(connect error, reset, timeout), a target is ejected for `base_ejection_s` times the number
of times it has been ejected (capped at `max_ejection_s`); the multiplier resets after a
quiet `max_ejection_s`. At most `max_ejected_percent` of the targets are ejected at once,
though one target may always be (as in Envoy).

Active health checks (`health_check:`) GET `path` on every target each `interval_s`; a
target turns unhealthy after `unhealthy_threshold` failures in a row (status outside
200-399, timeout, error) and healthy again after `healthy_threshold` successes in a row.
Targets start healthy; the first round runs at start.

Both only flip flags on the Endpoint (proxy/balancing.py); picking reads `available`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy.balancing import Endpoint

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutlierDetection(_Strict):
    consecutive_5xx: int = Field(default=5, ge=1, le=1000)
    consecutive_errors: int = Field(default=3, ge=1, le=1000,
                                    description="Connect errors, resets and timeouts in a row.")
    base_ejection_s: float = Field(default=30.0, gt=0, le=3600)
    max_ejection_s: float = Field(default=300.0, gt=0, le=86_400)
    max_ejected_percent: int = Field(default=50, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> OutlierDetection:
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError("max_ejection_s must be >= base_ejection_s")
        return self


class HealthCheck(_Strict):
    path: str = Field(default="/healthz", pattern=r"^/")
    interval_s: float = Field(default=5.0, gt=0, le=3600)
    timeout_s: float = Field(default=1.0, gt=0, le=60)
    healthy_threshold: int = Field(default=2, ge=1, le=100)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)


# proxy.metrics is imported lazily: config.py imports this module for its models, and the
# metrics must not be created before server.py has set up the multiprocess directory.

def publish(upstream: str, ep: Endpoint) -> None:
    from proxy.metrics import UPSTREAM_TARGET_AVAILABLE

    UPSTREAM_TARGET_AVAILABLE.labels(upstream, ep.address).set(1 if ep.available else 0)


class OutlierDetector:
    """Counts consecutive failures per target from real responses and ejects outliers."""

    def __init__(self, upstream: str, config: OutlierDetection,
                 endpoints: Sequence[Endpoint]) -> None:
        self.upstream = upstream
        self.config = config
        self.endpoints = tuple(endpoints)
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def success(self, ep: Endpoint) -> None:
        ep.consecutive_5xx = 0
        ep.consecutive_errors = 0

    def server_error(self, ep: Endpoint) -> None:
        ep.consecutive_5xx += 1
        if ep.consecutive_5xx >= self.config.consecutive_5xx:
            self.eject(ep, "consecutive_5xx")

    def transport_error(self, ep: Endpoint) -> None:
        ep.consecutive_errors += 1
        if ep.consecutive_errors >= self.config.consecutive_errors:
            self.eject(ep, "consecutive_errors")

    def eject(self, ep: Endpoint, reason: str) -> bool:
        if ep.ejected:
            return False
        ejected = sum(1 for other in self.endpoints if other.ejected)
        if ejected and (ejected + 1) * 100 > self.config.max_ejected_percent * len(
                self.endpoints):
            return False
        now = time.monotonic()
        if ep.released_at and now - ep.released_at > self.config.max_ejection_s:
            ep.ejections = 0
        ep.ejections += 1
        duration = min(self.config.base_ejection_s * ep.ejections, self.config.max_ejection_s)
        ep.ejected = True
        ep.consecutive_5xx = ep.consecutive_errors = 0
        ep.refresh()
        publish(self.upstream, ep)
        from proxy.metrics import UPSTREAM_EJECTIONS

        UPSTREAM_EJECTIONS.labels(self.upstream, ep.address, reason).inc()
        log.warning("upstream target ejected", extra={
            "upstream": self.upstream, "target": ep.address, "reason": reason,
            "ejection_s": duration, "times": ep.ejections})
        loop = asyncio.get_running_loop()
        self._timers[ep.index] = loop.call_later(duration, self._release, ep)
        return True

    def _release(self, ep: Endpoint) -> None:
        self._timers.pop(ep.index, None)
        ep.ejected = False
        ep.released_at = time.monotonic()
        ep.refresh()
        publish(self.upstream, ep)
        log.info("upstream target back from ejection",
                 extra={"upstream": self.upstream, "target": ep.address})

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


class HealthChecker:
    """A background task probing every target of one upstream."""

    def __init__(self, upstream: str, config: HealthCheck, endpoints: Sequence[Endpoint],
                 session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.config = config
        self.endpoints = tuple(endpoints)
        self.session = session
        self._streak: dict[int, int] = {}  # >0: successes in a row, <0: failures in a row
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"health-{self.upstream}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self.check(ep) for ep in self.endpoints))
            await asyncio.sleep(self.config.interval_s)

    async def probe(self, ep: Endpoint) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self.session.get(ep.base + self.config.path, timeout=timeout,
                                        allow_redirects=False,
                                        headers={"User-Agent": "apigw-health-check"}) as response:
                await response.read()
                return 200 <= response.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def check(self, ep: Endpoint) -> None:
        from proxy.metrics import UPSTREAM_HEALTH_CHECKS

        ok = await self.probe(ep)
        UPSTREAM_HEALTH_CHECKS.labels(self.upstream, ep.address,
                                      "success" if ok else "failure").inc()
        streak = self._streak.get(ep.index, 0)
        streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
        self._streak[ep.index] = streak
        if ep.healthy and streak <= -self.config.unhealthy_threshold:
            ep.healthy = False
        elif not ep.healthy and streak >= self.config.healthy_threshold:
            ep.healthy = True
        else:
            return
        ep.refresh()
        publish(self.upstream, ep)
        log.warning("upstream target health changed", extra={
            "upstream": self.upstream, "target": ep.address, "healthy": ep.healthy})
