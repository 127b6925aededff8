"""The policy record: the contract between whoever sets limits and the proxy that enforces them.

A policy says who it applies to (route, method, key-by, optionally one key value), the limit,
the mode, and its provenance (source, version, expiry, who changed it and why). Policies are
seeded from the gateway YAML (source=config), and changed at runtime by operators and the
analytics job through `proxy.policy_store.PolicyStore`. See docs/policies.md.
"""

from __future__ import annotations

import re
import time
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ANY: Final = "*"
_KEY_PART = re.compile(r"^(client_id|api_key|ip|tenant|header:[A-Za-z0-9-]{1,64})$")
_PERIOD_SECONDS: Final = {"day": 86_400, "month": 86_400 * 31}
_POLICY_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,200}$")


class Mode(StrEnum):
    ENFORCE = "enforce"  # reject over-limit requests with 429
    SHADOW = "shadow"  # count and record "would have limited", never reject
    OFF = "off"  # not evaluated


class Source(StrEnum):
    CONFIG = "config"
    OPERATOR = "operator"
    ANALYTICS = "analytics"


class Algorithm(StrEnum):
    GCRA = "gcra"  # token bucket semantics: `limit` per `window_s`, bursts up to `burst`
    SLIDING_WINDOW = "sliding_window"  # weighted count of this and the previous window


class QuotaPeriod(StrEnum):
    """Calendar periods (UTC) of a quota: `limit` requests per period, reset at its start."""

    DAY = "day"
    MONTH = "month"


