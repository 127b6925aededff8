"""Security review decisions on anomalies (dismissed / actioned), kept in Redis.

Hash `RedisKeys.anomaly_reviews` (`<prefix>:anomaly_reviews`): anomaly id -> AnomalyReview
JSON. The anomaly rows themselves stay immutable in ClickHouse; the API joins the two when it
answers, and turns a status filter into bound id lists for ClickHouse (`outcomes`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from proxy.policy import RedisKeys

log = logging.getLogger(__name__)


class ReviewOutcome(StrEnum):
    DISMISSED = "dismissed"
    ACTIONED = "actioned"


class AnomalyReview(BaseModel):
    outcome: ReviewOutcome
    by: str
    reason: str
    at: float
    policy_id: str = ""  # the targeted limit set for it, when actioned


class ReviewStore:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self.key = RedisKeys(prefix).anomaly_reviews

    async def get_many(self, ids: Sequence[str]) -> dict[str, AnomalyReview]:
        if not ids:
            return {}
        raws = await self._redis.hmget(self.key, list(ids))
        found = {}
        for anomaly_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            try:
                found[anomaly_id] = AnomalyReview.model_validate_json(raw)
            except ValidationError:
                log.warning("skipping an unreadable anomaly review", extra={"id": anomaly_id})
        return found

    async def outcomes(self) -> dict[str, ReviewOutcome]:
        """Every reviewed anomaly id and its outcome (to filter anomalies by status)."""
        found: dict[str, ReviewOutcome] = {}
        for key, raw in (await self._redis.hgetall(self.key)).items():
            anomaly_id = key.decode() if isinstance(key, bytes) else str(key)
            try:
                found[anomaly_id] = AnomalyReview.model_validate_json(raw).outcome
            except ValidationError:
                log.warning("skipping an unreadable anomaly review", extra={"id": anomaly_id})
        return found

    async def put(self, anomaly_id: str, review: AnomalyReview) -> None:
        await self._redis.hset(self.key, anomaly_id, review.model_dump_json())
