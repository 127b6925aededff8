"""The control-plane API against real Redis and a real embedded ClickHouse, over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from analytics.api import ApiSettings, app_runner, build_api
from analytics.auth import token_digest
from analytics.controlplane import ControlPlaneSettings, run_controlplane
from analytics.models import (
    Anomaly,
    Endpoint,
    ImpactEstimate,
    Recommendation,
    RecommendationStatus,
)
from analytics.queries import (
    BreakdownDimension,
    Compare,
    EndpointFilter,
    Queries,
    RequestSearch,
    TimeRange,
)
from apigw.redis_server import free_port
from collector.clickhouse import SharedClient
from collector.schema import migrate
from proxy.event import EVENT_FIELDS, SCHEMA_VERSION, RequestEvent, encode_batch
from proxy.policy import Policy, RedisKeys, Source
from proxy.policy_store import PolicyStore

MINUTES = 10
ORDERS = Endpoint(route_id="orders", method="GET", http_route="/orders/{id}")
USERS = Endpoint(route_id="users", method="GET", http_route="/users/{id}")
ANOMALY_ID = "anom-orders-1"
REC_ID = "rec-orders-1"
TOKENS = {"ops": "operator-token-0123456789", "sec": "security-token-0123456789",
          "ro": "viewer-token-0123456789"}


# -- seeded data: the numbers every assertion below derives from --------------------------------


def seed_events(now: float) -> list[RequestEvent]:
    """Ten minutes of traffic ending a minute ago.

    orders: client-a 10/min (200), client-b 5/min (200, but 500 in the last 3 minutes)
    users: client-a 4/min (200)
    -> orders 150 requests, 15 5xx (all client-b); users 40 requests.
    """
    events = []
    first = int(now // 60) * 60 - MINUTES * 60
    for minute in range(MINUTES):
        start = first + minute * 60
        failing = minute >= MINUTES - 3
        for i in range(10):
            events.append(_event(ORDERS, start + i, f"/orders/{i}", 200, "client-a",
                                 f"req-a-{minute}-{i}", 5.0 + i))
        for i in range(5):
            events.append(_event(ORDERS, start + 20 + i, f"/orders/{100 + i}",
                                 500 if failing else 200, "client-b", f"req-b-{minute}-{i}",
                                 50.0 if failing else 8.0))
        for i in range(4):
            events.append(_event(USERS, start + 30 + i, f"/users/{i}", 200, "client-a",
                                 f"req-u-{minute}-{i}", 3.0))
    return events


def _event(endpoint: Endpoint, ts: float, path: str, status: int, client: str,
           request_id: str, duration: float) -> RequestEvent:
    return RequestEvent(
        timestamp=ts + 0.25, request_id=request_id, http_request_method=endpoint.method,
        url_path=path, http_response_status_code=status, duration_ms=duration,
        trace_id=f"trace-{request_id}", route_id=endpoint.route_id,
        http_route=endpoint.http_route, client_id=client, client_address="127.0.0.9",
        user_agent_original="seed/1", upstream="127.0.0.1:9001", gateway_instance="seed",
        error_type="upstream_status_5xx" if status >= 500 else "")


def seed_anomaly(now: float) -> Anomaly:
    window_end = int(now // 60) * 60 - 60
    return Anomaly(
        id=ANOMALY_ID, detected_at=now - 30, window_start=window_end - 180,
        window_end=window_end, endpoint=ORDERS, kind="error_spike", severity="high",
        score=0.97, metric="error_rate", baseline=0.0, observed=0.333,
        top_clients=["client-b"], example_request_ids=["req-b-9-0", "req-b-9-1"],
        example_trace_ids=["trace-req-b-9-0"], summary="5xx rate 33% vs 0% baseline")


def seed_recommendation(now: float) -> Recommendation:
    policy = Policy(id="analytics:orders:GET", route_id="orders", method="GET",
                    key_by="client_id", limit=12, window_s=60, source=Source.ANALYTICS,
                    updated_by="analytics", reason="recommended for error_spike")
    return Recommendation(
        id=REC_ID, created_at=now - 20, updated_at=now - 20, endpoint=ORDERS,
        anomaly_ids=[ANOMALY_ID], policy=policy, rationale="client-b drives the 5xx spike",
        client_rate_p50=10, client_rate_p90=10, client_rate_p99=10, confidence=0.8,
        impact=ImpactEstimate(window_s=600, clients_limited=1, requests_limited=3,
                              flagged_clients_limited=1, flagged_requests_limited=3,
                              other_clients_limited=0, other_requests_limited=0),
        flagged_clients=["client-b"])


def insert_events(ch: SharedClient, events: list[RequestEvent]) -> None:
    rows = [[datetime.fromtimestamp(e.timestamp, UTC) if name == "timestamp"
             else getattr(e, name) for name in EVENT_FIELDS] for e in events]
    with ch.lock:
        ch.client.insert("events", rows, column_names=list(EVENT_FIELDS))


def insert_anomaly(ch: SharedClient, anomaly: Anomaly) -> None:
    row = {
        "id": anomaly.id, "detected_at": datetime.fromtimestamp(anomaly.detected_at, UTC),
        "window_start": datetime.fromtimestamp(anomaly.window_start, UTC),
        "window_end": datetime.fromtimestamp(anomaly.window_end, UTC),
        "route_id": anomaly.endpoint.route_id, "http_request_method": anomaly.endpoint.method,
        "http_route": anomaly.endpoint.http_route, "kind": anomaly.kind.value,
        "severity": anomaly.severity.value, "score": anomaly.score, "metric": anomaly.metric,
        "baseline": anomaly.baseline, "observed": anomaly.observed,
        "top_clients": anomaly.top_clients, "example_request_ids": anomaly.example_request_ids,
        "example_trace_ids": anomaly.example_trace_ids, "summary": anomaly.summary,
    }
    with ch.lock:
        ch.client.insert("anomalies", [list(row.values())], column_names=list(row))


def seed_store(ch: SharedClient, now: float) -> None:
    with ch.lock:
        migrate(ch.client)
    insert_events(ch, seed_events(now))
    insert_anomaly(ch, seed_anomaly(now))


async def seed_redis(redis: aioredis.Redis, store: PolicyStore, now: float) -> None:
    keys = RedisKeys()
    await redis.hset(keys.recommendations, REC_ID, seed_recommendation(now).model_dump_json())
    await store.put(Policy(id="default-per-client", limit=100, window_s=60),
                    actor="config", reason="baseline")


# -- a live API ---------------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    redis: aioredis.Redis
    store: PolicyStore
    app: web.Application
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, *, token: str | None = None,
                   **kwargs: Any) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.url + path, headers=headers,
                                        **kwargs) as response:
            raw = await response.read()
            body = orjson.loads(raw) if raw and "json" in response.content_type else raw
            return response.status, body, response.headers

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        status, body, _ = await self.call(method, path, **kwargs)
        assert status == 200, (method, path, status, body)
        return body


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def ch(chdb_dsn: str, now: float) -> Iterator[SharedClient]:
    client = SharedClient(chdb_dsn)
    try:
        seed_store(client, now)
        yield client
    finally:
        client.close()


async def start_api(settings: ApiSettings, redis: aioredis.Redis, ch: SharedClient,
                    port: int) -> tuple[web.AppRunner, web.Application, PolicyStore]:
    store = PolicyStore(redis, RedisKeys(settings.key_prefix))
    app = build_api(settings, redis, ch, store, None)
    runner = app_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, app, store


@pytest.fixture
def tokens_spec() -> str:
    return ""


@pytest.fixture
def public_reads() -> bool:
    return True


@pytest.fixture
async def live(redis_url: str, redis_client: aioredis.Redis, ch: SharedClient, port: int,
               tmp_path: Path, now: float, tokens_spec: str,
               public_reads: bool) -> AsyncIterator[Live]:
    settings = ApiSettings(redis_url=redis_url, clickhouse_dsn=ch.dsn, data_dir=tmp_path,
                           api_tokens=tokens_spec, api_public_reads=public_reads)
    runner, app, store = await start_api(settings, redis_client, ch, port)
    try:
        await seed_redis(redis_client, store, now)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield Live(f"http://127.0.0.1:{port}", redis_client, store, app, session)
    finally:
        await runner.cleanup()


@contextmanager
def served_api(redis_url: str, chdb_dsn: str, data_dir: Path, *, seeded: bool = True,
               anomalies: Callable[[float], list[Anomaly]] | None = None,
               **settings: Any) -> Iterator[str]:
    """A live API with seeded data, served from its own thread and event loop (for callers
    that block their own loop: AppTest, schemathesis, a browser subprocess). Yields its URL."""
    now = time.time()
    ch = SharedClient(chdb_dsn)
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        client = aioredis.Redis.from_url(redis_url)
        api_settings = ApiSettings(redis_url=redis_url, clickhouse_dsn=chdb_dsn,
                                   data_dir=data_dir, **settings)
        runner = None
        try:
            stop.append(asyncio.Event())
            runner, _, store = await start_api(api_settings, client, ch, port)
            if seeded:
                await seed_redis(client, store, now)
            ready.set()
            await stop[0].wait()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            raise
        finally:
            if runner is not None:
                await runner.cleanup()
            await client.aclose()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    try:
        if seeded:
            seed_store(ch, now)
            for anomaly in anomalies(now) if anomalies else []:
                insert_anomaly(ch, anomaly)
        else:
            with ch.lock:
                migrate(ch.client)
        thread.start()
        assert ready.wait(60), "API did not start"
        assert not failure, failure
        yield f"http://127.0.0.1:{port}"
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)
        loop.close()
        ch.close()


def by_route(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["route_id"]: row for row in rows}


# -- reads --------------------------------------------------------------------------------------


async def test_endpoints_summarise_the_seeded_traffic(live: Live, now: float) -> None:
    # The range ends at the seeding time: "the last minute" is the seed's last minute even
    # when a minute boundary passes between seeding and this request.
    body = await live.ok("GET", f"/api/v1/endpoints?from={now - 3600:.3f}&to={now:.3f}")
    rows = by_route(body["endpoints"])
    assert set(rows) == {"orders", "users"}
    orders, users = rows["orders"], rows["users"]
    assert (orders["requests"], orders["errors_5xx"], orders["clients"]) == (150, 15, 2)
    assert orders["error_rate"] == pytest.approx(0.1)
    assert orders["last_minute_requests"] == 15
    assert orders["open_anomalies"] == 1
    assert orders["max_severity"] == "high"
    assert orders["health"] == "critical"
    assert orders["p99_ms"] == pytest.approx(50.0, rel=0.05)
    assert (users["requests"], users["errors_5xx"], users["health"]) == (40, 0, "ok")
    assert users["mean_ms"] == pytest.approx(3.0)


async def test_endpoint_names_busiest_first_then_flagged_without_traffic(
        live: Live, ch: SharedClient, now: float) -> None:
    body = await live.ok("GET", "/api/v1/endpoints/names?minutes=60")
    assert body["endpoints"] == [
        {"route_id": "orders", "method": "GET", "http_route": "/orders/{id}", "requests": 150},
        {"route_id": "users", "method": "GET", "http_route": "/users/{id}", "requests": 40}]
    quiet = Endpoint(route_id="quiet", method="POST", http_route="/quiet")
    insert_anomaly(ch, seed_anomaly(now).model_copy(update={"id": "anom-quiet",
                                                            "endpoint": quiet}))
    body = await live.ok("GET", "/api/v1/endpoints/names?minutes=60")
    assert [(row["route_id"], row["requests"]) for row in body["endpoints"]] == [
        ("orders", 150), ("users", 40), ("quiet", 0)]
    top = await live.ok("GET", "/api/v1/endpoints/names?minutes=60&limit=1")
    assert [row["route_id"] for row in top["endpoints"]] == ["orders"]
    status, problem, _ = await live.call("GET", "/api/v1/endpoints/names?limit=0")
    assert status == 400, problem
    assert "limit" in problem["detail"]


async def test_endpoints_with_sparklines_in_one_call(live: Live, now: float) -> None:
    plain = await live.ok("GET", "/api/v1/endpoints?minutes=60")
    assert all(row["sparkline"] is None for row in plain["endpoints"])
    assert plain["sparkline_step_s"] is None

    body = await live.ok("GET", "/api/v1/endpoints?minutes=60&sparkline=true")
    assert body["sparkline_step_s"] == 60
    assert body["sparkline_start"] == (now - 3600) // 60 * 60
    rows = by_route(body["endpoints"])
    orders, users = rows["orders"]["sparkline"], rows["users"]["sparkline"]
    assert len(orders) == len(users) == 61  # [start, end) in minutes, at most 60 + 1 partial
    assert [n for n in orders if n] == [15] * MINUTES
    assert sum(users) == 40
    # the same buckets as the endpoint's own time series
    series = await live.ok("GET", "/api/v1/endpoints/timeseries?route_id=orders&method=GET"
                                  "&route=/orders/{id}&minutes=60")
    assert [p["requests"] for p in series["points"]] == orders

    day = await live.ok("GET", "/api/v1/endpoints?minutes=1440&sparkline=1")
    assert day["sparkline_step_s"] == 1800
    assert all(len(row["sparkline"]) <= 61 for row in day["endpoints"])
    assert sum(by_route(day["endpoints"])["orders"]["sparkline"]) == 150


async def test_timeseries_per_minute_and_coarse_for_long_ranges(live: Live, now: float) -> None:
    body = await live.ok("GET", "/api/v1/endpoints/timeseries?route_id=orders&method=GET"
                                "&route=/orders/{id}&minutes=30")
    assert body["step_s"] == 60
    points = [p for p in body["points"] if p["requests"]]
    assert len(points) == MINUTES
    assert sum(p["requests"] for p in points) == 150
    assert [p["errors_5xx"] for p in points] == [0] * 7 + [5] * 3
    assert points[-1]["error_rate"] == pytest.approx(5 / 15)

    month = await live.ok("GET", "/api/v1/endpoints/timeseries?minutes=44640")
    assert month["step_s"] > 60
    assert len(month["points"]) <= 500
    assert sum(p["requests"] for p in month["points"]) == 190

    start = datetime.fromtimestamp(now - 3600, UTC).isoformat()
    ranged = await live.ok("GET", "/api/v1/endpoints/timeseries",
                           params={"route_id": "users", "from": start, "to": str(now)})
    assert sum(p["requests"] for p in ranged["points"]) == 40


async def test_top_clients_and_breakdown(live: Live) -> None:
    body = await live.ok("GET", "/api/v1/endpoints/top-clients?route_id=orders&minutes=60")
    clients = {row["client"]: row for row in body["clients"]}
    assert clients["client-a"]["requests"] == 100
    assert clients["client-a"]["share"] == pytest.approx(100 / 150)
    assert (clients["client-b"]["requests"], clients["client-b"]["errors_5xx"]) == (50, 15)
    assert clients["client-b"]["distinct_paths"] == 5
    assert clients["client-a"]["distinct_paths"] == 10
    top = await live.ok("GET", "/api/v1/endpoints/top-clients?route_id=orders&minutes=60&limit=1")
    assert [(row["client"], row["distinct_paths"]) for row in top["clients"]] == [("client-a", 10)]
    empty = await live.ok("GET", "/api/v1/endpoints/top-clients?route_id=nothing&minutes=60")
    assert empty["clients"] == []

    status = await live.ok("GET", "/api/v1/endpoints/breakdown?route_id=orders&by=status")
    assert {row["value"]: row["requests"] for row in status["rows"]} == {"200": 135, "500": 15}
    errors = await live.ok("GET", "/api/v1/endpoints/breakdown?by=error_type&route_id=orders")
    assert errors["rows"][1] == {"value": "upstream_status_5xx", "requests": 15, "share": 0.1,
                                 "compare_requests": None, "compare_share": None}


async def test_request_search_filters_and_pages(live: Live) -> None:
    path = "/api/v1/requests?route_id=orders&status=5xx&minutes=60"
    first = await live.ok("GET", path + "&limit=10")
    assert len(first["requests"]) == 10
    assert first["next_offset"] == 10
    rest = await live.ok("GET", path + "&limit=10&offset=10")
    assert len(rest["requests"]) == 5
    assert rest["next_offset"] is None
    rows = first["requests"] + rest["requests"]
    assert len({row["request_id"] for row in rows}) == 15
    assert {(row["client_id"], row["status"]) for row in rows} == {("client-b", 500)}
    timestamps = [row["timestamp"] for row in rows]
    assert timestamps == sorted(timestamps, reverse=True)

    one = await live.ok("GET", "/api/v1/requests?request_id=req-a-3-4")
    assert [(r["request_id"], r["trace_id"], r["url_path"]) for r in one["requests"]] == [
        ("req-a-3-4", "trace-req-a-3-4", "/orders/4")]
    traced = await live.ok("GET", "/api/v1/requests?trace_id=trace-req-u-0-1")
    assert [r["route_id"] for r in traced["requests"]] == ["users"]
    by_client = await live.ok("GET", "/api/v1/requests?client=client-a&route_id=users&limit=1000")
    assert len(by_client["requests"]) == 40
    exact = await live.ok("GET", "/api/v1/requests?status=200&route_id=orders&limit=1000")
    assert len(exact["requests"]) == 135


async def test_request_pages_are_exact_when_timestamps_tie(ch: SharedClient, now: float) -> None:
    """Pages of (timestamp desc, request_id) stay exact with many rows on one millisecond
    (the search bounds its sort by the page's oldest timestamp)."""
    ties = Endpoint(route_id="ties", method="GET", http_route="/ties")
    second = int(now // 60) * 60 - 120
    ids = [f"tie-{n:02d}" for n in range(14)]
    events = [_event(ties, second + index % 3, "/ties", 200, "client-t", request_id, 1.0)
              for index, request_id in enumerate(reversed(ids))]
    insert_events(ch, events)
    expected = [e.request_id for e in sorted(events, key=lambda e: (-e.timestamp, e.request_id))]
    queries = Queries(ch)
    pages = [await queries.search_requests(RequestSearch(
        TimeRange.last(60, now), EndpointFilter("ties", "GET"), limit=4, offset=offset))
        for offset in range(0, 16, 4)]
    assert [len(page) for page in pages] == [4, 4, 4, 2]
    assert [row.request_id for page in pages for row in page] == expected


async def test_injection_attempts_are_only_values(live: Live) -> None:
    hostile = ["x' OR '1'='1", "orders' OR 1=1 --", "'); DROP TABLE events; --",
               "{route_id:String}", "\\' UNION SELECT 1 --"]
    for value in hostile:
        for name in ("client", "route_id", "route", "trace_id", "request_id", "method"):
            body = await live.ok("GET", "/api/v1/requests", params={name: value[:16]
                                                                    if name == "method"
                                                                    else value})
            assert body["requests"] == [], (name, value)
        ends = await live.ok("GET", "/api/v1/endpoints/timeseries", params={"route_id": value})
        assert sum(p["requests"] for p in ends["points"]) == 0
    body = await live.ok("GET", "/api/v1/endpoints?minutes=60")
    assert sum(row["requests"] for row in body["endpoints"]) == 190  # nothing was dropped


async def test_anomalies_with_filters_and_evidence(live: Live) -> None:
    body = await live.ok("GET", "/api/v1/anomalies?minutes=60")
    [anomaly] = body["anomalies"]
    assert anomaly["id"] == ANOMALY_ID
    assert anomaly["kind"] == "error_spike"
    assert anomaly["endpoint"] == {"route_id": "orders", "method": "GET",
                                   "http_route": "/orders/{id}"}
    assert anomaly["top_clients"] == ["client-b"]
    assert anomaly["example_request_ids"] == ["req-b-9-0", "req-b-9-1"]
    assert (anomaly["baseline"], anomaly["observed"]) == (0.0, 0.333)
    assert (await live.ok("GET", "/api/v1/anomalies?kind=error_spike&severity=high"
                                 "&route_id=orders"))["anomalies"][0]["id"] == ANOMALY_ID
    assert (await live.ok("GET", "/api/v1/anomalies?kind=enumeration"))["anomalies"] == []
    assert (await live.ok("GET", "/api/v1/anomalies?route_id=users"))["anomalies"] == []
    assert (await live.ok("GET", f"/api/v1/anomalies/{ANOMALY_ID}"))["summary"].startswith("5xx")
    status, problem, _ = await live.call("GET", "/api/v1/anomalies/nope")
    assert status == 404
    assert problem["status"] == 404


@pytest.mark.parametrize(("path", "fragment"), [
    ("/api/v1/endpoints?minutes=60&colour=red", "colour: unknown parameter"),
    ("/api/v1/endpoints?minutes=60&sparkline=maybe", "sparkline"),
    ("/api/v1/endpoints?minutes=-5", "minutes"),
    ("/api/v1/endpoints?minutes=lots", "minutes"),
    ("/api/v1/endpoints?from=0", "range longer than 31 days"),
    ("/api/v1/endpoints?from=2030-01-02T00:00:00&to=2030-01-01T00:00:00", "before"),
    ("/api/v1/endpoints?from=yesterday", "ISO-8601"),
    ("/api/v1/endpoints?to=0", "before 1970"),
    ("/api/v1/endpoints?minutes=5&minutes=6", "more than once"),
    ("/api/v1/requests?limit=5000", "limit"),
    ("/api/v1/requests?status=abc", "status"),
    ("/api/v1/requests?offset=-1", "offset"),
    ("/api/v1/anomalies?kind=bogus", "kind"),
    ("/api/v1/endpoints/breakdown?by=password", "by"),
    ("/api/v1/recommendations?status=maybe", "status"),
    ("/api/v1/audit?count=0", "count"),
])
async def test_bad_parameters_are_400_problems(live: Live, path: str, fragment: str) -> None:
    status, problem, headers = await live.call("GET", path)
    assert status == 400, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert problem["status"] == 400
    assert problem["instance"] == path.split("?")[0]
    assert fragment in problem["detail"], problem


async def test_unknown_path_and_method_are_problems(live: Live) -> None:
    status, problem, _ = await live.call("GET", "/api/v1/nothing-here")
    assert status == 404
    assert problem["title"] == "Not Found"
    status, problem, headers = await live.call("DELETE", "/api/v1/endpoints")
    assert status == 405
    assert "GET" in headers["Allow"]


# -- actions ------------------------------------------------------------------------------------


async def _audit(live: Live, subject: str) -> list[dict[str, Any]]:
    body = await live.ok("GET", "/api/v1/audit", params={"subject": subject})
    return list(body["records"])


async def test_recommendation_lifecycle_changes_redis_and_audits(live: Live) -> None:
    keys = RedisKeys()
    listed = await live.ok("GET", "/api/v1/recommendations?status=pending")
    [rec] = listed["recommendations"]
    assert rec["id"] == REC_ID
    assert rec["impact"]["flagged_requests_limited"] == 3

    approved = await live.ok("POST", f"/api/v1/recommendations/{REC_ID}/approve",
                             json={"reason": "looks right"})
    assert approved["status"] == "approved"
    status, problem, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/approve",
                                         json={"reason": "again"})
    assert status == 409
    assert "approved" in problem["detail"]

    applied = await live.ok("POST", f"/api/v1/recommendations/{REC_ID}/apply", json={})
    assert applied["status"] == "applied"
    assert applied["policy"]["version"] == 1
    policy = await live.store.get("analytics:orders:GET")
    assert policy is not None
    assert policy.limit == 12
    assert policy.route_id == "orders"
    stored = Recommendation.model_validate_json(
        await live.redis.hget(keys.recommendations, REC_ID))
    assert stored.status is RecommendationStatus.APPLIED

    status, problem, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/rollback",
                                         json={})
    assert status == 400
    assert "reason" in problem["detail"]
    rolled = await live.ok("POST", f"/api/v1/recommendations/{REC_ID}/rollback",
                           json={"reason": "false positive"})
    assert rolled["status"] == "rolled_back"
    assert rolled["status_reason"] == "false positive"
    assert await live.store.get("analytics:orders:GET") is None

    trail = await _audit(live, f"recommendation:{REC_ID}")
    assert [r["action"] for r in trail] == ["recommendation.rolled_back",
                                            "recommendation.applied",
                                            "recommendation.approved"]
    assert trail[0]["reason"] == "false positive"
    assert trail[0]["evidence"] == ANOMALY_ID
    assert trail[2]["before"]["status"] == "pending"
    assert trail[2]["after"]["status"] == "approved"
    assert {r["actor"] for r in trail} == {"anonymous"}
    policy_trail = await _audit(live, "analytics:orders:GET")
    assert len(policy_trail) == 2  # put, then delete

    status, _, _ = await live.call("POST", "/api/v1/recommendations/missing/approve", json={})
    assert status == 404
    status, problem, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/dismiss",
                                         json={"reason": "x", "colour": "red"})
    assert status == 400
    assert "colour" in problem["detail"]
    status, problem, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/dismiss",
                                         data=b"{not json")
    assert status == 400
    assert problem["title"] == "Invalid JSON body"


