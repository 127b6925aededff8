"""The control-plane API: JSON under /api/v1 for the dashboard, operators and automation.

Reads come from ClickHouse (`analytics.queries`) and Redis (policies, recommendations, audit);
actions change Redis through `PolicyStore` and are audited with the actor and reason. One route
table drives both the router and the OpenAPI 3.1 document at /openapi.json. Errors are RFC 9457
problem documents. With `APIGW_API_TOKENS` set, actions need `Authorization: Bearer <token>`
of a role allowed to take them (viewer < security < operator).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, TypeVar

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from analytics.job import RunReport, Scheduler
from analytics.models import Anomaly, AnomalyKind, Recommendation, RecommendationStatus, Severity
from analytics.queries import (
    MAX_RANGE_S,
    BreakdownDimension,
    BreakdownRow,
    ClientRow,
    EndpointFilter,
    EndpointSummary,
    Queries,
    RequestRow,
    RequestSearch,
    Series,
    TimeRange,
)
from analytics.settings import AutoMode
from apigw.settings import CommonSettings
from collector.clickhouse import SharedClient
from proxy.policy import Algorithm, Mode, Policy, RedisKeys, Source
from proxy.policy_store import AuditRecord, PolicyStore

log = logging.getLogger(__name__)

API_REQUESTS = Counter("apigw_api_requests_total", "Control-plane API requests.",
                       ["method", "route", "status"])
API_LATENCY = Histogram("apigw_api_request_duration_seconds", "Control-plane API latency.",
                        ["route"])
API_ACTIONS = Counter("apigw_api_actions_total", "Audited control-plane actions.", ["action"])

PREFIX: Final = "/api/v1"
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_GROUP = re.compile(r"^[A-Za-z0-9._*-]{1,100}$")
_STATUS = re.compile(r"^([1-5])(xx|\d\d)$")


# ---------------------------------------------------------------------------------------------
# Settings and auth


class Role(StrEnum):
    VIEWER = "viewer"  # read
    SECURITY = "security"  # + approve / dismiss recommendations
    OPERATOR = "operator"  # + apply, roll back, edit policies, auto mode, kill switch, runs


_RANK: Final = {Role.VIEWER: 1, Role.SECURITY: 2, Role.OPERATOR: 3}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class _Token:
    principal: Principal
    digest: bytes  # sha256 of the token


def parse_tokens(spec: str) -> list[_Token]:
    """`name:role:token,...`; a token written `sha256:<64 hex>` is given by its hash."""
    tokens = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3:
            raise ValueError("each entry must be name:role:token (token may be sha256:<hex>)")
        name, role, secret = parts
        if not _NAME.match(name):
            raise ValueError(f"token name {name!r} must be 1-64 letters, digits or ._@-")
        if role not in Role.__members__.values():
            raise ValueError(f"token {name!r}: role must be one of {[r.value for r in Role]}")
        if secret.startswith("sha256:"):
            try:
                digest = bytes.fromhex(secret[len("sha256:"):])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"token {name!r}: sha256: needs 64 hex digits")
        elif len(secret) < 16:
            raise ValueError(f"token {name!r} must be at least 16 characters")
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        tokens.append(_Token(Principal(name, Role(role)), digest))
    return tokens


def authenticate(tokens: list[_Token], presented: str) -> Principal | None:
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for token in tokens:  # no early exit: time does not depend on which entry matched
        if hmac.compare_digest(digest, token.digest):
            found = token.principal
    return found


class ApiSettings(CommonSettings):
    listen: str = Field(default="127.0.0.1:8088", description="HOST:PORT of the API.")
    api_tokens: str = Field(default="", description="name:role:token,... ; empty = no auth. "
                                                    "Roles: viewer, security, operator.")
    api_public_reads: bool = Field(default=True, description="Reads need no token even when "
                                                             "tokens are configured.")
    api_run_timeout_s: float = Field(default=120.0, gt=0,
                                     description="How long POST /analytics/run waits.")

    @field_validator("api_tokens")
    @classmethod
    def _tokens_shape(cls, value: str) -> str:
        parse_tokens(value)
        return value


# ---------------------------------------------------------------------------------------------
# Problems (RFC 9457)


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[dict[str, Any]] = Field(default_factory=list)


class ProblemError(Exception):
    def __init__(self, status: int, title: str, detail: str = "",
                 errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


def problem_response(request: web.Request, status: int, title: str, detail: str = "",
                     errors: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    body = Problem(title=title, status=status, detail=detail, instance=request.path,
                   errors=errors or [])
    return web.Response(status=status, body=orjson.dumps(body.model_dump()), headers=headers,
                        content_type="application/problem+json")


def _validation_problem(exc: ValidationError, what: str) -> ProblemError:
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"]) or what
        message = ("unknown parameter" if error["type"] == "extra_forbidden"
                   else str(error["msg"]))
        errors.append({"loc": loc, "msg": message})
    detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
    return ProblemError(400, f"Invalid {what}", detail, errors)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _model(model: BaseModel) -> web.Response:
    return _json(model.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# Request models


def _epoch(value: Any) -> Any:
    """Epoch seconds or an ISO-8601 time (naive = UTC) -> epoch seconds."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError("must be epoch seconds or an ISO-8601 time") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return value


