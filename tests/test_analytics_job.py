"""The analytics job against a real embedded ClickHouse (chDB) and a real Redis.

Events are inserted into `events` through clickhouse-connect, exactly as the collector does,
so the materialized views fill the rollups the job reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from analytics.job import AnalyticsJob, Scheduler
from analytics.models import (
    AnomalyKind,
    Recommendation,
    RecommendationAction,
    RecommendationStatus,
)
from analytics.settings import AnalyticsSettings, AutoMode
from collector.clickhouse import SharedClient
from collector.consumer import event_columns
from collector.schema import migrate
from proxy.event import EVENT_FIELDS, RequestEvent
from proxy.policy import Mode, Policy, RedisKeys, Source
from proxy.policy_store import PolicyStore

LEGIT = [f"client-{i}" for i in range(10)]
ENDPOINTS = [("orders", "GET", "/orders/{id}"), ("users", "GET", "/users/{id}"),
             ("items", "POST", "/items")]
KEYS = RedisKeys("apigw")


@pytest.fixture
async def ch(chdb_dsn: str) -> AsyncIterator[SharedClient]:
    client = await asyncio.to_thread(SharedClient, chdb_dsn)
    try:
        await asyncio.to_thread(migrate, client.client)
        yield client
    finally:
        await asyncio.to_thread(client.close)


def _event(ts: float, route: tuple[str, str, str], client: str, status: int) -> RequestEvent:
    route_id, method, template = route
    return RequestEvent(
        timestamp=ts, request_id=uuid.uuid4().hex, http_request_method=method,
        url_path=template.replace("{id}", "42"), http_response_status_code=status,
        duration_ms=12.0, trace_id=uuid.uuid4().hex, route_id=route_id, http_route=template,
        client_address="127.0.0.1", client_id=client)


def _insert(ch: SharedClient, events: list[RequestEvent]) -> None:
    columns = event_columns([dataclasses.asdict(event) for event in events])
    assert columns is not None
    with ch.lock:
        ch.client.insert("events", columns, column_names=list(EVENT_FIELDS),
                         column_oriented=True)


def traffic(spike_minute: float) -> tuple[list[RequestEvent], set[str]]:
    """10 minutes of calm traffic on 3 endpoints, then one minute where client "bad" makes
    /orders/{id} fail. Returns the events and the request ids of the spike's 5xx."""
    events: list[RequestEvent] = []
    for m in range(10, 0, -1):
        minute = spike_minute - 60 * m
        for e, route in enumerate(ENDPOINTS):
            for c, client in enumerate(LEGIT):
                for r in range(4):
                    status = 500 if (m + c + r + e) % 97 == 0 else 200  # about 1% errors
                    events.append(_event(minute + 1 + c * 4 + r, route, client, status))
    spike_errors: set[str] = set()
    for i in range(150):
        event = _event(spike_minute + 1 + i * 0.3, ENDPOINTS[0], "bad",
                       500 if i % 5 else 200)
        events.append(event)
        if event.http_response_status_code >= 500:
            spike_errors.add(event.request_id)
    for route in ENDPOINTS:
        for c, client in enumerate(LEGIT):
            for r in range(4):
                events.append(_event(spike_minute + 2 + c * 4 + r, route, client, 200))
    return events, spike_errors


