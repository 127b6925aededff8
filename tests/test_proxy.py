"""The data plane through real sockets: a real aiohttp upstream on loopback, the gateway
in-process (or as a subprocess with 2 workers), a real client and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from apigw.redis_server import RedisServer, free_port
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.event import decode_batch
from proxy.server import seed_policies, start_listener
from proxy.settings import ProxySettings
from tests.processes import ManagedProcess, serve_process

STREAM = "apigw:events"
CHUNK = 64 * 1024
MB = 1024 * 1024


# --- a real upstream ------------------------------------------------------------------------

async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "path": request.raw_path,
                              "headers": list(request.headers.items()),
                              "body_len": len(body)},
                             headers={"X-Upstream": "yes"})


async def _resp_headers(request: web.Request) -> web.Response:
    response = web.Response(text="ok")
    response.headers["Connection"] = "X-Hop-Resp"
    response.headers["X-Hop-Resp"] = "1"
    response.headers["Keep-Alive"] = "timeout=5"
    response.headers["Proxy-Thing"] = "1"
    response.headers["X-Kept"] = "yes"
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    return response


async def _big(request: web.Request) -> web.StreamResponse:
    size = int(request.query["mb"]) * MB
    response = web.StreamResponse()
    response.content_length = size
    response.content_type = "application/octet-stream"
    await response.prepare(request)
    block = b"x" * CHUNK
    for _ in range(size // CHUNK):
        await response.write(block)
    await response.write_eof()
    return response


async def _truncated(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 4 * MB
    await response.prepare(request)
    for _ in range(4):
        await response.write(b"y" * CHUNK)
    assert request.transport is not None
    request.transport.close()  # dies mid-body
    return response


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b"one,", b"two,", b"three"):
        await response.write(part)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest(),
                              "chunked": "chunked" in request.headers.get("Transfer-Encoding",
                                                                          "")})


def pattern_blocks(size: int) -> Iterator[bytes]:
    """`size` bytes (a multiple of CHUNK) made on the fly: a fixed random block whose first 8
    bytes are the block's index, so lost, repeated or reordered blocks change the hash."""
    for index in range(size // CHUNK):
        yield index.to_bytes(8, "big") + _PATTERN_TAIL


_PATTERN_TAIL = os.urandom(CHUNK - 8)


async def _pattern(request: web.Request) -> web.StreamResponse:
    size = int(request.query["mb"]) * MB
    response = web.StreamResponse()
    response.content_length = size
    response.content_type = "application/octet-stream"
    await response.prepare(request)
    for block in pattern_blocks(size):
        await response.write(block)
    await response.write_eof()
    return response


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "2")))
    return web.Response(text="late")


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code, headers={"ETag": '"v1"'})
    return web.Response(status=code, text=f"status {code}")


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=1024 * MB)
    app.router.add_route("*", "/echo/{tail:.*}", _echo)
    app.router.add_route("*", "/orders/{id}", _echo)
    app.router.add_get("/resp-headers", _resp_headers)
    app.router.add_get("/big", _big)
    app.router.add_get("/pattern", _pattern)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/truncated", _truncated)
    app.router.add_post("/upload", _upload)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/status/{code}", _status)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- the gateway in-process -----------------------------------------------------------------

@dataclass
class Running:
    url: str
    gateway: Gateway
    redis: aioredis.Redis


def make_config(upstream: str, **overrides: Any) -> GatewayConfig:
    document: dict[str, Any] = {
        "version": 1,
        "upstreams": {"app": {"url": upstream, "timeouts": {"connect_s": 1, "read_s": 5,
                                                           "total_s": 10}},
                      "dead": {"url": f"http://127.0.0.1:{free_port()}"},
                      "impatient": {"url": upstream, "timeouts": {"connect_s": 1,
                                                                 "read_s": 0.3,
                                                                 "total_s": 5}}},
        "routes": [
            {"id": "order", "match": {"path": "/orders/{id}"}, "methods": ["GET"],
             "upstream": "app"},
            {"id": "echo", "match": {"prefix": "/echo"}, "upstream": "app"},
            {"id": "api", "match": {"prefix": "/api"}, "upstream": "app",
             "strip_prefix": True},
            {"id": "dead", "match": {"prefix": "/dead"}, "upstream": "dead"},
            {"id": "slow", "match": {"path": "/slow"}, "methods": ["GET"],
             "upstream": "impatient"},
            {"id": "upload", "match": {"path": "/upload"}, "methods": ["POST"],
             "upstream": "app"},
        ],
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2, "policies": []},
    }
    document.update(overrides)
    return GatewayConfig.model_validate(document)


GatewayFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(redis_url: str) -> AsyncIterator[GatewayFactory]:
    started: list[tuple[Gateway, web.ServerRunner, aioredis.Redis]] = []

    async def start(config: GatewayConfig, redis_url_override: str | None = None) -> Running:
        port = free_port()
        settings = ProxySettings(redis_url=redis_url_override or redis_url, instance="test-gw",
                                 listen=f"127.0.0.1:{port}", redis_timeout_s=0.2,
                                 shutdown_grace_s=2, events_stream=STREAM)
        redis = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5,
                                        socket_timeout=2)
        await seed_policies(config, settings, redis)  # as serve() does before the workers
        gateway = Gateway(config, settings, redis)
        await gateway.start()
        runner = await start_listener(gateway, settings.listen, shutdown_grace_s=2)
        started.append((gateway, runner, redis))
        return Running(f"http://127.0.0.1:{port}", gateway, redis)

    try:
        yield start
    finally:
        for gateway, runner, redis in reversed(started):
            await runner.cleanup()
            await gateway.stop(timeout_s=1.0)
            await redis.aclose()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     auto_decompress=False) as session:
        yield session


async def stream_entries(redis: aioredis.Redis) -> list[dict[bytes, bytes]]:
    entries: Any = await redis.xrange(STREAM)
    return [fields for _, fields in entries]


