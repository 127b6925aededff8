"""What every control-plane handler shares: settings, clients, the caller, the audit trail."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import Counter
from pydantic import Field, field_validator

from analytics.auth import Principal, parse_tokens
from analytics.job import Scheduler
from analytics.queries import Queries
from analytics.reviews import ReviewStore
from apigw.settings import CommonSettings
from proxy.policy import RedisKeys
from proxy.policy_store import AuditRecord, PolicyStore

PREFIX: Final = "/api/v1"
PRINCIPAL: Final = web.RequestKey("principal", Principal)

API_ACTIONS = Counter("apigw_api_actions_total", "Audited control-plane actions.", ["action"])


class ApiSettings(CommonSettings):
    listen: str = Field(default="127.0.0.1:8088", description="HOST:PORT of the API.")
    api_tokens: str = Field(default="", description="name:role:token,... ; empty = no auth. "
                                                    "Roles: viewer, security, operator. Give "
                                                    "a token as sha256:<hex> to store only "
                                                    "its hash.")
    api_public_reads: bool = Field(default=True, description="Reads need no token even when "
                                                             "tokens are configured.")
    api_run_timeout_s: float = Field(default=120.0, gt=0,
                                     description="How long POST /analytics/run waits.")
    api_open_anomaly_s: float = Field(default=1800.0, gt=0,
                                      description="An unreviewed anomaly whose window ended "
                                                  "this recently is `open`, else `resolved`.")

    @field_validator("api_tokens")
    @classmethod
    def _tokens_shape(cls, value: str) -> str:
        parse_tokens(value)
        return value


@dataclass
class ApiContext:
    settings: ApiSettings
    redis: aioredis.Redis
    queries: Queries
    store: PolicyStore
    scheduler: Scheduler | None
    keys: RedisKeys = field(init=False)
    reviews: ReviewStore = field(init=False)

    def __post_init__(self) -> None:
        self.keys = RedisKeys(self.settings.key_prefix)
        self.reviews = ReviewStore(self.redis, self.settings.key_prefix)

    async def audit(self, request: web.Request, action: str, subject: str, reason: str,
                    before: dict[str, Any] | None, after: dict[str, Any] | None,
                    evidence: str = "") -> None:
        """Record an action with the calling principal as the actor."""
        await self.store.audit(AuditRecord(ts=time.time(), actor=request[PRINCIPAL].name,
                                           action=action, subject=subject, reason=reason,
                                           evidence=evidence, before=before, after=after))
        API_ACTIONS.labels(action).inc()


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
