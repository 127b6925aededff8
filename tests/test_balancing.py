"""Upstream pools: balancers (unit), then real target servers on loopback behind the gateway:
weighted round-robin, consistent hashing, outlier ejection and active health checks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from apigw.redis_server import free_port
from proxy.balancing import Balancing, ConsistentHash, Endpoint, LeastRequest, RoundRobin
from proxy.config import GatewayConfig
from tests import test_proxy as _proxy_tests
from tests.test_proxy import GatewayFactory, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture



def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(index, f"http://127.0.0.1:{9000 + index}", weight)
            for index, weight in enumerate(weights)]


# --- balancers -------------------------------------------------------------------------------

def test_smooth_weighted_round_robin_is_exact_and_interleaved() -> None:
    eps = endpoints(1, 2, 3)
    balancer = RoundRobin(eps)
    picks = [balancer.pick("").index for _ in range(60)]
    assert Counter(picks) == {0: 10, 1: 20, 2: 30}
    assert picks[:6] != [2, 2, 2, 1, 1, 0]  # smooth: no bursts of one target
    assert max(len(run) for run in "".join(map(str, picks)).split("0")) <= 5
    eps[2].available = False
    assert Counter(balancer.pick("").index for _ in range(30)) == {0: 10, 1: 20}


def test_least_request_prefers_idle_and_respects_weight() -> None:
    eps = endpoints(1, 1, 2)
    balancer = LeastRequest(eps)
    eps[0].outstanding, eps[1].outstanding, eps[2].outstanding = 5, 0, 1
    assert balancer.pick("").index == 1
    eps[1].outstanding = 3  # loads (n+1)/w: 6, 4, 1
    assert balancer.pick("").index == 2
    for ep in eps:
        ep.outstanding = 0
    equal = LeastRequest(endpoints(1, 1, 1))
    assert set(equal.pick("").index for _ in range(3)) == {0, 1, 2}  # ties rotate
    eps[0].available = eps[1].available = eps[2].available = False
    assert balancer.pick("") in eps  # panic: all unavailable still picks


def test_consistent_hash_is_stable_and_moves_only_a_leaving_targets_keys() -> None:
    eps = endpoints(1, 1, 1, 1)
    ring = ConsistentHash(eps)
    keys = [f"client-{n}" for n in range(2000)]
    before = {key: ring.pick(key).index for key in keys}
    assert before == {key: ring.pick(key).index for key in keys}
    spread = Counter(before.values())
    assert all(300 < count < 700 for count in spread.values()), spread
    eps[1].available = False
    after = {key: ring.pick(key).index for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved
    assert all(before[key] == 1 for key in moved)
    assert 1 not in after.values()


def test_balancing_config_needs_a_header_for_header_hashing() -> None:
    with pytest.raises(ValueError, match="hash_header"):
        Balancing.model_validate({"algorithm": "consistent_hash", "hash_on": "header"})
    with pytest.raises(ValueError, match="exactly one of `url` or `targets`"):
        GatewayConfig.model_validate({
            "upstreams": {"a": {"url": "http://127.0.0.1:1",
                                "targets": [{"url": "http://127.0.0.1:2"}]}},
            "routes": [{"id": "r", "match": {"prefix": "/"}, "upstream": "a"}]})


# --- real targets ----------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    url: str = ""
    status: int = 200  # what /work answers
    health: int = 200  # what /healthz answers
    hits: int = 0
    probes: int = 0
    seen: list[str] = field(default_factory=list)


@pytest.fixture
async def targets() -> AsyncIterator[list[Target]]:
    made: list[tuple[Target, web.AppRunner]] = []
    for name in ("a", "b", "c"):
        target = Target(name)

        async def work(request: web.Request, target: Target = target) -> web.Response:
            target.hits += 1
            target.seen.append(request.headers.get("X-User", ""))
            return web.Response(status=target.status, text=target.name)

        async def healthz(request: web.Request, target: Target = target) -> web.Response:
            target.probes += 1
            return web.Response(status=target.health)

        app = web.Application()
        app.router.add_get("/work", work)
        app.router.add_post("/work", work)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        target.url = f"http://127.0.0.1:{port}"
        made.append((target, runner))
    try:
        yield [target for target, _ in made]
    finally:
        for _, runner in made:
            await runner.cleanup()


def pool_config(targets: list[Target], weights: tuple[int, ...] = (1, 1, 1),
                **upstream: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "upstreams": {"pool": {"targets": [{"url": t.url, "weight": w}
                                           for t, w in zip(targets, weights, strict=True)],
                               "timeouts": {"connect_s": 1, "read_s": 2, "total_s": 5},
                               **upstream}},
        "routes": [{"id": "work", "match": {"path": "/work"}, "methods": ["GET", "POST"],
                    "upstream": "pool"}],
        "events": {"flush_interval_ms": 20}})


async def names(client: aiohttp.ClientSession, url: str, count: int,
                headers: dict[str, str] | None = None) -> list[str]:
    out = []
    for _ in range(count):
        async with client.get(url, headers=headers) as response:
            out.append(await response.text())
    return out


async def test_weighted_round_robin_through_the_gateway(
        targets: list[Target], start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(pool_config(targets, (1, 2, 3)))
    got = await names(client, f"{gw.url}/work", 60)
    assert Counter(got) == {"a": 10, "b": 20, "c": 30}
    events = await read_events(gw.redis, 60)
    assert {event["upstream"] for event in events} == {t.url.removeprefix("http://")
                                                        for t in targets}


async def test_consistent_hash_by_header(targets: list[Target], start_gateway: GatewayFactory,
                                         client: aiohttp.ClientSession) -> None:
    config = pool_config(targets, balancing={"algorithm": "consistent_hash",
                                             "hash_on": "header", "hash_header": "X-User"})
    gw = await start_gateway(config)
    owners = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        got = set(await names(client, f"{gw.url}/work", 5, {"X-User": user}))
        assert len(got) == 1, (user, got)
        owners[user] = got.pop()
    assert len(set(owners.values())) >= 2


async def test_outlier_ejection_and_return(targets: list[Target], start_gateway: GatewayFactory,
                                           client: aiohttp.ClientSession) -> None:
    b = targets[1]
    config = pool_config(targets, outlier_detection={
        "consecutive_5xx": 2, "base_ejection_s": 0.6, "max_ejection_s": 5,
        "max_ejected_percent": 50})
    gw = await start_gateway(config)
    b.status = 500
    await names(client, f"{gw.url}/work", 6)  # b answers 500 twice -> ejected
    assert b.hits == 2
    got = await names(client, f"{gw.url}/work", 20)
    assert b.hits == 2
    assert set(got) == {"a", "c"}
    pool = gw.gateway.forwarder.upstreams["pool"]
    assert [ep.available for ep in pool.endpoints] == [True, False, True]
    b.status = 200
    await asyncio.sleep(0.7)
    got = await names(client, f"{gw.url}/work", 6)
    assert got.count("b") == 2
    # Ejected again: twice as long (1.2 s), the multiplier grows with repeats.
    b.status = 500
    await names(client, f"{gw.url}/work", 6)
    b.status = 200
    assert pool.endpoints[1].ejections == 2
    await asyncio.sleep(0.8)
    assert not pool.endpoints[1].available
    await asyncio.sleep(0.6)
    assert pool.endpoints[1].available


async def test_max_ejected_percent_keeps_targets_in_service(
        targets: list[Target], start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    config = pool_config(targets, outlier_detection={
        "consecutive_5xx": 1, "base_ejection_s": 30, "max_ejected_percent": 34})
    gw = await start_gateway(config)
    for target in targets:
        target.status = 503
    await names(client, f"{gw.url}/work", 9)
    pool = gw.gateway.forwarder.upstreams["pool"]
    assert sum(not ep.available for ep in pool.endpoints) == 1


async def test_active_health_checks_remove_and_restore(
        targets: list[Target], start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    b = targets[1]
    b.health = 503
    config = pool_config(targets, health_check={
        "path": "/healthz", "interval_s": 0.1, "timeout_s": 0.5, "healthy_threshold": 2,
        "unhealthy_threshold": 2})
    gw = await start_gateway(config)
    pool = gw.gateway.forwarder.upstreams["pool"]
    deadline = time.monotonic() + 5
    while pool.endpoints[1].available and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not pool.endpoints[1].available
    assert set(await names(client, f"{gw.url}/work", 10)) == {"a", "c"}
    b.health = 200
    while not pool.endpoints[1].available and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pool.endpoints[1].available
    assert "b" in await names(client, f"{gw.url}/work", 6)
    assert b.probes >= 4

    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("apigw_upstream_target_available",
                                      {"upstream": "pool",
                                       "target": b.url.removeprefix("http://")})
    assert value == 1.0