@pytest.fixture
async def filled(ch: SharedClient) -> tuple[float, set[str]]:
    now = time.time()
    spike_minute = (now // 60) * 60 - 60  # the last complete minute
    events, spike_errors = traffic(spike_minute)
    await asyncio.to_thread(_insert, ch, events)
    return spike_minute, spike_errors


def settings(tmp_path: Path, redis_url: str, **overrides: object) -> AnalyticsSettings:
    return AnalyticsSettings(data_dir=tmp_path, redis_url=redis_url, instance="test",
                             **overrides)  # type: ignore[arg-type]


async def _recommendations(redis: aioredis.Redis,
                           action: RecommendationAction | None = RecommendationAction.TIGHTEN,
                           ) -> list[Recommendation]:
    """Stored recommendations of one action (endpoint-wide by default; None: all)."""
    raw = await redis.hgetall(KEYS.recommendations)
    records = [Recommendation.model_validate_json(value) for value in raw.values()]
    return [r for r in records if action is None or r.action == action]


def _anomaly_rows(ch: SharedClient) -> list[tuple[object, ...]]:
    with ch.lock:
        result = ch.client.query(
            "SELECT id, route_id, kind, toUnixTimestamp(window_start), top_clients, "
            "example_request_ids FROM anomalies ORDER BY kind")
    return [tuple(row) for row in result.result_rows]


async def test_spike_flagged_recorded_and_recommended(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        filled: tuple[float, set[str]]) -> None:
    spike_minute, spike_errors = filled
    store = PolicyStore(redis_client, KEYS)
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch, store)
    report = await job.run_once()

    assert report.leader
    assert report.endpoints == 3
    assert {a.endpoint.route_id for a in report.anomalies} == {"orders"}
    spikes = [a for a in report.anomalies if a.kind == AnomalyKind.ERROR_SPIKE]
    assert len(spikes) == 1
    spike = spikes[0]
    assert spike.window_start == spike_minute
    assert spike.window_end == spike_minute + 60
    assert spike.top_clients == ["bad"]
    assert spike.observed > 0.5
    assert spike.baseline < 0.05
    assert spike.example_request_ids
    assert set(spike.example_request_ids) <= spike_errors
    assert len(spike.example_trace_ids) == len(spike.example_request_ids)

    rows = await asyncio.to_thread(_anomaly_rows, ch)
    assert report.new_anomalies == len(rows) == len(report.anomalies)
    assert {row[1] for row in rows} == {"orders"}
    [spike_row] = [row for row in rows if row[2] == "error_spike"]
    assert (spike.id, "orders", "error_spike", int(spike_minute)) == spike_row[:4]
    assert spike_row[4] == ["bad"]
    # the same minute is also a one-client surge and a takeover, blamed on the same client
    kinds = {a.kind: a for a in report.anomalies}
    assert set(kinds) == {AnomalyKind.ERROR_SPIKE, AnomalyKind.TRAFFIC_SURGE,
                          AnomalyKind.CLIENT_DOMINANCE}
    assert kinds[AnomalyKind.TRAFFIC_SURGE].top_clients == ["bad"]

    stored = await _recommendations(redis_client)
    assert len(stored) == 1
    rec = stored[0]
    assert rec.status == RecommendationStatus.PENDING
    assert rec.endpoint.route_id == "orders"
    assert rec.flagged_clients == ["bad"]
    assert spike.id in rec.anomaly_ids
    assert rec.policy.route_id == "orders"
    assert rec.policy.method == "GET"
    assert rec.policy.key_by == "client_id"
    assert rec.policy.source == Source.ANALYTICS
    assert rec.policy.limit == 10  # legit clients send 4/min: max(10, ceil(4 x 2))
    assert rec.impact is not None
    assert rec.impact.flagged_clients_limited == 1
    assert rec.impact.other_clients_limited == 0
    assert await store.get(rec.policy.id) is None  # recommend mode applies nothing
    audit = await store.audit_log(subject=f"recommendation:{rec.id}")
    assert [entry.action for entry in audit] == ["recommendation.created"]
    assert audit[0].actor == "analytics"
    assert spike.id in audit[0].evidence

    # the named contributor also gets a targeted, expiring limit of its own
    [targeted] = await _recommendations(redis_client, RecommendationAction.TARGETED)
    assert targeted.target_client == "bad"
    assert targeted.status == RecommendationStatus.PENDING
    assert targeted.policy.match_key == "bad"
    assert targeted.policy.key_by == rec.policy.key_by == "client_id"
    assert targeted.policy.route_id == "orders"
    assert targeted.policy.method == "GET"
    assert targeted.policy.limit == 4  # legit p50 is 4/min: at (not above) it
    assert targeted.policy.expires_at is not None
    assert targeted.policy.expires_at > report.started_at
    assert targeted.policy.id != rec.policy.id
    assert targeted.impact is not None
    assert targeted.impact.flagged_clients_limited == 1
    assert targeted.impact.flagged_requests_limited == 150 - 4  # its one minute of 150
    assert targeted.impact.other_clients_limited == 0
    assert set(targeted.anomaly_ids) <= {a.id for a in report.anomalies}

    again = await job.run_once()  # a re-run neither re-inserts nor duplicates
    assert again.new_anomalies == 0
    assert len(again.anomalies) == len(report.anomalies)
    assert len(await asyncio.to_thread(_anomaly_rows, ch)) == len(rows)
    assert [r.id for r in await _recommendations(redis_client)] == [rec.id]
    assert [r.id for r in await _recommendations(
        redis_client, RecommendationAction.TARGETED)] == [targeted.id]
    assert len(await store.audit_log(subject=f"recommendation:{rec.id}")) == 1
    await job.close()


