"""When a hot-path dependency (Redis for rate limits, Redis for the response cache) fails: stop
calling it for a backoff (1 s doubling to 10 s by default), then let one probe decide; a
success ends the degraded state. The caller decides what "not calling it" means (the local
limiter, a cache BYPASS); this class only keeps the state, the gauge and the two log lines.

    if gate.skipping():            # degraded and still backing off
        return fallback()
    probing = gate.begin()         # True: this call is the one probe
    try:
        result = await call()
    except Exception as exc:
        gate.failed(exc, probing)
        return fallback()
    gate.succeeded()

While `gate.degraded` is False, `skipping`, `begin` and `succeeded` do nothing (False, False,
no-op); a per-request caller may skip those calls then (proxy/ratelimit.py's
`FailoverRateLimiter.check` does). `failed` must always be called.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import Gauge


class DegradeGate:
    def __init__(self, gauge: Gauge, log: logging.Logger, degraded_message: str,
                 recovered_message: str, *, min_backoff_s: float = 1.0,
                 max_backoff_s: float = 10.0, log_extra: dict[str, Any] | None = None) -> None:
        self._gauge = gauge
        self._log = log
        self._degraded_message = degraded_message
        self._recovered_message = recovered_message
        self._log_extra = log_extra or {}
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._backoff = min_backoff_s
        self._retry_at = 0.0
        self.degraded = False
        self.last_error = ""

    def skipping(self) -> bool:
        """Degraded and the backoff has not run out: do not call the dependency."""
        return self.degraded and time.monotonic() < self._retry_at

    def begin(self) -> bool:
        """Before a call; True when it is the probe of a degraded dependency (one at a time:
        the next probe waits another backoff)."""
        probing = self.degraded
        if probing:
            self._retry_at = time.monotonic() + self._backoff
        return probing

    def failed(self, exc: BaseException, probing: bool) -> None:
        self.last_error = type(exc).__name__
        if self.degraded:
            if not probing:
                return  # a call already in flight when the dependency went away
            self._backoff = min(self._backoff * 2, self._max_backoff)
        else:
            self.degraded = True
            self._backoff = self._min_backoff
            self._gauge.set(1)
            self._log.warning(self._degraded_message,
                              extra={"error": repr(exc)[:200], **self._log_extra})
        self._retry_at = time.monotonic() + self._backoff

    def succeeded(self) -> None:
        if not self.degraded:
            return
        self.degraded = False
        self._backoff = self._min_backoff
        self.last_error = ""
        self._gauge.set(0)
        self._log.info(self._recovered_message)
