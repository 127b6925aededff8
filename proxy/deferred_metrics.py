"""Per-request metrics counted in plain numbers and handed to prometheus_client in batches.

A prometheus_client `inc()` is four Python calls and a lock; a request on the full chain made
eight of them (~6% of its instructions, bench/README.md). The counters here count in an
attribute on the hot path instead, and `flush()` hands the sums to the real metric children:

- on every read of the default registry (a collector registered ahead of every metric here
  flushes first), so this process's `/metrics` and `REGISTRY.get_sample_value` are exact;
- every `APIGW_METRICS_FLUSH_S` in a serving worker (`flush_every`), so in multiprocess mode
  the files the supervisor's `/metrics` reads lag by at most that;
- when a worker stops, after its last request.

Counting happens on the event loop's thread only (the request path), and so do the worker's
flushes and its `/metrics`; a registry read from another thread could lose a count that
races with it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram


log = logging.getLogger(__name__)


class _Flushable(Protocol):
    def flush(self) -> None: ...


_PENDING: list[_Flushable] = []


def flush_all() -> None:
    """Hand every deferred count to prometheus_client. A metric that fails to take its count
    is logged and skipped: it never stops the others, a scrape or a worker's shutdown."""
    for deferred in _PENDING:
        try:
            deferred.flush()
        except Exception:
            log.exception("handing a deferred count to prometheus_client failed")


async def flush_every(interval_s: float) -> None:
    """A worker's background flush, until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        flush_all()


class _FlushOnCollect:
    """Registered before any deferred metric: a registry read flushes them first."""

    def collect(self) -> Iterable[Metric]:
        flush_all()
        return ()


REGISTRY.register(_FlushOnCollect())


class DeferredCounter:
    """One counter child (`Counter(...).labels(...)`, or a counter without labels)."""

    __slots__ = ("_child", "pending")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.pending = 0
        _PENDING.append(self)

    def inc(self, amount: int = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        pending = self.pending
        if pending:
            self.pending -= pending
            self._child.inc(pending)


class InFlight:
    """A gauge of things in progress (requests in flight): counted up and down here, set on
    the gauge at each flush (in multiprocess mode each worker sets its own value)."""

    __slots__ = ("_flushed", "_gauge", "level")

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self.level = 0
        self._flushed = 0
        _PENDING.append(self)

    def inc(self) -> None:
        self.level += 1

    def dec(self) -> None:
        self.level -= 1

    def flush(self) -> None:
        level = self.level
        if level != self._flushed:
            self._flushed = level
            self._gauge.set(level)


class DeferredHistogram:
    """One histogram child: per-bucket counts and the sum, added to the child at a flush as
    prometheus_client's own `observe` would have (bucket `le` = the first upper bound >= the
    value; `_sum` the total). Falls back to `observe` per value on a prometheus_client whose
    histogram keeps its state otherwise (tests/test_deferred_metrics.py checks the output
    is the same either way)."""

    __slots__ = ("_bounds", "_child", "_counts", "_observed", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        usable = (bounds is not None and buckets is not None and total is not None
                  and len(bounds) == len(buckets))
        self._bounds: list[float] | None = list(bounds) if usable and bounds else None
        self._counts = [0] * len(self._bounds) if self._bounds is not None else []
        self._sum = 0.0
        self._observed = False
        _PENDING.append(self)

    def observe(self, amount: float) -> None:
        bounds = self._bounds
        if bounds is None:
            self._child.observe(amount)
            return
        self._counts[bisect.bisect_left(bounds, amount)] += 1
        self._sum += amount
        self._observed = True

    def flush(self) -> None:
        if not self._observed:
            return
        counts, total = self._counts, self._sum
        self._counts, self._sum, self._observed = [0] * len(counts), 0.0, False
        child = self._child
        child._sum.inc(total)
        buckets = child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)