async def test_dismiss_needs_a_reason(live: Live) -> None:
    status, _, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/dismiss", json={})
    assert status == 400
    body = await live.ok("POST", f"/api/v1/recommendations/{REC_ID}/dismiss",
                         json={"reason": "expected batch job"})
    assert body["status"] == "dismissed"
    status, _, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/apply", json={})
    assert status == 409


async def test_policy_edit_history_and_rollback(live: Live) -> None:
    path = "/api/v1/policies/orders-tight"
    first = await live.ok("PUT", path, json={"route_id": "orders", "method": "get",
                                             "limit": 50, "window_s": 60,
                                             "reason": "incident 42"})
    assert (first["version"], first["source"], first["method"]) == (1, "operator", "GET")
    second = await live.ok("PUT", path, json={**first, "limit": 20, "reason": "tighter"})
    assert (second["version"], second["limit"]) == (2, 20)
    history = await live.ok("GET", path + "/history")
    assert [p["limit"] for p in history["versions"]] == [20, 50]
    restored = await live.ok("POST", path + "/rollback", json={"reason": "too tight"})
    assert (restored["version"], restored["limit"]) == (3, 50)
    assert (await live.store.get("orders-tight")).limit == 50  # type: ignore[union-attr]

    listing = await live.ok("GET", "/api/v1/policies")
    views = {view["policy"]["id"]: view for view in listing["policies"]}
    assert views["orders-tight"]["active"]
    assert not views["orders-tight"]["expired"]
    assert "default-per-client" in views
    assert listing["version"] >= 4

    trail = await _audit(live, "orders-tight")
    assert trail[0]["action"] == "policy.rollback"
    assert trail[0]["reason"] == "too tight"

    status, problem, _ = await live.call("PUT", path, json={"limit": -1, "window_s": 60})
    assert status == 400
    assert "limit" in problem["detail"]
    status, problem, _ = await live.call("PUT", path, json={"id": "other", "limit": 1,
                                                            "window_s": 1})
    assert status == 400
    assert "differs" in problem["detail"]
    status, problem, _ = await live.call("PUT", path, json={"limit": 1, "window_s": 1,
                                                            "key_by": "password"})
    assert status == 400
    assert "key_by" in problem["detail"]
    status, _, _ = await live.call("GET", "/api/v1/policies/absent")
    assert status == 404
    status, _, _ = await live.call("POST", "/api/v1/policies/absent/rollback", json={})
    assert status == 404
    status, _, _ = await live.call("POST", "/api/v1/policies/default-per-client/rollback",
                                   json={"reason": "x"})
    assert status == 409
    status, _, _ = await live.call("POST", path + "/rollback", json={"to_version": 99})
    assert status == 404
    deleted = await live.ok("DELETE", path, json={"reason": "incident over"})
    assert deleted == {"policy_id": "orders-tight", "deleted": True}
    assert await live.store.get("orders-tight") is None