Epoch = Annotated[float, BeforeValidator(_epoch), Field(ge=0, le=4_102_444_800)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RangeParams(_Params):
    minutes: float | None = Field(default=None, gt=0, le=MAX_RANGE_S / 60,
                                  description="Range ending now (default 60) unless from is set.")
    from_: Epoch | None = Field(default=None, alias="from",
                                description="Start: epoch seconds or ISO-8601.")
    to: Epoch | None = Field(default=None, description="End (default now).")

    @model_validator(mode="after")
    def _consistent(self) -> RangeParams:
        if self.minutes is not None and self.from_ is not None:
            raise ValueError("give either minutes or from, not both")
        start, end = self._bounds()
        if start >= end:
            raise ValueError("from must be before to")
        if end - start > MAX_RANGE_S:
            raise ValueError(f"range longer than {MAX_RANGE_S // 86_400} days")
        return self

    def _bounds(self) -> tuple[float, float]:
        end = self.to if self.to is not None else time.time()
        if self.from_ is not None:
            return self.from_, end
        return end - (self.minutes or 60) * 60, end

    def time_range(self) -> TimeRange:
        return TimeRange(*self._bounds())


class EndpointParams(RangeParams):
    route_id: str | None = Field(default=None, max_length=200)
    method: str | None = Field(default=None, max_length=16)
    route: str | None = Field(default=None, max_length=1000, description="Route template.")

    def endpoint(self) -> EndpointFilter:
        return EndpointFilter(self.route_id, self.method, self.route)


class EndpointsParams(RangeParams):
    limit: int = Field(default=500, ge=1, le=1000)


class TopClientsParams(EndpointParams):
    limit: int = Field(default=20, ge=1, le=1000)


class BreakdownParams(EndpointParams):
    by: BreakdownDimension = BreakdownDimension.STATUS
    limit: int = Field(default=20, ge=1, le=1000)


class RequestsParams(EndpointParams):
    status: str | None = Field(default=None, description="A code (503) or a class (5xx).")
    client: str | None = Field(default=None, max_length=500,
                               description="client_id or client address.")
    trace_id: str | None = Field(default=None, max_length=200)
    request_id: str | None = Field(default=None, max_length=200)
    error_type: str | None = Field(default=None, max_length=200)
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=100_000)

    @field_validator("status")
    @classmethod
    def _status_shape(cls, value: str | None) -> str | None:
        if value is not None and not _STATUS.match(value.lower()):
            raise ValueError("must be a status code like 503 or a class like 5xx")
        return value.lower() if value else value

    def search(self) -> RequestSearch:
        low = high = None
        if self.status:
            if self.status.endswith("xx"):
                low, high = int(self.status[0]) * 100, int(self.status[0]) * 100 + 99
            else:
                low = high = int(self.status)
        return RequestSearch(range=self.time_range(), endpoint=self.endpoint(), status_min=low,
                             status_max=high, client=self.client, trace_id=self.trace_id,
                             request_id=self.request_id, error_type=self.error_type,
                             limit=self.limit, offset=self.offset)


class AnomaliesParams(EndpointParams):
    kind: AnomalyKind | None = None
    severity: Severity | None = None
    limit: int = Field(default=200, ge=1, le=1000)


class RecommendationsParams(_Params):
    status: RecommendationStatus | None = None
    route_id: str | None = Field(default=None, max_length=200)


class AuditParams(_Params):
    count: int = Field(default=200, ge=1, le=1000)
    subject: str | None = Field(default=None, max_length=300)


class NoParams(_Params):
    pass


_P = TypeVar("_P", bound=_Params)
_B = TypeVar("_B", bound=BaseModel)


class ActionBody(_Params):
    reason: str = Field(default="", max_length=2000, description="Why; required to dismiss.")


class PolicyRollbackBody(ActionBody):
    to_version: int | None = Field(default=None, ge=1,
                                   description="Version to restore; default the previous one.")