@pytest.mark.parametrize("how", ["setting", "route_override"])
async def test_auto_mode_applies_an_expiring_policy(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        filled: tuple[float, set[str]], how: str) -> None:
    if how == "setting":
        config = settings(tmp_path, redis_url, auto_mode="auto", auto_expiry_s=600, shadow_s=0)
    else:
        config = settings(tmp_path, redis_url, auto_expiry_s=600, shadow_s=0)
        await redis_client.hset(KEYS.auto_mode, "orders", "auto")
    store = PolicyStore(redis_client, KEYS)
    job = AnalyticsJob(config, redis_client, ch, store)
    before = time.time()
    report = await job.run_once()

    [rec] = await _recommendations(redis_client)
    [targeted] = await _recommendations(redis_client, RecommendationAction.TARGETED)
    assert sorted(report.applied) == sorted([rec.id, targeted.id])
    assert rec.status == RecommendationStatus.APPLIED
    assert targeted.status == RecommendationStatus.APPLIED
    hold = await store.get(targeted.policy.id)
    assert hold is not None
    assert (hold.match_key, hold.mode, hold.source) == ("bad", Mode.ENFORCE, Source.ANALYTICS)
    assert hold.expires_at is not None
    assert before + 600 <= hold.expires_at <= time.time() + 600
    assert rec.status_by == "analytics"
    policy = await store.get("analytics:orders:GET")
    assert policy is not None
    assert policy.source == Source.ANALYTICS
    assert policy.mode == Mode.ENFORCE
    assert policy.route_id == "orders"
    assert policy.method == "GET"
    assert policy.limit == 10
    assert policy.expires_at is not None
    assert before + 600 <= policy.expires_at <= time.time() + 600
    assert policy.updated_by == "analytics"
    assert "error_spike" in policy.reason
    actions = [e.action for e in await store.audit_log(subject=f"recommendation:{rec.id}")]
    assert actions == ["recommendation.applied", "recommendation.created"]

    again = await job.run_once()  # the limit is in place: nothing new to apply
    assert again.applied == []
    current = await store.get("analytics:orders:GET")
    assert current is not None
    assert current.version == policy.version
    await job.close()


async def test_kill_switch_stops_automatic_changes(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        filled: tuple[float, set[str]]) -> None:
    await redis_client.set(KEYS.kill_switch, "1")
    store = PolicyStore(redis_client, KEYS)
    job = AnalyticsJob(settings(tmp_path, redis_url, auto_mode="auto"), redis_client, ch, store)
    report = await job.run_once()
    assert report.applied == []
    assert await store.list() == []
    [rec] = await _recommendations(redis_client)
    assert rec.status == RecommendationStatus.PENDING
    await job.close()


async def test_off_mode_records_anomalies_but_recommends_nothing(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        filled: tuple[float, set[str]]) -> None:
    await redis_client.hset(KEYS.auto_mode, "orders", AutoMode.OFF.value)
    store = PolicyStore(redis_client, KEYS)
    job = AnalyticsJob(settings(tmp_path, redis_url, auto_mode="auto"), redis_client, ch, store)
    report = await job.run_once()
    assert report.new_anomalies >= 1
    assert await _recommendations(redis_client, None) == []
    assert await store.list() == []
    await job.close()


