"""Guardrails of automatic tightening: what an automatic limit may be, and when it stays.

- **Floor**: never below legitimate clients' p99 per window x `floor_headroom` (not for a
  targeted limit: it binds one flagged client only, `match_key`, and expires).
- **Bounded step**: never below `max_step` x the current automatic (analytics) limit of the
  endpoint, so successive automatic changes at most halve it (default 0.5).
- **Shadow first**: a new automatic limit is stored in `shadow` mode (the proxy counts
  "would have limited" as `shadow_limited` events, never rejects); after `shadow_s` it is
  promoted to `enforce` only if the shadow hits fall on the flagged clients (at most
  `shadow_max_other_share` of them from others); with no shadow hits at all, the
  recommendation's simulated impact decides (no unflagged client limited). Otherwise it is
  withdrawn (`rolled_back`).
- **Expiry**: every automatic policy version carries `expires_at = now + auto_expiry_s`.
- **Rollback**: an enforced automatic limit whose 429s reach unflagged clients at a rate above
  `rollback_429_rate` (over at least `rollback_min_requests` of their requests) is rolled back.
- **Kill switch** stops applying and promoting (rollbacks and expiry still happen: they only
  ever loosen); **single leader**: `review` runs only in the lease holder (the job calls it).

Evidence about one policy comes from raw events with a bounded query
(`features.policy_clients`: route + method prefix of the sort key, the time range, LIMIT),
grouped by the policy's own budget key: "a client" of an ip-keyed limit is an address, so a
bot that rotates a claimed client id behind one address is still one (flagged) client.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from analytics import features
from analytics.models import Recommendation, RecommendationAction, RecommendationStatus
from analytics.recommend import current_policy
from analytics.settings import AnalyticsSettings
from collector.clickhouse import SharedClient
from proxy.policy import Mode, Policy, Source
from proxy.policy_store import PolicyStore

if TYPE_CHECKING:
    from analytics.writeback import WriteBack

log = logging.getLogger(__name__)

ACTOR = "analytics"


def floor_limit(record: Recommendation, window_s: float, headroom: float = 1.0) -> int:
    """The least automatic limit: legitimate clients' p99 per window x headroom (>= 1)."""
    return max(1, math.ceil(record.client_rate_p99 * window_s / 60.0 * headroom - 1e-9))


def step_limit(current: Policy | None, window_s: float, max_step: float) -> int:
    """The least limit one automatic step may set, from the current automatic limit."""
    if current is None or current.source != Source.ANALYTICS or current.key_by != "client_id":
        return 1
    return max(1, math.ceil(current.limit * window_s / current.window_s * max_step - 1e-9))


