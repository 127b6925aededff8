"""Write-back: recommendations into Redis, automatic application, the leader lease.

Recommendations live in the hash `RedisKeys.recommendations` (id -> Recommendation JSON).
Their ids are deterministic per endpoint and anomaly window, and a still-pending
recommendation for the same endpoint is updated in place, so re-runs never duplicate one.
Every creation and status change is audited through `PolicyStore.audit`.

Automatic application (mode `auto` for the route, no kill switch) stores the policy through
`PolicyStore.put` (which versions, audits and publishes it) as shaped by
`analytics.guardrails.Guardrails.stage` (floor, bounded step, shadow first, expiry), then
marks the recommendation `applied`; `Guardrails.review` later promotes, withdraws or rolls it
back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis

from analytics.models import Recommendation, RecommendationAction, RecommendationStatus
from analytics.settings import AnalyticsSettings, AutoMode
from proxy.policy import Mode, Policy, RedisKeys, Source
from proxy.policy_store import AuditRecord, PolicyStore

if TYPE_CHECKING:
    from analytics.guardrails import Guardrails

log = logging.getLogger(__name__)

ACTOR: Final = "analytics"

# Renew only a lease this instance holds; release likewise (compare-and-act in one step).
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LeaderLease:
    """A Redis lease (SET NX PX) so that only one analytics instance acts at a time."""

    def __init__(self, redis: aioredis.Redis, key: str, ttl_s: float,
                 holder: str = "") -> None:
        self._redis = redis
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = f"{holder or 'analytics'}:{uuid.uuid4().hex[:12]}"

    async def acquire(self) -> bool:
        """Take the lease, or extend it if this instance holds it; False if another does."""
        if await self._redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        return bool(await self._redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    async def release(self) -> bool:
        return bool(await self._redis.eval(_RELEASE, 1, self.key, self.token))

    async def holder(self) -> str | None:
        value = await self._redis.get(self.key)
        return None if value is None else _text(value)


@dataclass
class WriteResult:
    stored: list[Recommendation] = field(default_factory=list)  # as stored now
    created: list[str] = field(default_factory=list)  # ids of new recommendations
    applied: list[str] = field(default_factory=list)  # ids applied now


class WriteBack:
    """Stores recommendations and, where allowed, applies them as policies."""

    def __init__(self, settings: AnalyticsSettings, redis: aioredis.Redis,
                 store: PolicyStore) -> None:
        self._settings = settings
        self._redis = redis
        self._store = store
        self._keys = RedisKeys(settings.key_prefix)
        self.guardrails: Guardrails | None = None  # set by the job; shapes automatic changes

    async def load_all(self) -> list[Recommendation]:
        raw = await self._redis.hgetall(self._keys.recommendations)
        records: list[Recommendation] = []
        for key, value in raw.items():
            try:
                records.append(Recommendation.model_validate_json(value))
            except ValueError:
                log.warning("unreadable recommendation skipped", extra={"rec_id": _text(key)})
        return records

    async def get(self, recommendation_id: str) -> Recommendation | None:
        raw = await self._redis.hget(self._keys.recommendations, recommendation_id)
        return None if raw is None else Recommendation.model_validate_json(raw)

    async def save(self, recommendation: Recommendation) -> None:
        await self._redis.hset(self._keys.recommendations, recommendation.id,
                               recommendation.model_dump_json())

    async def mode_for(self, route_id: str) -> AutoMode:
        """The route's override from Redis, else the configured default."""
        raw = await self._redis.hget(self._keys.auto_mode, route_id)
        if raw is not None:
            try:
                return AutoMode(_text(raw).strip().lower())
            except ValueError:
                log.warning("ignoring unknown auto mode", extra={"route_id": route_id,
                                                                 "auto_mode": _text(raw)})
        return self._settings.auto_mode

    async def kill_switch(self) -> bool:
        return _text(await self._redis.get(self._keys.kill_switch) or b"") == "1"

    async def write(self, recommendations: Sequence[Recommendation],
                    now: float | None = None) -> WriteResult:
        """Store the recommendations (created or updated); apply those in auto mode."""
        now = time.time() if now is None else now
        existing = await self.load_all() if recommendations else []
        pending_by_slot = {_slot(rec): rec for rec in existing
                           if rec.status == RecommendationStatus.PENDING}
        by_id = {rec.id: rec for rec in existing}
        result = WriteResult()
        killed = await self.kill_switch() if recommendations else False
        for proposal in recommendations:
            mode = await self.mode_for(proposal.endpoint.route_id)
            if mode == AutoMode.OFF:
                continue
            previous = by_id.get(proposal.id) or pending_by_slot.get(_slot(proposal))
            if previous is not None and previous.status != RecommendationStatus.PENDING:
                continue  # decided already (applied, dismissed, ...): leave it alone
            record = await self._upsert(proposal, previous, now)
            if previous is None:
                result.created.append(record.id)
            if mode == AutoMode.AUTO and proposal.action == RecommendationAction.LOOSEN:
                log.info("loosening is never automatic: left pending", extra={
                    "rec_id": record.id})
            elif mode == AutoMode.AUTO:
                if killed:
                    log.info("kill switch on: not applying", extra={"rec_id": record.id})
                else:
                    record = await self.apply(record, now=now, actor=ACTOR,
                                              reason="auto mode")
                    result.applied.append(record.id)
            result.stored.append(record)
        return result

    async def _upsert(self, proposal: Recommendation, previous: Recommendation | None,
                      now: float) -> Recommendation:
        if previous is None:
            await self.save(proposal)
            await self._audit("recommendation.created", proposal, None, proposal,
                              reason=proposal.rationale, now=now)
            log.info("recommendation created", extra={"rec_id": proposal.id,
                                                      "endpoint": proposal.endpoint.key,
                                                      "limit": proposal.policy.limit})
            return proposal
        record = proposal.model_copy(update={
            "id": previous.id,
            "created_at": previous.created_at,
            "updated_at": now,
            "anomaly_ids": sorted(set(previous.anomaly_ids) | set(proposal.anomaly_ids)),
        })
        await self.save(record)
        return record

    async def apply(self, record: Recommendation, *, now: float, actor: str,
                    reason: str) -> Recommendation:
        """Store the recommended policy (expiring, source analytics, within the guardrails);
        mark the recommendation applied."""
        if self.guardrails is not None:
            policy, notes = await self.guardrails.stage(record, now)
        else:
            policy, notes = Policy.model_validate({
                **record.policy.model_dump(), "mode": Mode.ENFORCE, "source": Source.ANALYTICS,
                "expires_at": now + self._settings.auto_expiry_s}), []
        evidence = ",".join(record.anomaly_ids)
        guarded = f" [guardrails: {'; '.join(notes)}]" if notes else ""
        stored = await self._store.put(policy, actor=actor,
                                       reason=f"{reason}: {record.rationale}{guarded}",
                                       evidence=evidence)
        return await self.transition(record, RecommendationStatus.APPLIED, actor=actor,
                                     reason=f"{reason}: policy {stored.id} v{stored.version} "
                                            f"({stored.mode}, limit {stored.limit}, expires "
                                            f"{policy.expires_at:.0f}){guarded}",
                                     now=now, policy=stored)

    async def record_policy(self, record: Recommendation, policy: Policy, *, action: str,
                            reason: str, now: float) -> Recommendation:
        """Keep the status, point the recommendation at a new version of its policy, audit."""
        after = record.model_copy(update={"policy": policy, "status_reason": reason,
                                          "updated_at": now})
        await self.save(after)
        await self._audit(action, after, record, after, reason=reason, now=now)
        return after

    async def transition(self, record: Recommendation, status: RecommendationStatus, *,
                         actor: str, reason: str, now: float | None = None,
                         policy: Policy | None = None) -> Recommendation:
        """Change a recommendation's status, store it and audit the transition."""
        now = time.time() if now is None else now
        update: dict[str, Any] = {"status": status, "status_reason": reason,
                                  "status_by": actor, "updated_at": now}
        if policy is not None:
            update["policy"] = policy
        after = record.model_copy(update=update)
        await self.save(after)
        await self._audit(f"recommendation.{status}", after, record, after, reason=reason,
                          now=now, actor=actor)
        return after

    async def _audit(self, action: str, subject: Recommendation,
                     before: Recommendation | None, after: Recommendation | None, *,
                     reason: str, now: float, actor: str = ACTOR) -> None:
        await self._store.audit(AuditRecord(
            ts=now, actor=actor, action=action, subject=f"recommendation:{subject.id}",
            reason=reason, evidence=",".join(subject.anomaly_ids),
            before=_summary(before), after=_summary(after),
        ))


def _slot(record: Recommendation) -> tuple[str, str, str]:
    """What one pending recommendation stands for: endpoint, action and targeted client (a
    re-run updates the pending record of its slot instead of adding one)."""
    return (record.endpoint.key, str(record.action), record.target_client or "")


def _summary(record: Recommendation | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"status": str(record.status), "endpoint": record.endpoint.key,
            "policy_id": record.policy.id, "limit": record.policy.limit,
            "mode": str(record.policy.mode), "version": record.policy.version,
            "window_s": record.policy.window_s, "confidence": record.confidence,
            "action": str(record.action), "target_client": record.target_client,
            "expires_at": record.policy.expires_at}
