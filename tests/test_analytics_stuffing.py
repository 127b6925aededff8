"""Credential stuffing closes the loop: the analytics job, on real events in a real embedded
ClickHouse (chDB) and a real Redis, turns an auth-failure burst whose traffic never
authenticated into a targeted limit keyed by the client address (`ip`), which the proxy
enforces before authentication (tests/test_ratelimit_preauth.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import tests.test_analytics_job as job_tests
from analytics.job import AnalyticsJob
from analytics.models import AnomalyKind, RecommendationAction
from collector.clickhouse import SharedClient
from proxy.event import RequestEvent
from proxy.policy_store import PolicyStore, is_pre_auth
from tests.test_analytics_job import KEYS, _insert, _recommendations, settings

USERS = ("users", "GET", "/users/{id}")
ORDERS = ("orders", "GET", "/orders/{id}")
LEGIT = [f"client-{i}" for i in range(10)]
STUFFER = "203.0.113.66"
SHARED_NAT = "192.0.2.10"  # fails a lot, but some of its users do authenticate

ch = job_tests.ch  # the chDB fixture


def _event(ts: float, route: tuple[str, str, str], *, client_id: str, address: str,
           status: int, auth: str) -> RequestEvent:
    route_id, method, template = route
    return RequestEvent(
        timestamp=ts, request_id=uuid.uuid4().hex, http_request_method=method,
        url_path=template.replace("{id}", "7"), http_response_status_code=status,
        duration_ms=3.0, trace_id=uuid.uuid4().hex, route_id=route_id, http_route=template,
        client_address=address, client_id=client_id, auth_outcome=auth)


def stuffing(burst_minute: float, *, rotating_ids: bool) -> list[RequestEvent]:
    """10 calm minutes of authenticated clients on two endpoints, then a minute where
    203.0.113.66 sends 150 bad credentials to GET /users/{id} (optionally claiming a new
    X-Client-Id each time, which authentication never verifies), and a shared NAT address
    both fails (60) and succeeds (5)."""
    events: list[RequestEvent] = []
    for m in range(10, -1, -1):
        minute = burst_minute - 60 * m
        for route in (USERS, ORDERS):
            for c, client in enumerate(LEGIT):
                for r in range(4):
                    failed = (m + c + r) % 53 == 0  # the odd typo
                    events.append(_event(minute + 1 + c * 4 + r, route, client_id=client,
                                         address=f"10.1.0.{c + 1}",
                                         status=401 if failed else 200,
                                         auth="failure" if failed else "success"))
    for i in range(150):
        claimed = f"bot-{uuid.uuid4().hex[:8]}" if rotating_ids else ""
        events.append(_event(burst_minute + 1 + i * 0.3, USERS, client_id=claimed,
                             address=STUFFER, status=401, auth="failure"))
    for i in range(65):
        ok = i % 13 == 0
        events.append(_event(burst_minute + 2 + i * 0.5, USERS,
                             client_id="nat-user" if ok else "", address=SHARED_NAT,
                             status=200 if ok else 401, auth="success" if ok else "failure"))
    return events


@pytest.mark.parametrize("rotating_ids", [False, True], ids=["no-client-id", "rotating-ids"])
async def test_unauthenticated_burst_yields_an_ip_keyed_targeted_limit(
        rotating_ids: bool, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis,
        ch: SharedClient) -> None:
    now = time.time()
    burst_minute = (now // 60) * 60 - 60  # the last complete minute
    await asyncio.to_thread(_insert, ch, stuffing(burst_minute, rotating_ids=rotating_ids))
    job = AnalyticsJob(settings(tmp_path, redis_url), redis_client, ch,
                       PolicyStore(redis_client, KEYS))
    report = await job.run_once(now)

    bursts = [a for a in report.anomalies if a.kind == AnomalyKind.AUTH_FAILURE_BURST]
    assert [(a.endpoint.route_id, a.window_start) for a in bursts] == [("users", burst_minute)]
    # The shared NAT fails a lot too, but someone there authenticated: not blamed by address.
    assert bursts[0].summary.endswith(f"; unauthenticated traffic from {STUFFER}")

    targeted = await _recommendations(redis_client, RecommendationAction.TARGETED)
    by_ip = [r for r in targeted if r.policy.key_by == "ip"]
    assert len(by_ip) == 1, [r.policy for r in targeted]
    policy = by_ip[0].policy
    assert (policy.route_id, policy.method, policy.match_key) == ("users", "GET", STUFFER)
    assert policy.expires_at is not None
    assert 1 <= policy.limit <= 4  # the legitimate clients' median per minute
    assert is_pre_auth(policy)  # the proxy enforces it before authentication
    assert by_ip[0].target_client == STUFFER
    assert by_ip[0].anomaly_ids == [bursts[0].id]
    assert "before authentication" in by_ip[0].rationale
    assert by_ip[0].impact is not None
    assert by_ip[0].impact.flagged_requests_limited > 100
    # No limit keyed by client id for traffic that never authenticated: it would never apply.
    stray = [r.policy for r in targeted if r.policy.key_by == "client_id"
             and (r.policy.match_key == STUFFER or str(r.policy.match_key).startswith("bot-"))]
    assert stray == []
    # A second run updates the same recommendation rather than adding one.
    await job.run_once(now)
    again = await _recommendations(redis_client, RecommendationAction.TARGETED)
    assert sorted(r.id for r in again) == sorted(r.id for r in targeted)