class Guardrails:
    def __init__(self, settings: AnalyticsSettings, writeback: WriteBack, store: PolicyStore,
                 ch: SharedClient | None) -> None:
        self._settings = settings
        self._writeback = writeback
        self._store = store
        self._ch = ch

    async def stage(self, record: Recommendation, now: float) -> tuple[Policy, list[str]]:
        """The policy an automatic application stores, and the guardrails that shaped it."""
        s = self._settings
        proposal = record.policy
        notes: list[str] = []
        effective = await self._store.effective(now)
        endpoint_current = current_policy(effective, record.endpoint)
        mine = next((p for p in effective if p.id == proposal.id), None)
        targeted = record.action == RecommendationAction.TARGETED
        step_base = mine if mine is not None and mine.mode == Mode.ENFORCE else (
            None if targeted else endpoint_current)
        limit = proposal.limit
        floor = floor_limit(record, proposal.window_s, s.floor_headroom)
        if targeted:
            notes.append(f"targeted at {record.target_client} only: the legitimate p99 floor "
                         "does not apply")
        elif limit < floor:
            notes.append(f"raised {limit} to the legitimate p99 floor {floor}")
            limit = floor
        step = step_limit(step_base, proposal.window_s, s.max_step)
        if limit < step:
            notes.append(f"raised {limit} to {step}: one step may cut the current automatic "
                         f"limit to {s.max_step:g}x at most")
            limit = step
        mode = Mode.SHADOW if s.shadow_s > 0 else Mode.ENFORCE
        if mode == Mode.SHADOW:
            notes.append(f"shadow for {s.shadow_s:g}s before enforcement")
        policy = Policy.model_validate({**proposal.model_dump(), "limit": limit, "burst": None,
                                        "mode": mode, "source": Source.ANALYTICS,
                                        "expires_at": now + s.auto_expiry_s})
        return policy, notes

    async def review(self, now: float | None = None) -> list[str]:
        """Promote, withdraw, roll back or expire the automatic changes; one line per action."""
        now = time.time() if now is None else now
        actions: list[str] = []
        killed: bool | None = None
        for record in await self._writeback.load_all():
            if (record.status != RecommendationStatus.APPLIED or record.status_by != ACTOR
                    or record.policy.source != Source.ANALYTICS):
                continue
            current = await self._store.get(record.policy.id)
            if current is None or current.version != record.policy.version:
                continue  # changed by someone else since: theirs to manage
            try:
                if current.is_expired(now):
                    await self._writeback.transition(
                        record, RecommendationStatus.EXPIRED, actor=ACTOR, now=now,
                        reason=f"policy {current.id} v{current.version} expired at "
                               f"{current.expires_at:.0f}")
                    actions.append(f"expired {record.id}")
                elif current.mode == Mode.SHADOW:
                    if now - current.updated_at < self._settings.shadow_s:
                        continue
                    if killed is None:
                        killed = await self._writeback.kill_switch()
                    if killed:
                        continue
                    actions.append(await self._judge_shadow(record, current, now))
                elif current.mode == Mode.ENFORCE:
                    action = await self._judge_enforced(record, current, now)
                    if action:
                        actions.append(action)
            except Exception:  # one bad record must not stop the others' review
                log.exception("guardrail review failed", extra={"rec_id": record.id})
        return actions

    async def _judge_shadow(self, record: Recommendation, current: Policy, now: float) -> str:
        s = self._settings
        flagged = set(record.flagged_clients)
        hits_flagged = hits_other = other_clients = 0
        if self._ch is not None:
            frame = await features.policy_clients(self._ch, current.route_id, current.method,
                                                  current.id, current.updated_at, now,
                                                  key_by=current.key_by)
            hit = frame[frame["shadow_limited"] > 0]
            is_flagged = hit["client"].isin(list(flagged))
            hits_flagged = int(hit.loc[is_flagged, "shadow_limited"].sum())
            hits_other = int(hit.loc[~is_flagged, "shadow_limited"].sum())
            other_clients = int((~is_flagged).sum())
        total = hits_flagged + hits_other
        if total:
            share = hits_other / total
            promote = share <= s.shadow_max_other_share
            evidence = (f"shadow {now - current.updated_at:.0f}s: {hits_flagged} would-be-"
                        f"limited requests from flagged clients, {hits_other} from "
                        f"{other_clients} other clients ({share:.0%})")
        else:
            simulated = record.impact.other_clients_limited if record.impact else 0
            promote = simulated == 0
            evidence = (f"shadow {now - current.updated_at:.0f}s: no would-be-limited requests; "
                        f"simulated impact: {simulated} other clients limited")
        if promote:
            enforced = current.model_copy(update={"mode": Mode.ENFORCE,
                                                  "expires_at": now + s.auto_expiry_s})
            stored = await self._store.put(enforced, actor=ACTOR,
                                           reason=f"promoted from shadow: {evidence}",
                                           evidence=",".join(record.anomaly_ids))
            await self._writeback.record_policy(record, stored, action="recommendation.promoted",
                                                reason=f"enforced after {evidence}", now=now)
            log.info("automatic limit promoted", extra={"rec_id": record.id,
                                                        "policy_id": stored.id})
            return f"promoted {record.id}: {evidence}"
        await self._undo(current, reason=f"shadow withdrawn: {evidence}")
        await self._writeback.transition(record, RecommendationStatus.ROLLED_BACK, actor=ACTOR,
                                         reason=f"not enforced: {evidence}", now=now)
        log.warning("automatic limit withdrawn after shadow", extra={"rec_id": record.id})
        return f"withdrawn {record.id}: {evidence}"

    async def _judge_enforced(self, record: Recommendation, current: Policy,
                              now: float) -> str | None:
        s = self._settings
        if self._ch is None:
            return None
        frame = await features.policy_clients(self._ch, current.route_id, current.method,
                                              current.id, current.updated_at, now,
                                              key_by=current.key_by)
        others = frame[~frame["client"].isin(list(record.flagged_clients))]
        requests = int(others["requests"].sum())
        limited = int(others["limited"].sum())
        if requests < s.rollback_min_requests:
            return None
        rate = limited / requests
        if rate <= s.rollback_429_rate:
            return None
        hurt = int((others["limited"] > 0).sum())
        evidence = (f"unflagged clients got {limited} 429s from {current.id} in {requests} "
                    f"requests ({rate:.1%} > {s.rollback_429_rate:.1%}; {hurt} clients)")
        await self._undo(current, reason=f"automatic rollback: {evidence}")
        await self._writeback.transition(record, RecommendationStatus.ROLLED_BACK, actor=ACTOR,
                                         reason=f"automatic rollback: {evidence}", now=now)
        log.warning("automatic limit rolled back", extra={"rec_id": record.id,
                                                          "policy_id": current.id})
        return f"rolled back {record.id}: {evidence}"

    async def _undo(self, current: Policy, *, reason: str) -> None:
        """Restore the newest earlier unexpired version of the policy, or delete it."""
        earlier = [p for p in await self._store.history(current.id)
                   if p.version < current.version and not p.is_expired()
                   and p.mode == Mode.ENFORCE]
        if earlier:
            await self._store.rollback(current.id, actor=ACTOR, reason=reason,
                                       to_version=earlier[0].version)
        else:
            await self._store.delete(current.id, actor=ACTOR, reason=reason)
