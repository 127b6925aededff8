"""OpenTelemetry spans from the gateway: the SDK's in-memory exporter (its real exporter for
tests) and a real OTLP/HTTP post to a loopback aiohttp receiver. Real upstream, real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from apigw.redis_server import free_port
from proxy.tracing import GatewayTracer, TracingConfig, build_tracer
from tests import test_proxy as _proxy_tests
from tests.test_proxy import (
    GatewayFactory,
    header_map,
    make_config,
    read_events,
)

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture
upstream = _proxy_tests.upstream  # fixture

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def traced(start: GatewayFactory, upstream_url: str, ratio: float = 1.0,
                 **overrides: Any) -> tuple[Any, InMemorySpanExporter]:
    gw = await start(make_config(upstream_url, **overrides))
    assert gw.gateway.tracer is None  # off by default: no tracer, nothing per request
    exporter = InMemorySpanExporter()
    gw.gateway.tracer = GatewayTracer(TracingConfig(enabled=True, sample_ratio=ratio),
                                      exporter, batch=False)
    return gw, exporter


async def test_server_and_client_spans_share_ids_with_event_and_traceparent(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw, exporter = await traced(start_gateway, upstream)
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "User-Agent": "tracing-test/1"}
    async with client.get(f"{gw.url}/echo/a?x=1&token=secret", headers=headers) as response:
        assert response.status == 200
        seen = header_map((await response.json())["headers"])
    [event] = await read_events(gw.redis, 1)
    spans = exporter.get_finished_spans()
    [server] = [span for span in spans if span.kind is SpanKind.SERVER]
    [client_span] = [span for span in spans if span.kind is SpanKind.CLIENT]

    assert server.context is not None
    assert client_span.context is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID == event["trace_id"]
    assert f"{server.context.span_id:016x}" == event["span_id"]
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == PARENT
    assert client_span.parent is not None
    assert client_span.parent.span_id == server.context.span_id
    # the upstream is told about the client span, in the same trace
    assert seen["traceparent"] == (f"00-{TRACE_ID}-{client_span.context.span_id:016x}-01")

    assert server.name == "GET /echo/*"
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.route"] == "/echo/*"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.path"] == "/echo/a"
    assert attributes["url.query"] == "x=1&token=REDACTED"
    assert attributes["url.scheme"] == "http"
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["user_agent.original"] == "tracing-test/1"
    assert attributes["server.port"] == int(gw.url.rsplit(":", 1)[1])
    assert attributes["apigw.route_id"] == "echo"
    assert "error.type" not in attributes
    client_attributes = dict(client_span.attributes or {})
    assert client_attributes["http.request.method"] == "GET"
    assert client_attributes["http.response.status_code"] == 200
    assert client_attributes["server.address"] == "127.0.0.1"
    assert client_attributes["server.port"] == int(upstream.rsplit(":", 1)[1])
    assert client_attributes["url.full"] == f"{upstream}/echo/a"  # no query: it may hold secrets
    assert client_span.start_time is not None
    assert server.start_time is not None
    assert client_span.start_time >= server.start_time


async def test_failures_and_retries_are_visible(upstream: str, start_gateway: GatewayFactory,
                                                client: aiohttp.ClientSession) -> None:
    gw, exporter = await traced(start_gateway, upstream)
    async with client.get(f"{gw.url}/dead/x") as response:
        assert response.status == 502
    async with client.get(f"{gw.url}/nowhere") as response:  # no route: a span, no client span
        assert response.status == 404
    spans = exporter.get_finished_spans()
    servers = {dict(span.attributes or {})["http.response.status_code"]: span
               for span in spans if span.kind is SpanKind.SERVER}
    failed = servers[502]
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "upstream_connect_error"
    [client_span] = [span for span in spans if span.kind is SpanKind.CLIENT]
    assert dict(client_span.attributes or {})["error.type"] == "upstream_connect_error"
    assert client_span.status.status_code is StatusCode.ERROR
    assert servers[404].name == "GET"  # unmatched: no route template
    assert servers[404].status.status_code is StatusCode.UNSET  # 4xx is not a server error


async def test_unsampled_requests_export_nothing_but_keep_one_trace(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw, exporter = await traced(start_gateway, upstream, ratio=0.0)
    async with client.get(f"{gw.url}/echo/a") as response:
        seen = header_map((await response.json())["headers"])
    # an incoming sampled decision is followed even at ratio 0
    async with client.get(f"{gw.url}/echo/b",
                          headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}) as response:
        assert response.status == 200
    events = {event["url_path"]: event for event in await read_events(gw.redis, 2)}
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert version == "00"
    assert not int(flags, 16) & 1
    assert trace_id == events["/echo/a"]["trace_id"]
    assert span_id != events["/echo/a"]["span_id"]  # the (unrecorded) client span's id
    spans = exporter.get_finished_spans()
    assert {f"{span.context.trace_id:032x}" for span in spans if span.context} == {TRACE_ID}
    assert len(spans) == 2


def test_tracing_is_off_by_default_and_env_can_disable_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_tracer(TracingConfig()) is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert build_tracer(TracingConfig(enabled=True)) is None


async def test_otlp_http_export_reaches_a_collector(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[str, str, bytes]] = []

    async def collect(request: web.Request) -> web.Response:
        received.append((request.path, request.content_type, await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        gw = await start_gateway(make_config(upstream, tracing={"enabled": True}))
        assert gw.gateway.tracer is not None
        async with client.get(f"{gw.url}/echo/otlp") as response:
            assert response.status == 200
        tracer = gw.gateway.tracer
        assert await asyncio.to_thread(tracer.force_flush, 5000)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert received, "no OTLP export arrived"
    path, content_type, body = received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert b"GET /echo/*" in body
    assert len(body) > 50
