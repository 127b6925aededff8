"""Proxying edge cases through real sockets: per-route limits (413/414/431), Expect:
100-continue refused before the body is sent, and malformed HTTP (request smuggling shapes)
rejected by the parser with 400, the connection closed, never forwarded, recorded as events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from apigw.redis_server import free_port
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.limits import RouteLimits
from proxy.reload import LiveGateway
from proxy.server import start_listener
from proxy.settings import ProxySettings
from tests import test_proxy as _proxy_tests
from tests.test_proxy import STREAM, GatewayFactory, make_config, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture
upstream = _proxy_tests.upstream  # fixture


LIMITS: dict[str, int] = {"max_url_bytes": 64, "max_header_bytes": 2048, "max_body_bytes": 1000}


def limited(upstream: str) -> GatewayConfig:
    config = make_config(upstream)
    for route in config.routes:
        if route.id == "echo":
            route.limits = RouteLimits(**LIMITS)
    return config


async def test_route_limits(upstream: str, start_gateway: GatewayFactory,
                            client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(limited(upstream))
    async with client.post(f"{gw.url}/echo/a", data=b"x" * 1000) as response:
        assert response.status == 200
    async with client.post(f"{gw.url}/echo/a", data=b"x" * 1001) as response:
        assert response.status == 413
        assert (await response.json(content_type=None))["type"] == \
            "urn:apigw:problem:payload-too-large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    async with client.post(f"{gw.url}/echo/a", data=chunks()) as response:
        assert response.status == 413
    async with client.get(f"{gw.url}/echo/{'a' * 80}") as response:
        assert response.status == 414
    async with client.get(f"{gw.url}/echo/a", headers={"X-Big": "z" * 3000}) as response:
        assert response.status == 431
    async with client.get(f"{gw.url}/api/{'a' * 80}") as response:  # other route: no limits
        assert response.status == 404 or response.status == 200
    events = await read_events(gw.redis, 6)
    errors = sorted(event["error_type"] for event in events if event["error_type"])
    assert errors == ["headers_too_large", "payload_too_large", "payload_too_large",
                      "uri_too_long"]


async def _raw(port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while True:
                data = await reader.read(65536)
                if not data:  # closed by the gateway
                    break
                chunks.append(data)
                if b"HTTP/1.1 100" in data and b"\r\n\r\n" in data and len(chunks) == 1 \
                        and data.count(b"HTTP/1.1") == 1 and b" 100 " in data[:20]:
                    break
        return b"".join(chunks)
    finally:
        writer.close()


async def test_expect_100_continue(upstream: str,
                                   start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(limited(upstream))
    port = int(gw.url.rsplit(":", 1)[1])
    # Too large: 413 straight away, no 100 Continue, connection closed.
    answer = await _raw(port, b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                              b"Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert b"100 Continue" not in answer
    # Acceptable: 100 Continue first, then the body goes through.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(3):
            first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        await writer.drain()
        async with asyncio.timeout(3):
            rest = await reader.read()
        assert rest.startswith(b"HTTP/1.1 200")
        assert b'"body_len":5' in rest or b'"body_len": 5' in rest
    finally:
        writer.close()


@pytest.fixture
async def live_url(upstream: str, redis_url: str) -> AsyncIterator[tuple[int, aioredis.Redis]]:
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, instance="smuggle-test",
                             listen=f"127.0.0.1:{port}", events_stream=STREAM)
    redis = aioredis.Redis.from_url(redis_url)
    gateway = Gateway(make_config(upstream), settings, redis)
    await gateway.start()
    live = LiveGateway(gateway, settings, redis)
    runner = await start_listener(live, settings.listen, shutdown_grace_s=1)
    try:
        yield port, redis
    finally:
        await runner.cleanup()
        await live.stop(timeout_s=1)
        await redis.aclose()


SMUGGLING = [
    b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n",
    b"G(T /echo/a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET echo/a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
]


async def test_malformed_requests_rejected_closed_and_recorded(
        live_url: tuple[int, aioredis.Redis]) -> None:
    port, redis = live_url
    expected = [b"400"] * (len(SMUGGLING) - 1) + [b"431"]  # the overlong header field
    for payload, status in zip(SMUGGLING, expected, strict=True):
        answer = await _raw(port, payload)
        assert answer.split(b" ", 2)[1] == status, (payload[:60], answer[:200])
    events = await read_events(redis, len(SMUGGLING))
    assert len(events) == len(SMUGGLING)
    assert sorted(event["http_response_status_code"] for event in events) == \
        [400] * (len(SMUGGLING) - 1) + [431]
    assert all(event["route_id"] == "" and event["upstream"] == "" for event in events)
    kinds = {event["error_type"] for event in events}
    assert "invalid_method" in kinds
    assert "headers_too_large" in kinds
    assert all(kind for kind in kinds)
