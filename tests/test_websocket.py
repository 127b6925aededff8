"""WebSocket sessions through the gateway: a real aiohttp echo upstream, a real client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from apigw.redis_server import free_port
from tests import test_proxy as _proxy_tests
from tests.test_proxy import (
    GatewayFactory,
    make_config,
    read_events,
)

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture


class Upstream:
    def __init__(self) -> None:
        self.closes: list[int | None] = []
        self.headers: list[dict[str, str]] = []
        self.closed = asyncio.Event()
        self.failing_hits = 0


STATE = web.AppKey("state", Upstream)


async def _echo(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    state.headers.append(dict(request.headers))
    ws = web.WebSocketResponse(protocols=("chat",))
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            if message.data == "close-me":
                await ws.close(code=4001, message=b"bye")
                break
            if message.data == "vanish":
                assert request.transport is not None
                request.transport.close()
                break
            await ws.send_str(f"echo:{message.data}")
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    state.closes.append(ws.close_code)
    state.closed.set()
    return ws


async def _not_websocket(request: web.Request) -> web.Response:
    return web.Response(status=404)


async def _failing(request: web.Request) -> web.Response:
    request.app[STATE].failing_hits += 1
    return web.Response(status=503, text="overloaded")


@pytest.fixture
async def ws_upstream() -> AsyncIterator[tuple[str, Upstream]]:
    app = web.Application()
    state = Upstream()
    app[STATE] = state
    app.router.add_get("/echo/ws", _echo)
    app.router.add_get("/echo/plain", _not_websocket)
    app.router.add_get("/echo/failing", _failing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


def ws_config(url: str, **upstream: Any) -> Any:
    config = make_config(url)
    config.upstreams["app"] = config.upstreams["app"].model_copy(update=upstream)
    return config


async def test_messages_round_trip_and_client_close_propagates(
        ws_upstream: tuple[str, Upstream], start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    url, state = ws_upstream
    # total_s 1: a session outlives the upstream's request timeouts
    config = ws_config(url, timeouts=config_timeouts(total_s=1.0, read_s=0.5))
    gw = await start_gateway(config)
    started = time.monotonic()
    async with client.ws_connect(f"{gw.url.replace('http', 'ws')}/echo/ws?x=1",
                                 protocols=("chat", "other")) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
        await asyncio.sleep(1.2)
        await ws.send_str("still here")
        assert await ws.receive_str(timeout=5) == "echo:still here"
        await ws.close(code=4000, message=b"done")
    session_s = time.monotonic() - started
    await asyncio.wait_for(state.closed.wait(), 5)
    assert state.closes == [4000]
    seen = {name.lower(): value for name, value in state.headers[0].items()}
    assert seen["sec-websocket-protocol"] == "chat,other"
    assert "x-request-id" in seen
    assert seen["traceparent"].startswith("00-")
    assert seen["x-forwarded-for"] == "127.0.0.1"
    [event] = await read_events(gw.redis, 1)
    assert event["http_response_status_code"] == 101
    assert event["route_id"] == "echo"
    assert event["error_type"] == ""
    assert event["http_request_body_size"] == len("hello") + 3 + len("still here")
    assert event["http_response_body_size"] == len("echo:hello") + 3 + len("echo:still here")
    assert 1200 <= event["duration_ms"] <= session_s * 1000 + 50


def config_timeouts(**values: float) -> Any:
    from proxy.config import Timeouts

    return Timeouts(**{"connect_s": 1.0, **values})


async def test_upstream_close_reaches_the_client(ws_upstream: tuple[str, Upstream],
                                                 start_gateway: GatewayFactory,
                                                 client: aiohttp.ClientSession) -> None:
    url, _ = ws_upstream
    gw = await start_gateway(make_config(url))
    async with client.ws_connect(f"{gw.url}/echo/ws", autoclose=False) as ws:
        await ws.send_str("close-me")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4001, "bye")
        await ws.close()
    # an upstream that vanishes without a close frame: the client gets 1011
    async with client.ws_connect(f"{gw.url}/echo/ws", autoclose=False) as ws:
        await ws.send_str("vanish")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1011)
    events = await read_events(gw.redis, 2)
    assert [event["http_response_status_code"] for event in events] == [101, 101]
    assert [event["error_type"] for event in events] == ["", "upstream_reset"]


async def test_refused_upgrade_and_bad_requests(ws_upstream: tuple[str, Upstream],
                                                start_gateway: GatewayFactory,
                                                client: aiohttp.ClientSession) -> None:
    url, _ = ws_upstream
    gw = await start_gateway(make_config(url))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"{gw.url}/echo/plain")
    assert refused.value.status == 502
    async with client.get(f"{gw.url}/echo/ws",  # no Sec-WebSocket-Key
                          headers={"Upgrade": "websocket", "Connection": "Upgrade"}) as response:
        assert response.status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError) as dead:
        await client.ws_connect(f"{gw.url}/dead/ws")
    assert dead.value.status == 502
    events = {event["url_path"]: event for event in await read_events(gw.redis, 3)}
    assert events["/echo/plain"]["error_type"] == "upstream_websocket_refused"
    assert events["/echo/ws"]["error_type"] == "invalid_websocket_upgrade"
    assert events["/dead/ws"]["error_type"] == "upstream_connect_error"


async def test_client_vanishing_closes_the_upstream(ws_upstream: tuple[str, Upstream],
                                                    start_gateway: GatewayFactory) -> None:
    url, state = ws_upstream
    gw = await start_gateway(make_config(url))
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /echo/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
    finally:
        writer.close()  # gone without a close frame
    await asyncio.wait_for(state.closed.wait(), 5)
    assert state.closes == [1001]
    [event] = await read_events(gw.redis, 1)
    assert (event["http_response_status_code"], event["error_type"]) == (101,
                                                                         "client_disconnect")


async def _refused(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    """The status and headers of an upgrade the gateway refuses."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url)
    return refused.value.status, dict(refused.value.headers or {})