async def read_events(redis: aioredis.Redis, count: int, timeout: float = 10.0
                      ) -> list[dict[str, Any]]:
    """Every event in the stream, once at least `count` arrived (and a moment for extras)."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = [event for fields in await stream_entries(redis)
                  for event in decode_batch(fields[b"v"], fields[b"b"], fields.get(b"c"))]
        if len(events) >= count:
            await asyncio.sleep(0.2)
            return [event for fields in await stream_entries(redis)
                    for event in decode_batch(fields[b"v"], fields[b"b"], fields.get(b"c"))]
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(events)} of {count} events arrived")


def header_map(pairs: list[list[str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in pairs}


# --- pass-through ---------------------------------------------------------------------------

async def test_status_body_and_forwarding_headers(upstream: str, start_gateway: GatewayFactory,
                                                  client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    headers = {"Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "Keep-Alive": "300",
               "TE": "trailers", "Proxy-Authorization": "Basic Zm9vOmJhcg==",
               "X-Forwarded-For": "6.6.6.6", "X-Custom": "kept", "User-Agent": "test-agent/1"}
    async with client.get(f"{gw.url}/echo/a%20b?x=1&y=2", headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
        request_id = response.headers["X-Request-Id"]
        assert response.headers["X-Upstream"] == "yes"
        assert response.headers["Via"] == "1.1 apigw"
    assert seen["method"] == "GET"
    assert seen["path"] == "/echo/a%20b?x=1&y=2"
    upstream_headers = header_map(seen["headers"])
    for gone in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert gone not in upstream_headers, gone
    assert upstream_headers["x-custom"] == "kept"
    assert upstream_headers["user-agent"] == "test-agent/1"
    assert upstream_headers["x-forwarded-for"] == "127.0.0.1"  # the spoofed hop is dropped
    assert upstream_headers["x-forwarded-proto"] == "http"
    assert upstream_headers["x-forwarded-host"] == gw.url.removeprefix("http://")
    assert upstream_headers["forwarded"] == (
        f'for=127.0.0.1;proto=http;host="{gw.url.removeprefix("http://")}"')
    assert upstream_headers["host"] == upstream.removeprefix("http://")
    assert upstream_headers["via"] == "1.1 apigw"
    assert upstream_headers["x-request-id"] == request_id
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", upstream_headers["traceparent"])
    [event] = await read_events(gw.redis, 1)
    assert event["request_id"] == request_id
    assert event["route_id"] == "echo"
    assert event["http_route"] == "/echo/*"
    assert event["url_path"] == "/echo/a%20b"
    assert event["url_query"] == "x=1&y=2"
    assert event["client_address"] == "127.0.0.1"
    assert event["user_agent_original"] == "test-agent/1"
    assert event["upstream"] == upstream.removeprefix("http://")
    assert event["trace_id"] == upstream_headers["traceparent"][3:35]
    assert event["span_id"] == upstream_headers["traceparent"][36:52]
    assert event["gateway_instance"] == "test-gw"
    assert event["http_response_status_code"] == 200
    assert event["http_response_body_size"] > 0
    assert event["error_type"] == ""

    async with client.post(f"{gw.url}/echo/new", data=b'{"qty": 2}',
                           headers={"Content-Type": "application/json"}) as response:
        seen = await response.json()
    assert seen["method"] == "POST"
    assert seen["body_len"] == 10
    upstream_headers = header_map(seen["headers"])
    assert upstream_headers["content-length"] == "10"
    assert upstream_headers["content-type"] == "application/json"
    assert "transfer-encoding" not in upstream_headers


async def test_response_hop_by_hop_stripped(upstream: str, start_gateway: GatewayFactory,
                                            client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    async with client.get(f"{gw.url}/api/resp-headers") as response:
        assert response.status == 200
        assert await response.text() == "ok"
        for gone in ("X-Hop-Resp", "Keep-Alive", "Proxy-Thing"):
            assert gone not in response.headers, gone
        assert response.headers["X-Kept"] == "yes"
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_incoming_request_id_and_trace_are_continued(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"X-Request-Id": "req-abc.123", "traceparent": f"00-{trace_id}-{parent}-01",
               "tracestate": "vendor=1"}
    async with client.get(f"{gw.url}/orders/7", headers=headers) as response:
        assert response.headers["X-Request-Id"] == "req-abc.123"
    async with client.get(f"{gw.url}/echo/x", headers=headers) as response:
        seen = header_map((await response.json())["headers"])
    assert seen["x-request-id"] == "req-abc.123"
    assert seen["tracestate"] == "vendor=1"
    version, got_trace, span, flags = seen["traceparent"].split("-")
    assert (version, got_trace, flags) == ("00", trace_id, "01")
    assert span != parent
    # A malformed id or traceparent is replaced, not propagated.
    bad = {"X-Request-Id": "x" * 300, "traceparent": f"00-{'0' * 32}-{parent}-01"}
    async with client.get(f"{gw.url}/echo/x", headers=bad) as response:
        seen = header_map((await response.json())["headers"])
    assert seen["x-request-id"] != bad["X-Request-Id"]
    assert seen["traceparent"][3:35] != "0" * 32
    events = await read_events(gw.redis, 3)
    echo = [event for event in events if event["route_id"] == "echo"]
    assert echo[0]["trace_id"] == trace_id
    assert echo[0]["span_id"] == span


async def test_trusted_proxy_forwarded_for(upstream: str, start_gateway: GatewayFactory,
                                           client: aiohttp.ClientSession) -> None:
    config = make_config(upstream, identity={"trusted_proxies": ["127.0.0.0/8"],
                                             "client_id_header": "X-Client-Id"})
    gw = await start_gateway(config)
    headers = {"X-Forwarded-For": "203.0.113.9, 127.0.0.2", "X-Forwarded-Proto": "https",
               "X-Client-Id": "shop-7", "Forwarded": 'for=203.0.113.9;proto=https'}
    async with client.get(f"{gw.url}/echo/x", headers=headers) as response:
        seen = header_map((await response.json())["headers"])
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.2, 127.0.0.1"
    assert seen["forwarded"].startswith("for=203.0.113.9;proto=https, for=127.0.0.1;proto=http")
    assert seen["x-forwarded-proto"] == "https"
    [event] = await read_events(gw.redis, 1)
    assert event["client_address"] == "203.0.113.9"
    assert event["client_id"] == "shop-7"


async def test_head_204_304_and_chunked(upstream: str, start_gateway: GatewayFactory,
                                        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    async with client.get(f"{gw.url}/api/status/200") as response:
        body = await response.read()
    async with client.head(f"{gw.url}/api/status/200") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(body)
        assert await response.read() == b""
    for code in (204, 304):
        async with client.get(f"{gw.url}/api/status/{code}") as response:
            assert response.status == code
            assert response.headers["ETag"] == '"v1"'
            assert await response.read() == b""
    async with client.get(f"{gw.url}/api/chunked") as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert await response.read() == b"one,two,three"
    async with client.get(f"{gw.url}/api/status/503") as response:
        assert response.status == 503
        assert await response.text() == "status 503"


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_large_bodies_stream_without_buffering(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    size_mb = 50
    block = os.urandom(CHUNK)
    expected = hashlib.sha256()
    for _ in range(size_mb * MB // CHUNK):
        expected.update(block)
    before = _max_rss_mb()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size_mb * MB // CHUNK):
            yield block

    async with client.post(f"{gw.url}/upload", data=body()) as response:
        assert response.status == 200, await response.text()
        result = await response.json()
    assert result == {"size": size_mb * MB, "sha256": expected.hexdigest(), "chunked": True}
    received = 0
    async with client.get(f"{gw.url}/api/big?mb={size_mb}") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == size_mb * MB
        async for chunk in response.content.iter_chunked(CHUNK):
            received += len(chunk)
    assert received == size_mb * MB
    growth = _max_rss_mb() - before
    assert growth < 30, f"peak RSS grew {growth:.0f} MB while moving {size_mb} MB bodies"
    events = await read_events(gw.redis, 2)
    sizes = {event["route_id"]: event for event in events}
    assert sizes["upload"]["http_request_body_size"] == size_mb * MB
    assert sizes["api"]["http_response_body_size"] == size_mb * MB


def _proc_status_kb(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
async def test_200_mb_each_way_through_a_proxy_process_in_bounded_memory(
        upstream: str, redis_url: str, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """`apigw proxy` as its own process (one worker: the process serving is the one measured)
    moves a 200 MB upload and a 200 MB download at the same time; its peak RSS during the
    transfer stays within 64 MB of its RSS before it, and bytes and hashes match end to end.
    Nothing holds a whole body: both ends make and hash the bytes block by block."""
    from tests.processes import apigw_command

    size_mb, bound_mb = 200, 64
    size = size_mb * MB
    config = tmp_path / "stream.yaml"
    config.write_text(f"""
