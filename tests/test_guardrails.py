"""Each guardrail of automatic tightening, against a real Redis and a real chDB.

Recommendations are written through the job's own WriteBack (auto mode); the proxy's
enforcement is stood in for by events with the rate-limit outcome it would record
(`shadow_limited` / `limited`, with the policy id), inserted into ClickHouse `events`.
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

from analytics.features import key_expression
from analytics.guardrails import floor_limit, step_limit
from analytics.job import AnalyticsJob
from analytics.models import (
    Endpoint,
    ImpactEstimate,
    Recommendation,
    RecommendationAction,
    RecommendationStatus,
)
from analytics.recommend import policy_id_for, targeted_policy_id
from analytics.settings import AnalyticsSettings
from collector.clickhouse import SharedClient
from collector.consumer import event_columns
from collector.schema import migrate
from proxy.event import EVENT_FIELDS, RequestEvent
from proxy.policy import Mode, Policy, RedisKeys, Source
from proxy.policy_store import PolicyStore

KEYS = RedisKeys("apigw")
ENDPOINT = Endpoint(route_id="orders", method="GET", http_route="/orders/{id}")
POLICY_ID = policy_id_for(ENDPOINT)


@pytest.fixture
async def ch(chdb_dsn: str) -> AsyncIterator[SharedClient]:
    client = await asyncio.to_thread(SharedClient, chdb_dsn)
    try:
        await asyncio.to_thread(migrate, client.client)
        yield client
    finally:
        await asyncio.to_thread(client.close)


def _job(tmp_path: Path, redis_url: str, redis: aioredis.Redis, ch: SharedClient,
         **overrides: object) -> tuple[AnalyticsJob, PolicyStore]:
    config = AnalyticsSettings(data_dir=tmp_path, redis_url=redis_url, instance="test",
                               auto_mode="auto", **overrides)  # type: ignore[arg-type]
    store = PolicyStore(redis, KEYS)
    return AnalyticsJob(config, redis, ch, store), store


def _recommendation(limit: int = 10, p99: float = 4.0, other_limited: int = 0,
                    window: float = 1_000_000.0) -> Recommendation:
    policy = Policy(id=POLICY_ID, route_id="orders", method="GET", key_by="client_id",
                    limit=limit, window_s=60, source=Source.ANALYTICS)
    impact = ImpactEstimate(window_s=86_400, clients_limited=1 + other_limited,
                            requests_limited=500, flagged_clients_limited=1,
                            flagged_requests_limited=480, other_clients_limited=other_limited,
                            other_requests_limited=20 if other_limited else 0)
    return Recommendation(id=f"rec-{int(window)}", endpoint=ENDPOINT, anomaly_ids=["an-1"],
                          policy=policy, rationale="test", client_rate_p99=p99, impact=impact,
                          flagged_clients=["bad"])


def _insert(ch: SharedClient, clients: dict[str, tuple[int, int]], outcome: str,
            ts: float | None = None) -> None:
    """Per client (requests, of which `outcome` by the analytics policy), on GET orders."""
    _insert_for(ch, POLICY_ID, clients, outcome, ts)


def _insert_for(ch: SharedClient, policy_id: str, clients: dict[str, tuple[int, int]],
                outcome: str, ts: float | None = None) -> None:
    """Per client (requests, of which `outcome` by `policy_id`), on GET orders."""
    ts = time.time() if ts is None else ts
    events = []
    for client, (requests, hit) in clients.items():
        for i in range(requests):
            limited = i < hit
            events.append(RequestEvent(
                timestamp=ts + i * 0.001, request_id=uuid.uuid4().hex,
                http_request_method="GET", url_path=f"/orders/{i}",
                http_response_status_code=429 if limited and outcome == "limited" else 200,
                duration_ms=3.0, route_id="orders", http_route="/orders/{id}",
                client_id=client, client_address="127.0.0.1",
                ratelimit_outcome=outcome if limited else "allowed",
                ratelimit_policy_id=policy_id if limited else "default"))
    columns = event_columns([dataclasses.asdict(event) for event in events])
    assert columns is not None
    with ch.lock:
        ch.client.insert("events", columns, column_names=list(EVENT_FIELDS),
                         column_oriented=True)


async def _stored(redis: aioredis.Redis, rec_id: str) -> Recommendation:
    raw = await redis.hget(KEYS.recommendations, rec_id)
    assert raw is not None
    return Recommendation.model_validate_json(raw)


async def test_new_automatic_limit_goes_to_shadow_first_with_expiry(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=300, auto_expiry_s=900)
    before = time.time()
    result = await job.writeback.write([_recommendation()], now=before)
    assert result.applied == ["rec-1000000"]
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.mode == Mode.SHADOW
    assert policy.source == Source.ANALYTICS
    assert policy.expires_at == pytest.approx(before + 900)
    rec = await _stored(redis_client, "rec-1000000")
    assert rec.status == RecommendationStatus.APPLIED
    assert rec.policy.mode == Mode.SHADOW
    # the shadow period has not passed: nothing to decide yet
    assert await job.guardrails.review(time.time() + 10) == []
    assert (await store.get(POLICY_ID)) == policy


async def test_shadow_promoted_when_hits_fall_on_flagged_clients(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60, auto_expiry_s=900)
    await job.writeback.write([_recommendation()], now=time.time())
    shadow = await store.get(POLICY_ID)
    assert shadow is not None
    await asyncio.to_thread(_insert, ch, {"bad": (300, 250), "good-1": (8, 0),
                                          "good-2": (8, 0)}, "shadow_limited")
    later = time.time() + 61
    actions = await job.guardrails.review(later)
    assert len(actions) == 1
    assert actions[0].startswith("promoted rec-1000000")
    enforced = await store.get(POLICY_ID)
    assert enforced is not None
    assert enforced.mode == Mode.ENFORCE
    assert enforced.version == shadow.version + 1
    assert enforced.limit == shadow.limit
    assert enforced.expires_at == pytest.approx(later + 900)
    rec = await _stored(redis_client, "rec-1000000")
    assert rec.status == RecommendationStatus.APPLIED
    assert rec.policy.version == enforced.version  # an operator rollback undoes this version
    actions_logged = [e.action for e in await store.audit_log(subject="recommendation:rec-1000000")]
    assert actions_logged[0] == "recommendation.promoted"
    assert "250 would-be-limited requests from flagged clients" in rec.status_reason


async def test_shadow_withdrawn_when_hits_fall_on_other_clients(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60)
    await job.writeback.write([_recommendation()], now=time.time())
    await asyncio.to_thread(_insert, ch, {"bad": (100, 50), "good-1": (40, 20),
                                          "good-2": (40, 15)}, "shadow_limited")
    actions = await job.guardrails.review(time.time() + 61)
    assert len(actions) == 1
    assert actions[0].startswith("withdrawn rec-1000000")
    assert await store.get(POLICY_ID) is None  # there was nothing before it
    rec = await _stored(redis_client, "rec-1000000")
    assert rec.status == RecommendationStatus.ROLLED_BACK
    assert "35 from 2 other clients" in rec.status_reason


@pytest.mark.parametrize(("other_limited", "promoted"), [(0, True), (3, False)])
async def test_without_shadow_hits_the_simulated_impact_decides(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient,
        other_limited: int, promoted: bool) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60)
    await job.writeback.write([_recommendation(other_limited=other_limited)], now=time.time())
    await job.guardrails.review(time.time() + 61)
    policy = await store.get(POLICY_ID)
    if promoted:
        assert policy is not None
        assert policy.mode == Mode.ENFORCE
    else:
        assert policy is None


async def test_never_below_the_legitimate_p99_floor(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0)
    rec = _recommendation(limit=5, p99=37.2)  # a proposal below what legit clients send
    assert floor_limit(rec, 60) == 38
    await job.writeback.write([rec], now=time.time())
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.limit == 38
    assert policy.mode == Mode.ENFORCE
    stored = await _stored(redis_client, rec.id)
    assert "legitimate p99 floor 38" in stored.status_reason


async def test_one_step_at_most_halves_the_current_automatic_limit(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0, max_step=0.5)
    current = await store.put(Policy(id=POLICY_ID, route_id="orders", method="GET", limit=40,
                                     window_s=60, source=Source.ANALYTICS),
                              actor="analytics", reason="earlier step")
    assert step_limit(current, 60, 0.5) == 20
    await job.writeback.write([_recommendation(limit=10, p99=2.0)], now=time.time())
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.limit == 20  # not 10: at most half of 40 in one step
    assert policy.version == current.version + 1
    # an operator's (config) limit is a ceiling, not an automatic step to bound
    assert step_limit(Policy(id="default", limit=100_000, window_s=60), 60, 0.5) == 1


async def test_rollback_when_unflagged_clients_get_429s_after_enforcement(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0,
                      rollback_429_rate=0.05)
    earlier = await store.put(Policy(id=POLICY_ID, route_id="orders", method="GET", limit=200,
                                     window_s=60, source=Source.OPERATOR),
                              actor="ops", reason="before analytics")
    await job.writeback.write([_recommendation()], now=time.time())
    enforced = await store.get(POLICY_ID)
    assert enforced is not None
    assert enforced.mode == Mode.ENFORCE
    assert enforced.limit == 10
    # the abuser being limited is the point: no rollback
    await asyncio.to_thread(_insert, ch, {"bad": (300, 280), "good-1": (50, 0)}, "limited")
    assert await job.guardrails.review(time.time() + 5) == []
    # then legitimate clients start getting 429s from it
    await asyncio.to_thread(_insert, ch, {"good-2": (50, 10), "good-3": (50, 2)}, "limited")
    actions = await job.guardrails.review(time.time() + 5)
    assert len(actions) == 1
    assert actions[0].startswith("rolled back rec-1000000")
    restored = await store.get(POLICY_ID)
    assert restored is not None
    assert restored.limit == earlier.limit  # the operator's version is back
    assert restored.source == Source.OPERATOR
    rec = await _stored(redis_client, "rec-1000000")
    assert rec.status == RecommendationStatus.ROLLED_BACK
    assert "12 429s" in rec.status_reason


async def test_expired_automatic_change_is_marked_expired(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0, auto_expiry_s=30)
    await job.writeback.write([_recommendation()], now=time.time())
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.expires_at is not None
    actions = await job.guardrails.review(policy.expires_at + 1)
    assert actions == ["expired rec-1000000"]
    rec = await _stored(redis_client, "rec-1000000")
    assert rec.status == RecommendationStatus.EXPIRED
    assert [p.id for p in await store.effective(policy.expires_at + 1)] == []


async def test_kill_switch_stops_promotion(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60)
    await job.writeback.write([_recommendation()], now=time.time())
    await redis_client.set(KEYS.kill_switch, "1")
    assert await job.guardrails.review(time.time() + 61) == []
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.mode == Mode.SHADOW
    await redis_client.delete(KEYS.kill_switch)
    assert (await job.guardrails.review(time.time() + 61))[0].startswith("promoted")


async def test_only_the_leader_reviews(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    leader, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=1)
    follower, _ = _job(tmp_path, redis_url, redis_client, ch, shadow_s=1)
    await leader.writeback.write([_recommendation()], now=time.time())
    assert await leader.lease.acquire()
    await asyncio.sleep(1.1)
    report = await follower.run_once()
    assert not report.leader
    assert report.guardrail_actions == []
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.mode == Mode.SHADOW
    report = await leader.run_once()
    assert report.leader
    assert [a.split(":")[0] for a in report.guardrail_actions] == ["promoted rec-1000000"]
    await leader.close()
    await follower.close()


async def test_changes_by_others_are_left_alone(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60)
    await job.writeback.write([_recommendation()], now=time.time())
    shadow = await store.get(POLICY_ID)
    assert shadow is not None
    await store.put(shadow.model_copy(update={"limit": 500}), actor="ops", reason="manual")
    assert await job.guardrails.review(time.time() + 61) == []
    policy = await store.get(POLICY_ID)
    assert policy is not None
    assert policy.limit == 500


def _targeted(limit: int = 2, p99: float = 8.0) -> Recommendation:
    policy = Policy(id=targeted_policy_id(ENDPOINT, "bad"), route_id="orders", method="GET",
                    key_by="client_id", match_key="bad", limit=limit, window_s=60,
                    source=Source.ANALYTICS, expires_at=time.time() + 3600)
    impact = ImpactEstimate(window_s=86_400, clients_limited=1, requests_limited=290,
                            flagged_clients_limited=1, flagged_requests_limited=290,
                            other_clients_limited=0, other_requests_limited=0)
    return Recommendation(id="rec-targeted", endpoint=ENDPOINT, anomaly_ids=["an-1"],
                          policy=policy, rationale="test", client_rate_p50=2.0,
                          client_rate_p99=p99, impact=impact, flagged_clients=["bad"],
                          action=RecommendationAction.TARGETED, target_client="bad")


async def test_targeted_limit_is_shadowed_expiring_and_kill_switched(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60, auto_expiry_s=900)
    before = time.time()
    result = await job.writeback.write([_targeted()], now=before)
    assert result.applied == ["rec-targeted"]
    policy = await store.get(targeted_policy_id(ENDPOINT, "bad"))
    assert policy is not None
    assert (policy.mode, policy.match_key, policy.source) == (Mode.SHADOW, "bad",
                                                              Source.ANALYTICS)
    assert policy.limit == 2  # one flagged client only: the legit p99 floor (8) does not apply
    assert policy.expires_at == pytest.approx(before + 900)
    audit = [e.action for e in await store.audit_log(subject="recommendation:rec-targeted")]
    assert audit == ["recommendation.applied", "recommendation.created"]
    await asyncio.to_thread(_insert_for, ch, policy.id, {"bad": (300, 290)}, "shadow_limited")
    await redis_client.set(KEYS.kill_switch, "1")
    assert await job.guardrails.review(time.time() + 61) == []  # kill switch: stays shadow
    await redis_client.delete(KEYS.kill_switch)
    later = time.time() + 61
    [action] = await job.guardrails.review(later)
    assert action.startswith("promoted rec-targeted")
    enforced = await store.get(policy.id)
    assert enforced is not None
    assert enforced.mode == Mode.ENFORCE
    assert enforced.expires_at == pytest.approx(later + 900)
    # the endpoint-wide policy is untouched: there is none
    assert await store.get(POLICY_ID) is None


async def test_targeted_limit_needs_the_lease(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    leader, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0)
    follower, _ = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0)
    assert await leader.lease.acquire()
    assert not await follower.lease.acquire()  # the job writes only after acquiring it
    await leader.lease.release()
    assert await follower.lease.acquire()
    await follower.writeback.write([_targeted()], now=time.time())
    assert (await store.get(targeted_policy_id(ENDPOINT, "bad"))) is not None


async def test_loosening_is_never_applied_automatically(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0)
    loosen = _recommendation(limit=30).model_copy(update={
        "id": "rec-loosen", "action": RecommendationAction.LOOSEN, "flagged_clients": []})
    result = await job.writeback.write([loosen], now=time.time())
    assert result.applied == []
    assert result.created == ["rec-loosen"]
    assert await store.list() == []
    assert (await _stored(redis_client, "rec-loosen")).status == RecommendationStatus.PENDING


BOT_ADDRESS = "203.0.113.9"


def _ip_targeted() -> Recommendation:
    """A pre-auth targeted limit for the address behind a credential-stuffing burst."""
    policy = Policy(id=targeted_policy_id(ENDPOINT, BOT_ADDRESS, "ip"), route_id="orders",
                    method="GET", key_by="ip", match_key=BOT_ADDRESS, limit=2, window_s=60,
                    source=Source.ANALYTICS, expires_at=time.time() + 3600)
    impact = ImpactEstimate(window_s=86_400, clients_limited=1, requests_limited=290,
                            flagged_clients_limited=1, flagged_requests_limited=290,
                            other_clients_limited=0, other_requests_limited=0)
    return Recommendation(id="rec-ip", endpoint=ENDPOINT, anomaly_ids=["an-1"], policy=policy,
                          rationale="test", client_rate_p50=2.0, client_rate_p99=8.0,
                          impact=impact, flagged_clients=[BOT_ADDRESS],
                          action=RecommendationAction.TARGETED, target_client=BOT_ADDRESS)


def _insert_rotating(ch: SharedClient, policy_id: str, address: str, requests: int, hit: int,
                     outcome: str, *, others: dict[str, tuple[str, int]] | None = None) -> None:
    """`requests` from one address, each claiming a new client id, the first `hit` of them
    `outcome` by `policy_id`; plus `others`: client id -> (address, requests), all allowed."""
    ts = time.time()
    events = [RequestEvent(
        timestamp=ts + i * 0.001, request_id=uuid.uuid4().hex, http_request_method="GET",
        url_path=f"/orders/{i}", http_response_status_code=429 if i < hit else 401,
        duration_ms=1.0, route_id="orders", http_route="/orders/{id}",
        client_id=f"rotated-{i}", client_address=address, auth_outcome="failure",
        ratelimit_outcome=outcome if i < hit else "allowed",
        ratelimit_policy_id=policy_id if i < hit else "default") for i in range(requests)]
    for client, (client_address, count) in (others or {}).items():
        events.extend(RequestEvent(
            timestamp=ts + i * 0.001, request_id=uuid.uuid4().hex, http_request_method="GET",
            url_path=f"/orders/{i}", http_response_status_code=200, duration_ms=1.0,
            route_id="orders", http_route="/orders/{id}", client_id=client,
            client_address=client_address, auth_outcome="success",
            ratelimit_policy_id="default") for i in range(count))
    columns = event_columns([dataclasses.asdict(event) for event in events])
    assert columns is not None
    with ch.lock:
        ch.client.insert("events", columns, column_names=list(EVENT_FIELDS),
                         column_oriented=True)


async def test_ip_keyed_shadow_judged_by_address_not_rotated_client_ids(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    """A bot rotating X-Client-Id behind one address is one flagged client of an ip-keyed
    limit: its shadow hits promote the limit instead of counting as many other clients."""
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=60, auto_expiry_s=900)
    assert (await job.writeback.write([_ip_targeted()], now=time.time())).applied == ["rec-ip"]
    policy = await store.get(targeted_policy_id(ENDPOINT, BOT_ADDRESS, "ip"))
    assert policy is not None
    assert (policy.mode, policy.key_by) == (Mode.SHADOW, "ip")
    await asyncio.to_thread(_insert_rotating, ch, policy.id, BOT_ADDRESS, 200, 190,
                            "shadow_limited", others={"good-1": ("198.51.100.7", 20)})
    [action] = await job.guardrails.review(time.time() + 61)
    assert action.startswith("promoted rec-ip"), action
    assert "190 would-be-limited requests from flagged clients, 0 from 0 other" in action
    enforced = await store.get(policy.id)
    assert enforced is not None
    assert enforced.mode == Mode.ENFORCE


async def test_ip_keyed_enforced_not_rolled_back_for_the_bots_rotated_ids(
        tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, ch: SharedClient) -> None:
    job, store = _job(tmp_path, redis_url, redis_client, ch, shadow_s=0,
                      rollback_429_rate=0.05, rollback_min_requests=20)
    await job.writeback.write([_ip_targeted()], now=time.time())
    policy_id = targeted_policy_id(ENDPOINT, BOT_ADDRESS, "ip")
    enforced = await store.get(policy_id)
    assert enforced is not None
    assert enforced.mode == Mode.ENFORCE
    await asyncio.to_thread(_insert_rotating, ch, policy_id, BOT_ADDRESS, 200, 190, "limited",
                            others={"good-1": ("198.51.100.7", 30)})
    assert await job.guardrails.review(time.time() + 5) == []
    assert await store.get(policy_id) == enforced


def test_policy_key_expression_follows_key_by() -> None:
    assert key_expression("ip") == "client_address"
    assert key_expression("client_id") == "if(client_id != '', client_id, client_address)"
    assert key_expression("ip+tenant") == "concat(client_address, '|', toString(tenant))"
    # no column for a header: grouped by client; never the policy's text in the SQL
    assert key_expression("header:X-Evil') OR 1=1 --") == key_expression("client_id")