async def test_auto_mode_and_kill_switch(live: Live) -> None:
    keys = RedisKeys()
    assert (await live.ok("GET", "/api/v1/analytics/kill-switch")) == {"engaged": False}
    body = await live.ok("PUT", "/api/v1/analytics/kill-switch",
                         json={"engaged": True, "reason": "bad deploy"})
    assert body == {"engaged": True}
    assert await live.redis.get(keys.kill_switch) == b"1"
    await live.ok("PUT", "/api/v1/analytics/kill-switch", json={"engaged": False})
    assert await live.redis.get(keys.kill_switch) is None

    modes = await live.ok("PUT", "/api/v1/analytics/auto-mode",
                          json={"group": "orders", "mode": "auto", "reason": "trusted"})
    assert modes == {"modes": {"orders": "auto"}}
    assert await live.redis.hget(keys.auto_mode, "orders") == b"auto"
    cleared = await live.ok("PUT", "/api/v1/analytics/auto-mode",
                            json={"group": "orders", "mode": None})
    assert cleared == {"modes": {}}
    status, _, _ = await live.call("PUT", "/api/v1/analytics/auto-mode",
                                   json={"group": "orders", "mode": "yolo"})
    assert status == 400
    status, _, _ = await live.call("PUT", "/api/v1/analytics/auto-mode",
                                   json={"group": "a b", "mode": "off"})
    assert status == 400
    kill = await _audit(live, "kill_switch")
    assert [r["after"] for r in kill] == [{"engaged": False}, {"engaged": True}]
    assert kill[1]["reason"] == "bad deploy"
    assert len(await _audit(live, "auto_mode:orders")) == 2

    status, problem, _ = await live.call("POST", "/api/v1/analytics/run", json={})
    assert status == 503
    assert "scheduler" in problem["detail"]