version: 1
upstreams:
  app: {{url: "{upstream}", timeouts: {{connect_s: 2, read_s: 30, total_s: 120}}}}
routes:
  - {{id: upload, match: {{path: /upload}}, methods: [POST], upstream: app}}
  - {{id: api, match: {{prefix: /api}}, upstream: app, strip_prefix: true}}
events: {{flush_interval_ms: 50}}
""")
    port, admin = free_port(), free_port()
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_EVENTS_STREAM": STREAM,
           "APIGW_LOG_LEVEL": "warning"}
    process = ManagedProcess("proxy", apigw_command(
        "proxy", "--config", str(config), "--listen", f"127.0.0.1:{port}",
        "--admin", f"127.0.0.1:{admin}", "--workers", "1"), env, tmp_path)
    try:
        await asyncio.to_thread(process.wait_http, f"http://127.0.0.1:{admin}/readyz", 60)
        gateway = f"http://127.0.0.1:{port}"
        expected = hashlib.sha256()
        for block in pattern_blocks(size):
            expected.update(block)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                         auto_decompress=False) as session:
            for _ in range(3):  # warm up: pools, code paths, allocator arenas
                async with session.post(f"{gateway}/upload", data=b"w" * CHUNK) as response:
                    assert response.status == 200
                async with session.get(f"{gateway}/api/pattern?mb=1") as response:
                    assert len(await response.read()) == MB
            pid = process.process.pid
            before_kb = _proc_status_kb(pid, "VmRSS")

            async def upload() -> dict[str, Any]:
                async def body() -> AsyncIterator[bytes]:
                    for block in pattern_blocks(size):
                        yield block

                async with session.post(f"{gateway}/upload", data=body(),
                                        headers={"Content-Length": str(size)}) as response:
                    assert response.status == 200, await response.text()
                    result: dict[str, Any] = await response.json()
                    return result

            async def download() -> tuple[int, str]:
                digest, received = hashlib.sha256(), 0
                async with session.get(f"{gateway}/api/pattern?mb={size_mb}") as response:
                    assert response.status == 200
                    assert int(response.headers["Content-Length"]) == size
                    async for chunk in response.content.iter_chunked(CHUNK):
                        digest.update(chunk)
                        received += len(chunk)
                return received, digest.hexdigest()

            started = time.monotonic()
            uploaded, downloaded = await asyncio.gather(upload(), download())
            elapsed = time.monotonic() - started
        peak_kb = _proc_status_kb(pid, "VmHWM")
        assert uploaded == {"size": size, "sha256": expected.hexdigest(), "chunked": False}
        assert downloaded == (size, expected.hexdigest())
        growth_mb = (peak_kb - before_kb) / 1024
        print(f"200 MB each way in {elapsed:.1f}s; proxy RSS before {before_kb / 1024:.0f} MB, "
              f"peak {peak_kb / 1024:.0f} MB (+{growth_mb:.0f} MB)")
        assert growth_mb < bound_mb, (
            f"proxy peak RSS grew {growth_mb:.0f} MB while moving {size_mb} MB each way")
        events = [e for e in await read_events(redis_client, 8) if e["url_path"] in (
            "/upload", "/api/pattern") and e["http_response_status_code"] == 200]
        big = {e["route_id"]: e for e in events
               if max(e["http_request_body_size"], e["http_response_body_size"]) == size}
        assert big["upload"]["http_request_body_size"] == size
        assert big["api"]["http_response_body_size"] == size
    finally:
        process.stop()
    assert "Traceback" not in process.log(), process.log()[-3000:]


# --- errors -----------------------------------------------------------------------------------

async def test_unroutable_404_and_405_and_bad_path(upstream: str, start_gateway: GatewayFactory,
                                                   client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    async with client.get(f"{gw.url}/nowhere") as response:
        assert response.status == 404
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = await response.json(content_type=None)
        assert problem["status"] == 404
        assert problem["type"] == "urn:apigw:problem:route-not-found"
        assert problem["title"]
        assert problem["instance"] == response.headers["X-Request-Id"]
    async with client.post(f"{gw.url}/orders/1") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert (await response.json(content_type=None))["status"] == 405
    async with client.get(f"{gw.url}/echo/a%2Fb") as response:
        assert response.status == 400
        assert "encoded slash" in (await response.json(content_type=None))["detail"]
    async with client.get(f"{gw.url}/x/../echo/./y") as response:  # normalised, then routed
        assert response.status == 200
        assert (await response.json())["path"] == "/echo/y"
    events = await read_events(gw.redis, 4)
    by_status = {event["http_response_status_code"]: event for event in events}
    assert by_status[404]["route_id"] == ""
    assert by_status[404]["url_path"] == "/nowhere"
    assert by_status[404]["client_address"] == "127.0.0.1"
    assert by_status[405]["http_request_method"] == "POST"
    assert by_status[200]["url_path"] == "/echo/y"


async def test_closed_port_502_and_slow_upstream_504(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    async with client.get(f"{gw.url}/dead/x") as response:
        assert response.status == 502
        problem = await response.json(content_type=None)
        assert problem["type"] == "urn:apigw:problem:upstream-unreachable"
    started = time.monotonic()
    async with client.get(f"{gw.url}/slow?s=3") as response:
        assert response.status == 504
        assert (await response.json(content_type=None))["status"] == 504
    assert time.monotonic() - started < 2.0
    events = await read_events(gw.redis, 2)
    errors = {event["route_id"]: event for event in events}
    assert errors["dead"]["error_type"] == "upstream_connect_error"
    assert errors["dead"]["http_response_status_code"] == 502
    assert errors["slow"]["error_type"] == "upstream_timeout"
    assert errors["slow"]["http_response_status_code"] == 504


async def test_client_disconnect_still_one_event(upstream: str, start_gateway: GatewayFactory,
                                                 client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.1):
            await client.get(f"{gw.url}/api/slow?s=0.5")
    [event] = await read_events(gw.redis, 1, timeout=5)
    assert event["http_response_status_code"] == 499
    assert event["error_type"] == "client_disconnect"


async def test_failures_mid_body(upstream: str, start_gateway: GatewayFactory,
                                 client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(make_config(upstream))
    # The upstream dies mid-body: the client must see a truncated response, not a short one.
    async with client.get(f"{gw.url}/api/truncated") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    # The client goes away mid-download.
    async with client.get(f"{gw.url}/api/big?mb=20") as response:
        await response.content.readexactly(CHUNK)
        response.close()
    events = await read_events(gw.redis, 2)
    by_path = {event["url_path"]: event for event in events}
    truncated = by_path["/api/truncated"]
    assert truncated["error_type"] == "upstream_reset"
    assert 0 < truncated["http_response_body_size"] < 4 * MB
    gone = by_path["/api/big"]
    assert gone["error_type"] == "client_disconnect"
    assert gone["http_response_status_code"] == 499
    assert gone["http_response_body_size"] < 20 * MB


# --- events -----------------------------------------------------------------------------------

async def test_every_request_one_event_without_secrets(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    policy = {"id": "tight", "route_id": "order", "key_by": "client_id", "limit": 1,
              "window_s": 60}
    gw = await start_gateway(make_config(upstream, ratelimit={"policies": [policy]}))
    secret_headers = {"Authorization": "Bearer top-secret-token-123",
                      "Cookie": "session=cookie-secret-456", "X-Client-Id": "tester"}
    urls = [f"{gw.url}/echo/a?token=query-secret-789&page=2&API_KEY=query-secret-000",
            f"{gw.url}/nowhere", f"{gw.url}/dead/x", f"{gw.url}/orders/1", f"{gw.url}/orders/2",
            f"{gw.url}/echo/b", f"{gw.url}/echo/a%2Fb"]
    sent: dict[str, int] = {}
    for index, url in enumerate(urls):
        request_id = f"req-{index}"
        async with client.get(url, headers={**secret_headers, "X-Request-Id": request_id}
                              ) as response:
            await response.read()
            sent[request_id] = response.status
    async with client.delete(f"{gw.url}/orders/3", headers={"X-Request-Id": "req-del"}) as r:
        sent["req-del"] = r.status
    assert sorted(sent.values()) == [200, 200, 200, 400, 404, 405, 429, 502], str(sent)
    events = await read_events(gw.redis, len(sent))
    assert sorted(event["request_id"] for event in events) == sorted(sent)
    for event in events:
        assert event["http_response_status_code"] == sent[event["request_id"]]
        assert event["duration_ms"] > 0
    first = next(event for event in events if event["request_id"] == "req-0")
    assert first["url_query"] == "token=REDACTED&page=2&API_KEY=REDACTED"
    limited = next(event for event in events if event["request_id"] == "req-4")
    assert limited["ratelimit_outcome"] == "limited"
    assert limited["ratelimit_policy_id"] == "tight"
    raw = b"".join(fields[b"b"] for fields in await stream_entries(gw.redis))
    for secret in (b"top-secret-token-123", b"cookie-secret-456", b"query-secret-789",
                   b"query-secret-000", b"Authorization", b"session="):
        assert secret not in raw, secret


# --- rate limiting ----------------------------------------------------------------------------

async def test_enforce_429_with_headers_per_client(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    policy = {"id": "per-client", "key_by": "client_id", "limit": 3, "window_s": 60}
    gw = await start_gateway(make_config(upstream, ratelimit={"policies": [policy]}))
    statuses = []
    for _ in range(4):
        async with client.get(f"{gw.url}/orders/1", headers={"X-Client-Id": "greedy"}) as r:
            statuses.append(r.status)
            if r.status == 200:
                assert r.headers["RateLimit-Policy"] == '"per-client";q=3;w=60'
            last = r
            body = await r.read()
    assert statuses == [200, 200, 200, 429]
    assert 1 <= int(last.headers["Retry-After"]) <= 20
    assert last.headers["RateLimit-Policy"] == '"per-client";q=3;w=60'
    assert re.fullmatch(r'"per-client";r=0;t=\d+', last.headers["RateLimit"])
    assert last.headers["Content-Type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["status"] == 429
    assert problem["instance"] == last.headers["X-Request-Id"]
    async with client.get(f"{gw.url}/orders/1", headers={"X-Client-Id": "polite"}) as r:
        assert r.status == 200


async def test_shadow_never_rejects(upstream: str, start_gateway: GatewayFactory,
                                    client: aiohttp.ClientSession) -> None:
    policy = {"id": "watch", "key_by": "ip", "limit": 1, "window_s": 60, "mode": "shadow"}
    gw = await start_gateway(make_config(upstream, ratelimit={"policies": [policy]}))
    for _ in range(5):
        async with client.get(f"{gw.url}/orders/1") as response:
            assert response.status == 200
            assert "RateLimit" not in response.headers
    events = await read_events(gw.redis, 5)
    outcomes = sorted(event["ratelimit_outcome"] for event in events)
    assert outcomes == ["allowed"] + ["shadow_limited"] * 4
    assert {event["ratelimit_mode"] for event in events} == {"shadow"}


async def test_redis_down_requests_keep_flowing(upstream: str, start_gateway: GatewayFactory,
                                                client: aiohttp.ClientSession,
                                                tmp_path: Path) -> None:
    own = RedisServer(tmp_path / "redis").start()
    try:
        policy = {"id": "per-client", "key_by": "client_id", "limit": 1000, "window_s": 60}
        gw = await start_gateway(make_config(upstream, ratelimit={"policies": [policy]}),
                                 redis_url_override=own.url)
        async with client.get(f"{gw.url}/orders/1") as response:
            assert response.status == 200
        own.stop()
        started = time.monotonic()
        for n in range(20):
            async with client.get(f"{gw.url}/orders/{n}") as response:
                assert response.status == 200
        assert time.monotonic() - started < 5.0
        ready, detail = await gw.gateway.readiness()
        assert ready  # fail-open: still serving
        assert detail["redis"]["reachable"] is False
        assert detail["status"] == "degraded"
        emitter = gw.gateway.emitter
        assert emitter is not None
        assert emitter.stats["emitted"] == 21
    finally:
        own.stop()


async def test_fail_closed_gives_503(upstream: str, start_gateway: GatewayFactory,
                                     client: aiohttp.ClientSession) -> None:
    policy = {"id": "strict", "key_by": "client_id", "limit": 1000, "window_s": 60}
    config = make_config(upstream, ratelimit={"policies": [policy], "fail_mode": "closed"})
    gw = await start_gateway(config, redis_url_override=f"redis://127.0.0.1:{free_port()}/0")
    async with client.get(f"{gw.url}/orders/1") as response:
        assert response.status == 503
        problem = await response.json(content_type=None)
        assert problem["type"] == "urn:apigw:problem:rate-limit-unavailable"
    async with client.get(f"{gw.url}/nowhere") as response:  # no policy involved: unaffected
        assert response.status == 404


async def test_admin_endpoints(upstream: str, start_gateway: GatewayFactory,
                               client: aiohttp.ClientSession) -> None:
    from prometheus_client import REGISTRY

    from proxy.admin import build_admin_app, config_document

    secret_upstream = upstream.replace("http://", "http://svc:hunter2@")
    config = make_config(upstream)
    config.upstreams["app"].url = secret_upstream
    gw = await start_gateway(config)
    async with client.get(f"{gw.url}/orders/5") as response:
        assert response.status == 200
    app = build_admin_app(gw.gateway.readiness, lambda: config_document(config), REGISTRY)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    admin = f"http://127.0.0.1:{port}"
    try:
        async with client.get(f"{admin}/healthz") as response:
            assert response.status == 200
        async with client.get(f"{admin}/readyz") as response:
            assert response.status == 200
            detail = await response.json()
            assert detail["redis"]["reachable"] is True
            assert detail["policies"]["healthy"] is True
            assert "buffered" in detail["events"]
        async with client.get(f"{admin}/metrics") as response:
            text = await response.text()
            assert 'apigw_http_server_request_duration_seconds_bucket{' in text
            assert 'route_id="order"' in text
            assert "apigw_http_server_active_requests" in text
        async with client.get(f"{admin}/config") as response:
            raw = await response.text()
            assert "hunter2" not in raw
            assert "REDACTED" in raw
            assert (await response.json())["version"] == gw.gateway.version
        gw.gateway.stopping = True  # draining: not ready any more
        async with client.get(f"{admin}/readyz") as response:
            assert response.status == 503
    finally:
        await runner.cleanup()


# --- serve() as real processes ----------------------------------------------------------------

def _write_config(path: Path, upstream: str) -> None:
    path.write_text(f"""
