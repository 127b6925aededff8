"""Deferred per-request metrics (proxy/deferred_metrics.py): what prometheus_client exposes after
a flush is what it would have exposed had every value been counted directly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from proxy.deferred_metrics import DeferredCounter, DeferredHistogram, InFlight, flush_all
from proxy.metrics import OTEL_DURATION_BUCKETS

# On a bound, between bounds, above the last finite one, zero, tiny, repeated.
VALUES = (0.0, 1e-9, 0.005, 0.0050001, 0.01, 0.3, 0.3, 0.75, 9.99, 10.0, 10.5, 400.0, 0.02)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text format without `_created` lines (creation times differ between registries)."""
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_a_flushed_histogram_exposes_what_observe_would_have() -> None:
    direct_registry, deferred_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("d", "d", ["route"], buckets=OTEL_DURATION_BUCKETS,
                       registry=direct_registry)
    deferred = Histogram("d", "d", ["route"], buckets=OTEL_DURATION_BUCKETS,
                         registry=deferred_registry)
    counted = DeferredHistogram(deferred.labels("orders"))
    for value in VALUES:
        direct.labels("orders").observe(value)
        counted.observe(value)
    assert exposition(deferred_registry) != exposition(direct_registry)  # not flushed yet
    counted.flush()
    assert exposition(deferred_registry) == exposition(direct_registry)
    for value in VALUES[:3]:  # a second batch adds to the first
        direct.labels("orders").observe(value)
        counted.observe(value)
    counted.flush()
    counted.flush()  # nothing new: no change
    assert exposition(deferred_registry) == exposition(direct_registry)


def test_a_histogram_without_the_expected_state_is_observed_directly() -> None:
    class Opaque:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    child = Opaque()
    counted = DeferredHistogram(child)  # type: ignore[arg-type]
    counted.observe(0.25)
    counted.flush()
    assert child.seen == [0.25]


@pytest.fixture
def registered_counter() -> Iterator[Counter]:
    counter = Counter("apigw_test_deferred_total", "test", ["outcome"])
    try:
        yield counter
    finally:
        REGISTRY.unregister(counter)


def test_a_read_of_the_default_registry_flushes_first(registered_counter: Counter) -> None:
    counted = DeferredCounter(registered_counter.labels("allowed"))
    for _ in range(3):
        counted.inc()
    counted.inc(2)
    assert registered_counter.labels("allowed")._value.get() == 0  # counted, not handed on
    assert REGISTRY.get_sample_value("apigw_test_deferred_total", {"outcome": "allowed"}) == 5
    assert "apigw_test_deferred_total{outcome=\"allowed\"} 5.0" in generate_latest().decode()
    counted.inc()
    flush_all()
    assert registered_counter.labels("allowed")._value.get() == 6


def test_in_flight_sets_the_gauge_at_each_flush() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("in_flight", "test", registry=registry)
    level = InFlight(gauge)
    level.inc()
    level.inc()
    level.dec()
    assert registry.get_sample_value("in_flight") == 0
    level.flush()
    assert registry.get_sample_value("in_flight") == 1
    level.dec()
    flush_all()
    assert registry.get_sample_value("in_flight") == 0


def test_a_failing_metric_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def inc(self, amount: float = 1) -> None:
            raise OSError("the metrics file is gone")

    registry = CollectorRegistry()
    healthy = Counter("after_broken", "test", registry=registry)
    broken = DeferredCounter(Broken())  # type: ignore[arg-type]
    counted = DeferredCounter(healthy)
    broken.inc()
    counted.inc(4)
    with caplog.at_level("ERROR", logger="proxy.deferred_metrics"):
        flush_all()
    assert registry.get_sample_value("after_broken_total") == 4
    assert "deferred count" in caplog.text
