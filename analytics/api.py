"""The control-plane API: JSON under /api/v1 for the dashboard, operators and automation.

Reads come from ClickHouse (`analytics.queries`) and Redis (policies, recommendations, reviews,
audit); actions change Redis through `PolicyStore` and are audited with the actor and reason.
One route table (`routes`) drives both the router and the OpenAPI 3.1 document at
/openapi.json. Errors are RFC 9457 problem documents. With `APIGW_API_TOKENS` set, actions need
`Authorization: Bearer <token>` of a role allowed to take them (viewer < security < operator).

Modules: `api_models` (validated parameters, bodies, answers), `api_reads` and `api_actions`
(handlers), `auth` (tokens, roles), `openapi` (the document), `problems` (errors).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from analytics.api_actions import TRANSITIONS, Actions, transition_body
from analytics.api_context import PREFIX, PRINCIPAL, ApiContext, ApiSettings
from analytics.api_models import (
    ActionBody,
    AnomaliesParams,
    AnomaliesResponse,
    AnomalyView,
    AuditParams,
    AuditResponse,
    AutoModeBody,
    AutoModeResponse,
    BreakdownParams,
    BreakdownResponse,
    ClientsResponse,
    DeletedResponse,
    DiffParams,
    EndpointNamesParams,
    EndpointNamesResponse,
    EndpointsParams,
    EndpointsResponse,
    Health,
    KillSwitchBody,
    KillSwitchResponse,
    NoParams,
    PoliciesResponse,
    PolicyDiff,
    PolicyEdit,
    PolicyHistoryResponse,
    PolicyRollbackBody,
    ReasonBody,
    RecommendationsParams,
    RecommendationsResponse,
    RequestsParams,
    RequestsResponse,
    Series,
    TargetedImpact,
    TargetedImpactParams,
    TargetedLimitBody,
    TimeseriesParams,
    TopClientsParams,
    json_response,
    model_response,
)
from analytics.api_reads import Reads
from analytics.auth import Authenticator, Role
from analytics.job import RunReport, Scheduler
from analytics.models import Recommendation
from analytics.openapi import Handler, Route, openapi_document
from analytics.problems import ProblemError, is_unavailable, problem_response
from analytics.queries import Queries
from apigw.signals import stop_on_signals
from collector.clickhouse import SharedClient
from proxy.policy import Policy, RedisKeys
from proxy.policy_store import PolicyStore

__all__ = ["PREFIX", "ApiSettings", "app_runner", "build_api", "parse_listen", "routes", "run_app",
           "serve_api"]

log = logging.getLogger(__name__)

API_REQUESTS = Counter("apigw_api_requests_total", "Control-plane API requests.",
                       ["method", "route", "status"])
API_LATENCY = Histogram("apigw_api_request_duration_seconds", "Control-plane API latency.",
                        ["route"])

OPENAPI: Final = web.AppKey("openapi", dict)
MAX_LINE: Final = 64 * 1024


def routes(ctx: ApiContext) -> list[Route]:
    """Everything the API serves: (method, path, handler, documentation, role)."""
    r, a, p = Reads(ctx), Actions(ctx), PREFIX
    read = [
        Route("GET", f"{p}/endpoints", r.endpoints, "Endpoints with health summary",
              "traffic", EndpointsResponse, EndpointsParams),
        Route("GET", f"{p}/endpoints/names", r.endpoint_names,
              "Endpoint keys only, busiest first, then those with anomalies only (a picker's "
              "list, without the summaries' latency and client merges)", "traffic",
              EndpointNamesResponse, EndpointNamesParams),
        Route("GET", f"{p}/endpoints/timeseries", r.timeseries,
              "Time series (auto resolution, <= 500 points), optionally with an earlier window",
              "traffic", Series, TimeseriesParams),
        Route("GET", f"{p}/endpoints/top-clients", r.top_clients,
              "Top clients, optionally with their share in an earlier window", "traffic",
              ClientsResponse, TopClientsParams),
        Route("GET", f"{p}/endpoints/breakdown", r.breakdown,
              "Breakdown by status, error type, client address (IP), user agent or tenant",
              "traffic", BreakdownResponse, BreakdownParams),
        Route("GET", f"{p}/requests", r.requests, "Search requests (raw events), paginated",
              "traffic", RequestsResponse, RequestsParams),
        Route("GET", f"{p}/anomalies", r.anomalies,
              "Anomalies with their evidence and review status", "anomalies",
              AnomaliesResponse, AnomaliesParams),
        Route("GET", f"{p}/anomalies/{{id}}", r.anomaly, "One anomaly", "anomalies",
              AnomalyView, NoParams),
        Route("GET", f"{p}/recommendations", r.recommendations,
              "Recommendations with simulated impact", "recommendations",
              RecommendationsResponse, RecommendationsParams),
        Route("GET", f"{p}/recommendations/{{id}}", r.recommendation, "One recommendation",
              "recommendations", Recommendation, NoParams),
        Route("GET", f"{p}/policies", r.policies, "Policies, current and effective",
              "policies", PoliciesResponse, NoParams),
        Route("GET", f"{p}/policies/targeted/impact", r.targeted_impact,
              "Simulated impact of a per-client limit on the client's recorded traffic",
              "policies", TargetedImpact, TargetedImpactParams),
        Route("GET", f"{p}/policies/{{id}}", r.policy, "One policy", "policies", Policy,
              NoParams),
        Route("GET", f"{p}/policies/{{id}}/history", r.policy_history,
              "Every version of a policy, newest first", "policies", PolicyHistoryResponse,
              NoParams),
        Route("GET", f"{p}/policies/{{id}}/diff", r.policy_diff,
              "What changed between two versions of a policy", "policies", PolicyDiff,
              DiffParams),
        Route("GET", f"{p}/audit", r.audit, "Audit log, newest first", "audit",
              AuditResponse, AuditParams),
        Route("GET", f"{p}/analytics/last-run", r.last_run, "Report of the last run",
              "analytics", RunReport, NoParams, errors=(404,)),
        Route("GET", f"{p}/analytics/auto-mode", r.auto_mode, "Auto mode per route group",
              "analytics", AutoModeResponse, NoParams),
        Route("GET", f"{p}/analytics/kill-switch", r.kill_switch,
              "Whether automatic changes are stopped", "analytics", KillSwitchResponse,
              NoParams),
    ]
    actions = [
        Route("POST", f"{p}/recommendations/{{id}}/{name}", a.transition(name),
              f"{name.capitalize()} a recommendation", "recommendations", Recommendation,
              NoParams, transition_body(name), role, errors=(409,))
        for name, (_, _, role) in TRANSITIONS.items()
    ]
    actions += [
        Route("POST", f"{p}/anomalies/{{id}}/dismiss", a.dismiss_anomaly,
              "Dismiss a flagged anomaly (security review)", "anomalies", AnomalyView,
              NoParams, ReasonBody, Role.SECURITY),
        Route("POST", f"{p}/policies/targeted", a.targeted_limit,
              "Set an expiring limit for one client on one endpoint", "policies", Policy,
              NoParams, TargetedLimitBody, Role.SECURITY, errors=(404, 409)),
        Route("PUT", f"{p}/policies/{{id}}", a.put_policy, "Create or edit a policy",
              "policies", Policy, NoParams, PolicyEdit, Role.OPERATOR, errors=(409,)),
        Route("DELETE", f"{p}/policies/{{id}}", a.delete_policy, "Delete a policy",
              "policies", DeletedResponse, NoParams, ActionBody, Role.OPERATOR, errors=(409,)),
        Route("POST", f"{p}/policies/{{id}}/rollback", a.rollback_policy,
              "Restore an earlier version", "policies", Policy, NoParams, PolicyRollbackBody,
              Role.OPERATOR, errors=(409,)),
        Route("POST", f"{p}/analytics/run", a.run_analytics,
              "Run the analytics job now and return its report", "analytics", RunReport,
              NoParams, ActionBody, Role.OPERATOR, errors=(409, 504)),
        Route("PUT", f"{p}/analytics/auto-mode", a.put_auto_mode,
              "Set a route group's auto mode", "analytics", AutoModeResponse, NoParams,
              AutoModeBody, Role.OPERATOR),
        Route("PUT", f"{p}/analytics/kill-switch", a.put_kill_switch,
              "Engage or release the kill switch", "analytics", KillSwitchResponse, NoParams,
              KillSwitchBody, Role.OPERATOR),
    ]
    ops = _Ops(ctx)
    infra = [
        Route("GET", "/healthz", ops.healthz, "Liveness", "ops", Health, public=True),
        Route("GET", "/readyz", ops.readyz, "Readiness: Redis and ClickHouse reachable",
              "ops", Health, public=True, errors=(503,)),
        Route("GET", "/metrics", ops.metrics, "Prometheus metrics", "ops", public=True),
        Route("GET", "/openapi.json", ops.openapi, "This document", "ops", public=True),
    ]
    return read + actions + infra


class _Ops:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def healthz(self, request: web.Request) -> web.Response:
        return model_response(Health(status="ok"))

    async def readyz(self, request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.ctx.redis.ping(), 2.0)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            ok = await asyncio.wait_for(self.ctx.queries.ping(), 5.0)
            checks["clickhouse"] = "ok" if ok else "error: unexpected answer"
        except Exception as exc:
            checks["clickhouse"] = f"error: {type(exc).__name__}"
        ready = all(value == "ok" for value in checks.values())
        body = Health(status="ok" if ready else "unavailable", checks=checks)
        return json_response(body.model_dump(), 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(request.app[OPENAPI])


def _guard(route: Route, auth: Authenticator) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        request[PRINCIPAL] = auth.principal(request.headers.get("Authorization", ""),
                                            route.role, route.public)
        return await route.handler(request)

    return guarded


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    resource = request.match_info.route.resource
    label = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except ProblemError as exc:
        response = problem_response(request, exc.status, exc.title, exc.detail, exc.errors,
                                    exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem_response(request, exc.status, exc.reason, exc.text or "",
                                    headers={k: v for k, v in exc.headers.items()
                                             if k.lower() == "allow"})
    except Exception as exc:
        if not is_unavailable(exc):
            log.exception("unhandled error", extra={"path": request.path})
            response = problem_response(request, 500, "Internal error", "see the server log")
        else:
            log.warning("backend unavailable", extra={"path": request.path,
                                                      "error": type(exc).__name__})
            response = problem_response(request, 503, "Backend unavailable",
                                        f"Redis or ClickHouse failed: {type(exc).__name__}")
    API_REQUESTS.labels(request.method, label, str(response.status)).inc()
    API_LATENCY.labels(label).observe(time.perf_counter() - started)
    return response


def build_api(settings: ApiSettings, redis: aioredis.Redis, ch: SharedClient,
              store: PolicyStore, scheduler: Scheduler | None) -> web.Application:
    ctx = ApiContext(settings, redis, Queries(ch), store, scheduler)
    auth = Authenticator(settings.api_tokens, settings.api_public_reads)
    app = web.Application(middlewares=[_errors], client_max_size=256 * 1024)
    table = routes(ctx)
    for route in table:
        app.router.add_route(route.method, route.path, _guard(route, auth))
    app[OPENAPI] = openapi_document(table, __doc__ or "",
                                    protected_reads=bool(auth.tokens) and not auth.public_reads)
    return app


# -- serving ------------------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65_536:
        raise ValueError(f"--listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:8088")
    return host, int(port)


def app_runner(app: web.Application) -> web.AppRunner:
    """A runner whose request line and headers may be long enough for every valid query
    (longer ones are refused by aiohttp's parser with a plain-text 400)."""
    return web.AppRunner(app, access_log=None, handle_signals=False,
                         max_line_size=MAX_LINE, max_field_size=MAX_LINE)


async def run_app(app: web.Application, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` until `stop` is set, then finish in-flight requests and close."""
    runner = app_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("api listening", extra={"host": host, "port": port})
        await stop.wait()
    finally:
        await runner.cleanup()


async def _serve_api(settings: ApiSettings, host: str, port: int) -> None:
    stop = stop_on_signals()
    redis = aioredis.Redis.from_url(settings.redis_url)
    ch = await asyncio.to_thread(SharedClient, settings.resolved_clickhouse_dsn())
    try:
        store = PolicyStore(redis, RedisKeys(settings.key_prefix))
        await run_app(build_api(settings, redis, ch, store, None), host, port, stop)
    finally:
        await asyncio.to_thread(ch.close)
        await redis.aclose()


def serve_api(settings: ApiSettings, listen: str) -> int:
    """The API alone (for a ClickHouse server deployment): no collector, no scheduler."""
    from apigw import logs
    from apigw.logs import new_event_loop

    logs.configure("api", settings.log_level)
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        log.error(str(exc))
        return 2
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve_api(settings, host, port))
    except Exception:
        log.exception("api failed")
        return 1
    return 0