version: 1
upstreams:
  app: {{url: "{upstream}"}}
routes:
  - id: echo
    match: {{prefix: /echo}}
    upstream: app
  - id: slow
    match: {{path: /slow}}
    upstream: app
events: {{flush_interval_ms: 50}}
ratelimit:
  policies:
    - {{id: default-per-client, key_by: client_id, limit: 10000, window_s: 60}}
""")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_serve_two_workers_and_sigterm(upstream: str, redis_url: str,
                                             redis_client: aioredis.Redis,
                                             tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    _write_config(config, upstream)
    port, admin = free_port(), free_port()
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_LISTEN": f"127.0.0.1:{port}",
           "APIGW_ADMIN_LISTEN": f"127.0.0.1:{admin}", "APIGW_WORKERS": "2",
           "APIGW_SHUTDOWN_GRACE_S": "3", "APIGW_EVENTS_STREAM": STREAM}
    process = serve_process(config, env, tmp_path)
    try:
        await asyncio.to_thread(process.wait_http, f"http://127.0.0.1:{admin}/readyz", 60)
        for n in range(20):
            status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/echo/{n}")
            assert status == 200
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin}/readyz")
        detail = orjson.loads(body)
        assert detail["workers"]["alive"] == 2
        # Workers hand their counts over every APIGW_METRICS_FLUSH_S (1 s): poll a little.
        counted, deadline = 0, time.monotonic() + 10
        while counted < 20 and time.monotonic() < deadline:
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin}/metrics")
            count = re.search(rb'apigw_http_server_request_duration_seconds_count\{'
                              rb'http_request_method="GET",route_id="echo",status_class="2xx"\} '
                              rb'(\d+)', body)
            counted = int(count.group(1)) if count is not None else 0
            if counted < 20:
                await asyncio.sleep(0.2)
        assert counted == 20, body[:2000]
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin}/config")
        assert orjson.loads(body)["config"]["routes"][0]["id"] == "echo"

        events = await read_events(redis_client, 20)
        assert len(events) == 20

        # A worker that dies is replaced.
        os.kill(detail["workers"]["pids"][0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin}/readyz")
            workers = orjson.loads(body)["workers"]
            if status == 200 and workers["restarts"] == 1:
                break
            await asyncio.sleep(0.2)
        assert workers["restarts"] == 1, workers
        assert workers["ready"] == 2, workers

        # SIGTERM to the parent only (by its own pid): an in-flight request still completes.
        in_flight = asyncio.create_task(
            asyncio.to_thread(_get, f"http://127.0.0.1:{port}/slow?s=1"))
        await asyncio.sleep(0.3)
        process.process.send_signal(signal.SIGTERM)
        assert await in_flight == (200, b"late")
        exit_code = await asyncio.to_thread(process.process.wait, 30)
        assert exit_code == 0, process.log()[-3000:]
        assert "Traceback" not in process.log(), process.log()[-3000:]
    finally:
        process.stop()


def test_serve_rejects_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("version: 1\nupstreams: {}\nroutes: []\n")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from proxy.server import serve; from proxy.settings import ProxySettings; "
         f"sys.exit(serve(Path({str(config)!r}), ProxySettings()))"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "routes" in result.stderr
    assert "Traceback" not in result.stderr
