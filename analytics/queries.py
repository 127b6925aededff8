"""Read queries of the control-plane API: rollups, anomalies and (for search only) raw events.

Every value reaches ClickHouse as a bound parameter (`{name:Type}` with `parameters=`); the
SQL text is assembled only from fixed fragments in this module. Rollup queries aggregate with
sum / the latency state merge (collector.schema.DURATION_QUANTILES) / uniqMerge and
GROUP BY, since rows of one key merge only eventually.
Raw `events` are read only with a time range on the sort key and a LIMIT.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel

from analytics.models import Anomaly, AnomalyKind, Endpoint, Severity
from collector.clickhouse import SharedClient
from collector.schema import DURATION_QUANTILES

MAX_RANGE_S: Final = 31 * 86_400
MAX_POINTS: Final = 500
SPARKLINE_POINTS: Final = 60
STEPS_S: Final = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200, 86_400)
_SEVERITY_RANK: Final = {Severity.LOW: 1, Severity.MEDIUM: 2, Severity.HIGH: 3,
                         Severity.CRITICAL: 4}


def resolution(duration_s: float, max_points: int = MAX_POINTS) -> int:
    """The smallest bucket (seconds) that keeps a series of `duration_s` within max_points."""
    for step in STEPS_S:
        if math.ceil(duration_s / step) <= max_points:
            return step
    return STEPS_S[-1]


@dataclass(frozen=True, slots=True)
class TimeRange:
    """[start, end) in epoch seconds."""

    start: float
    end: float

    @classmethod
    def last(cls, minutes: float, now: float | None = None) -> TimeRange:
        end = time.time() if now is None else now
        return cls(end - minutes * 60, end)

    @property
    def minute_start(self) -> int:
        return int(self.start // 60) * 60

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def params(self) -> dict[str, int]:
        """Bound values (never below the epoch: an earlier window is just empty)."""
        return {"start_s": max(0, self.minute_start), "end_s": max(0, math.ceil(self.end)),
                "start_ms": max(0, int(self.start * 1000)),
                "end_ms": max(0, math.ceil(self.end * 1000))}


@dataclass(frozen=True, slots=True)
class EndpointFilter:
    """Optional parts of the endpoint identity; None = any, "" matches the empty value."""

    route_id: str | None = None
    method: str | None = None
    http_route: str | None = None

    def clauses(self) -> tuple[list[str], dict[str, str]]:
        where: list[str] = []
        params: dict[str, str] = {}
        if self.route_id is not None:
            where.append("route_id = {route_id:String}")
            params["route_id"] = self.route_id
        if self.method is not None:
            where.append("http_request_method = {method:String}")
            params["method"] = self.method.upper()
        if self.http_route is not None:
            where.append("http_route = {http_route:String}")
            params["http_route"] = self.http_route
        return where, params


class Compare(StrEnum):
    """An earlier window of the same length to compare a range with."""

    PREV = "prev"  # the window just before
    DAY = "1d"
    WEEK = "1w"

    def offset_s(self, rng: TimeRange, step_s: int = 60) -> int:
        """How far back. `prev` spans the range's whole minute buckets, rounded up to whole
        steps, so the two windows' buckets line up and do not overlap."""
        if self is Compare.DAY:
            return 86_400
        if self is Compare.WEEK:
            return 7 * 86_400
        buckets = math.ceil(rng.end / 60) * 60 - rng.minute_start
        return math.ceil(buckets / step_s) * step_s

    def shift(self, rng: TimeRange, step_s: int = 60) -> TimeRange:
        offset = self.offset_s(rng, step_s)
        return TimeRange(rng.start - offset, rng.end - offset)