class PolicyEdit(_Params):
    """The editable fields of a policy; provenance fields are accepted and ignored."""

    id: str | None = None
    route_id: str = "*"
    method: str = "*"
    key_by: str = "client_id"
    match_key: str | None = None
    tenant: str | None = None
    algorithm: Algorithm = Algorithm.GCRA
    limit: int
    window_s: float
    burst: int | None = None
    mode: Mode = Mode.ENFORCE
    expires_at: float | None = None
    reason: str = Field(default="", max_length=2000)
    version: int | None = None
    source: str | None = None
    updated_at: float | None = None
    updated_by: str | None = None


class AutoModeBody(ActionBody):
    group: str = Field(default="*", description="A route id, or * for the default.")
    mode: AutoMode | None = Field(description="off | recommend | auto; null removes the override.")

    @field_validator("group")
    @classmethod
    def _group_shape(cls, value: str) -> str:
        if not _GROUP.match(value):
            raise ValueError("must be a route id or *")
        return value


class KillSwitchBody(ActionBody):
    engaged: bool


# ---------------------------------------------------------------------------------------------
# Response models (for the OpenAPI document, and the shape of every answer)


class EndpointsResponse(BaseModel):
    start: float
    end: float
    endpoints: list[EndpointSummary]


class ClientsResponse(BaseModel):
    start: float
    end: float
    clients: list[ClientRow]


class BreakdownResponse(BaseModel):
    start: float
    end: float
    by: BreakdownDimension
    rows: list[BreakdownRow]


class RequestsResponse(BaseModel):
    requests: list[RequestRow]
    next_offset: int | None


class AnomaliesResponse(BaseModel):
    anomalies: list[Anomaly]


class RecommendationsResponse(BaseModel):
    recommendations: list[Recommendation]


class PolicyView(BaseModel):
    policy: Policy
    active: bool  # the version the proxy enforces now
    expired: bool


class PoliciesResponse(BaseModel):
    version: int
    policies: list[PolicyView]
    effective: list[Policy]


class PolicyHistoryResponse(BaseModel):
    policy_id: str
    versions: list[Policy]


class DeletedResponse(BaseModel):
    policy_id: str
    deleted: bool


class AuditResponse(BaseModel):
    records: list[AuditRecord]


class AutoModeResponse(BaseModel):
    modes: dict[str, str]


class KillSwitchResponse(BaseModel):
    engaged: bool


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Route table

OPENAPI: Final = web.AppKey("openapi", dict)
PRINCIPAL: Final = web.RequestKey("principal", Principal)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    response: type[BaseModel] | None = None
    params: type[_Params] | None = None
    body: type[BaseModel] | None = None
    role: Role | None = None  # None: a read (viewer when reads are protected)
    public: bool = False  # probes, metrics and the OpenAPI document


_TRANSITIONS: Final = {
    "approve": ({RecommendationStatus.PENDING}, RecommendationStatus.APPROVED, Role.SECURITY),
    "dismiss": ({RecommendationStatus.PENDING, RecommendationStatus.APPROVED},
                RecommendationStatus.DISMISSED, Role.SECURITY),
    "apply": ({RecommendationStatus.PENDING, RecommendationStatus.APPROVED},
              RecommendationStatus.APPLIED, Role.OPERATOR),
    "rollback": ({RecommendationStatus.APPLIED}, RecommendationStatus.ROLLED_BACK,
                 Role.OPERATOR),
}


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, aioredis.RedisError | OSError | asyncio.TimeoutError):
        return True
    module = type(exc).__module__
    return module.startswith(("clickhouse_connect", "chdb"))