@pytest.mark.parametrize("tokens_spec", [",".join(f"{name}:{role}:{TOKENS[name]}" for name, role
                                                  in (("ops", "operator"), ("sec", "security"),
                                                      ("ro", "viewer")))])
async def test_tokens_and_roles(live: Live) -> None:
    approve = f"/api/v1/recommendations/{REC_ID}/approve"
    status, problem, headers = await live.call("POST", approve, json={})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = await live.call("POST", approve, json={}, token="not-a-valid-token-at-all")
    assert status == 401
    status, problem, _ = await live.call("POST", approve, json={}, token=TOKENS["ro"])
    assert status == 403
    assert "viewer" in problem["detail"]
    status, _, _ = await live.call("PUT", "/api/v1/analytics/kill-switch",
                                   json={"engaged": True}, token=TOKENS["sec"])
    assert status == 403
    body = await live.ok("POST", approve, json={"reason": "ok"}, token=TOKENS["sec"])
    assert body["status_by"] == "sec"
    status, _, _ = await live.call("POST", f"/api/v1/recommendations/{REC_ID}/apply", json={},
                                   token=TOKENS["sec"])
    assert status == 403
    await live.ok("POST", f"/api/v1/recommendations/{REC_ID}/apply", json={},
                  token=TOKENS["ops"])
    trail = await _audit(live, f"recommendation:{REC_ID}")
    assert [r["actor"] for r in trail] == ["ops", "sec"]
    # reads stay open by default
    assert (await live.ok("GET", "/api/v1/policies"))["policies"]


