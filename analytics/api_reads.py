"""Read handlers of the control-plane API: traffic, anomalies, recommendations, policies."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from analytics.api_audit import audit_records
from analytics.api_context import ApiContext, text
from analytics.api_models import (
    AnomaliesParams,
    AnomaliesResponse,
    AnomalyStatus,
    AnomalyView,
    AuditParams,
    AuditResponse,
    AutoModeResponse,
    BreakdownParams,
    BreakdownResponse,
    ClientsResponse,
    DiffParams,
    EndpointNamesParams,
    EndpointNamesResponse,
    EndpointsParams,
    EndpointsResponse,
    FieldChange,
    KillSwitchResponse,
    NoParams,
    PoliciesResponse,
    PolicyDiff,
    PolicyHistoryResponse,
    PolicyView,
    RecommendationsParams,
    RecommendationsResponse,
    RequestsParams,
    RequestsResponse,
    TargetedImpact,
    TargetedImpactParams,
    TimeseriesParams,
    TopClientsParams,
    model_response,
    query_params,
)
from analytics.job import Scheduler
from analytics.models import Anomaly, Recommendation
from analytics.problems import ProblemError
from analytics.queries import ReviewFilter
from analytics.reviews import AnomalyReview
from proxy.policy import Policy

log = logging.getLogger(__name__)

_DIFF_IGNORED = frozenset({"version"})


class Reads:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    # -- traffic -------------------------------------------------------------------------------

    async def endpoints(self, request: web.Request) -> web.Response:
        params = query_params(request, EndpointsParams)
        rng = params.time_range()
        rows = await self.ctx.queries.endpoints(rng, params.limit)
        if not params.sparkline:
            return model_response(EndpointsResponse(start=rng.start, end=rng.end,
                                                    endpoints=rows))
        lines = await self.ctx.queries.sparklines(
            rng, [(row.route_id, row.method, row.http_route) for row in rows])
        rows = [row.model_copy(update={"sparkline": lines.counts.get(
            (row.route_id, row.method, row.http_route))}) for row in rows]
        return model_response(EndpointsResponse(
            start=rng.start, end=rng.end, endpoints=rows, sparkline_start=lines.start,
            sparkline_step_s=lines.step_s))

    async def endpoint_names(self, request: web.Request) -> web.Response:
        params = query_params(request, EndpointNamesParams)
        rng = params.time_range()
        names = await self.ctx.queries.endpoint_names(rng, params.limit)
        return model_response(EndpointNamesResponse(start=rng.start, end=rng.end,
                                                    endpoints=names))

    async def timeseries(self, request: web.Request) -> web.Response:
        params = query_params(request, TimeseriesParams)
        return model_response(await self.ctx.queries.timeseries(
            params.time_range(), params.endpoint(), params.compare))

    async def top_clients(self, request: web.Request) -> web.Response:
        params = query_params(request, TopClientsParams)
        rng = params.time_range()
        earlier = params.compare.shift(rng) if params.compare else None
        rows = await self.ctx.queries.top_clients(rng, params.endpoint(), params.limit, earlier)
        return model_response(ClientsResponse(
            start=rng.start, end=rng.end, compare=params.compare,
            compare_start=earlier.start if earlier else None,
            compare_end=earlier.end if earlier else None, clients=rows))

    async def breakdown(self, request: web.Request) -> web.Response:
        params = query_params(request, BreakdownParams)
        rng = params.time_range()
        earlier = params.compare.shift(rng) if params.compare else None
        rows = await self.ctx.queries.breakdown(rng, params.endpoint(), params.by, params.limit,
                                                earlier)
        return model_response(BreakdownResponse(
            start=rng.start, end=rng.end, by=params.by, compare=params.compare,
            compare_start=earlier.start if earlier else None,
            compare_end=earlier.end if earlier else None, rows=rows))

    async def requests(self, request: web.Request) -> web.Response:
        params = query_params(request, RequestsParams)
        search = params.search()
        rows = await self.ctx.queries.search_requests(search)
        next_offset = search.offset + len(rows) if len(rows) == search.limit else None
        return model_response(RequestsResponse(requests=rows, next_offset=next_offset))

    # -- anomalies -----------------------------------------------------------------------------

    async def _views(self, anomalies: list[Anomaly]) -> list[AnomalyView]:
        reviews = await self.ctx.reviews.get_many([a.id for a in anomalies])
        open_after = time.time() - self.ctx.settings.api_open_anomaly_s
        return [anomaly_view(a, reviews.get(a.id), open_after) for a in anomalies]

    async def anomalies(self, request: web.Request) -> web.Response:
        params = query_params(request, AnomaliesParams)
        review = await self._review_filter(params.status)
        if review is not None and review.only_ids is not None and not review.only_ids:
            return model_response(AnomaliesResponse(anomalies=[]))  # none has that outcome
        rows = await self.ctx.queries.anomalies(params.time_range(), params.endpoint(),
                                                params.kind, params.severity, params.limit,
                                                params.offset, review)
        next_offset = params.offset + len(rows) if len(rows) == params.limit else None
        return model_response(AnomaliesResponse(anomalies=await self._views(rows),
                                                next_offset=next_offset))

    async def _review_filter(self, status: AnomalyStatus | None) -> ReviewFilter | None:
        """The status as a filter ClickHouse applies before the limit: reviewed ones by id,
        open / resolved as not reviewed and by when their window ended (as `anomaly_view`)."""
        if status is None:
            return None
        outcomes = await self.ctx.reviews.outcomes()
        if status in (AnomalyStatus.DISMISSED, AnomalyStatus.ACTIONED):
            return ReviewFilter(only_ids=sorted(i for i, outcome in outcomes.items()
                                                if outcome.value == status.value))
        open_after = time.time() - self.ctx.settings.api_open_anomaly_s
        if status is AnomalyStatus.OPEN:
            return ReviewFilter(except_ids=sorted(outcomes), ended_after=open_after)
        return ReviewFilter(except_ids=sorted(outcomes), ended_before=open_after)

    async def anomaly(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        found = await self.ctx.queries.anomaly(request.match_info["id"])
        if found is None:
            raise ProblemError(404, "Unknown anomaly", f"no anomaly {request.match_info['id']!r}")
        [view] = await self._views([found])
        return model_response(view)

    # -- recommendations -----------------------------------------------------------------------

    async def recommendations(self, request: web.Request) -> web.Response:
        params = query_params(request, RecommendationsParams)
        found = []
        for raw in (await self.ctx.redis.hgetall(self.ctx.keys.recommendations)).values():
            try:
                rec = Recommendation.model_validate_json(raw)
            except ValidationError:
                log.warning("skipping an unreadable recommendation record")
                continue
            if params.status is not None and rec.status is not params.status:
                continue
            if params.route_id is not None and rec.endpoint.route_id != params.route_id:
                continue
            found.append(rec)
        found.sort(key=lambda rec: rec.created_at, reverse=True)
        return model_response(RecommendationsResponse(recommendations=found))

    async def recommendation(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        return model_response(await load_recommendation(self.ctx, request.match_info["id"]))

    # -- policies ------------------------------------------------------------------------------

    async def policies(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        now = time.time()
        current = await self.ctx.store.list()
        effective = await self.ctx.store.effective(now)
        active = {(p.id, p.version) for p in effective}
        views = [PolicyView(policy=p, active=(p.id, p.version) in active,
                            expired=p.is_expired(now)) for p in
                 sorted(current, key=lambda p: (p.route_id, p.method, p.id))]
        return model_response(PoliciesResponse(version=await self.ctx.store.version(),
                                               policies=views, effective=effective))

    async def policy(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        return model_response(await existing_policy(self.ctx, request.match_info["id"]))

    async def policy_history(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        policy_id = request.match_info["id"]
        versions = await self.ctx.store.history(policy_id)
        if not versions:
            await existing_policy(self.ctx, policy_id)
        return model_response(PolicyHistoryResponse(policy_id=policy_id, versions=versions))

    async def policy_diff(self, request: web.Request) -> web.Response:
        params = query_params(request, DiffParams)
        policy_id = request.match_info["id"]
        versions = {p.version: p for p in await self.ctx.store.history(policy_id)}
        if not versions:
            raise ProblemError(404, "Unknown policy", f"no policy {policy_id!r}")
        newest = params.to if params.to is not None else max(versions)
        older = [v for v in versions if v < newest]
        oldest = params.from_ if params.from_ is not None else max(older, default=newest)
        missing = sorted({oldest, newest} - set(versions))
        if missing:
            raise ProblemError(404, "Unknown policy version",
                               f"policy {policy_id!r} has no version(s) {missing}; it has "
                               f"{sorted(versions)}")
        before, after = versions[oldest], versions[newest]
        return model_response(PolicyDiff(policy_id=policy_id, from_version=oldest,
                                         to_version=newest, before=before, after=after,
                                         changes=diff(before, after)))

    async def targeted_impact(self, request: web.Request) -> web.Response:
        params = query_params(request, TargetedImpactParams)
        rng = params.time_range()
        step = max(60, math.ceil(params.window_s / 60) * 60)
        allowed = params.limit * step / params.window_s
        counts = await self.ctx.queries.client_windows(
            rng, params.route_id, None if params.method == "*" else params.method,
            params.client, step)
        limited = sum(max(0, math.ceil(n - allowed)) for n in counts)
        total = sum(counts)
        return model_response(TargetedImpact(
            client=params.client, start=rng.start, end=rng.end, window_s=params.window_s,
            requests=total, windows=len(counts),
            windows_over_limit=sum(1 for n in counts if n > allowed),
            requests_limited=limited, share_limited=limited / total if total else 0.0))

    # -- audit and analytics -------------------------------------------------------------------

    async def audit(self, request: web.Request) -> web.Response:
        params = query_params(request, AuditParams)
        records = await audit_records(self.ctx.redis, self.ctx.keys.audit, params)
        return model_response(AuditResponse(records=records))

    async def last_run(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        report = need_scheduler(self.ctx).last_report
        if report is None:
            raise ProblemError(404, "No run yet", "the analytics job has not run yet")
        return model_response(report)

    async def auto_mode(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        return model_response(AutoModeResponse(modes=await auto_modes(self.ctx)))

    async def kill_switch(self, request: web.Request) -> web.Response:
        query_params(request, NoParams)
        return model_response(KillSwitchResponse(engaged=await engaged(self.ctx)))


def anomaly_view(anomaly: Anomaly, review: AnomalyReview | None,
                 open_after: float) -> AnomalyView:
    fields: dict[str, Any] = anomaly.model_dump()
    if review is None:
        status = AnomalyStatus.OPEN if anomaly.window_end >= open_after else AnomalyStatus.RESOLVED
        return AnomalyView(**fields, status=status)
    return AnomalyView(**fields, status=AnomalyStatus(review.outcome.value),
                       reviewed_by=review.by, review_reason=review.reason,
                       reviewed_at=review.at)


def diff(before: Policy, after: Policy) -> list[FieldChange]:
    old, new = before.model_dump(mode="json"), after.model_dump(mode="json")
    return [FieldChange(field=name, before=old[name], after=new[name])
            for name in old if name not in _DIFF_IGNORED and old[name] != new[name]]


async def load_recommendation(ctx: ApiContext, rec_id: str) -> Recommendation:
    raw = await ctx.redis.hget(ctx.keys.recommendations, rec_id)
    if raw is None:
        raise ProblemError(404, "Unknown recommendation", f"no recommendation {rec_id!r}")
    return Recommendation.model_validate_json(raw)


async def existing_policy(ctx: ApiContext, policy_id: str) -> Policy:
    found = await ctx.store.get(policy_id)
    if found is None:
        raise ProblemError(404, "Unknown policy", f"no policy {policy_id!r}")
    return found


def need_scheduler(ctx: ApiContext) -> Scheduler:
    if ctx.scheduler is None:
        raise ProblemError(503, "No analytics scheduler",
                           "this API runs without the analytics scheduler (standalone)")
    return ctx.scheduler


async def auto_modes(ctx: ApiContext) -> dict[str, str]:
    raw = await ctx.redis.hgetall(ctx.keys.auto_mode)
    return {text(k): text(v) for k, v in sorted(raw.items())}


async def engaged(ctx: ApiContext) -> bool:
    return text(await ctx.redis.get(ctx.keys.kill_switch) or b"") == "1"