class ControlPlaneApi:
    """Handlers over the shared clients; `routes()` is the single list of what is served."""

    def __init__(self, settings: ApiSettings, redis: aioredis.Redis, ch: SharedClient,
                 store: PolicyStore, scheduler: Scheduler | None) -> None:
        self.settings = settings
        self.redis = redis
        self.queries = Queries(ch)
        self.store = store
        self.scheduler = scheduler
        self.keys = RedisKeys(settings.key_prefix)
        self.tokens = parse_tokens(settings.api_tokens)

    def routes(self) -> list[Route]:
        a, p = self, PREFIX
        read = [
            Route("GET", f"{p}/endpoints", a.endpoints, "Endpoints with health summary",
                  "traffic", EndpointsResponse, EndpointsParams),
            Route("GET", f"{p}/endpoints/timeseries", a.timeseries,
                  "Time series (auto resolution, <= 500 points)", "traffic", Series,
                  EndpointParams),
            Route("GET", f"{p}/endpoints/top-clients", a.top_clients, "Top clients",
                  "traffic", ClientsResponse, TopClientsParams),
            Route("GET", f"{p}/endpoints/breakdown", a.breakdown,
                  "Breakdown by status, error type, client address, user agent or tenant",
                  "traffic", BreakdownResponse, BreakdownParams),
            Route("GET", f"{p}/requests", a.requests, "Search requests (raw events)",
                  "traffic", RequestsResponse, RequestsParams),
            Route("GET", f"{p}/anomalies", a.anomalies, "Anomalies with their evidence",
                  "anomalies", AnomaliesResponse, AnomaliesParams),
            Route("GET", f"{p}/anomalies/{{id}}", a.anomaly, "One anomaly", "anomalies",
                  Anomaly, NoParams),
            Route("GET", f"{p}/recommendations", a.recommendations,
                  "Recommendations with simulated impact", "recommendations",
                  RecommendationsResponse, RecommendationsParams),
            Route("GET", f"{p}/recommendations/{{id}}", a.recommendation, "One recommendation",
                  "recommendations", Recommendation, NoParams),
            Route("GET", f"{p}/policies", a.policies, "Policies, current and effective",
                  "policies", PoliciesResponse, NoParams),
            Route("GET", f"{p}/policies/{{id}}", a.policy, "One policy", "policies", Policy,
                  NoParams),
            Route("GET", f"{p}/policies/{{id}}/history", a.policy_history,
                  "Every version of a policy, newest first", "policies", PolicyHistoryResponse,
                  NoParams),
            Route("GET", f"{p}/audit", a.audit, "Audit log, newest first", "audit",
                  AuditResponse, AuditParams),
            Route("GET", f"{p}/analytics/last-run", a.last_run, "Report of the last run",
                  "analytics", RunReport, NoParams),
            Route("GET", f"{p}/analytics/auto-mode", a.auto_mode, "Auto mode per route group",
                  "analytics", AutoModeResponse, NoParams),
            Route("GET", f"{p}/analytics/kill-switch", a.kill_switch,
                  "Whether automatic changes are stopped", "analytics", KillSwitchResponse,
                  NoParams),
        ]
        actions = [
            Route("POST", f"{p}/recommendations/{{id}}/{name}", a.transition(name),
                  f"{name.capitalize()} a recommendation", "recommendations", Recommendation,
                  body=ActionBody, role=role)
            for name, (_, _, role) in _TRANSITIONS.items()
        ]
        actions += [
            Route("PUT", f"{p}/policies/{{id}}", a.put_policy, "Create or edit a policy",
                  "policies", Policy, body=PolicyEdit, role=Role.OPERATOR),
            Route("DELETE", f"{p}/policies/{{id}}", a.delete_policy, "Delete a policy",
                  "policies", DeletedResponse, body=ActionBody, role=Role.OPERATOR),
            Route("POST", f"{p}/policies/{{id}}/rollback", a.rollback_policy,
                  "Restore an earlier version", "policies", Policy, body=PolicyRollbackBody,
                  role=Role.OPERATOR),
            Route("POST", f"{p}/analytics/run", a.run_analytics,
                  "Run the analytics job now and return its report", "analytics", RunReport,
                  body=ActionBody, role=Role.OPERATOR),
            Route("PUT", f"{p}/analytics/auto-mode", a.put_auto_mode,
                  "Set a route group's auto mode", "analytics", AutoModeResponse,
                  body=AutoModeBody, role=Role.OPERATOR),
            Route("PUT", f"{p}/analytics/kill-switch", a.put_kill_switch,
                  "Engage or release the kill switch", "analytics", KillSwitchResponse,
                  body=KillSwitchBody, role=Role.OPERATOR),
        ]
        infra = [
            Route("GET", "/healthz", a.healthz, "Liveness", "ops", Health, public=True),
            Route("GET", "/readyz", a.readyz, "Readiness: Redis and ClickHouse reachable",
                  "ops", Health, public=True),
            Route("GET", "/metrics", a.metrics, "Prometheus metrics", "ops", public=True),
            Route("GET", "/openapi.json", a.openapi, "This document", "ops", public=True),
        ]
        return read + actions + infra

    # -- plumbing ------------------------------------------------------------------------------

    def guard(self, route: Route) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            request[PRINCIPAL] = self._principal(request, route)
            return await route.handler(request)

        return guarded

    def _principal(self, request: web.Request, route: Route) -> Principal:
        needed = route.role or (None if self.settings.api_public_reads else Role.VIEWER)
        if route.public or not self.tokens or needed is None:
            return Principal("anonymous", Role.OPERATOR if not self.tokens else Role.VIEWER)
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ProblemError(401, "Authentication required",
                               "send Authorization: Bearer <token>",
                               headers={"WWW-Authenticate": 'Bearer realm="apigw"'})
        principal = authenticate(self.tokens, presented.strip())
        if principal is None:
            raise ProblemError(401, "Invalid token", "the bearer token is not recognised",
                               headers={"WWW-Authenticate":
                                        'Bearer realm="apigw", error="invalid_token"'})
        if _RANK[principal.role] < _RANK[needed]:
            raise ProblemError(403, "Forbidden",
                               f"role {principal.role.value} may not do this; "
                               f"needs {needed.value}")
        return principal

    @staticmethod
    def _params(request: web.Request, model: type[_P]) -> _P:
        repeated = sorted({name for name in request.query
                           if len(request.query.getall(name)) > 1})
        if repeated:
            raise ProblemError(400, "Invalid query parameters",
                               f"parameters given more than once: {repeated}")
        try:
            return model.model_validate(dict(request.query))
        except ValidationError as exc:
            raise _validation_problem(exc, "query parameters") from None

    @staticmethod
    async def _body(request: web.Request, model: type[_B]) -> _B:
        raw = await request.read()
        try:
            data = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ProblemError(400, "Invalid JSON body", str(exc)) from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _validation_problem(exc, "request body") from None

    async def _audit(self, request: web.Request, action: str, subject: str, reason: str,
                     before: dict[str, Any] | None, after: dict[str, Any] | None,
                     evidence: str = "") -> None:
        principal = request[PRINCIPAL]
        await self.store.audit(AuditRecord(ts=time.time(), actor=principal.name, action=action,
                                           subject=subject, reason=reason, evidence=evidence,
                                           before=before, after=after))
        API_ACTIONS.labels(action).inc()

    # -- traffic -------------------------------------------------------------------------------

    async def endpoints(self, request: web.Request) -> web.Response:
        params = self._params(request, EndpointsParams)
        rng = params.time_range()
        rows = await self.queries.endpoints(rng, params.limit)
        return _model(EndpointsResponse(start=rng.start, end=rng.end, endpoints=rows))

    async def timeseries(self, request: web.Request) -> web.Response:
        params = self._params(request, EndpointParams)
        return _model(await self.queries.timeseries(params.time_range(), params.endpoint()))

    async def top_clients(self, request: web.Request) -> web.Response:
        params = self._params(request, TopClientsParams)
        rng = params.time_range()
        rows = await self.queries.top_clients(rng, params.endpoint(), params.limit)
        return _model(ClientsResponse(start=rng.start, end=rng.end, clients=rows))

    async def breakdown(self, request: web.Request) -> web.Response:
        params = self._params(request, BreakdownParams)
        rng = params.time_range()
        rows = await self.queries.breakdown(rng, params.endpoint(), params.by, params.limit)
        return _model(BreakdownResponse(start=rng.start, end=rng.end, by=params.by, rows=rows))

    async def requests(self, request: web.Request) -> web.Response:
        params = self._params(request, RequestsParams)
        search = params.search()
        rows = await self.queries.search_requests(search)
        next_offset = search.offset + len(rows) if len(rows) == search.limit else None
        return _model(RequestsResponse(requests=rows, next_offset=next_offset))

    async def anomalies(self, request: web.Request) -> web.Response:
        params = self._params(request, AnomaliesParams)
        rows = await self.queries.anomalies(params.time_range(), params.endpoint(), params.kind,
                                            params.severity, params.limit)
        return _model(AnomaliesResponse(anomalies=rows))

    async def anomaly(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        found = await self.queries.anomaly(request.match_info["id"])
        if found is None:
            raise ProblemError(404, "Unknown anomaly", f"no anomaly {request.match_info['id']!r}")
        return _model(found)

    # -- recommendations -----------------------------------------------------------------------

    async def _load_recommendation(self, rec_id: str) -> Recommendation:
        raw = await self.redis.hget(self.keys.recommendations, rec_id)
        if raw is None:
            raise ProblemError(404, "Unknown recommendation", f"no recommendation {rec_id!r}")
        return Recommendation.model_validate_json(raw)

    async def recommendations(self, request: web.Request) -> web.Response:
        params = self._params(request, RecommendationsParams)
        found = []
        for raw in (await self.redis.hgetall(self.keys.recommendations)).values():
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
        return _model(RecommendationsResponse(recommendations=found))

    async def recommendation(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        return _model(await self._load_recommendation(request.match_info["id"]))

    def transition(self, action: str) -> Handler:
        allowed, target, _ = _TRANSITIONS[action]

        async def handler(request: web.Request) -> web.Response:
            self._params(request, NoParams)
            body = await self._body(request, ActionBody)
            if action in ("dismiss", "rollback") and not body.reason.strip():
                raise ProblemError(400, "Reason required", f"{action} needs a non-empty reason")
            rec_id = request.match_info["id"]
            lock = f"{self.keys.prefix}:lock:recommendation:{rec_id}"
            if not await self.redis.set(lock, "1", nx=True, px=30_000):
                raise ProblemError(409, "Busy", f"another action on {rec_id!r} is in progress")
            try:
                rec = await self._load_recommendation(rec_id)
                if rec.status not in allowed:
                    raise ProblemError(409, "Invalid status transition",
                                       f"cannot {action} a recommendation that is "
                                       f"{rec.status.value}; allowed from "
                                       f"{sorted(s.value for s in allowed)}")
                principal = request[PRINCIPAL]
                update: dict[str, Any] = {"status": target, "status_reason": body.reason,
                                          "status_by": principal.name, "updated_at": time.time()}
                if action == "apply":
                    update["policy"] = await self.store.put(
                        rec.policy, actor=principal.name,
                        reason=body.reason or f"recommendation {rec.id}: {rec.rationale}",
                        evidence=",".join(rec.anomaly_ids))
                elif action == "rollback":
                    await self._undo_policy(rec, principal, body.reason)
                updated = rec.model_copy(update=update)
                await self.redis.hset(self.keys.recommendations, rec.id,
                                      updated.model_dump_json())
                await self._audit(request, f"recommendation.{target.value}",
                                  f"recommendation:{rec.id}", body.reason, _summary(rec),
                                  _summary(updated), evidence=",".join(rec.anomaly_ids))
            finally:
                await self.redis.delete(lock)
            return _model(updated)

        handler.__name__ = f"recommendation_{action}"
        return handler

    async def _undo_policy(self, rec: Recommendation, principal: Principal, reason: str) -> None:
        """Restore what the policy was before this recommendation was applied."""
        current = await self.store.get(rec.policy.id)
        if current is None:
            return  # deleted since: nothing left to undo
        if current.version != rec.policy.version:
            raise ProblemError(409, "Policy changed since applied",
                               f"policy {current.id!r} is at version {current.version}, the "
                               f"recommendation applied version {rec.policy.version}; roll "
                               "back the policy itself instead")
        earlier = [p for p in await self.store.history(current.id)
                   if p.version < current.version and not p.is_expired()]
        if earlier:
            await self.store.rollback(current.id, actor=principal.name, reason=reason,
                                      to_version=earlier[0].version)
        else:
            await self.store.delete(current.id, actor=principal.name, reason=reason)

    # -- policies ------------------------------------------------------------------------------

    async def policies(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        now = time.time()
        current = await self.store.list()
        effective = await self.store.effective(now)
        active = {(p.id, p.version) for p in effective}
        views = [PolicyView(policy=p, active=(p.id, p.version) in active,
                            expired=p.is_expired(now)) for p in
                 sorted(current, key=lambda p: (p.route_id, p.method, p.id))]
        return _model(PoliciesResponse(version=await self.store.version(), policies=views,
                                       effective=effective))

    async def _existing_policy(self, policy_id: str) -> Policy:
        found = await self.store.get(policy_id)
        if found is None:
            raise ProblemError(404, "Unknown policy", f"no policy {policy_id!r}")
        return found

    async def policy(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        return _model(await self._existing_policy(request.match_info["id"]))

    async def policy_history(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        policy_id = request.match_info["id"]
        versions = await self.store.history(policy_id)
        if not versions:
            await self._existing_policy(policy_id)
        return _model(PolicyHistoryResponse(policy_id=policy_id, versions=versions))

    async def put_policy(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        policy_id = request.match_info["id"]
        edit = await self._body(request, PolicyEdit)
        if edit.id is not None and edit.id != policy_id:
            raise ProblemError(400, "Invalid request body",
                               f"body id {edit.id!r} differs from the path's {policy_id!r}")
        fields = edit.model_dump(exclude={"id", "version", "source", "updated_at", "updated_by",
                                          "reason"})
        principal = request[PRINCIPAL]
        try:
            policy = Policy(id=policy_id, source=Source.OPERATOR, updated_by=principal.name,
                            reason=edit.reason, **fields)
        except ValidationError as exc:
            raise _validation_problem(exc, "policy") from None
        stored = await self.store.put(policy, actor=principal.name,
                                      reason=edit.reason or "operator edit")
        return _model(stored)

    async def delete_policy(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        body = await self._body(request, ActionBody)
        policy_id = request.match_info["id"]
        await self._existing_policy(policy_id)
        principal = request[PRINCIPAL]
        deleted = await self.store.delete(policy_id, actor=principal.name,
                                          reason=body.reason or "operator delete")
        return _model(DeletedResponse(policy_id=policy_id, deleted=deleted))

    async def rollback_policy(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        body = await self._body(request, PolicyRollbackBody)
        policy_id = request.match_info["id"]
        await self._existing_policy(policy_id)
        versions = await self.store.history(policy_id)
        known = {p.version for p in versions}
        if body.to_version is not None and body.to_version not in known:
            raise ProblemError(404, "Unknown policy version",
                               f"policy {policy_id!r} has versions {sorted(known)}")
        if body.to_version is None and len(versions) < 2:
            raise ProblemError(409, "Nothing to roll back to",
                               f"policy {policy_id!r} has a single version")
        principal = request[PRINCIPAL]
        try:
            restored = await self.store.rollback(policy_id, actor=principal.name,
                                                 reason=body.reason or "operator rollback",
                                                 to_version=body.to_version)
        except (LookupError, ValueError) as exc:
            raise ProblemError(409, "Rollback refused", str(exc)) from None
        return _model(restored)

    # -- audit and analytics -------------------------------------------------------------------

    async def audit(self, request: web.Request) -> web.Response:
        params = self._params(request, AuditParams)
        records = await self.store.audit_log(params.count, params.subject)
        return _model(AuditResponse(records=records))

    def _need_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise ProblemError(503, "No analytics scheduler",
                               "this API runs without the analytics scheduler (standalone)")
        return self.scheduler

    async def last_run(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        report = self._need_scheduler().last_report
        if report is None:
            raise ProblemError(404, "No run yet", "the analytics job has not run yet")
        return _model(report)

    async def run_analytics(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        body = await self._body(request, ActionBody)
        scheduler = self._need_scheduler()
        await self._audit(request, "analytics.run", "analytics", body.reason, None, None)
        run = asyncio.ensure_future(scheduler.run_now())  # waits for a run in progress first
        try:
            report = await asyncio.wait_for(asyncio.shield(run),
                                            self.settings.api_run_timeout_s)
        except TimeoutError:
            raise ProblemError(504, "Run not finished", "the run goes on; its report will be at "
                               f"{PREFIX}/analytics/last-run") from None
        except Exception as exc:
            if _unavailable(exc):
                raise
            log.exception("analytics run failed")
            raise ProblemError(500, "Analytics run failed", f"{type(exc).__name__}: {exc}"
                               ) from None
        return _model(report)

    async def _modes(self) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.auto_mode)
        return {_text(k): _text(v) for k, v in sorted(raw.items())}

    async def auto_mode(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        return _model(AutoModeResponse(modes=await self._modes()))

    async def put_auto_mode(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        body = await self._body(request, AutoModeBody)
        before = await self._modes()
        if body.mode is None:
            await self.redis.hdel(self.keys.auto_mode, body.group)
        else:
            await self.redis.hset(self.keys.auto_mode, body.group, body.mode.value)
        after = await self._modes()
        await self._audit(request, "analytics.auto_mode", f"auto_mode:{body.group}",
                          body.reason, {"mode": before.get(body.group)},
                          {"mode": after.get(body.group)})
        return _model(AutoModeResponse(modes=after))

    async def kill_switch(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        return _model(KillSwitchResponse(engaged=await self._engaged()))

    async def _engaged(self) -> bool:
        return _text(await self.redis.get(self.keys.kill_switch) or b"") == "1"

    async def put_kill_switch(self, request: web.Request) -> web.Response:
        self._params(request, NoParams)
        body = await self._body(request, KillSwitchBody)
        before = await self._engaged()
        if body.engaged:
            await self.redis.set(self.keys.kill_switch, "1")
        else:
            await self.redis.delete(self.keys.kill_switch)
        await self._audit(request, "analytics.kill_switch", "kill_switch", body.reason,
                          {"engaged": before}, {"engaged": body.engaged})
        return _model(KillSwitchResponse(engaged=body.engaged))

    # -- ops -----------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _model(Health(status="ok"))

    async def readyz(self, request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            ok = await asyncio.wait_for(self.queries.ping(), 5.0)
            checks["clickhouse"] = "ok" if ok else "error: unexpected answer"
        except Exception as exc:
            checks["clickhouse"] = f"error: {type(exc).__name__}"
        ready = all(value == "ok" for value in checks.values())
        body = Health(status="ok" if ready else "unavailable", checks=checks)
        return _json(body.model_dump(), 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(request.app[OPENAPI])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _summary(rec: Recommendation) -> dict[str, Any]:
    """The audit view of a recommendation (as the analytics write-back records it)."""
    return {"status": rec.status.value, "endpoint": rec.endpoint.key, "policy_id": rec.policy.id,
            "policy_version": rec.policy.version, "limit": rec.policy.limit,
            "window_s": rec.policy.window_s, "confidence": rec.confidence}


# ---------------------------------------------------------------------------------------------
# OpenAPI 3.1


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    outputs = {route.response for route in routes if route.response is not None} | {Problem}
    inputs = {route.body for route in routes if route.body is not None}
    keyed = ([(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
             + [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)])
    refs, defs = models_json_schema(keyed,  # type: ignore[arg-type]
                                    ref_template="#/components/schemas/{model}")
    ref_of: dict[Any, dict[str, Any]] = {model: schema for (model, mode), schema in refs.items()
                                         if mode == "serialization"}
    body_ref: dict[Any, dict[str, Any]] = {model: schema for (model, mode), schema in refs.items()
                                           if mode == "validation"}
    problem = {"application/problem+json": {"schema": ref_of[Problem]}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": _operation_id(route), "summary": route.summary, "tags": [route.tag],
            "parameters": _parameters(route),
            "responses": {"200": _ok(route, ref_of)},
        }
        if route.body is not None:
            operation["requestBody"] = {"required": route.method in ("PUT",), "content": {
                "application/json": {"schema": body_ref[route.body]}}}
        errors = {"400": "Invalid parameters or body"} if not route.public else {}
        if "{id}" in route.path:
            errors["404"] = "Unknown id"
        if route.role is not None:
            errors |= {"401": "Missing or invalid token", "403": "Role not allowed",
                       "409": "Invalid status transition or conflicting change"}
        if not route.public:
            errors["503"] = "Redis or ClickHouse unavailable"
        operation["responses"] |= {code: {"description": text, "content": problem}
                                   for code, text in errors.items()}
        if route.role is not None:
            operation["security"] = [{"bearer": []}]
            operation["x-required-role"] = route.role.value
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "apigw control plane", "version": "1",
                 "description": __doc__ or ""},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation_id(route: Route) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", route.path.replace("{id}", "by_id")).strip("_")
    return f"{route.method.lower()}_{words}"


def _ok(route: Route, ref_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if route.path == "/metrics":
        return {"description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}
    if route.response is None:
        return {"description": "OK", "content": {"application/json": {"schema": {
            "type": "object"}}}}
    return {"description": "OK",
            "content": {"application/json": {"schema": ref_of[route.response]}}}


def _parameters(route: Route) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if "{id}" in route.path:
        found.append({"name": "id", "in": "path", "required": True,
                      "schema": {"type": "string"}})
    if route.params is None:
        return found
    schema = route.params.model_json_schema()
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        entry: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                 "schema": {k: v for k, v in prop.items() if k != "description"}}
        if "description" in prop:
            entry["description"] = prop["description"]
        found.append(entry)
    if "$defs" in schema:  # enum parameters: inline their definitions
        for entry in found:
            entry["schema"] = _inline(entry["schema"], schema["$defs"])
    return found


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return defs[schema["$ref"].rsplit("/", 1)[-1]]
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


# ---------------------------------------------------------------------------------------------
# App




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
        if not _unavailable(exc):
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
    api = ControlPlaneApi(settings, redis, ch, store, scheduler)
    app = web.Application(middlewares=[_errors], client_max_size=256 * 1024)
    routes = api.routes()
    for route in routes:
        app.router.add_route(route.method, route.path, api.guard(route))
    app[OPENAPI] = openapi_document(routes)
    return app


# ---------------------------------------------------------------------------------------------
# Serving


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65_536:
        raise ValueError(f"--listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:8088")
    return host, int(port)


async def run_app(app: web.Application, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` until `stop` is set, then finish in-flight requests and close."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("api listening", extra={"host": host, "port": port})
        await stop.wait()
    finally:
        await runner.cleanup()


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _serve_api(settings: ApiSettings, host: str, port: int) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
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
    import uvloop

    from apigw import logs

    logs.configure("api", settings.log_level)
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        log.error(str(exc))
        return 2
    try:
        uvloop.run(_serve_api(settings, host, port))
    except Exception:
        log.exception("api failed")
        return 1
    return 0

