"""Prometheus metrics of the data plane, and the `observe` step that records them.

The request duration histogram follows the OpenTelemetry `http.server.request.duration`
conventions (seconds, the OTel default buckets). With several workers, prometheus_client's
multiprocess mode aggregates them: PROMETHEUS_MULTIPROC_DIR must be set before this module
is imported (proxy/server.py does that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import Counter, Gauge, Histogram

from proxy.deferred_metrics import DeferredCounter, DeferredHistogram, InFlight

if TYPE_CHECKING:
    from prometheus_client.metrics import Histogram as HistogramChild

    from proxy.app import Exchange

OTEL_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
                                2.5, 5.0, 7.5, 10.0)
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                  "CONNECT", "TRACE"})

REQUEST_DURATION = Histogram(
    "apigw_http_server_request_duration_seconds",
    "Duration of HTTP server requests (OTel http.server.request.duration)",
    ["route_id", "http_request_method", "status_class"], buckets=OTEL_DURATION_BUCKETS)
ACTIVE_REQUESTS = Gauge("apigw_http_server_active_requests", "Requests in flight",
                        multiprocess_mode="livesum")
UPSTREAM_ERRORS = Counter("apigw_upstream_errors_total",
                          "Upstream requests that failed, by upstream and error class",
                          ["upstream", "error_type"])
RATELIMIT_OUTCOMES = Counter("apigw_proxy_ratelimit_outcomes_total",
                             "Requests by rate-limit outcome (allowed, limited, shadow_limited, "
                             "error)", ["outcome"])
CONFIG_INFO = Gauge("apigw_config_info", "The loaded gateway config (value 1)", ["version"],
                    multiprocess_mode="livemax")
WORKERS = Gauge("apigw_proxy_workers", "Worker processes alive (set by the supervisor)",
                multiprocess_mode="livemax")
WORKER_RESTARTS = Counter("apigw_proxy_worker_restarts_total", "Workers restarted after dying")
UPSTREAM_TARGET_AVAILABLE = Gauge(
    "apigw_upstream_target_available",
    "1 when a target takes traffic (health check passing, not ejected); the minimum over "
    "workers", ["upstream", "target"], multiprocess_mode="livemin")
UPSTREAM_EJECTIONS = Counter("apigw_upstream_ejections_total",
                             "Targets ejected by outlier detection, by reason",
                             ["upstream", "target", "reason"])
UPSTREAM_HEALTH_CHECKS = Counter("apigw_upstream_health_checks_total",
                                 "Active health checks by result (success, failure)",
                                 ["upstream", "target", "result"])
UPSTREAM_PANIC = Counter("apigw_upstream_panic_total",
                         "Picks made while no target was available (routed to any target)",
                         ["upstream"])
CIRCUIT_STATE = Gauge("apigw_circuit_state",
                      "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
                      ["upstream"], multiprocess_mode="livemax")
CIRCUIT_TRANSITIONS = Counter("apigw_circuit_transitions_total",
                              "Circuit breaker state changes, by the state entered",
                              ["upstream", "state"])
RETRIES = Counter("apigw_upstream_retries_total",
                  "Retry decisions per route: retried, budget_exhausted, not_retryable",
                  ["route_id", "decision"])
REJECTIONS = Counter("apigw_proxy_rejections_total",
                     "Requests the gateway refused to forward, by reason (route_overloaded, "
                     "circuit_open, payload_too_large, ...)", ["route_id", "reason"])
CONFIG_RELOADS = Counter("apigw_config_reloads_total",
                         "Config reloads by outcome (success, invalid, error, unchanged)",
                         ["outcome"])
_OUTCOMES: Final = {outcome: DeferredCounter(RATELIMIT_OUTCOMES.labels(outcome))
                   for outcome in ("allowed", "limited", "shadow_limited", "error")}
_IN_FLIGHT: Final = InFlight(ACTIVE_REQUESTS)
DURATION_CHILDREN_MAX: Final = 10_000  # (route, method, status class) kept counting deferred
_DURATIONS: dict[tuple[str, str, int], DeferredHistogram] = {}


def _duration_child(key: tuple[str, str, int]) -> DeferredHistogram | HistogramChild:
    method = key[1] if key[1] in KNOWN_METHODS else "_OTHER"
    child = REQUEST_DURATION.labels(key[0], method, f"{key[2]}xx")
    if len(_DURATIONS) >= DURATION_CHILDREN_MAX:
        return child
    deferred = _DURATIONS[key] = DeferredHistogram(child)
    return deferred


class ObserveStep:
    """Counts requests in flight on the way in; records duration and errors on the way out
    (the per-request counts deferred: proxy/deferred_metrics.py)."""

    async def access(self, ex: Exchange) -> None:
        _IN_FLIGHT.inc()
        ex.observed = True

    def log(self, ex: Exchange) -> None:
        if not ex.observed:
            return
        _IN_FLIGHT.dec()
        event = ex.event
        key = (event.route_id, event.http_request_method, event.http_response_status_code // 100)
        child = _DURATIONS.get(key) or _duration_child(key)
        child.observe(event.duration_ms / 1000.0)
        error = event.error_type
        if error.startswith("upstream_"):
            UPSTREAM_ERRORS.labels(event.upstream, error).inc()
        outcome = event.ratelimit_outcome
        if outcome != "none":
            _OUTCOMES[outcome].inc()