async def test_only_the_leader_writes(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        filled: tuple[float, set[str]]) -> None:
    store = PolicyStore(redis_client, KEYS)
    config = settings(tmp_path, redis_url, auto_mode="auto")
    leader = AnalyticsJob(config, redis_client, ch, store)
    follower = AnalyticsJob(config, redis_client, ch, store)
    assert await leader.lease.acquire()

    report = await follower.run_once()
    assert not report.leader
    assert report.anomalies
    assert report.recommendations
    assert report.new_anomalies == 0
    assert report.applied == []
    assert await asyncio.to_thread(_anomaly_rows, ch) == []
    assert await _recommendations(redis_client, None) == []
    assert await store.list() == []

    await leader.close()  # the leader steps down: the follower takes over on its next run
    report = await follower.run_once()
    assert report.leader
    assert report.applied
    await follower.close()


async def test_quiet_traffic_flags_nothing(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    now = time.time()
    events, _ = traffic((now // 60) * 60 - 60)
    calm = [e for e in events if e.client_id != "bad"]
    await asyncio.to_thread(_insert, ch, calm)
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch,
                       PolicyStore(redis_client, KEYS))
    report = await job.run_once()
    assert report.endpoints == 3
    assert report.anomalies == []
    assert report.recommendations == []
    assert await asyncio.to_thread(_anomaly_rows, ch) == []
    await job.close()


async def test_empty_store(tmp_path: Path, redis_url: str, redis_client: aioredis.Redis,
                           ch: SharedClient) -> None:
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch,
                       PolicyStore(redis_client, KEYS))
    report = await job.run_once()
    assert report.endpoints == 0
    assert report.anomalies == []
    assert report.leader
    await job.close()


async def test_tighter_existing_policy_means_no_recommendation(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        filled: tuple[float, set[str]]) -> None:
    store = PolicyStore(redis_client, KEYS)
    await store.put(Policy(id="orders-strict", route_id="orders", method="GET", limit=5,
                           window_s=60), actor="operator", reason="test")
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch, store)
    report = await job.run_once()
    assert report.anomalies
    # nothing endpoint-wide; the flagged client alone may still get a tighter targeted limit
    assert [r for r in report.recommendations if r.action != RecommendationAction.TARGETED
            ] == []
    assert all(r.policy.limit < 5 for r in report.recommendations)
    await job.close()


async def test_scheduler_runs_on_schedule_and_on_trigger(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch,
                       PolicyStore(redis_client, KEYS))
    scheduler = Scheduler(job, interval_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.run(stop))
    try:
        async with asyncio.timeout(30):
            while scheduler.runs < 1:
                await asyncio.sleep(0.05)
            scheduler.trigger()
            while scheduler.runs < 2:
                await asyncio.sleep(0.05)
        assert scheduler.last_report is not None
        assert scheduler.healthy
        assert await job.lease.holder() == job.lease.token
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert await job.lease.holder() is None  # released on stop


def test_service_process_serves_runs_and_stops_on_sigterm(
        tmp_path: Path, redis_url: str, port: int) -> None:
    import json
    import sys
    import urllib.request

    from tests.processes import managed

    env = {"APIGW_REDIS_URL": redis_url, "APIGW_DATA_DIR": str(tmp_path),
           "APIGW_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'service-ch'}",
           "APIGW_INTERVAL_S": "3600"}
    code = ("import sys; from analytics.service import serve; "
            "from analytics.settings import AnalyticsSettings; "
            f"sys.exit(serve(AnalyticsSettings(), '127.0.0.1:{port}'))")
    base = f"http://127.0.0.1:{port}"
    with managed("analytics", [sys.executable, "-c", code], env, tmp_path) as process:
        process.wait_http(f"{base}/readyz", timeout=60)
        request = urllib.request.Request(f"{base}/run", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            report = json.loads(response.read())
        assert report["leader"] is True
        assert report["endpoints"] == 0
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'apigw_analytics_runs_total{outcome="ok"}' in metrics
        assert process.stop() == 0
        log = process.log()
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        assert not client.exists(KEYS.analytics_lock)  # the lease was released on SIGTERM
    finally:
        client.close()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line["msg"] == "analytics service stopped" for line in lines)
    assert all(line["component"] == "analytics" for line in lines)


