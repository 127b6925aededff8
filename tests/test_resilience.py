"""Resilience through real sockets: retries only where allowed, backoff and the retry budget,
the circuit breaker opening and recovering, max in-flight per route, per-route timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from apigw.redis_server import free_port
from proxy.config import GatewayConfig
from proxy.resilience import CircuitBreaker, CircuitBreakerConfig, Retry, RetryPolicy
from tests import test_proxy as _proxy_tests
from tests.http_servers import serving
from tests.test_proxy import GatewayFactory, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture



@dataclass
class Flaky:
    url: str = ""
    fail_next: int = 0  # answer 503 this many times, then 200
    status: int = 503
    hits: int = 0
    delay_s: float = 0.0


@pytest.fixture
async def flaky() -> AsyncIterator[Flaky]:
    state = Flaky()

    async def handler(request: web.Request) -> web.Response:
        state.hits += 1
        await request.read()
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.fail_next > 0:
            state.fail_next -= 1
            return web.Response(status=state.status, text="failing")
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app) as state.url:
        yield state


def config(upstream: dict[str, Any], **route: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "upstreams": {"svc": {"timeouts": {"connect_s": 1, "read_s": 5, "total_s": 10},
                              **upstream}},
        "routes": [{"id": "svc", "match": {"prefix": "/"}, "upstream": "svc", **route}],
        "events": {"flush_interval_ms": 20}})


FAST_RETRY = {"attempts": 2, "backoff_base_ms": 1, "backoff_max_ms": 5,
              "min_retries_per_s": 100}


def metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_idempotent_get_is_retried_post_is_not(
        flaky: Flaky, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(config({"url": flaky.url}, retry=FAST_RETRY))
    flaky.fail_next = 2
    async with client.get(f"{gw.url}/x") as response:
        assert response.status == 200
        assert await response.text() == "fine"
    assert flaky.hits == 3
    flaky.fail_next, flaky.hits = 1, 0
    async with client.post(f"{gw.url}/x", data=b"order") as response:
        assert response.status == 503  # the upstream's answer, passed through
    assert flaky.hits == 1
    flaky.fail_next, flaky.hits = 5, 0
    async with client.put(f"{gw.url}/x", data=b"state") as response:  # idempotent, body held
        assert response.status == 503
    assert flaky.hits == 3  # first try + 2 retries
    events = await read_events(gw.redis, 3)
    retries = {event["http_request_method"]: event["retries"] for event in events}
    assert retries == {"GET": 2, "POST": 0, "PUT": 2}


async def test_connect_failure_is_retried_even_for_post(
        flaky: Flaky, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    upstream = {"targets": [{"url": dead}, {"url": flaky.url}]}
    gw = await start_gateway(config(upstream, retry=FAST_RETRY))
    for _ in range(4):  # round-robin: each first try lands on the dead target
        async with client.post(f"{gw.url}/x", data=b"x" * 200_000) as response:  # streamed
            assert response.status == 200
    assert flaky.hits == 4
    events = await read_events(gw.redis, 4)
    assert [event["retries"] for event in events] == [1, 1, 1, 1]
    assert all(event["error_type"] == "" for event in events)


async def test_retry_budget_limits_retries(
        flaky: Flaky, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    retry = {**FAST_RETRY, "budget_percent": 0, "min_retries_per_s": 0}
    gw = await start_gateway(config({"url": flaky.url}, retry=retry))
    flaky.fail_next = 1
    before = metric("apigw_upstream_retries_total",
                    {"route_id": "svc", "decision": "budget_exhausted"})
    async with client.get(f"{gw.url}/x") as response:
        assert response.status == 503
    assert flaky.hits == 1
    assert metric("apigw_upstream_retries_total",
                  {"route_id": "svc", "decision": "budget_exhausted"}) == before + 1


def test_retry_policy_rules_and_backoff() -> None:
    policy = RetryPolicy(Retry(retry_on=["connect-failure", "gateway-error"],
                               backoff_base_ms=100, backoff_max_ms=300))
    assert policy.allows("POST", "connect-failure", replayable=False)
    assert not policy.allows("POST", "gateway-error", replayable=True)
    assert not policy.allows("GET", "gateway-error", replayable=False)
    assert policy.allows("GET", "gateway-error", replayable=True)
    assert not policy.allows("GET", "timeout", replayable=True)  # not listed
    delays = [policy.backoff_s(n) for n in range(6) for _ in range(50)]
    assert all(0 <= delay <= 0.3 for delay in delays)
    assert max(policy.backoff_s(0) for _ in range(200)) <= 0.1
    # budget: 10% of requests + 0 per second
    budget = RetryPolicy(Retry(budget_percent=10, min_retries_per_s=0))
    assert not budget.withdraw()
    for _ in range(20):
        budget.deposit()
    assert budget.withdraw()
    assert budget.withdraw()
    assert not budget.withdraw()


def test_circuit_breaker_states() -> None:
    breaker = CircuitBreaker("unit", CircuitBreakerConfig(failure_threshold=2, open_s=0.05,
                                                          half_open_requests=1))
    breaker.record(False)
    assert breaker.state == "closed"
    breaker.record(False)
    assert breaker.state == "open"
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()
    assert breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.record(False)
    assert breaker.state == "open"
    time.sleep(0.06)
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed"


async def test_circuit_opens_fails_fast_and_recovers(
        flaky: Flaky, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    breaker = {"failure_threshold": 3, "open_s": 0.5, "half_open_requests": 1}
    gw = await start_gateway(config({"url": flaky.url, "circuit_breaker": breaker}))
    flaky.fail_next = 100
    statuses = []
    for _ in range(6):
        async with client.get(f"{gw.url}/x") as response:
            statuses.append(response.status)
            if len(statuses) == 4:
                assert response.headers["Retry-After"] == "1"
                assert (await response.json(content_type=None))["type"] == \
                    "urn:apigw:problem:circuit-open"
    assert statuses == [503] * 6
    assert flaky.hits == 3  # the last three never reached the upstream
    assert metric("apigw_circuit_state", {"upstream": "svc"}) == 2
    flaky.fail_next = 0
    await asyncio.sleep(0.55)
    async with client.get(f"{gw.url}/x") as response:  # the half-open probe
        assert response.status == 200
    assert metric("apigw_circuit_state", {"upstream": "svc"}) == 0
    async with client.get(f"{gw.url}/x") as response:
        assert response.status == 200
    events = await read_events(gw.redis, 8)
    assert [event["error_type"] for event in events].count("circuit_open") == 3


async def test_max_in_flight_rejects_fast_with_retry_after(
        flaky: Flaky, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(config({"url": flaky.url}, max_in_flight=2))
    flaky.delay_s = 0.5

    async def get() -> int:
        async with client.get(f"{gw.url}/x") as response:
            await response.read()
            return response.status

    slow = [asyncio.create_task(get()) for _ in range(2)]
    await asyncio.sleep(0.15)
    started = time.monotonic()
    async with client.get(f"{gw.url}/x") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 0.3
    assert await asyncio.gather(*slow) == [200, 200]
    flaky.delay_s = 0
    async with client.get(f"{gw.url}/x") as response:
        assert response.status == 200
    events = await read_events(gw.redis, 4)
    assert [event["error_type"] for event in events].count("route_overloaded") == 1


async def test_route_timeout_overrides_upstream(
        flaky: Flaky, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(config({"url": flaky.url}, timeouts={"read_s": 0.2}))
    flaky.delay_s = 1.0
    started = time.monotonic()
    async with client.get(f"{gw.url}/x") as response:
        assert response.status == 504
    assert time.monotonic() - started < 0.8
    [event] = await read_events(gw.redis, 1)
    assert event["error_type"] == "upstream_timeout"
