"""Action handlers of the control-plane API. Each one is audited with the actor and reason."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError

from analytics.api_context import PREFIX, PRINCIPAL, ApiContext
from analytics.api_models import (
    PROVENANCE,
    ActionBody,
    AnomalyView,
    AutoModeBody,
    AutoModeResponse,
    DeletedResponse,
    KillSwitchBody,
    KillSwitchResponse,
    NoParams,
    PolicyEdit,
    PolicyRollbackBody,
    ReasonBody,
    TargetedLimitBody,
    json_body,
    model_response,
    query_params,
)
from analytics.api_reads import (
    anomaly_view,
    auto_modes,
    engaged,
    existing_policy,
    load_recommendation,
    need_scheduler,
)
from analytics.auth import Principal, Role
from analytics.models import Recommendation, RecommendationStatus
from analytics.openapi import Handler
from analytics.problems import ProblemError, is_unavailable, validation_problem
from analytics.reviews import AnomalyReview, ReviewOutcome
from proxy.policy import Policy, Source

log = logging.getLogger(__name__)

# action -> (statuses it may start from, status it leads to, least role allowed)
TRANSITIONS: Final = {
    "approve": ({RecommendationStatus.PENDING}, RecommendationStatus.APPROVED, Role.SECURITY),
    "dismiss": ({RecommendationStatus.PENDING, RecommendationStatus.APPROVED},
                RecommendationStatus.DISMISSED, Role.SECURITY),
    "apply": ({RecommendationStatus.PENDING, RecommendationStatus.APPROVED},
              RecommendationStatus.APPLIED, Role.OPERATOR),
    "rollback": ({RecommendationStatus.APPLIED}, RecommendationStatus.ROLLED_BACK,
                 Role.OPERATOR),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")




def targeted_policy_id(route_id: str, method: str, client: str) -> str:
    """A stable, valid policy id for a per-client limit (hash suffix when chars were replaced)."""
    parts = [_UNSAFE.sub("_", part)[:60] for part in (route_id, method.upper(), client)]
    policy_id = "targeted:" + ":".join(parts)
    if parts != [route_id, method.upper(), client]:
        digest = hashlib.sha256(f"{route_id}\0{method}\0{client}".encode()).hexdigest()[:10]
        policy_id += f"-{digest}"
    return policy_id


def transition_body(action: str) -> type[ActionBody | ReasonBody]:
    """Dismissing and rolling back need a reason; approving and applying may give one."""
    return ReasonBody if action in ("dismiss", "rollback") else ActionBody


def _summary(rec: Recommendation) -> dict[str, Any]:
    """The audit view of a recommendation (as the analytics write-back records it)."""
    return {"status": rec.status.value, "endpoint": rec.endpoint.key, "policy_id": rec.policy.id,
            "policy_version": rec.policy.version, "limit": rec.policy.limit,
            "window_s": rec.policy.window_s, "confidence": rec.confidence}


class Actions:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    @asynccontextmanager
    async def _locked(self, what: str) -> AsyncIterator[None]:
        lock = f"{self.ctx.keys.prefix}:lock:{what}"
        if not await self.ctx.redis.set(lock, "1", nx=True, px=30_000):
            raise ProblemError(409, "Busy", f"another action on {what!r} is in progress")
        try:
            yield
        finally:
            await self.ctx.redis.delete(lock)

    # -- recommendations -----------------------------------------------------------------------

    def transition(self, action: str) -> Handler:
        allowed, target, _ = TRANSITIONS[action]

        async def handler(request: web.Request) -> web.Response:
            query_params(request, NoParams)
            body = await json_body(request, transition_body(action))
            rec_id = request.match_info["id"]
            async with self._locked(f"recommendation:{rec_id}"):
                rec = await load_recommendation(self.ctx, rec_id)
                if rec.status not in allowed:
                    raise ProblemError(409, "Invalid status transition",
                                       f"cannot {action} a recommendation that is "
                                       f"{rec.status.value}; allowed from "
                                       f"{sorted(s.value for s in allowed)}")
                principal = request[PRINCIPAL]
                update: dict[str, Any] = {"status": target, "status_reason": body.reason,
                                          "status_by": principal.name, "updated_at": time.time()}
                if action == "apply":
                    update["policy"] = await self.ctx.store.put(
                        rec.policy, actor=principal.name,
                        reason=body.reason or f"recommendation {rec.id}: {rec.rationale}",
                        evidence=",".join(rec.anomaly_ids))
                elif action == "rollback":
                    await self._undo_policy(rec, principal, body.reason)
                updated = rec.model_copy(update=update)
                await self.ctx.redis.hset(self.ctx.keys.recommendations, rec.id,
                                          updated.model_dump_json())
                await self.ctx.audit(request, f"recommendation.{target.value}",
                                     f"recommendation:{rec.id}", body.reason, _summary(rec),
                                     _summary(updated), evidence=",".join(rec.anomaly_ids))
            return model_response(updated)

        handler.__name__ = f"recommendation_{action}"
        return handler

    async def _undo_policy(self, rec: Recommendation, principal: Principal, reason: str) -> None:
        """Restore what the policy was before this recommendation was applied."""
        current = await self.ctx.store.get(rec.policy.id)
        if current is None:
            return  # deleted since: nothing left to undo
        if current.version != rec.policy.version:
            raise ProblemError(409, "Policy changed since applied",
                               f"policy {current.id!r} is at version {current.version}, the "
                               f"recommendation applied version {rec.policy.version}; roll "
                               "back the policy itself instead")
        earlier = [p for p in await self.ctx.store.history(current.id)
                   if p.version < current.version and not p.is_expired()]
        if earlier:
            await self.ctx.store.rollback(current.id, actor=principal.name, reason=reason,
                                          to_version=earlier[0].version)
        else:
            await self.ctx.store.delete(current.id, actor=principal.name, reason=reason)

    # -- anomalies: review ---------------------------------------------------------------------

    async def dismiss_anomaly(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, ReasonBody)
        anomaly_id = request.match_info["id"]
        found = await self.ctx.queries.anomaly(anomaly_id)
        if found is None:
            raise ProblemError(404, "Unknown anomaly", f"no anomaly {anomaly_id!r}")
        review = AnomalyReview(outcome=ReviewOutcome.DISMISSED, by=request[PRINCIPAL].name,
                               reason=body.reason, at=time.time())
        before = (await self.ctx.reviews.get_many([anomaly_id])).get(anomaly_id)
        await self.ctx.reviews.put(anomaly_id, review)
        await self.ctx.audit(request, "anomaly.dismissed", f"anomaly:{anomaly_id}", body.reason,
                             before.model_dump() if before else None, review.model_dump(),
                             evidence=found.summary)
        view: AnomalyView = anomaly_view(found, review, 0.0)
        return model_response(view)

    async def targeted_limit(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, TargetedLimitBody)
        principal = request[PRINCIPAL]
        wanted = list(dict.fromkeys([*([body.anomaly_id] if body.anomaly_id else []),
                                     *body.anomaly_ids]))
        answered = await self.ctx.queries.anomalies_by_id(wanted)
        missing = sorted(set(wanted) - {a.id for a in answered})
        if missing:
            raise ProblemError(404, "Unknown anomaly",
                               f"no anomaly {', '.join(map(repr, missing))}")
        try:
            policy = Policy(id=targeted_policy_id(body.route_id, body.method, body.client),
                            route_id=body.route_id, method=body.method,
                            key_by=body.key_by, match_key=body.client, limit=body.limit,
                            window_s=body.window_s, mode=body.mode, source=Source.OPERATOR,
                            expires_at=time.time() + body.expires_in_s,
                            updated_by=principal.name, reason=body.reason)
        except ValidationError as exc:
            raise validation_problem(exc, "request body") from None
        stored = await self.ctx.store.put(policy, actor=principal.name, reason=body.reason,
                                          evidence=",".join(wanted))
        for anomaly in sorted(answered, key=lambda a: wanted.index(a.id)):
            await self.ctx.reviews.put(anomaly.id, AnomalyReview(
                outcome=ReviewOutcome.ACTIONED, by=principal.name, reason=body.reason,
                at=time.time(), policy_id=stored.id))
            await self.ctx.audit(request, "anomaly.actioned", f"anomaly:{anomaly.id}",
                                 body.reason, None, {"policy_id": stored.id,
                                                     "version": stored.version},
                                 evidence=anomaly.summary)
        return model_response(stored)

    # -- policies ------------------------------------------------------------------------------

    async def put_policy(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        policy_id = request.match_info["id"]
        edit = (await json_body(request, PolicyEdit)).model_dump()
        if edit["id"] is not None and edit["id"] != policy_id:
            raise ProblemError(400, "Invalid request body",
                               f"body id {edit['id']!r} differs from the path's {policy_id!r}")
        reason = str(edit["reason"])
        fields = {name: value for name, value in edit.items()
                  if name not in ("id", "reason", *PROVENANCE)}
        principal = request[PRINCIPAL]
        try:
            policy = Policy(id=policy_id, source=Source.OPERATOR, updated_by=principal.name,
                            reason=reason, **fields)
        except ValidationError as exc:
            raise validation_problem(exc, "policy") from None
        stored = await self.ctx.store.put(policy, actor=principal.name,
                                          reason=reason or "operator edit")
        return model_response(stored)

    async def delete_policy(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, ActionBody)
        policy_id = request.match_info["id"]
        await existing_policy(self.ctx, policy_id)
        principal = request[PRINCIPAL]
        deleted = await self.ctx.store.delete(policy_id, actor=principal.name,
                                              reason=body.reason or "operator delete")
        if deleted:
            await self._undone_recommendations(request, policy_id, 0,
                                               body.reason or "operator delete")
        return model_response(DeletedResponse(policy_id=policy_id, deleted=deleted))

    async def rollback_policy(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, PolicyRollbackBody)
        policy_id = request.match_info["id"]
        current = await existing_policy(self.ctx, policy_id)
        versions = await self.ctx.store.history(policy_id)
        known = {p.version for p in versions}
        if body.to_version is not None and body.to_version not in known:
            raise ProblemError(404, "Unknown policy version",
                               f"policy {policy_id!r} has versions {sorted(known)}")
        if body.to_version is None and len(versions) < 2:
            raise ProblemError(409, "Nothing to roll back to",
                               f"policy {policy_id!r} has a single version")
        principal = request[PRINCIPAL]
        try:
            restored = await self.ctx.store.rollback(policy_id, actor=principal.name,
                                                     reason=body.reason or "operator rollback",
                                                     to_version=body.to_version)
        except (LookupError, ValueError) as exc:
            raise ProblemError(409, "Rollback refused", str(exc)) from None
        target = body.to_version if body.to_version is not None else max(
            (v for v in known if v < current.version), default=0)
        await self._undone_recommendations(request, policy_id, target,
                                           body.reason or "operator rollback")
        return model_response(restored)

    async def _undone_recommendations(self, request: web.Request, policy_id: str,
                                      kept_version: int, reason: str) -> None:
        """A policy rolled back to `kept_version` (0: deleted) no longer enforces what an
        applied recommendation put in at a later version: mark it rolled back, audited."""
        principal = request[PRINCIPAL]
        raws = await self.ctx.redis.hgetall(self.ctx.keys.recommendations)
        for raw in raws.values():
            try:
                rec = Recommendation.model_validate_json(raw)
            except ValidationError:
                continue
            if (rec.status is not RecommendationStatus.APPLIED or rec.policy.id != policy_id
                    or rec.policy.version <= kept_version):
                continue
            undone = (f"rolled back to version {kept_version}" if kept_version
                      else "deleted")
            updated = rec.model_copy(update={
                "status": RecommendationStatus.ROLLED_BACK, "status_by": principal.name,
                "status_reason": f"policy {policy_id} {undone}: {reason}",
                "updated_at": time.time()})
            await self.ctx.redis.hset(self.ctx.keys.recommendations, rec.id,
                                      updated.model_dump_json())
            await self.ctx.audit(request, "recommendation.rolled_back",
                                 f"recommendation:{rec.id}", reason, _summary(rec),
                                 _summary(updated), evidence=",".join(rec.anomaly_ids))

    # -- analytics -----------------------------------------------------------------------------

    async def run_analytics(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, ActionBody)
        scheduler = need_scheduler(self.ctx)
        await self.ctx.audit(request, "analytics.run", "analytics", body.reason, None, None)
        run = asyncio.ensure_future(scheduler.run_now())  # waits for a run in progress first
        try:
            report = await asyncio.wait_for(asyncio.shield(run),
                                            self.ctx.settings.api_run_timeout_s)
        except TimeoutError:
            raise ProblemError(504, "Run not finished", "the run goes on; its report will be at "
                               f"{PREFIX}/analytics/last-run") from None
        except Exception as exc:
            if is_unavailable(exc):
                raise
            log.exception("analytics run failed")
            raise ProblemError(500, "Analytics run failed", f"{type(exc).__name__}: {exc}"
                               ) from None
        return model_response(report)

    async def put_auto_mode(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, AutoModeBody)
        before = await auto_modes(self.ctx)
        if body.mode is None:
            await self.ctx.redis.hdel(self.ctx.keys.auto_mode, body.group)
        else:
            await self.ctx.redis.hset(self.ctx.keys.auto_mode, body.group, body.mode.value)
        after = await auto_modes(self.ctx)
        await self.ctx.audit(request, "analytics.auto_mode", f"auto_mode:{body.group}",
                             body.reason, {"mode": before.get(body.group)},
                             {"mode": after.get(body.group)})
        return model_response(AutoModeResponse(modes=after))

    async def put_kill_switch(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        body = await json_body(request, KillSwitchBody)
        before = await engaged(self.ctx)
        if body.engaged:
            await self.ctx.redis.set(self.ctx.keys.kill_switch, "1")
        else:
            await self.ctx.redis.delete(self.ctx.keys.kill_switch)
        await self.ctx.audit(request, "analytics.kill_switch", "kill_switch", body.reason,
                             {"engaged": before}, {"engaged": body.engaged})
        return model_response(KillSwitchResponse(engaged=body.engaged))
