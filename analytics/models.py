"""Records the analytics job produces and the control-plane API serves.

`Anomaly` rows live in the ClickHouse `anomalies` table; `Recommendation` records live in
Redis (hash `RedisKeys.recommendations`, id -> JSON) next to the policies they propose.
"""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from proxy.policy import Policy


class Endpoint(BaseModel):
    """The endpoint identity used everywhere: route id + method + route template."""

    model_config = ConfigDict(frozen=True)

    route_id: str
    method: str
    http_route: str

    @property
    def key(self) -> str:
        return f"{self.route_id} {self.method} {self.http_route}"


class AnomalyKind(StrEnum):
    ERROR_SPIKE = "error_spike"
    LATENCY_REGRESSION = "latency_regression"
    TRAFFIC_SURGE = "traffic_surge"
    TRAFFIC_DROP = "traffic_drop"
    AUTH_FAILURE_BURST = "auth_failure_burst"
    ENUMERATION = "enumeration"
    CLIENT_DOMINANCE = "client_dominance"
    UNDECLARED_ENDPOINT = "undeclared_endpoint"


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Anomaly(BaseModel):
    id: str
    detected_at: float  # epoch seconds
    window_start: float
    window_end: float
    endpoint: Endpoint
    kind: AnomalyKind
    severity: Severity
    score: float = Field(ge=0, le=1)
    metric: str  # e.g. error_rate
    baseline: float
    observed: float
    top_clients: list[str] = Field(default_factory=list)
    example_request_ids: list[str] = Field(default_factory=list)
    example_trace_ids: list[str] = Field(default_factory=list)
    summary: str = ""


class RecommendationStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    APPLIED = "applied"
    DISMISSED = "dismissed"
    ROLLED_BACK = "rolled_back"
    EXPIRED = "expired"


class RecommendationAction(StrEnum):
    """What a recommendation does (added field; records without it are `tighten`)."""

    TIGHTEN = "tighten"  # a per-client limit for every client of the endpoint
    TARGETED = "targeted"  # a limit for one flagged client (policy.match_key), always expiring
    LOOSEN = "loosen"  # a looser endpoint limit; never applied automatically


class ImpactEstimate(BaseModel):
    """What the proposed limit would have done to the recorded traffic."""

    window_s: float
    clients_limited: int
    requests_limited: int
    flagged_clients_limited: int
    flagged_requests_limited: int
    other_clients_limited: int
    other_requests_limited: int


class Recommendation(BaseModel):
    id: str
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    endpoint: Endpoint
    anomaly_ids: list[str] = Field(default_factory=list)
    policy: Policy  # the policy to apply, in the format the proxy enforces
    current_policy_id: str | None = None  # the policy it tightens, if any
    rationale: str
    client_rate_p50: float = 0.0  # per-client requests per window, flagged clients excluded
    client_rate_p90: float = 0.0
    client_rate_p99: float = 0.0
    confidence: float = Field(default=0.0, ge=0, le=1)
    impact: ImpactEstimate | None = None
    flagged_clients: list[str] = Field(default_factory=list)
    status: RecommendationStatus = RecommendationStatus.PENDING
    status_reason: str = ""
    status_by: str = "analytics"
    action: RecommendationAction = RecommendationAction.TIGHTEN  # additive, defaulted
    target_client: str | None = None  # the client of a `targeted` recommendation
