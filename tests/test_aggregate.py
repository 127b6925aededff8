"""Aggregation routes through real sockets: backends called concurrently, merged keyed or
flat, one backend down, one too slow, allow_partial both ways, the event's error_type."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from apigw.redis_server import free_port
from proxy.config import ConfigError, GatewayConfig, parse_config
from tests import test_proxy as _proxy_tests
from tests.test_proxy import GatewayFactory, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture


@pytest.fixture
async def backends() -> AsyncIterator[str]:
    async def user(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"id": int(request.match_info["id"]),
                                               "name": "ann"}),
                            content_type="application/json")

    async def orders(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"orders": [1, 2],
                                               "for": request.match_info["id"]}),
                            content_type="application/json")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_get("/users/{id}", user)
    app.router.add_get("/orders/by-user/{id}", orders)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def aggregate_config(url: str, backends: list[dict[str, Any]], **extra: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"app": {"url": url}, "dead": {"url": f"http://127.0.0.1:{free_port()}"}},
        "routes": [{"id": "profile", "match": {"path": "/profile/{id}"}, "methods": ["GET"],
                    "upstream": "app", "aggregate": {"backends": backends, **extra}}],
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2, "policies": []},
    })


USER = {"name": "user", "path": "/users/{id}"}
ORDERS = {"name": "orders", "path": "/orders/by-user/{id}"}
DOWN = {"name": "billing", "upstream": "dead", "path": "/bills/{id}"}
SLOW = {"name": "recs", "path": "/slow", "timeout_s": 0.3}


async def test_merged_keyed_and_flat(backends: str, start_gateway: GatewayFactory,
                                     client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(aggregate_config(backends, [USER, ORDERS]))
    async with client.get(f"{gw.url}/profile/7") as response:
        assert response.status == 200
        assert await response.json() == {"user": {"id": 7, "name": "ann"},
                                         "orders": {"orders": [1, 2], "for": "7"}}
    flat = await start_gateway(aggregate_config(backends, [USER, ORDERS], merge="flat"))
    async with client.get(f"{flat.url}/profile/8") as response:
        assert await response.json() == {"id": 8, "name": "ann", "orders": [1, 2],
                                         "for": "8"}
    event = (await read_events(gw.redis, 2))[0]
    assert event["error_type"] == ""
    assert event["http_response_status_code"] == 200


async def test_one_backend_down_and_one_slow_partial(backends: str,
                                                    start_gateway: GatewayFactory,
                                                    client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(aggregate_config(backends, [USER, DOWN, SLOW]))
    started = time.monotonic()
    async with client.get(f"{gw.url}/profile/3") as response:
        assert response.status == 200
        document = await response.json()
    assert time.monotonic() - started < 1.5  # concurrent, bounded by the 0.3 s timeout
    assert document == {"user": {"id": 3, "name": "ann"},
                        "_errors": {"billing": "connect_error", "recs": "timeout"}}
    event = (await read_events(gw.redis, 1))[0]
    assert event["error_type"] == "aggregate_partial"
    assert event["http_response_status_code"] == 200


async def test_partial_not_allowed(backends: str, start_gateway: GatewayFactory,
                                   client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(aggregate_config(backends, [USER, SLOW], allow_partial=False))
    async with client.get(f"{gw.url}/profile/3") as response:
        assert response.status == 504
        problem = await response.json()
    assert problem["errors"] == {"recs": "timeout"}
    down = await start_gateway(aggregate_config(backends, [USER, DOWN], allow_partial=False))
    async with client.get(f"{down.url}/profile/3") as response:
        assert response.status == 502
        assert (await response.json())["errors"] == {"billing": "connect_error"}
    events = await read_events(gw.redis, 2)
    assert {event["error_type"] for event in events} == {"upstream_timeout",
                                                         "upstream_connect_error"}


def test_config_references_are_checked() -> None:
    text = """
version: 1
upstreams: {app: {url: "http://127.0.0.1:1"}}
routes:
  - id: r
    match: {path: "/p/{id}"}
    upstream: app
    aggregate: {backends: [{name: a, upstream: nowhere, path: "/x/{id}"}]}
"""
    with pytest.raises(ConfigError, match="nowhere"):
        parse_config(text)
    with pytest.raises(ConfigError, match="other"):
        parse_config(text.replace("nowhere", "app").replace("/x/{id}", "/x/{other}"))