class Health(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    CRITICAL = "critical"
    IDLE = "idle"


class EndpointSummary(BaseModel):
    route_id: str
    method: str
    http_route: str
    requests: int
    errors_5xx: int
    errors_4xx: int
    error_rate: float  # 5xx share of requests
    rate_limited: int
    auth_failures: int
    clients: int
    mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    last_minute_requests: int  # the last complete minute of the range
    open_anomalies: int  # anomalies whose window ends inside the range
    max_severity: Severity | None
    max_score: float
    health: Health
    # requests per bucket from the response's sparkline_start, every sparkline_step_s seconds
    # (only when asked for with sparkline=true)
    sparkline: list[int] | None = None


class EndpointName(BaseModel):
    route_id: str
    method: str
    http_route: str
    requests: int


class Sparklines(BaseModel):
    start: float
    step_s: int
    counts: dict[tuple[str, str, str], list[int]]


class SeriesPoint(BaseModel):
    ts: float
    requests: int
    errors_5xx: int
    errors_4xx: int
    error_rate: float
    rate_limited: int
    auth_failures: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class Series(BaseModel):
    start: float
    end: float
    step_s: int
    points: list[SeriesPoint]
    compare: Compare | None = None
    compare_offset_s: int | None = None
    compare_points: list[SeriesPoint] = []  # ts shifted forward by compare_offset_s


class ClientRow(BaseModel):
    client: str
    requests: int
    share: float
    errors_5xx: int
    errors_4xx: int
    rate_limited: int
    auth_failures: int
    distinct_paths: int
    compare_requests: int | None = None  # in the compare window, when one was asked for
    compare_share: float | None = None


class BreakdownDimension(StrEnum):
    STATUS = "status"
    ERROR_TYPE = "error_type"
    CLIENT_ADDRESS = "client_address"
    USER_AGENT = "user_agent"
    TENANT = "tenant"


class BreakdownRow(BaseModel):
    value: str
    requests: int
    share: float
    compare_requests: int | None = None
    compare_share: float | None = None


class RequestRow(BaseModel):
    timestamp: float
    request_id: str
    trace_id: str
    route_id: str
    method: str
    http_route: str
    url_path: str
    status: int
    duration_ms: float
    client_id: str
    client_address: str
    user_agent: str
    error_type: str
    auth_outcome: str
    ratelimit_outcome: str
    ratelimit_policy_id: str
    upstream: str
    tenant: str


@dataclass(frozen=True, slots=True)
class ReviewFilter:
    """Anomalies by review state: only these ids (None: any), none of those, and bounds on
    when their window ended (open vs resolved)."""

    only_ids: Sequence[str] | None = None
    except_ids: Sequence[str] = ()
    ended_after: float | None = None
    ended_before: float | None = None


@dataclass(frozen=True, slots=True)
class RequestSearch:
    range: TimeRange
    endpoint: EndpointFilter
    status_min: int | None = None
    status_max: int | None = None
    client: str | None = None
    trace_id: str | None = None
    request_id: str | None = None
    error_type: str | None = None
    limit: int = 100
    offset: int = 0


_REQUEST_COLUMNS: Final = (
    "timestamp, request_id, trace_id, route_id, http_request_method, http_route, url_path, "
    "http_response_status_code, duration_ms, client_id, client_address, user_agent_original, "
    "error_type, auth_outcome, ratelimit_outcome, ratelimit_policy_id, upstream, tenant")

_ANOMALY_COLUMNS: Final = (
    "id, detected_at, window_start, window_end, route_id, http_request_method, http_route, "
    "kind, severity, score, metric, baseline, observed, top_clients, example_request_ids, "
    "example_trace_ids, summary")

_ENDPOINT_IN: Final = ("(route_id, http_request_method, http_route) "
                        "IN {endpoints:Array(Tuple(String, String, String))}")
_MINUTE_RANGE: Final = ("minute >= toDateTime({start_s:UInt32}, 'UTC')",
                        "minute < toDateTime({end_s:UInt32}, 'UTC')")
_EVENT_RANGE: Final = ("timestamp >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
                       "timestamp < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')")
# Anomalies whose window overlaps the range.
_ANOMALY_OVERLAP: Final = ("window_end >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
                           "detected_at < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')")


@dataclass(frozen=True, slots=True)
class _Breakdown:
    value: str  # SQL expression of the value
    table: str
    range: tuple[str, ...]
    summed: str | None = None  # the column holding each row's requests; None: a row each
    # an hourly rollup of the value (`requests` per hour): whole hours read from it, the
    # partial hours at the window's ends from `table` (raw events)
    hourly: str | None = None

    def requests_if(self, condition: str) -> str:
        return f"sumIf({self.summed}, {condition})" if self.summed else f"countIf({condition})"


# Status codes and error classes come from their minute rollup (whole minutes of the range);
# client addresses from their hourly rollup plus raw events at the range's ends (a minute
# rollup would not shrink them); user agents and tenants from raw events.
_BREAKDOWNS: Final = {
    BreakdownDimension.STATUS: _Breakdown("toString(status)", "events_status_1m",
                                          _MINUTE_RANGE, "requests"),
    BreakdownDimension.ERROR_TYPE: _Breakdown("error_type", "events_status_1m", _MINUTE_RANGE,
                                              "requests"),
    BreakdownDimension.CLIENT_ADDRESS: _Breakdown("client_address", "events", _EVENT_RANGE,
                                                  hourly="events_address_1h"),
    BreakdownDimension.USER_AGENT: _Breakdown("user_agent_original", "events", _EVENT_RANGE),
    BreakdownDimension.TENANT: _Breakdown("tenant", "events", _EVENT_RANGE),
}
# A range and an earlier window to compare it with are read in one scan of both (conditional
# sums per window: the windows may overlap, e.g. seven days compared with a day earlier); the
# earlier window's bound parameters carry this prefix. One query instead of two saves the
# engine's ~2-3 ms of per-query work on every read that compares.
_EARLIER: Final = "earlier_"
_NO_WINDOW: Final = "0"


def _earlier(values: dict[str, int]) -> dict[str, int]:
    """An earlier window's bound values, named for `_window(..., _EARLIER)`."""
    return {_EARLIER + name: value for name, value in values.items()}


def _window(clauses: tuple[str, ...], prefix: str = "") -> str:
    """A range's clauses as one condition, its parameters' names prefixed."""
    return "(" + " AND ".join(clause.replace("{", "{" + prefix) for clause in clauses) + ")"


def _windows(clauses: tuple[str, ...], rng: TimeRange, earlier: TimeRange | None,
             bounds: Callable[[TimeRange], dict[str, int]] = TimeRange.params
             ) -> tuple[str, str, dict[str, Any]]:
    """The conditions of the range and of the earlier window (never true without one) and
    their bound values (`bounds` of each window)."""
    params: dict[str, Any] = dict(bounds(rng))
    if earlier is None:
        return _window(clauses), _NO_WINDOW, params
    params.update(_earlier(bounds(earlier)))
    return _window(clauses), _window(clauses, _EARLIER), params


_HOURS: Final = ("hour >= toDateTime({hours_from_s:UInt32}, 'UTC')",
                 "hour < toDateTime({hours_to_s:UInt32}, 'UTC')")
_EDGES: Final = ("(timestamp >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') AND "
                 "timestamp < fromUnixTimestamp64Milli({hours_from_ms:Int64}, 'UTC') OR "
                 "timestamp >= fromUnixTimestamp64Milli({hours_to_ms:Int64}, 'UTC') AND "
                 "timestamp < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC'))",)


def _either(now: str, then: str) -> str:
    """What to scan: the range, or it and the earlier window."""
    return now if then == _NO_WINDOW else f"({now} OR {then})"


def _hour_split(rng: TimeRange) -> dict[str, int]:
    """A range's bound values split into its whole hours [hours_from, hours_to) and the partial
    hours at its ends; without a whole hour, hours_from = hours_to = the range's end."""
    params = rng.params()
    first, last = math.ceil(rng.start / 3600) * 3600, math.floor(rng.end / 3600) * 3600
    if last <= first:
        return {**params, "hours_from_s": params["end_s"], "hours_to_s": params["end_s"],
                "hours_from_ms": params["end_ms"], "hours_to_ms": params["end_ms"]}
    first, last = max(0, first), max(0, last)
    return {**params, "hours_from_s": first, "hours_to_s": last,
            "hours_from_ms": first * 1000, "hours_to_ms": last * 1000}


def _compare_fields(row: dict[str, Any], compared: bool) -> dict[str, Any]:
    if not compared:
        return {}
    earlier = int(row["n_earlier"])
    return {"compare_requests": earlier,
            "compare_share": _rate(earlier, int(row["total_earlier"]))}


def _endpoint_of(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["route_id"], row["http_request_method"], row["http_route"]


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return float(value.timestamp())
    return float(value)


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _quantiles(values: Sequence[Any] | None) -> tuple[float | None, float | None, float | None]:
    if not values or len(values) < 3:
        return None, None, None
    return _finite(values[0]), _finite(values[1]), _finite(values[2])


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _where(parts: Sequence[str]) -> str:
    return " AND ".join(parts) if parts else "1"


def _point(row: dict[str, Any], bucket: int) -> SeriesPoint:
    """A series point from a bucket's row (an empty row: a bucket without traffic)."""
    n, e5 = int(row.get("n", 0)), int(row.get("e5", 0))
    p50, p95, p99 = _quantiles(row.get("q"))
    return SeriesPoint(ts=float(bucket), requests=n, errors_5xx=e5,
                       errors_4xx=int(row.get("e4", 0)), error_rate=_rate(e5, n),
                       rate_limited=int(row.get("rl", 0)), auth_failures=int(row.get("af", 0)),
                       p50_ms=p50, p95_ms=p95, p99_ms=p99)


def health_of(error_rate: float, requests: int, anomalies: int,
              max_severity: Severity | None) -> Health:
    if max_severity in (Severity.HIGH, Severity.CRITICAL) or error_rate >= 0.2:
        return Health.CRITICAL
    if anomalies or error_rate >= 0.05:
        return Health.DEGRADED
    return Health.OK if requests else Health.IDLE


def anomaly_from_row(row: dict[str, Any]) -> Anomaly:
    return Anomaly(
        id=row["id"], detected_at=_epoch(row["detected_at"]),
        window_start=_epoch(row["window_start"]), window_end=_epoch(row["window_end"]),
        endpoint=Endpoint(route_id=row["route_id"], method=row["http_request_method"],
                          http_route=row["http_route"]),
        kind=AnomalyKind(row["kind"]), severity=Severity(row["severity"]),
        score=min(1.0, max(0.0, float(row["score"]))), metric=row["metric"],
        baseline=float(row["baseline"]), observed=float(row["observed"]),
        top_clients=list(row["top_clients"]), example_request_ids=list(row["example_request_ids"]),
        example_trace_ids=list(row["example_trace_ids"]), summary=row["summary"])


class Queries:
    """The API's reads. Each call runs in a worker thread holding the client's lock."""

    def __init__(self, ch: SharedClient) -> None:
        self._ch = ch

    def _run(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self._ch.lock:
            result = self._ch.client.query(sql, parameters=params)
            return list(result.named_results())

    async def rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._run, sql, params)

    async def ping(self) -> bool:
        rows = await self.rows("SELECT 1 AS ok", {})
        return bool(rows and rows[0]["ok"] == 1)

    async def endpoints(self, rng: TimeRange, limit: int = 500) -> list[EndpointSummary]:
        last_minute = max(rng.minute_start, int(rng.end // 60) * 60 - 60)
        params: dict[str, Any] = {**rng.params(), "limit": limit, "last_minute": last_minute}
        traffic = await self.rows(
            "SELECT route_id, http_request_method, http_route, sum(requests) AS n, "
            "sum(errors_5xx) AS e5, sum(errors_4xx) AS e4, sum(rate_limited) AS rl, "
            "sum(auth_failures) AS af, sum(duration_sum_ms) AS dur, "
            f"{DURATION_QUANTILES} AS q, uniqMerge(clients) AS uc, "
            "sumIf(requests, minute = toDateTime({last_minute:UInt32}, 'UTC')) AS last_n "
            f"FROM events_1m WHERE {_where(_MINUTE_RANGE)} "
            "GROUP BY route_id, http_request_method, http_route ORDER BY n DESC "
            "LIMIT {limit:UInt32}", params)
        flagged = await self.rows(
            "SELECT route_id, http_request_method, http_route, uniqExact(id) AS n, "
            "max(score) AS top_score, groupUniqArray(severity) AS severities FROM anomalies "
            f"WHERE {_where(_ANOMALY_OVERLAP)} "
            "GROUP BY route_id, http_request_method, http_route", params)
        by_endpoint = {_endpoint_of(row): row for row in flagged}
        summaries = [self._summary(row, by_endpoint.pop(_endpoint_of(row), None))
                     for row in traffic]
        for key, row in by_endpoint.items():
            idle = {"route_id": key[0], "http_request_method": key[1], "http_route": key[2]}
            summaries.append(self._summary(idle, row))
        return summaries

    async def endpoint_names(self, rng: TimeRange, limit: int = 500) -> list[EndpointName]:
        """The endpoints with traffic in the range, busiest first, then those with anomalies
        only: what a picker needs, without the latency and client merges of `endpoints`."""
        params: dict[str, Any] = {**rng.params(), "limit": limit}
        traffic = await self.rows(
            "SELECT route_id, http_request_method, http_route, sum(requests) AS n "
            f"FROM events_1m WHERE {_where(_MINUTE_RANGE)} "
            "GROUP BY route_id, http_request_method, http_route "
            "ORDER BY n DESC, route_id, http_request_method, http_route "
            "LIMIT {limit:UInt32}", params)
        flagged = await self.rows(
            "SELECT DISTINCT route_id, http_request_method, http_route FROM anomalies "
            f"WHERE {_where(_ANOMALY_OVERLAP)} "
            "ORDER BY route_id, http_request_method, http_route", params)
        requests = {_endpoint_of(row): int(row["n"]) for row in traffic}
        for row in flagged:
            requests.setdefault(_endpoint_of(row), 0)
        return [EndpointName(route_id=route_id, method=method, http_route=route, requests=n)
                for (route_id, method, route), n in list(requests.items())[:limit]]

    async def sparklines(self, rng: TimeRange,
                         endpoints: Sequence[tuple[str, str, str]]) -> Sparklines:
        """Requests per bucket (at most SPARKLINE_POINTS) of each endpoint, in one query."""
        step = resolution(rng.duration_s, SPARKLINE_POINTS)
        first = (rng.minute_start // step) * step
        size = max(1, math.ceil((rng.end - first) / step))
        counts = {key: [0] * size for key in endpoints}
        if not endpoints:
            return Sparklines(start=float(first), step_s=step, counts=counts)
        params: dict[str, Any] = {**rng.params(), "step": step, "first": first,
                                  "endpoints": list(endpoints)}
        rows = await self.rows(
            "SELECT route_id, http_request_method, http_route, "
            "intDiv(toUInt32(minute) - {first:UInt32}, {step:UInt32}) AS slot, "
            "sum(requests) AS n FROM events_1m WHERE "
            f"{_where([*_MINUTE_RANGE, _ENDPOINT_IN])} "
            "GROUP BY route_id, http_request_method, http_route, slot", params)
        for row in rows:
            series = counts.get(_endpoint_of(row))
            slot = int(row["slot"])
            if series is not None and 0 <= slot < size:
                series[slot] = int(row["n"])
        return Sparklines(start=float(first), step_s=step, counts=counts)

    @staticmethod
    def _summary(row: dict[str, Any], flagged: dict[str, Any] | None) -> EndpointSummary:
        requests = int(row.get("n", 0))
        errors_5xx = int(row.get("e5", 0))
        p50, p95, p99 = _quantiles(row.get("q"))
        severities = [Severity(s) for s in (flagged or {}).get("severities", [])
                      if s in Severity.__members__.values()]
        top = max(severities, key=_SEVERITY_RANK.__getitem__) if severities else None
        count = int(flagged["n"]) if flagged else 0
        error_rate = _rate(errors_5xx, requests)
        return EndpointSummary(
            route_id=row["route_id"], method=row["http_request_method"],
            http_route=row["http_route"], requests=requests, errors_5xx=errors_5xx,
            errors_4xx=int(row.get("e4", 0)), error_rate=error_rate,
            rate_limited=int(row.get("rl", 0)), auth_failures=int(row.get("af", 0)),
            clients=int(row.get("uc", 0)),
            mean_ms=float(row["dur"]) / requests if requests else None,
            p50_ms=p50, p95_ms=p95, p99_ms=p99, last_minute_requests=int(row.get("last_n", 0)),
            open_anomalies=count, max_severity=top,
            max_score=float(flagged["top_score"]) if flagged else 0.0,
            health=health_of(error_rate, requests, count, top))

    async def timeseries(self, rng: TimeRange, endpoint: EndpointFilter,
                         compare: Compare | None = None) -> Series:
        step = resolution(rng.duration_s)
        offset = compare.offset_s(rng, step) if compare is not None else 0
        earlier = (TimeRange(rng.start - offset, rng.end - offset) if compare is not None
                   else None)
        points, compare_points = await self._points(rng, endpoint, step, earlier, offset)
        series = Series(start=rng.start, end=rng.end, step_s=step, points=points)
        if compare is not None:
            series.compare = compare
            series.compare_offset_s = offset
            series.compare_points = compare_points
        return series

    async def _points(self, rng: TimeRange, endpoint: EndpointFilter, step: int,
                      earlier: TimeRange | None = None, offset: int = 0
                      ) -> tuple[list[SeriesPoint], list[SeriesPoint]]:
        """The range's points and, with `earlier` (the range `offset` seconds back, a whole
        number of steps), the earlier window's, its buckets moved forward onto the range's.
        A row in both windows (they overlap) is counted in each (the ARRAY JOIN)."""
        where, filters = endpoint.clauses()
        now, then, windows = _windows(_MINUTE_RANGE, rng, earlier)
        rows = await self.rows(
            "SELECT win, intDiv(toUInt32(minute) + win * {offset:UInt32}, "
            "{step:UInt32}) * {step:UInt32} AS bucket, "
            "sum(requests) AS n, sum(errors_5xx) AS e5, sum(errors_4xx) AS e4, "
            "sum(rate_limited) AS rl, sum(auth_failures) AS af, "
            f"{DURATION_QUANTILES} AS q FROM events_1m "
            f"ARRAY JOIN arrayFilter(w -> (w = 0 AND {now}) OR (w = 1 AND {then}), [0, 1]) "
            f"AS win WHERE {_where([*where, _either(now, then)])} "
            "GROUP BY win, bucket ORDER BY win, bucket",
            {**windows, **filters, "step": step, "offset": offset})
        found = {(int(row["win"]), int(row["bucket"])): row for row in rows}
        first = (rng.minute_start // step) * step
        buckets = range(first, math.ceil(rng.end), step)
        return ([_point(found.get((0, bucket), {}), bucket) for bucket in buckets],
                [_point(found.get((1, bucket), {}), bucket) for bucket in buckets]
                if earlier is not None else [])

    async def top_clients(self, rng: TimeRange, endpoint: EndpointFilter,
                          limit: int = 20, compare: TimeRange | None = None) -> list[ClientRow]:
        where, filters = endpoint.clauses()
        now, then, windows = _windows(_MINUTE_RANGE, rng, compare)
        scan = _either(now, then)
        rows = await self.rows(
            "SELECT client, n, e5, e4, rl, af, total, n_earlier, total_earlier FROM ("
            f"SELECT client, sumIf(requests, {now}) AS n, sumIf(errors_5xx, {now}) AS e5, "
            f"sumIf(errors_4xx, {now}) AS e4, sumIf(rate_limited, {now}) AS rl, "
            f"sumIf(auth_failures, {now}) AS af, sum(sumIf(requests, {now})) OVER () AS total, "
            f"sumIf(requests, {then}) AS n_earlier, "
            f"sum(sumIf(requests, {then})) OVER () AS total_earlier "
            f"FROM events_client_1m WHERE {_where([*where, scan])} GROUP BY client) "
            "WHERE n > 0 ORDER BY n DESC, client LIMIT {limit:UInt32}",
            {**windows, **filters, "limit": limit})
        # Distinct paths for the top clients only: merging every client's path states first
        # took 390-440 ms over 24 h with 20,000 clients, against ~90 ms for both reads.
        paths: dict[str, int] = {}
        if rows:
            top = {**rng.params(), **filters, "clients": [row["client"] for row in rows]}
            paths = {row["client"]: int(row["up"]) for row in await self.rows(
                "SELECT client, uniqMerge(paths) AS up FROM events_client_1m WHERE "
                f"{_where([*_MINUTE_RANGE, *where, 'client IN {clients:Array(String)}'])} "
                "GROUP BY client", top)}
        return [ClientRow(client=row["client"], requests=int(row["n"]),
                          share=_rate(int(row["n"]), int(row["total"])),
                          errors_5xx=int(row["e5"]), errors_4xx=int(row["e4"]),
                          rate_limited=int(row["rl"]), auth_failures=int(row["af"]),
                          distinct_paths=paths.get(row["client"], 0),
                          **_compare_fields(row, compare is not None)) for row in rows]

    async def breakdown(self, rng: TimeRange, endpoint: EndpointFilter,
                        by: BreakdownDimension, limit: int = 20,
                        compare: TimeRange | None = None) -> list[BreakdownRow]:
        where, filters = endpoint.clauses()
        spec = _BREAKDOWNS[by]
        if spec.hourly is not None:
            rows = await self._hourly_breakdown(spec, spec.hourly, rng, where, filters, limit,
                                                compare)
        else:
            now, then, windows = _windows(spec.range, rng, compare)
            scan = _either(now, then)
            rows = await self.rows(
                "SELECT value, n, total, n_earlier, total_earlier FROM ("
                f"SELECT {spec.value} AS value, {spec.requests_if(now)} AS n, "
                f"sum({spec.requests_if(now)}) OVER () AS total, "
                f"{spec.requests_if(then)} AS n_earlier, "
                f"sum({spec.requests_if(then)}) OVER () AS total_earlier "
                f"FROM {spec.table} WHERE {_where([*where, scan])} GROUP BY value) "
                "WHERE n > 0 ORDER BY n DESC, value LIMIT {limit:UInt32}",
                {**windows, **filters, "limit": limit})
        return [BreakdownRow(value=str(row["value"]), requests=int(row["n"]),
                             share=_rate(int(row["n"]), int(row["total"])),
                             **_compare_fields(row, compare is not None)) for row in rows]

    async def _hourly_breakdown(self, spec: _Breakdown, hourly: str, rng: TimeRange,
                                where: list[str], filters: dict[str, str], limit: int,
                                compare: TimeRange | None) -> list[dict[str, Any]]:
        """The breakdown's rows from the hourly rollup (whole hours of each window) plus raw
        events (the partial hours at the windows' ends), in one query."""
        hours_now, hours_then, windows = _windows(_HOURS, rng, compare, _hour_split)
        edges_now, edges_then, _ = _windows(_EDGES, rng, compare, _hour_split)
        return await self.rows(
            "SELECT value, n, total, n_earlier, total_earlier FROM (SELECT value, "
            "sum(n_now) AS n, sum(sum(n_now)) OVER () AS total, sum(n_then) AS n_earlier, "
            "sum(sum(n_then)) OVER () AS total_earlier FROM ("
            f"SELECT {spec.value} AS value, sumIf(requests, {hours_now}) AS n_now, "
            f"sumIf(requests, {hours_then}) AS n_then FROM {hourly} "
            f"WHERE {_where([*where, _either(hours_now, hours_then)])} GROUP BY value "
            f"UNION ALL SELECT {spec.value} AS value, {spec.requests_if(edges_now)} AS n_now, "
            f"{spec.requests_if(edges_then)} AS n_then FROM {spec.table} "
            f"WHERE {_where([*where, _either(edges_now, edges_then)])} GROUP BY value) "
            "GROUP BY value) WHERE n > 0 ORDER BY n DESC, value LIMIT {limit:UInt32}",
            {**windows, **filters, "limit": limit})

    async def client_windows(self, rng: TimeRange, route_id: str, method: str | None,
                             client: str, step_s: int) -> list[int]:
        """Requests of one client on one route per `step_s` bucket (buckets with traffic)."""
        endpoint = EndpointFilter(route_id, method)
        where, filters = endpoint.clauses()
        params: dict[str, Any] = {**rng.params(), **filters, "client": client, "step": step_s}
        rows = await self.rows(
            "SELECT intDiv(toUInt32(minute), {step:UInt32}) AS bucket, sum(requests) AS n "
            "FROM events_client_1m "
            f"WHERE {_where([*_MINUTE_RANGE, *where, 'client = {client:String}'])} "
            "GROUP BY bucket ORDER BY bucket", params)
        return [int(row["n"]) for row in rows]

    async def search_requests(self, search: RequestSearch) -> list[RequestRow]:
        where, filters = search.endpoint.clauses()
        params: dict[str, Any] = {**search.range.params(), **filters,
                                  "limit": search.limit, "offset": search.offset}
        where = [*where, *_EVENT_RANGE]
        if search.status_min is not None:
            where.append("http_response_status_code >= {status_min:UInt16}")
            params["status_min"] = search.status_min
        if search.status_max is not None:
            where.append("http_response_status_code <= {status_max:UInt16}")
            params["status_max"] = search.status_max
        if search.client is not None:
            where.append("(client_id = {client:String} OR client_address = {client:String})")
            params["client"] = search.client
        for name in ("trace_id", "request_id", "error_type"):
            value = getattr(search, name)
            if value is not None:
                where.append(f"{name} = {{{name}:String}}")
                params[name] = value
        # Sorting every match by (timestamp, request_id) costs a full read of the range; the
        # page's oldest timestamp, found in the table's own order (the scalar subquery, run
        # first; NULL, so the epoch, when fewer rows match), bounds what has to be sorted.
        params["last"] = search.offset + search.limit - 1
        matches = _where(where)
        rows = await self.rows(
            f"SELECT {_REQUEST_COLUMNS} FROM events WHERE {matches} AND timestamp >= ifNull(("
            f"SELECT timestamp FROM events WHERE {matches} ORDER BY timestamp DESC "
            "LIMIT 1 OFFSET {last:UInt32}), toDateTime64(0, 3, 'UTC')) "
            "ORDER BY timestamp DESC, request_id LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
            params)
        return [RequestRow(
            timestamp=_epoch(row["timestamp"]), request_id=row["request_id"],
            trace_id=row["trace_id"], route_id=row["route_id"],
            method=row["http_request_method"], http_route=row["http_route"],
            url_path=row["url_path"], status=int(row["http_response_status_code"]),
            duration_ms=float(row["duration_ms"]), client_id=row["client_id"],
            client_address=row["client_address"], user_agent=row["user_agent_original"],
            error_type=row["error_type"], auth_outcome=row["auth_outcome"],
            ratelimit_outcome=row["ratelimit_outcome"],
            ratelimit_policy_id=row["ratelimit_policy_id"], upstream=row["upstream"],
            tenant=row["tenant"]) for row in rows]

    async def anomalies(self, rng: TimeRange, endpoint: EndpointFilter,
                        kind: AnomalyKind | None = None, severity: Severity | None = None,
                        limit: int = 200, offset: int = 0,
                        review: ReviewFilter | None = None) -> list[Anomaly]:
        """Newest first, one row per id; `review` narrows by review state before the limit
        (the reviews live in Redis: their ids arrive as a bound array)."""
        where, filters = endpoint.clauses()
        params: dict[str, Any] = {**rng.params(), **filters, "limit": limit, "offset": offset}
        where = [*where, "detected_at >= fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC')",
                 "detected_at < fromUnixTimestamp64Milli({end_ms:Int64}, 'UTC')"]
        if kind is not None:
            where.append("kind = {kind:String}")
            params["kind"] = kind.value
        if severity is not None:
            where.append("severity = {severity:String}")
            params["severity"] = severity.value
        if review is not None:
            if review.only_ids is not None:
                where.append("has({only_ids:Array(String)}, id)")
                params["only_ids"] = list(review.only_ids)
            if review.except_ids:
                where.append("NOT has({except_ids:Array(String)}, id)")
                params["except_ids"] = list(review.except_ids)
            if review.ended_after is not None:
                where.append("window_end >= fromUnixTimestamp64Milli({ended_after:Int64}, 'UTC')")
                params["ended_after"] = int(review.ended_after * 1000)
            if review.ended_before is not None:
                where.append("window_end < fromUnixTimestamp64Milli({ended_before:Int64}, 'UTC')")
                params["ended_before"] = int(review.ended_before * 1000)
        rows = await self.rows(
            f"SELECT {_ANOMALY_COLUMNS} FROM anomalies WHERE {_where(where)} "
            "ORDER BY detected_at DESC, id LIMIT 1 BY id "
            "LIMIT {limit:UInt32} OFFSET {offset:UInt32}", params)
        return [anomaly_from_row(row) for row in rows]

    async def anomalies_by_id(self, ids: Sequence[str]) -> list[Anomaly]:
        """The latest row of each of these anomalies that exists (order not kept)."""
        if not ids:
            return []
        rows = await self.rows(
            f"SELECT {_ANOMALY_COLUMNS} FROM anomalies WHERE has({{ids:Array(String)}}, id) "
            "ORDER BY detected_at DESC LIMIT 1 BY id", {"ids": list(ids)})
        return [anomaly_from_row(row) for row in rows]

    async def anomaly(self, anomaly_id: str) -> Anomaly | None:
        rows = await self.rows(
            f"SELECT {_ANOMALY_COLUMNS} FROM anomalies WHERE id = {{id:String}} "
            "ORDER BY detected_at DESC LIMIT 1", {"id": anomaly_id})
        return anomaly_from_row(rows[0]) if rows else None