def test_token_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="name:role:token"):
        ApiSettings(api_tokens="just-a-token")
    with pytest.raises(ValueError, match="role"):
        ApiSettings(api_tokens="a:admin:0123456789abcdef")
    with pytest.raises(ValueError, match="16"):
        ApiSettings(api_tokens="a:viewer:short")
    hashed = "a:viewer:sha256:" + "ab" * 32
    assert ApiSettings(api_tokens=hashed).api_tokens == hashed


# -- ops and the OpenAPI document ---------------------------------------------------------------


async def test_probes_and_metrics(live: Live) -> None:
    assert (await live.ok("GET", "/healthz"))["status"] == "ok"
    ready = await live.ok("GET", "/readyz")
    assert ready["checks"] == {"redis": "ok", "clickhouse": "ok"}
    await live.ok("GET", "/api/v1/endpoints")
    status, text, _ = await live.call("GET", "/metrics")
    assert status == 200
    assert b'apigw_api_requests_total{method="GET",route="/api/v1/endpoints",status="200"}' in text


async def test_openapi_lists_every_served_route(live: Live) -> None:
    document = await live.ok("GET", "/openapi.json")
    assert document["openapi"].startswith("3.1")
    served = {(route.method.lower(), route.resource.canonical)
              for route in live.app.router.routes()
              if route.resource is not None and route.method != "HEAD"}
    documented = {(method, path) for path, operations in document["paths"].items()
                  for method in operations}
    assert served == documented
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for response in operation["responses"].values():
                for content in response.get("content", {}).values():
                    ref = content["schema"].get("$ref", "")
                    assert not ref or ref.rsplit("/", 1)[-1] in schemas, (path, method, ref)
    params = {p["name"] for p in document["paths"]["/api/v1/requests"]["get"]["parameters"]}
    assert {"route_id", "status", "client", "trace_id", "from", "to", "limit", "offset"} <= params
    assert document["paths"]["/api/v1/policies/{id}"]["put"]["x-required-role"] == "operator"


# -- the whole control plane, in process --------------------------------------------------------


async def test_controlplane_collects_serves_and_runs(redis_url: str, redis_client: aioredis.Redis,
                                                     chdb_dsn: str, tmp_path: Path) -> None:
    now = time.time()
    events = seed_events(now)
    await redis_client.xadd("apigw:events", {"v": str(SCHEMA_VERSION),
                                             "b": encode_batch(events)})
    settings = ControlPlaneSettings(redis_url=redis_url, clickhouse_dsn=chdb_dsn,
                                    data_dir=tmp_path)
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(run_controlplane(settings, "127.0.0.1", port, stop))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            total = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and total < len(events):
                assert not task.done(), task
                try:
                    async with session.get(f"{url}/api/v1/endpoints?minutes=60") as response:
                        if response.status == 200:
                            rows = (await response.json())["endpoints"]
                            total = sum(row["requests"] for row in rows)
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.2)
            assert total == len(events)
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 200
            async with session.post(f"{url}/api/v1/analytics/run",
                                    json={"reason": uuid.uuid4().hex}) as response:
                assert response.status == 200, await response.text()
                report = await response.json()
            assert report["endpoints"] == 2
            assert report["started_at"] >= now
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


# -- comparisons, review, targeted limits, diffs --------------------------------------------------


async def test_compare_with_earlier_windows(live: Live) -> None:
    path = "/api/v1/endpoints/top-clients?route_id=orders&minutes=5&compare=prev"
    body = await live.ok("GET", path)
    assert body["compare"] == "prev"
    assert body["compare_end"] == pytest.approx(body["start"])
    clients = {row["client"]: row for row in body["clients"]}
    # the window before spans the 5 whole minutes before: a 50, b 25
    assert clients["client-a"]["compare_requests"] == 50
    assert clients["client-b"]["compare_share"] == pytest.approx(25 / 75)
    day = await live.ok("GET", path.replace("prev", "1d"))
    assert {row["compare_requests"] for row in day["clients"]} == {0}
    assert day["compare_start"] == pytest.approx(day["start"] - 86_400)

    status = await live.ok("GET", "/api/v1/endpoints/breakdown?route_id=orders&minutes=4"
                                  "&compare=prev")
    rows = {row["value"]: row for row in status["rows"]}
    assert (rows["500"]["requests"], rows["500"]["compare_requests"]) == (15, 0)
    assert rows["500"]["compare_share"] == 0.0
    # the shares before are those of the earlier window read on its own
    for kind, listing, key in (("breakdown", "rows", "value"),
                               ("top-clients", "clients", "client")):
        now = await live.ok("GET", f"/api/v1/endpoints/{kind}?route_id=orders&minutes=5"
                                   "&compare=prev")
        alone = await live.ok("GET", f"/api/v1/endpoints/{kind}?route_id=orders"
                                     f"&from={now['compare_start']}&to={now['compare_end']}")
        before = {row[key]: row for row in alone[listing]}
        assert before
        assert any(row["compare_share"] for row in now[listing])
        for row in now[listing]:
            assert row["compare_share"] == pytest.approx(
                before[row[key]]["share"] if row[key] in before else 0.0)
            assert row["compare_requests"] == (
                before[row[key]]["requests"] if row[key] in before else 0)
    series = await live.ok("GET", "/api/v1/endpoints/timeseries?route_id=orders&minutes=5"
                                  "&compare=1w")
    assert series["compare_offset_s"] == 7 * 86_400
    assert [p["ts"] for p in series["compare_points"]] == [p["ts"] for p in series["points"]]
    assert sum(p["requests"] for p in series["compare_points"]) == 0
    status_code, problem, _ = await live.call("GET", "/api/v1/endpoints/timeseries?compare=2d")
    assert status_code == 400
    assert "compare" in problem["detail"]