def throttled(now: float, limit: int = 10, sent: int = 12) -> list[RequestEvent]:
    """10 calm minutes on GET /orders/{id}: 10 well-behaved clients each sending `sent`
    a minute against a per-client limit of `limit` (the rest answered 429)."""
    events: list[RequestEvent] = []
    last = (now // 60) * 60 - 60
    for m in range(10):
        minute = last - 60 * m
        for c, client in enumerate(LEGIT):
            for r in range(sent):
                events.append(_event(minute + 1 + c * 2 + r * 0.1, ENDPOINTS[0], client,
                                     429 if r >= limit else 200))
    return events


@pytest.mark.parametrize("current_source", ["config", "analytics"])
async def test_loosening_when_well_behaved_clients_hit_429s(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        current_source: str) -> None:
    now = time.time()
    await asyncio.to_thread(_insert, ch, throttled(now))
    store = PolicyStore(redis_client, KEYS)
    if current_source == "config":  # the config baseline itself is what throttles them
        await store.put(Policy(id="orders-base", route_id="orders", method="GET", limit=10,
                               window_s=60), actor="config", reason="seed")
    else:  # an earlier automatic limit under a generous config ceiling
        await store.put(Policy(id="orders-base", route_id="orders", method="*", limit=1000,
                               window_s=60), actor="config", reason="seed")
        await store.put(Policy(id="analytics:orders:GET", route_id="orders", method="GET",
                               limit=10, window_s=60, source=Source.ANALYTICS),
                        actor="analytics", reason="earlier")
    job = AnalyticsJob(settings(tmp_path, redis_url, auto_mode="auto"), redis_client, ch,
                       store)
    report = await job.run_once(now)
    assert report.anomalies == []
    [rec] = await _recommendations(redis_client, RecommendationAction.LOOSEN)
    assert rec.status == RecommendationStatus.PENDING  # even in auto mode
    assert report.applied == []
    assert rec.endpoint.route_id == "orders"
    assert rec.policy.id == "analytics:orders:GET"
    assert rec.policy.limit == 15  # bounded step: ceil(10 x 1.5), though p99 x 2 = 24
    assert rec.client_rate_p99 == 12
    assert rec.impact is not None
    assert rec.impact.clients_limited == 0  # 12/min fits under 15
    if current_source == "config":
        assert rec.current_policy_id == "orders-base"
        assert "ABOVE the config baseline ceiling" in rec.rationale
    else:
        assert rec.current_policy_id == "analytics:orders:GET"
        assert "ABOVE" not in rec.rationale
    stored = await store.get("analytics:orders:GET")
    assert stored is None or stored.limit == 10  # nothing applied
    again = await job.run_once(now + 1)  # the same condition updates the same record
    assert again.applied == []
    assert [r.id for r in await _recommendations(redis_client,
                                                 RecommendationAction.LOOSEN)] == [rec.id]
    await job.close()


async def test_no_loosening_when_one_heavy_client_gets_the_429s(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    now = time.time()
    events = [e for e in throttled(now, sent=8) if e.client_id != "client-0"]
    events += [e for e in throttled(now, sent=40) if e.client_id == "client-0"]
    await asyncio.to_thread(_insert, ch, events)
    store = PolicyStore(redis_client, KEYS)
    await store.put(Policy(id="orders-base", route_id="orders", method="GET", limit=10,
                           window_s=60), actor="config", reason="seed")
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch, store)
    await job.run_once(now)
    assert await _recommendations(redis_client, RecommendationAction.LOOSEN) == []
    await job.close()
