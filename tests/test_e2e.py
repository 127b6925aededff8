"""The whole loop on embedded defaults, through real processes.

request -> proxy -> Redis Stream -> collector -> ClickHouse (chDB) -> analytics flags the
endpoint -> recommendation + audit in Redis -> auto-applied policy -> the proxy enforces it
on the abusive client only.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from apigw.redis_server import free_port
from proxy.event import SCHEMA_VERSION, RequestEvent, encode_batch
from proxy.policy import Policy, RedisKeys, Source
from tests.processes import apigw_command, managed

pytestmark = pytest.mark.e2e

NORMAL_CLIENTS = [f"client-{n:02d}" for n in range(1, 9)]
ABUSER = "scraper-7"
SEEDED_MINUTES = 12


class Upstream:
    """A real HTTP service; its orders endpoint fails while `failing` is set."""

    def __init__(self) -> None:
        self.failing = False
        self.received = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/orders/{id}", self.order)
        app.router.add_get("/users/{id}", self.user)
        app.router.add_get("/catalog/items", self.catalog)
        return app

    async def order(self, request: web.Request) -> web.Response:
        self.received += 1
        if self.failing:
            return web.json_response({"error": "database overloaded"}, status=503)
        return web.json_response({"id": request.match_info["id"], "total": 42})

    async def user(self, request: web.Request) -> web.Response:
        self.received += 1
        return web.json_response({"id": request.match_info["id"]})

    async def catalog(self, request: web.Request) -> web.Response:
        self.received += 1
        return web.json_response({"items": [1, 2, 3]})


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    service = Upstream()
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield service, port
    finally:
        await runner.cleanup()


def _config(upstream_port: int) -> str:
    return f"""
version: 1
upstreams:
  shop:
    url: http://127.0.0.1:{upstream_port}
routes:
  - id: orders
    match: {{path: "/orders/{{id}}"}}
    methods: [GET]
    upstream: shop
  - id: users
    match: {{path: "/users/{{id}}"}}
    methods: [GET]
    upstream: shop
  - id: catalog
    match: {{path: /catalog/items}}
    methods: [GET]
    upstream: shop
events:
  flush_interval_ms: 50
ratelimit:
  policy_refresh_s: 0.5
  policies:
    - id: default-per-client
      key_by: client_id
      limit: 100000
      window_s: 60