async def test_session_holds_its_in_flight_slot_until_it_ends(
        ws_upstream: tuple[str, Upstream], start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    url, state = ws_upstream
    config = make_config(url)
    config.routes = [route.model_copy(update={"max_in_flight": 1}) if route.id == "echo"
                     else route for route in config.routes]
    gw = await start_gateway(config)
    async with client.ws_connect(f"{gw.url}/echo/ws") as ws:
        await ws.send_str("one")
        assert await ws.receive_str(timeout=5) == "echo:one"
        # The route is full while the session lasts: another upgrade and a plain request.
        status, headers = await _refused(client, f"{gw.url}/echo/ws")
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert headers["Content-Type"] == "application/problem+json"
        async with client.get(f"{gw.url}/echo/plain-http") as response:
            assert response.status == 503
            assert (await response.json())["type"].endswith("route-overloaded")
        # Another route is not affected (this upstream has nothing there: its 404 comes back).
        async with client.get(f"{gw.url}/orders/1") as response:
            assert response.status == 404
        await ws.send_str("two")  # the held session still works
        assert await ws.receive_str(timeout=5) == "echo:two"
    await asyncio.wait_for(state.closed.wait(), 5)
    # Slot given back: the next session is accepted, then plain requests again.
    async with client.ws_connect(f"{gw.url}/echo/ws") as ws:
        await ws.send_str("three")
        assert await ws.receive_str(timeout=5) == "echo:three"
    async with client.get(f"{gw.url}/echo/plain-http") as response:
        assert response.status == 404  # forwarded again (the upstream has no such page)
    events = await read_events(gw.redis, 6)
    overloaded = [e for e in events if e["error_type"] == "route_overloaded"]
    assert [(e["url_path"], e["http_response_status_code"]) for e in overloaded] == [
        ("/echo/ws", 503), ("/echo/plain-http", 503)]
    assert [e["http_response_status_code"] for e in events
            if e["url_path"] == "/echo/ws"] == [503, 101, 101]


async def test_breaker_opens_on_failed_handshakes_and_recovers(
        ws_upstream: tuple[str, Upstream], start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    from proxy.resilience import CircuitBreakerConfig

    url, state = ws_upstream
    breaker = CircuitBreakerConfig(failure_threshold=2, open_s=1.0, half_open_requests=1)
    gw = await start_gateway(ws_config(url, circuit_breaker=breaker))
    for _ in range(2):  # the upstream refuses with 503: two failures open the circuit
        status, _ = await _refused(client, f"{gw.url}/echo/failing")
        assert status == 502
    assert state.failing_hits == 2
    opened = time.monotonic()
    status, headers = await _refused(client, f"{gw.url}/echo/ws")
    assert status == 503
    assert 1 <= int(headers["Retry-After"]) <= 2
    assert state.headers == []  # fails fast: the upstream never saw that upgrade
    async with client.get(f"{gw.url}/echo/plain-http") as response:  # HTTP too: one breaker
        assert response.status == 503
    # After open_s one probe goes through; its successful handshake closes the circuit.
    await asyncio.sleep(max(0.0, 1.05 - (time.monotonic() - opened)))
    async with client.ws_connect(f"{gw.url}/echo/ws") as ws:
        await ws.send_str("probe")
        assert await ws.receive_str(timeout=5) == "echo:probe"
    async with client.ws_connect(f"{gw.url}/echo/ws") as ws:
        await ws.send_str("again")
        assert await ws.receive_str(timeout=5) == "echo:again"
    assert gw.gateway.forwarder.upstreams["app"].breaker is not None
    assert gw.gateway.forwarder.upstreams["app"].breaker.state == "closed"
    events = await read_events(gw.redis, 6)
    assert [e["error_type"] for e in events if e["url_path"] == "/echo/failing"] == [
        "upstream_websocket_refused", "upstream_websocket_refused"]
    circuit = [e for e in events if e["error_type"] == "circuit_open"]
    assert [(e["url_path"], e["http_response_status_code"]) for e in circuit] == [
        ("/echo/ws", 503), ("/echo/plain-http", 503)]


async def test_connect_failures_open_the_breaker_for_upgrades(
        start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    from proxy.resilience import CircuitBreakerConfig

    config = make_config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    config.upstreams["dead"] = config.upstreams["dead"].model_copy(update={
        "circuit_breaker": CircuitBreakerConfig(failure_threshold=2, open_s=30)})
    gw = await start_gateway(config)
    statuses = [(await _refused(client, f"{gw.url}/dead/ws"))[0] for _ in range(3)]
    assert statuses == [502, 502, 503]
    events = await read_events(gw.redis, 3)
    assert [e["error_type"] for e in events] == [
        "upstream_connect_error", "upstream_connect_error", "circuit_open"]