async def test_a_compared_read_equals_both_windows_read_alone(ch: SharedClient,
                                                             now: float) -> None:
    """A range and its earlier window are read in one scan; over a range longer than a day
    compared with a day earlier, yesterday's traffic lies in both windows and counts in each."""
    insert_events(ch, [replace(event, timestamp=event.timestamp - 86_400,
                               request_id=f"day-{event.request_id}")
                       for event in seed_events(now)])
    queries, orders = Queries(ch), EndpointFilter("orders", "GET", "/orders/{id}")
    rng = TimeRange(now - 86_400 - 20 * 60, now + 60)
    for compare in Compare:
        earlier = compare.shift(rng)
        series = await queries.timeseries(rng, orders, compare)
        alone = await queries.timeseries(earlier if compare is not Compare.PREV else TimeRange(
            rng.start - series.compare_offset_s, rng.end - series.compare_offset_s), orders)
        assert series.points == (await queries.timeseries(rng, orders)).points
        assert series.compare_points == [point.model_copy(update={
            "ts": point.ts + series.compare_offset_s}) for point in alone.points]
        for by in (BreakdownDimension.STATUS, BreakdownDimension.CLIENT_ADDRESS):
            rows = await queries.breakdown(rng, orders, by, 20, earlier)
            assert [row.model_copy(update={"compare_requests": None, "compare_share": None})
                    for row in rows] == await queries.breakdown(rng, orders, by, 20)
            before = {row.value: row for row in await queries.breakdown(earlier, orders, by)}
            assert [(row.compare_requests, row.compare_share) for row in rows] == [
                (before[row.value].requests, before[row.value].share) if row.value in before
                else (0, 0.0) for row in rows]
        clients = await queries.top_clients(rng, orders, 20, earlier)
        assert [row.model_copy(update={"compare_requests": None, "compare_share": None})
                for row in clients] == await queries.top_clients(rng, orders, 20)
        before_clients = {row.client: row for row in await queries.top_clients(earlier, orders)}
        assert [(row.compare_requests, row.compare_share) for row in clients] == [
            (before_clients[row.client].requests, before_clients[row.client].share)
            if row.client in before_clients else (0, 0.0) for row in clients]
    overlapping = await queries.timeseries(rng, orders, Compare.DAY)
    # yesterday's 150 requests in the range and in its day-earlier window; today's in the range
    assert sum(point.requests for point in overlapping.compare_points) == 150
    assert sum(point.requests for point in overlapping.points) == 300
    day = {row.client: row for row in await queries.top_clients(
        rng, orders, 20, Compare.DAY.shift(rng))}
    assert (day["client-a"].requests, day["client-a"].compare_requests) == (200, 100)


