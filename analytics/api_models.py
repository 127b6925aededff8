"""Request and response models of the control-plane API, and the parsing of both.

Query parameters and JSON bodies are validated by pydantic models that forbid unknown fields;
a failure is a 400 problem naming each bad field. The same models generate the OpenAPI
document, so what is validated is what is documented.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, TypeVar

import orjson
from aiohttp import web
from annotated_types import Ge, Le
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from analytics.job import RunReport
from analytics.models import Anomaly, AnomalyKind, Recommendation, RecommendationStatus, Severity
from analytics.problems import ProblemError, validation_problem
from analytics.queries import (
    MAX_RANGE_S,
    BreakdownDimension,
    BreakdownRow,
    ClientRow,
    Compare,
    EndpointFilter,
    EndpointName,
    EndpointSummary,
    RequestRow,
    RequestSearch,
    Series,
    TimeRange,
)
from analytics.settings import AutoMode
from proxy.policy import Mode, Policy
from proxy.policy_store import AuditRecord

_GROUP = re.compile(r"^[A-Za-z0-9._*-]{1,100}$")
_STATUS = re.compile(r"^([1-5])(xx|\d\d)$")
MAX_EXPIRY_S: Final = 7 * 86_400

__all__ = ["AuditRecord", "Policy", "Recommendation", "RunReport", "Series"]


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


_LAST_EPOCH: Final = 4_102_444_800  # 2100-01-01
Epoch = Annotated[float, BeforeValidator(_epoch), Ge(0), Le(_LAST_EPOCH), WithJsonSchema({
    "anyOf": [{"type": "number", "minimum": 0, "maximum": _LAST_EPOCH},
              {"type": "string", "format": "date-time"}]})]
Text = Annotated[str, Field(max_length=200)]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# -- query parameters ---------------------------------------------------------------------------


class RangeParams(Params):
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
        if start < 0:
            raise ValueError("the range starts before 1970: give a later to or fewer minutes")
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


_COMPARE_HELP = ("Also answer for an earlier window of the same length: prev (the one just "
                 "before), 1d or 1w (a day or a week earlier).")


class EndpointsParams(RangeParams):
    limit: int = Field(default=500, ge=1, le=1000)
    sparkline: bool = Field(default=False, description=(
        "Also answer each endpoint's requests per bucket (at most 60 buckets, from "
        "sparkline_start every sparkline_step_s seconds), all endpoints in one rollup query."))


class EndpointNamesParams(RangeParams):
    limit: int = Field(default=500, ge=1, le=1000)


class TimeseriesParams(EndpointParams):
    compare: Compare | None = Field(default=None, description=_COMPARE_HELP)


class TopClientsParams(EndpointParams):
    limit: int = Field(default=20, ge=1, le=1000)
    compare: Compare | None = Field(default=None, description=_COMPARE_HELP)


class BreakdownParams(EndpointParams):
    by: BreakdownDimension = BreakdownDimension.STATUS
    limit: int = Field(default=20, ge=1, le=1000)
    compare: Compare | None = Field(default=None, description=_COMPARE_HELP)


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


class AnomalyStatus(StrEnum):
    OPEN = "open"  # recent and not reviewed
    RESOLVED = "resolved"  # its window ended a while ago, not reviewed
    DISMISSED = "dismissed"  # reviewed: nothing to do
    ACTIONED = "actioned"  # reviewed: a limit was set for it


class AnomaliesParams(EndpointParams):
    kind: AnomalyKind | None = None
    severity: Severity | None = None
    status: AnomalyStatus | None = Field(default=None, description="open | resolved | "
                                                                   "dismissed | actioned")
    limit: int = Field(default=200, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=100_000, description=(
        "Skip this many (newest first); every filter, status included, applies before it."))


class RecommendationsParams(Params):
    status: RecommendationStatus | None = None
    route_id: str | None = Field(default=None, max_length=200)


_MATCH_HELP = "exact, or a prefix when it ends with * (e.g. {})"


def _match_shape(value: str | None) -> str | None:
    if value is not None and "*" in value[:-1]:
        raise ValueError("* is allowed only at the end (a prefix match)")
    return value


class AuditParams(Params):
    count: int = Field(default=200, ge=1, le=1000)
    subject: str | None = Field(default=None, max_length=300, description=(
        "Subject: " + _MATCH_HELP.format("recommendation:*")))
    actor: str | None = Field(default=None, max_length=200, description=(
        "Who acted: " + _MATCH_HELP.format("analytics")))
    action: str | None = Field(default=None, max_length=100, description=(
        "What was done: " + _MATCH_HELP.format("policy.*")))
    from_: Epoch | None = Field(default=None, alias="from",
                                description="Written at or after: epoch seconds or ISO-8601.")
    to: Epoch | None = Field(default=None, description="Written before (default: now).")

    @field_validator("subject", "actor", "action")
    @classmethod
    def _patterns(cls, value: str | None) -> str | None:
        return _match_shape(value)

    @model_validator(mode="after")
    def _ordered(self) -> AuditParams:
        if self.from_ is not None and self.to is not None and self.from_ >= self.to:
            raise ValueError("from must be before to")
        return self


class DiffParams(Params):
    from_: int | None = Field(default=None, alias="from", ge=1, le=10_000_000,
                              description="Older version (default: the one before `to`).")
    to: int | None = Field(default=None, ge=1, le=10_000_000,
                           description="Newer version (default: the current one).")


class TargetedImpactParams(RangeParams):
    route_id: str = Field(max_length=200)
    method: str = Field(default="*", max_length=16)
    client: str = Field(min_length=1, max_length=500)
    limit: int = Field(gt=0, le=10_000_000)
    window_s: float = Field(default=60.0, ge=1, le=86_400)


class NoParams(Params):
    pass


# -- bodies -------------------------------------------------------------------------------------


class ActionBody(Params):
    reason: str = Field(default="", max_length=2000, description="Why; required to dismiss.")


class ReasonBody(Params):
    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S",
                        description="Why; required (not blank).")


class PolicyRollbackBody(ActionBody):
    to_version: int | None = Field(default=None, ge=1, le=10_000_000,
                                   description="Version to restore; default the previous one.")


_KEY = r"(client_id|api_key|ip|tenant|header:[A-Za-z0-9-]{1,64})"
KEY_BY_PATTERN: Final = rf"^{_KEY}(\+{_KEY})*$"
POLICY_ID_PATTERN: Final = r"^[A-Za-z0-9._:@-]{1,200}$"


PROVENANCE: Final = ("version", "source", "updated_at", "updated_by")
_EDIT_OVERRIDES: Final[dict[str, Any]] = {
    "id": (str | None, Field(default=None, pattern=POLICY_ID_PATTERN)),
    "route_id": (str, Field(default="*", min_length=1, max_length=200)),
    "method": (str, Field(default="*", min_length=1, max_length=16)),
    "key_by": (str, Field(default="client_id", pattern=KEY_BY_PATTERN)),
    "expires_at": (float | None, Field(default=None, ge=0, le=_LAST_EPOCH)),
    "reason": (str, Field(default="", max_length=2000)),
}


def _policy_edit() -> type[Params]:
    """The body of PUT /policies/{id}: every field of the policy record (so it follows the
    record as it grows), provenance accepted and ignored, `id` optional."""
    fields: dict[str, Any] = {}
    for name, info in Policy.model_fields.items():
        if name in _EDIT_OVERRIDES:
            fields[name] = _EDIT_OVERRIDES[name]
        elif name in PROVENANCE:
            fields[name] = (Any, Field(default=None, description="Ignored: set by the store."))
        else:
            fields[name] = (info.annotation, info)
    model: type[Params] = create_model("PolicyEdit", __base__=Params, **fields)
    model.__doc__ = "The editable fields of a policy; provenance fields are ignored."
    return model


PolicyEdit = _policy_edit()


class TargetedLimitBody(Params):
    """A limit for one client on one endpoint; it always expires."""

    route_id: str = Field(min_length=1, max_length=200)
    method: str = Field(default="*", min_length=1, max_length=16)
    client: str = Field(min_length=1, max_length=500,
                        description="The client id (key_by client_id) or address (key_by ip).")
    key_by: str = Field(default="client_id", pattern=r"^(client_id|ip|api_key)$")
    limit: int = Field(gt=0, le=10_000_000)
    window_s: float = Field(ge=1, le=86_400)
    expires_in_s: float = Field(ge=60, le=MAX_EXPIRY_S,
                                description="Lifetime, 60 s to 7 days.")
    mode: Mode = Mode.ENFORCE
    anomaly_id: str | None = Field(default=None, max_length=200,
                                   description="The anomaly this answers; marked actioned.")
    anomaly_ids: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=500, description=(
            "More anomalies this answers (the other windows of one incident); each marked "
            "actioned."))
    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S",
                        description="Why; required (not blank).")


class AutoModeBody(ActionBody):
    group: str = Field(default="*", pattern=_GROUP.pattern,
                       description="A route id, or * for the default.")
    mode: AutoMode | None = Field(description="off | recommend | auto; null removes the override.")


class KillSwitchBody(ActionBody):
    engaged: bool


# -- responses ----------------------------------------------------------------------------------


class EndpointsResponse(BaseModel):
    start: float
    end: float
    endpoints: list[EndpointSummary]
    sparkline_start: float | None = None  # with sparkline=true: the first bucket's start
    sparkline_step_s: int | None = None


class EndpointNamesResponse(BaseModel):
    start: float
    end: float
    endpoints: list[EndpointName]


class ClientsResponse(BaseModel):
    start: float
    end: float
    compare: Compare | None = None
    compare_start: float | None = None
    compare_end: float | None = None
    clients: list[ClientRow]


class BreakdownResponse(BaseModel):
    start: float
    end: float
    by: BreakdownDimension
    compare: Compare | None = None
    compare_start: float | None = None
    compare_end: float | None = None
    rows: list[BreakdownRow]


class RequestsResponse(BaseModel):
    requests: list[RequestRow]
    next_offset: int | None


class AnomalyView(Anomaly):
    status: AnomalyStatus = AnomalyStatus.OPEN
    reviewed_by: str = ""
    review_reason: str = ""
    reviewed_at: float | None = None


class AnomaliesResponse(BaseModel):
    anomalies: list[AnomalyView]
    next_offset: int | None = Field(default=None, description=(
        "The offset of the next page when this one is full, else null."))


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


class FieldChange(BaseModel):
    field: str
    before: Any = None
    after: Any = None


class PolicyDiff(BaseModel):
    policy_id: str
    from_version: int
    to_version: int
    before: Policy
    after: Policy
    changes: list[FieldChange]


class TargetedImpact(BaseModel):
    """What a per-client limit would have done to the client's recorded traffic."""

    client: str
    start: float
    end: float
    window_s: float
    requests: int
    windows: int  # windows in which the client sent anything
    windows_over_limit: int
    requests_limited: int
    share_limited: float


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


# -- parsing ------------------------------------------------------------------------------------

P = TypeVar("P", bound=Params)
B = TypeVar("B", bound=BaseModel)


def query_params(request: web.Request, model: type[P]) -> P:
    repeated = sorted({name for name in request.query if len(request.query.getall(name)) > 1})
    if repeated:
        raise ProblemError(400, "Invalid query parameters",
                           f"parameters given more than once: {repeated}")
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise validation_problem(exc, "query parameters") from None


async def json_body(request: web.Request, model: type[B]) -> B:
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ProblemError(400, "Invalid JSON body", str(exc)) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc, "request body") from None


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def model_response(model: BaseModel) -> web.Response:
    return json_response(model.model_dump(mode="json"))