"""


async def _seed_history(redis: aioredis.Redis, stream: str, now: float) -> int:
    """Normal traffic for the minutes before the test, written to the stream as the proxy would."""
    rng = random.Random(7)
    endpoints = [("orders", "/orders/{id}", "/orders/{n}"), ("users", "/users/{id}", "/users/{n}"),
                 ("catalog", "/catalog/items", "/catalog/items")]
    events = []
    start_minute = int(now // 60) * 60 - SEEDED_MINUTES * 60
    for minute in range(SEEDED_MINUTES):
        for route_id, template, path in endpoints:
            for client in NORMAL_CLIENTS:
                for _ in range(rng.randint(3, 6)):
                    status = 500 if rng.random() < 0.01 else 200
                    events.append(RequestEvent(
                        timestamp=start_minute + minute * 60 + rng.random() * 59,
                        request_id=uuid.uuid4().hex, http_request_method="GET",
                        url_path=path.format(n=rng.randint(1, 500)),
                        http_response_status_code=status, duration_ms=rng.uniform(2, 9),
                        gateway_instance="seed", route_id=route_id, http_route=template,
                        client_id=client, client_address="127.0.0.1",
                        ratelimit_outcome="allowed", ratelimit_policy_id="default-per-client",
                        ratelimit_mode="enforce",
                        error_type="" if status == 200 else "upstream_status_5xx"))
    for offset in range(0, len(events), 500):
        await redis.xadd(stream, {"v": str(SCHEMA_VERSION),
                                  "b": encode_batch(events[offset:offset + 500])})
    return len(events)


async def _get(session: aiohttp.ClientSession, url: str, client: str) -> int:
    async with session.get(url, headers={"X-Client-Id": client}) as response:
        await response.read()
        return response.status


async def _api(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    async with session.request(method, url, **kwargs) as response:
        body = await response.read()
        assert response.status == 200, f"{method} {url} -> {response.status}: {body[:500]!r}"
        return orjson.loads(body)


async def _total_requests(session: aiohttp.ClientSession, api: str) -> int:
    rows = await _api(session, "GET", f"{api}/api/v1/endpoints?minutes=60")
    items = rows["endpoints"] if isinstance(rows, dict) else rows
    return sum(int(item["requests"]) for item in items)


async def test_whole_loop(tmp_path: Path, redis_url: str,
                          upstream: tuple[Upstream, int]) -> None:
    service, upstream_port = upstream
    config = tmp_path / "gateway.yaml"
    config.write_text(_config(upstream_port))
    proxy_port, admin_port, api_port = free_port(), free_port(), free_port()
    env = {
        "APIGW_REDIS_URL": redis_url,
        "APIGW_DATA_DIR": str(tmp_path / "data"),
        "APIGW_AUTO_MODE": "auto",
        "APIGW_SHADOW_S": "0",  # enforce at once: shadow-first is proven in test_guardrails.py
        "APIGW_INTERVAL_S": "3600",  # runs are triggered by the test
        "APIGW_LOG_LEVEL": "INFO",
    }
    redis = aioredis.Redis.from_url(redis_url)
    keys = RedisKeys()
    api = f"http://127.0.0.1:{api_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    try:
        seeded = await _seed_history(redis, "apigw:events", time.time())
        with managed("controlplane", apigw_command("controlplane", "--listen",
                                                   f"127.0.0.1:{api_port}"),
                     env, tmp_path) as controlplane, \
             managed("proxy", apigw_command("proxy", "--config", str(config), "--listen",
                                            f"127.0.0.1:{proxy_port}", "--admin",
                                            f"127.0.0.1:{admin_port}", "--workers", "1"),
                     env, tmp_path) as proxy_process:
            controlplane.wait_http(f"{api}/healthz", timeout=90)
            proxy_process.wait_http(f"http://127.0.0.1:{admin_port}/readyz", timeout=60)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # Normal traffic, then the incident: one client hammering a failing endpoint.
                statuses: Counter[int] = Counter()
                sent = 0
                for round_number in range(3):
                    for client in NORMAL_CLIENTS:
                        for url in (f"{proxy}/orders/{round_number + 1}",
                                    f"{proxy}/users/{round_number + 1}",
                                    f"{proxy}/catalog/items"):
                            statuses[await _get(session, url, client)] += 1
                            sent += 1
                assert statuses == Counter({200: sent})
                service.failing = True
                incident = await asyncio.gather(*(
                    _get(session, f"{proxy}/orders/{n}", ABUSER) for n in range(1000, 1200)))
                sent += len(incident)
                assert Counter(incident) == Counter({503: 200})
                service.failing = False
                unroutable = await _get(session, f"{proxy}/nowhere", "client-01")
                sent += 1
                assert unroutable == 404

                # Every request became exactly one row.
                deadline = time.monotonic() + 60
                total = 0
                while time.monotonic() < deadline:
                    total = await _total_requests(session, api)
                    if total >= seeded + sent:
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1.0)
                assert await _total_requests(session, api) == seeded + sent

                # Analytics flags the failing endpoint, and only that one.
                await _api(session, "POST", f"{api}/api/v1/analytics/run")
                anomalies = await _api(session, "GET", f"{api}/api/v1/anomalies?minutes=60")
                items = anomalies["anomalies"] if isinstance(anomalies, dict) else anomalies
                spikes = [item for item in items if item["kind"] == "error_spike"]
                assert spikes, f"no error spike flagged: {items}"
                assert {item["endpoint"]["route_id"] for item in spikes} == {"orders"}
                assert any(ABUSER in item["top_clients"] for item in spikes)

            # A recommendation, its audit trail, and (auto mode) an enforced policy in Redis.
            recommendations = [orjson.loads(raw) for raw in
                               (await redis.hgetall(keys.recommendations)).values()]
            assert recommendations, "no recommendation written"
            applied = [rec for rec in recommendations if rec["status"] == "applied"]
            assert applied, recommendations
            assert applied[0]["endpoint"]["route_id"] == "orders"
            audit = await redis.xrange(keys.audit)
            assert len(audit) >= 2, audit
            stored = await redis.hgetall(keys.policies)
            policies = [Policy.from_json(raw) for raw in stored.values()]
            tightened = [p for p in policies if p.source is Source.ANALYTICS]
            assert tightened, policies
            assert tightened[0].route_id == "orders"
            assert tightened[0].expires_at is not None

            # The proxy picks the policy up within 2 s and limits the abuser, not the others.
            await asyncio.sleep(2.0)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                abuser = Counter([await _get(session, f"{proxy}/orders/{n}", ABUSER)
                                  for n in range(2000, 2060)])
                normal = Counter([await _get(session, f"{proxy}/orders/{n}", "client-03")
                                  for n in range(5)])
            assert abuser[429] > 0, abuser
            assert normal == Counter({200: 5}), normal
            assert "Traceback" not in proxy_process.log(), proxy_process.log()[-3000:]
            assert "Traceback" not in controlplane.log(), controlplane.log()[-3000:]
    finally:
        await redis.aclose()