class Policy(BaseModel):
    """One rate-limit policy. `limit` requests per `window_s` per distinct key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(description="Stable identity; a change bumps `version`.")]
    route_id: str = Field(default=ANY, description="Route it applies to, or * for all routes.")
    method: str = Field(default=ANY, description="HTTP method it applies to, or *.")
    key_by: str = Field(default="client_id",
                        description="What a separate budget is kept for: client_id, api_key, ip, "
                                    "tenant, header:<Name>, or several joined by '+'.")
    match_key: str | None = Field(default=None,
                                  description="When set, applies only to this one key value "
                                              "(a targeted limit for one client).")
    tenant: str | None = Field(default=None, description="When set, applies only to this tenant.")
    plan: str | None = Field(default=None,
                             description="When set, applies only to principals of this plan.")
    algorithm: Algorithm = Algorithm.GCRA
    limit: int = Field(gt=0, le=10_000_000, description="Requests allowed per window.")
    window_s: float = Field(gt=0, le=86_400 * 31, description="Window length in seconds.")
    burst: int | None = Field(default=None, gt=0, le=10_000_000,
                              description="Largest burst; defaults to `limit`.")
    quota_period: QuotaPeriod | None = Field(
        default=None, description="When set, this is a quota: `limit` per calendar period "
                                  "(UTC day or month), checked besides the rate limit; "
                                  "`window_s`, `burst` and `algorithm` are then ignored.")
    fail_mode: Literal["open", "closed"] | None = Field(
        default=None, description="Redis unreachable: open = local limiter, closed = 503; "
                                  "None = the gateway's ratelimit.fail_mode.")
    mode: Mode = Mode.ENFORCE
    source: Source = Source.CONFIG
    version: int = Field(default=1, ge=1)
    expires_at: float | None = Field(default=None, description="Epoch seconds; None = never.")
    updated_at: float = Field(default_factory=time.time)
    updated_by: str = "config"
    reason: str = ""

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _POLICY_ID.match(value):
            raise ValueError("must be 1-200 characters of letters, digits and ._:@/-")
        return value

    @field_validator("method")
    @classmethod
    def _method_upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("key_by")
    @classmethod
    def _key_by_parts(cls, value: str) -> str:
        parts = value.split("+")
        bad = [part for part in parts if not _KEY_PART.match(part)]
        if bad:
            raise ValueError(f"unknown key part(s) {bad}; use client_id, api_key, ip, tenant "
                             "or header:<Name>, joined by '+'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _quota_window(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("quota_period") and "window_s" not in data:
            period = str(data["quota_period"])
            return {**data, "window_s": _PERIOD_SECONDS.get(period, 86_400)}
        return data

    @model_validator(mode="after")
    def _burst_default(self) -> Policy:
        if self.burst is None:
            object.__setattr__(self, "burst", self.limit)
        return self

    def is_expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    @property
    def specificity(self) -> int:
        """Higher wins when several policies match a request."""
        return ((self.match_key is not None) * 16 + (self.route_id != ANY) * 8
                + (self.method != ANY) * 4 + (self.tenant is not None) * 2
                + (self.plan is not None) * 1)

    @property
    def is_quota(self) -> bool:
        return self.quota_period is not None

    def applies_to(self, route_id: str, method: str, tenant: str, plan: str = "") -> bool:
        return ((self.route_id == ANY or self.route_id == route_id)
                and (self.method == ANY or self.method == method)
                and (self.tenant is None or self.tenant == tenant)
                and (self.plan is None or self.plan == plan))

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Policy:
        return cls.model_validate_json(raw)


class RedisKeys:
    """The Redis key layout shared by the proxy, the analytics job and the control plane.

    All keys live under one prefix. Rate-limit state keys carry a hash tag per counter so each
    check touches one slot on Redis Cluster.
    """

    def __init__(self, prefix: str = "apigw") -> None:
        self.prefix = prefix
        self.policies = f"{prefix}:policies"  # hash: policy id -> Policy JSON (current version)
        self.policies_version = f"{prefix}:policies:version"  # int, bumped on every change
        self.policies_channel = f"{prefix}:policies:changed"  # pub/sub: policy id per change
        self.audit = f"{prefix}:audit"  # stream of audit records
        self.recommendations = f"{prefix}:recommendations"  # hash: id -> Recommendation JSON
        self.auto_mode = f"{prefix}:analytics:auto_mode"  # hash: route group -> off|recommend|auto
        self.kill_switch = f"{prefix}:analytics:kill_switch"  # "1" stops automatic changes
        # hash: anomaly id -> AnomalyReview JSON (security review: dismissed / actioned)
        self.anomaly_reviews = f"{prefix}:anomaly_reviews"
        self.analytics_lock = f"{prefix}:analytics:leader"  # lease held by the acting instance
        # Event loss accounting (docs/reliability.md): hash emitter id -> heartbeat JSON
        # {assigned, handed, at, closed}; hash emitter id -> final "assigned" mark of a worker
        # that died (written by the proxy's parent); the lease of the collectors' accountant.
        self.event_emitters = f"{prefix}:events:emitters"
        self.event_emitter_deaths = f"{prefix}:events:emitters:deaths"
        self.loss_accountant_lock = f"{prefix}:events:accountant"

    def policy_history(self, policy_id: str) -> str:
        """List of every version of one policy, newest first."""
        return f"{self.prefix}:policy_history:{policy_id}"

    def ratelimit(self, policy_id: str, version: int, key: str) -> str:
        return f"{self.prefix}:rl:{{{policy_id}:{key}}}:{version}"

    def quota(self, policy_id: str, version: int, key: str, period: str) -> str:
        """Counter of one key for one quota period (e.g. 2025-06-01 or 2025-06)."""
        return f"{self.prefix}:quota:{{{policy_id}:{key}}}:{version}:{period}"

    def cache_resource(self, route_id: str, resource: str) -> str:
        """Response cache (proxy/cache_redis.py): the prefix of one cached resource's keys,
        `resource` a digest of its path and query. Its entries, Vary'd names and index share
        one hash tag, so an invalidation touches one Redis Cluster slot."""
        return f"{self.prefix}:cache:{{{route_id}:{resource}}}"

    def cache_entry(self, route_id: str, resource: str, variant: str) -> str:
        """One stored response (`variant`: a digest of its whole cache key), with PX."""
        return f"{self.cache_resource(route_id, resource)}:e:{variant}"

    def cache_vary(self, route_id: str, resource: str, primary: str) -> str:
        """The request headers the stored response's `Vary` names, for one primary key."""
        return f"{self.cache_resource(route_id, resource)}:v:{primary}"

    def cache_index(self, route_id: str, resource: str) -> str:
        """Set of the entry and Vary keys of one resource (what invalidation deletes)."""
        return f"{self.cache_resource(route_id, resource)}:i"

    @property
    def api_keys(self) -> str:
        """Hash: API-key digest -> ApiKeyRecord JSON (never the key itself)."""
        return f"{self.prefix}:apikeys"

    @property
    def api_key_ids(self) -> str:
        """Hash: API-key id -> its digest (to revoke by id)."""
        return f"{self.prefix}:apikeys:ids"

    @property
    def api_keys_version(self) -> str:
        return f"{self.prefix}:apikeys:version"

    @property
    def api_keys_channel(self) -> str:
        return f"{self.prefix}:apikeys:changed"