async def test_top_ips_and_clients_equal_the_finer_reads(
        ch: SharedClient, now: float) -> None:
    """Top IPs read whole hours from events_address_1h and the partial hours at each end from
    raw events: for ranges with and without whole hours, aligned or not, and compared with the
    window before, the counts are exactly those of raw events; top clients (a range and the
    window before in one scan) those of the minute rollup read for each window alone."""
    first_hour = int(now // 3600) * 3600 - 3 * 3600
    template = seed_events(now)[0]
    insert_events(ch, [replace(template, timestamp=first_hour + 10.5 + 30 * k,
                               request_id=f"ip-{k}", client_address=f"10.0.{k % 7}.{k % 3}",
                               client_id=f"client-{k % 5}", url_path=f"/orders/{k % 37}",
                               http_response_status_code=(200, 404, 429, 503)[k % 4])
                       for k in range(3 * 120 + 40)])
    queries, orders = Queries(ch), EndpointFilter("orders", "GET", "/orders/{id}")

    def raw(rng: TimeRange) -> dict[str, int]:
        with ch.lock:
            rows = ch.client.query(
                "SELECT client_address, count() FROM events WHERE route_id = 'orders' AND "
                "timestamp >= fromUnixTimestamp64Milli({start:Int64}, 'UTC') AND "
                "timestamp < fromUnixTimestamp64Milli({end:Int64}, 'UTC') "
                "GROUP BY client_address", parameters={"start": rng.params()["start_ms"],
                                                       "end": rng.params()["end_ms"]})
        return {str(address): int(n) for address, n in rows.result_rows}

    def per_minute(rng: TimeRange) -> dict[str, tuple[int, ...]]:
        with ch.lock:
            rows = ch.client.query(
                "SELECT client, sum(requests), sum(errors_5xx), sum(errors_4xx), "
                "sum(rate_limited), uniqMerge(paths) FROM events_client_1m "
                "WHERE route_id = 'orders' AND minute >= toDateTime({start:UInt32}, 'UTC') "
                "AND minute < toDateTime({end:UInt32}, 'UTC') GROUP BY client",
                parameters={"start": rng.params()["start_s"], "end": rng.params()["end_s"]})
        return {str(row[0]): tuple(int(value) for value in row[1:]) for row in rows.result_rows}

    ranges = [TimeRange(first_hour + 123.4, first_hour + 2 * 3600 + 17 * 60),  # edges + hours
              TimeRange(first_hour, first_hour + 3 * 3600),  # whole hours only
              TimeRange(first_hour + 3600 + 60, first_hour + 3600 + 1260.7),  # inside an hour
              TimeRange(first_hour + 1800, now)]  # up to now, today's seed traffic included
    for rng in ranges:
        earlier = Compare.PREV.shift(rng)
        expected, before = raw(rng), raw(earlier)
        assert sum(expected.values()) > 0
        rows = await queries.breakdown(rng, orders, BreakdownDimension.CLIENT_ADDRESS, 1000,
                                       earlier)
        assert {row.value: row.requests for row in rows} == expected, rng
        assert [row.compare_requests for row in rows] == [before.get(row.value, 0)
                                                          for row in rows], rng
        assert [row.value for row in rows] == sorted(expected, key=lambda v: (-expected[v], v))
        clients, clients_before = per_minute(rng), per_minute(earlier)
        found = await queries.top_clients(rng, orders, 1000, earlier)
        assert {row.client: (row.requests, row.errors_5xx, row.errors_4xx, row.rate_limited,
                             row.distinct_paths) for row in found} == clients, rng
        assert [row.compare_requests for row in found] == [
            clients_before.get(row.client, (0,))[0] for row in found], rng


async def test_anomaly_status_and_dismissal(live: Live) -> None:
    [anomaly] = (await live.ok("GET", "/api/v1/anomalies?status=open"))["anomalies"]
    assert (anomaly["id"], anomaly["status"]) == (ANOMALY_ID, "open")
    assert (await live.ok("GET", "/api/v1/anomalies?status=resolved"))["anomalies"] == []
    status, problem, _ = await live.call("POST", f"/api/v1/anomalies/{ANOMALY_ID}/dismiss",
                                         json={})
    assert status == 400
    assert "reason" in problem["detail"]
    body = await live.ok("POST", f"/api/v1/anomalies/{ANOMALY_ID}/dismiss",
                         json={"reason": "known batch job"})
    assert (body["status"], body["review_reason"]) == ("dismissed", "known batch job")
    assert (await live.ok("GET", "/api/v1/anomalies?status=open"))["anomalies"] == []
    [dismissed] = (await live.ok("GET", "/api/v1/anomalies?status=dismissed"))["anomalies"]
    assert dismissed["reviewed_by"] == "anonymous"
    trail = await _audit(live, f"anomaly:{ANOMALY_ID}")
    assert [(r["action"], r["reason"]) for r in trail] == [("anomaly.dismissed",
                                                            "known batch job")]
    status, _, _ = await live.call("POST", "/api/v1/anomalies/nope/dismiss", json={"reason": "x"})
    assert status == 404


async def test_anomaly_status_filters_before_the_limit_and_pages(live: Live, ch: SharedClient,
                                                                   now: float) -> None:
    """12 more anomalies, newest first: the 6 newest dismissed, then 4 open, then 2 whose
    window ended long ago (resolved). Pages of open ones must not be eaten by dismissed ones."""
    end = int(now // 60) * 60 - 60
    made = []
    for i in range(12):
        ended = end if i < 10 else end - 7200
        made.append(Anomaly.model_validate({
            **seed_anomaly(now).model_dump(), "id": f"anom-page-{i:02d}",
            "detected_at": now - 1 - i, "window_end": ended, "window_start": ended - 60,
            "kind": "enumeration" if i % 2 else "error_spike"}))
        insert_anomaly(ch, made[-1])
    for anomaly in made[:6]:
        await live.ok("POST", f"/api/v1/anomalies/{anomaly.id}/dismiss",
                      json={"reason": "paging test"})

    async def ids(query: str) -> tuple[list[str], int | None]:
        body = await live.ok("GET", f"/api/v1/anomalies?minutes=60&{query}")
        return [a["id"] for a in body["anomalies"]], body["next_offset"]

    assert await ids("status=open&limit=2") == (["anom-page-06", "anom-page-07"], 2)
    assert await ids("status=open&limit=2&offset=2") == (["anom-page-08", "anom-page-09"], 4)
    # the seeded anomaly (detected 30 s ago) is open too: the last, short page
    assert await ids("status=open&limit=2&offset=4") == ([ANOMALY_ID], None)
    assert await ids("status=open&kind=enumeration&limit=5") == (
        ["anom-page-07", "anom-page-09"], None)
    assert await ids("status=resolved") == (["anom-page-10", "anom-page-11"], None)
    dismissed, _ = await ids("status=dismissed&limit=100")
    assert dismissed == [a.id for a in made[:6]]
    assert await ids("status=actioned") == ([], None)
    assert await ids("status=dismissed&severity=low") == ([], None)
    everything, next_offset = await ids("limit=13")
    assert (len(everything), next_offset) == (13, 13)
    status, problem, _ = await live.call("GET", "/api/v1/anomalies?offset=-1")
    assert (status, "offset" in problem["detail"]) == (400, True)


async def test_targeted_limit_expires_and_actions_the_anomaly(live: Live) -> None:
    impact = await live.ok("GET", "/api/v1/policies/targeted/impact?route_id=orders&method=GET"
                                  "&client=client-b&limit=3&window_s=60&minutes=60")
    # client-b sends 5 a minute for 10 minutes: 2 over the limit in each
    assert (impact["requests"], impact["windows"]) == (50, 10)
    assert (impact["windows_over_limit"], impact["requests_limited"]) == (10, 20)
    assert impact["share_limited"] == pytest.approx(0.4)

    before = time.time()
    body = {"route_id": "orders", "method": "GET", "client": "client-b", "limit": 3,
            "window_s": 60, "expires_in_s": 3600, "reason": "5xx from one client",
            "anomaly_id": ANOMALY_ID}
    policy = await live.ok("POST", "/api/v1/policies/targeted", json=body)
    assert policy["id"] == "targeted:orders:GET:client-b"
    assert (policy["match_key"], policy["key_by"], policy["limit"]) == ("client-b",
                                                                        "client_id", 3)
    assert before + 3600 <= policy["expires_at"] <= time.time() + 3600
    stored = await live.store.get(policy["id"])
    assert stored is not None
    assert stored.source is Source.OPERATOR
    assert stored.specificity > Policy(id="x", limit=1, window_s=1).specificity
    view = await live.ok("GET", f"/api/v1/anomalies/{ANOMALY_ID}")
    assert view["status"] == "actioned"
    assert [r["action"] for r in await _audit(live, f"anomaly:{ANOMALY_ID}")] == [
        "anomaly.actioned"]
    assert (await _audit(live, policy["id"]))[0]["reason"] == "5xx from one client"

    odd = await live.ok("POST", "/api/v1/policies/targeted",
                        json={**body, "client": "10.0.0.1 x/y", "key_by": "ip",
                              "anomaly_id": None})
    assert odd["id"].startswith("targeted:orders:GET:10.0.0.1_x_y-")
    for bad in ({"expires_in_s": 10 * 86_400}, {"expires_in_s": None}, {"reason": " "},
                {"limit": 0}, {"key_by": "password"}, {"colour": "red"}):
        status, problem, _ = await live.call("POST", "/api/v1/policies/targeted",
                                             json={**body, **bad})
        assert status == 400, (bad, problem)
    status, _, _ = await live.call("POST", "/api/v1/policies/targeted",
                                   json={**body, "anomaly_id": "missing"})
    assert status == 404
    status, problem, _ = await live.call("POST", "/api/v1/policies/targeted",
                                         json={**body, "anomaly_ids": [ANOMALY_ID, "gone"]})
    assert (status, problem["detail"]) == (404, "no anomaly 'gone'")
    status, _, _ = await live.call("POST", "/api/v1/policies/targeted",
                                   json={**body, "anomaly_ids": ["a"] * 501})
    assert status == 400


async def test_audit_log_filters_by_actor_action_subject_and_time(live: Live) -> None:
    await live.ok("PUT", "/api/v1/analytics/kill-switch", json={"engaged": True, "reason": "a"})
    await asyncio.sleep(0.01)
    middle = time.time()
    await asyncio.sleep(0.01)
    await live.ok("PUT", "/api/v1/analytics/kill-switch", json={"engaged": False, "reason": "b"})
    await live.ok("POST", f"/api/v1/anomalies/{ANOMALY_ID}/dismiss", json={"reason": "c"})

    async def shown(**query: Any) -> list[tuple[str, str, str]]:
        body = await live.ok("GET", "/api/v1/audit", params=query)
        return [(r["actor"], r["action"], r["reason"]) for r in body["records"]]

    everything = await shown()
    assert everything == [("anonymous", "anomaly.dismissed", "c"),
                          ("anonymous", "analytics.kill_switch", "b"),
                          ("anonymous", "analytics.kill_switch", "a"),
                          ("config", "policy.create", "baseline")]
    assert await shown(actor="config") == [everything[3]]
    assert await shown(actor="anon") == []  # exact unless it ends with *
    assert await shown(actor="anon*", action="analytics.*") == everything[1:3]
    assert await shown(subject="anomaly:*") == [everything[0]]
    assert await shown(subject=f"anomaly:{ANOMALY_ID}") == [everything[0]]
    assert await shown(**{"from": str(middle)}) == everything[:2]
    assert await shown(to=str(middle), action="analytics.kill_switch") == [everything[2]]
    assert await shown(count="1", actor="anonymous") == [everything[0]]
    for query, fragment in (({"action": "po*licy"}, "* is allowed only at the end"),
                            ({"from": "100", "to": "50"}, "from must be before to"),
                            ({"actor": "x" * 201}, "actor"), ({"who": "me"}, "who")):
        status, problem, _ = await live.call("GET", "/api/v1/audit", params=query)
        assert status == 400, (query, problem)
        assert fragment in problem["detail"], (query, problem)


async def test_policy_rollback_marks_its_recommendation_rolled_back(live: Live) -> None:
    rec = seed_recommendation(time.time())
    await live.store.put(rec.policy.model_copy(update={"limit": 30}), actor="test",
                         reason="before the recommendation")
    await _applied(live)  # the recommendation's policy is version 2 now
    await live.store.put(rec.policy.model_copy(update={"limit": 11}), actor="test",
                         reason="hand-tuned after it")  # version 3
    url = f"/api/v1/policies/{rec.policy.id}/rollback"
    await live.ok("POST", url, json={"reason": "back to the applied one", "to_version": 2})
    after = await live.ok("GET", f"/api/v1/recommendations/{REC_ID}")
    assert after["status"] == "applied"  # version 2, its own, is in force again

    started = time.time()
    restored = await live.ok("POST", url, json={"reason": "it hurt checkout", "to_version": 1})
    assert (restored["version"], restored["limit"]) == (5, 30)
    after = await live.ok("GET", f"/api/v1/recommendations/{REC_ID}")
    assert (after["status"], after["status_by"]) == ("rolled_back", "anonymous")
    assert after["status_reason"] == (f"policy {rec.policy.id} rolled back to version 1: "
                                      "it hurt checkout")
    assert after["updated_at"] >= started
    [listed] = (await live.ok("GET", "/api/v1/recommendations?status=rolled_back")
                )["recommendations"]
    assert listed["id"] == REC_ID
    [record] = await _audit(live, f"recommendation:{REC_ID}")
    assert (record["action"], record["reason"]) == ("recommendation.rolled_back",
                                                    "it hurt checkout")
    assert (record["before"]["status"], record["after"]["status"]) == ("applied",
                                                                       "rolled_back")


async def test_deleting_an_applied_policy_rolls_its_recommendation_back(live: Live) -> None:
    await _applied(live)
    policy_id = seed_recommendation(time.time()).policy.id
    await live.ok("DELETE", f"/api/v1/policies/{policy_id}", json={"reason": "not needed"})
    after = await live.ok("GET", f"/api/v1/recommendations/{REC_ID}")
    assert (after["status"], after["status_reason"]) == (
        "rolled_back", f"policy {policy_id} deleted: not needed")


async def test_policy_diff_between_versions(live: Live) -> None:
    path = "/api/v1/policies/orders-tight"
    await live.ok("PUT", path, json={"route_id": "orders", "limit": 50, "window_s": 60,
                                     "reason": "first"})
    await live.ok("PUT", path, json={"route_id": "orders", "limit": 20, "window_s": 60,
                                     "mode": "shadow", "reason": "tighter"})
    body = await live.ok("GET", path + "/diff")
    assert (body["from_version"], body["to_version"]) == (1, 2)
    changes = {c["field"]: (c["before"], c["after"]) for c in body["changes"]}
    assert changes["limit"] == (50, 20)
    assert changes["mode"] == ("enforce", "shadow")
    assert changes["reason"] == ("first", "tighter")
    assert "version" not in changes
    same = await live.ok("GET", path + "/diff?from=2&to=2")
    assert same["changes"] == []
    for query, code in (("?from=7", 404), ("?to=0", 400), ("?from=x", 400)):
        status, _, _ = await live.call("GET", path + "/diff" + query)
        assert status == code, query
    status, _, _ = await live.call("GET", "/api/v1/policies/absent/diff")
    assert status == 404


# -- the role matrix: every role on every action ------------------------------------------------

ROLE_TOKENS = {"ops": ("operator", TOKENS["ops"]), "sec": ("security", TOKENS["sec"]),
               "ro": ("viewer", TOKENS["ro"])}
HASHED_SPEC = ",".join(f"{name}:{role}:{token_digest(token)}"
                       for name, (role, token) in ROLE_TOKENS.items())


async def _applied(live: Live) -> None:
    rec = Recommendation.model_validate_json(
        await live.redis.hget(RedisKeys().recommendations, REC_ID))
    policy = await live.store.put(rec.policy, actor="test", reason="applied")
    applied = rec.model_copy(update={"status": RecommendationStatus.APPLIED, "policy": policy})
    await live.redis.hset(RedisKeys().recommendations, REC_ID, applied.model_dump_json())


async def _two_versions(live: Live) -> None:
    await live.store.put(Policy(id="default-per-client", limit=50, window_s=60),
                         actor="test", reason="second")


_NOTHING: Any = None
# (method, path, body, least role, status when allowed, setup)
ACTION_MATRIX: list[tuple[str, str, dict[str, Any], str, int, Any]] = [
    ("POST", f"/api/v1/recommendations/{REC_ID}/approve", {}, "security", 200, _NOTHING),
    ("POST", f"/api/v1/recommendations/{REC_ID}/dismiss", {}, "security", 200, _NOTHING),
    ("POST", f"/api/v1/anomalies/{ANOMALY_ID}/dismiss", {}, "security", 200, _NOTHING),
    ("POST", "/api/v1/policies/targeted", {"route_id": "orders", "method": "GET",
                                           "client": "client-b", "limit": 3, "window_s": 60,
                                           "expires_in_s": 600}, "security", 200, _NOTHING),
    ("POST", f"/api/v1/recommendations/{REC_ID}/apply", {}, "operator", 200, _NOTHING),
    ("POST", f"/api/v1/recommendations/{REC_ID}/rollback", {}, "operator", 200, _applied),
    ("PUT", "/api/v1/policies/orders-tight", {"route_id": "orders", "limit": 5,
                                              "window_s": 60}, "operator", 200, _NOTHING),
    ("DELETE", "/api/v1/policies/default-per-client", {}, "operator", 200, _NOTHING),
    ("POST", "/api/v1/policies/default-per-client/rollback", {}, "operator", 200,
     _two_versions),
    ("PUT", "/api/v1/analytics/auto-mode", {"group": "orders", "mode": "auto"}, "operator", 200,
     _NOTHING),
    ("PUT", "/api/v1/analytics/kill-switch", {"engaged": True}, "operator", 200, _NOTHING),
    ("POST", "/api/v1/analytics/run", {}, "operator", 503, _NOTHING),  # no scheduler here
]
READS = ["/api/v1/endpoints", "/api/v1/anomalies", "/api/v1/recommendations",
         "/api/v1/policies", "/api/v1/audit", "/api/v1/analytics/kill-switch",
         "/api/v1/policies/default-per-client/history"]


@pytest.mark.parametrize("tokens_spec", [HASHED_SPEC])
@pytest.mark.parametrize("public_reads", [False])
async def test_role_matrix(live: Live, now: float) -> None:
    rank = {"viewer": 1, "security": 2, "operator": 3}
    seen: list[tuple[str, str, str, int]] = []
    for method, path, body, least, allowed_status, setup in ACTION_MATRIX:
        for caller in (None, "ro", "sec", "ops"):
            await live.redis.flushdb()
            await seed_redis(live.redis, live.store, now)
            if setup is not None:
                await setup(live)
            reason = f"matrix {caller} {method} {path}"
            token = ROLE_TOKENS[caller][1] if caller else None
            status, problem, _ = await live.call(method, path, token=token,
                                                 json={**body, "reason": reason})
            if caller is None:
                expected = 401
            elif rank[ROLE_TOKENS[caller][0]] < rank[least]:
                expected = 403
            else:
                expected = allowed_status
            seen.append((method, path, str(caller), status))
            assert status == expected, (method, path, caller, problem)
            if expected == 200:
                [latest] = (await live.ok("GET", "/api/v1/audit?count=1",
                                          token=ROLE_TOKENS["ro"][1]))["records"]
                assert (latest["actor"], latest["reason"]) == (caller, reason), latest
    assert len(seen) == len(ACTION_MATRIX) * 4
    for path in READS:
        status, _, _ = await live.call("GET", path)
        assert status == 401, path
        for caller in ROLE_TOKENS:
            status, problem, _ = await live.call("GET", path, token=ROLE_TOKENS[caller][1])
            assert status == 200, (path, caller, problem)
