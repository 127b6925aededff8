"""DegradeGate: the property a per-request caller relies on to skip its calls while healthy
(proxy/ratelimit.py's FailoverRateLimiter.check)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge

from proxy.degrade import DegradeGate


def _gate(registry: CollectorRegistry) -> DegradeGate:
    gauge = Gauge("test_degraded", "degraded", registry=registry)
    return DegradeGate(gauge, logging.getLogger("test"), "down", "up", min_backoff_s=60.0)


def test_a_healthy_gate_ignores_skipping_begin_and_succeeded() -> None:
    registry = CollectorRegistry()
    gate = _gate(registry)
    before = dict(vars(gate))
    assert gate.skipping() is False
    assert gate.begin() is False
    gate.succeeded()
    assert vars(gate) == before
    assert registry.get_sample_value("test_degraded") == 0.0


def test_a_failure_degrades_and_a_probe_success_recovers() -> None:
    registry = CollectorRegistry()
    gate = _gate(registry)
    gate.failed(ConnectionError("refused"), probing=False)
    assert gate.degraded
    assert gate.skipping()
    assert registry.get_sample_value("test_degraded") == 1.0
    gate.succeeded()
    assert not gate.degraded
    assert gate.last_error == ""
    assert registry.get_sample_value("test_degraded") == 0.0
