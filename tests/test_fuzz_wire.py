"""Fuzzing what crosses the wire: hop-by-hop header stripping (both directions), the event
encoder/decoder round trip, and RFC 9457 problem bodies."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from apigw.redis_server import free_port
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.event import (
    ROW_COLUMNS,
    SCHEMA_VERSION,
    RequestEvent,
    decode_batch,
    encode_batch,
    encode_rows,
)
from proxy.forward import HOP_BY_HOP, response_headers
from proxy.problem import PROBLEMS, problem_body
from proxy.server import start_listener
from proxy.settings import ProxySettings

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                min_size=1, max_size=12)
HOP = ["Connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
       "Proxy-Authenticate", "Proxy-Connection", "Proxy-X"]
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


def _stripped(name: str, named: set[str]) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in named or lower == "via"


@settings(max_examples=400, deadline=None)
@given(pairs=st.lists(st.tuples(st.one_of(st.sampled_from(HOP), TOKEN), VALUE), max_size=12),
       connection=st.lists(TOKEN, max_size=3))
def test_response_hop_by_hop_headers_never_pass(pairs: list[tuple[str, str]],
                                                connection: list[str]) -> None:
    upstream: CIMultiDict[str] = CIMultiDict(pairs)
    if connection:
        upstream.add("Connection", ", ".join(connection))
    named = {token.strip().lower() for token in upstream.get("Connection", "").split(",")}
    out = response_headers(CIMultiDictProxy(upstream), {"X-Request-Id": "r1"}, keep_length=True)
    expected = [(k, v) for k, v in upstream.items() if not _stripped(k, named)
                and k.lower() != "x-request-id"]
    kept = [(k, v) for k, v in out.items() if k.lower() not in ("via", "x-request-id")]
    assert kept == expected
    assert out["Via"].endswith("1.1 apigw")
    assert out["X-Request-Id"] == "r1"


# --- the request side, through a real gateway to an echo upstream ----------------------------

async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"headers": list(request.headers.items())})


@pytest.fixture
async def gateway_port(redis_url: str) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    config = GatewayConfig.model_validate({
        "upstreams": {"u": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "routes": [{"id": "all", "match": {"prefix": "/"}, "upstream": "u"}]})
    port = free_port()
    settings_ = ProxySettings(redis_url=redis_url, listen=f"127.0.0.1:{port}")
    redis = aioredis.Redis.from_url(redis_url)
    gateway = Gateway(config, settings_, redis)
    await gateway.start()
    listener = await start_listener(gateway, settings_.listen, shutdown_grace_s=1)
    try:
        yield port
    finally:
        await listener.cleanup()
        await gateway.stop(timeout_s=1)
        await redis.aclose()
        await runner.cleanup()


async def _raw_get(port: int, headers: list[tuple[str, str]]) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "GET /fuzz HTTP/1.1\r\nHost: gw\r\n" + "".join(f"{k}: {v}\r\n"
                                                               for k, v in headers) + "\r\n"
        writer.write(head.encode())
        await writer.drain()
        response_head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in response_head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(response_head.split(b" ")[1]), json.loads(body)


async def test_request_hop_by_hop_headers_never_reach_the_upstream(gateway_port: int) -> None:
    rng = random.Random(20261127)
    names = ["Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Authorization", "Proxy-Foo",
             "X-Forwarded-For", "Forwarded", "X-Real-Ip", "Via", "X-Request-Id"]
    for _ in range(60):
        custom = [f"X-F{rng.randrange(10**6)}" for _ in range(rng.randint(0, 4))]
        named = rng.sample(custom, k=min(len(custom), rng.randint(0, 2)))
        headers = [(name, f"v{rng.randrange(100)}") for name in
                   rng.sample(names, k=rng.randint(0, 5)) + custom]
        if named or rng.random() < 0.5:
            headers.append(("Connection", ", ".join(["keep-alive", *named])))
        status, echoed = await _raw_get(gateway_port, headers)
        assert status == 200
        seen = {name.lower(): value for name, value in echoed["headers"]}
        for name in ("keep-alive", "te", "trailer", "upgrade", "proxy-authorization",
                     "proxy-foo", *(n.lower() for n in named)):
            assert name not in seen, (name, headers)
        sent = dict(headers)
        for name in ("Forwarded", "X-Real-Ip"):  # set by the gateway, never believed
            if name in sent:
                assert sent[name] not in seen.get(name.lower(), ""), (name, headers)
        for name in set(custom) - set(named):
            assert seen[name.lower()] == dict(headers)[name], (name, headers)
        assert seen["x-forwarded-for"] == "127.0.0.1"  # not the client's claim
        assert seen["via"].endswith("1.1 apigw")


# --- events ------------------------------------------------------------------------------------

TEXT = st.text(max_size=40)
FIELD_STRATEGIES: dict[type | str, st.SearchStrategy[Any]] = {
    "str": TEXT, "int": st.integers(min_value=0, max_value=2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False, width=64)}


def _events() -> st.SearchStrategy[RequestEvent]:
    fields = {f.name: FIELD_STRATEGIES[str(f.type)] for f in dataclasses.fields(RequestEvent)
              if f.name != "schema_version"}
    return st.builds(RequestEvent, **fields)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_events(), min_size=1, max_size=5))
def test_event_batches_round_trip(events: list[RequestEvent]) -> None:
    decoded = decode_batch(str(SCHEMA_VERSION).encode(), encode_batch(events))
    assert decoded == [dataclasses.asdict(event) for event in events]


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_events(), min_size=1, max_size=5))
def test_event_rows_round_trip_and_store_like_objects(events: list[RequestEvent]) -> None:
    """The emitter's rows format decodes to the same events, and the collector turns a rows
    entry and an objects entry of the same events into the same Arrow rows."""
    from collector.batch import build_batch

    version = str(SCHEMA_VERSION).encode()
    decoded = decode_batch(version, encode_rows(events), ROW_COLUMNS)
    assert decoded == [dataclasses.asdict(event) for event in events]
    rows = build_batch([("1-0", {b"v": version, b"c": ROW_COLUMNS, b"b": encode_rows(events)})])
    objects = build_batch([("1-0", {b"v": version, b"b": encode_batch(events)})])
    assert (rows.rows, len(rows.dead)) == (objects.rows, len(objects.dead))
    assert rows.table.equals(objects.table)


@settings(max_examples=200, deadline=None)
@given(user_agent=st.text(alphabet=st.characters(codec=None), max_size=20))
def test_events_with_invalid_unicode_are_repaired_not_lost(user_agent: str) -> None:
    """aiohttp passes invalid UTF-8 from the wire on as lone surrogates; the emitter's
    encoder repairs such an event rather than dropping it (a client could hide that way)."""
    from proxy.emitter import EventEmitter

    event = RequestEvent(timestamp=1.0, request_id="r", http_request_method="GET",
                         url_path="/", http_response_status_code=200, duration_ms=1.0,
                         user_agent_original=user_agent)
    payload, dropped = EventEmitter._encode([event])
    assert dropped == []
    [decoded] = decode_batch(b"1", payload, ROW_COLUMNS)
    assert decoded["request_id"] == "r"


# --- problems ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(slug=st.sampled_from(sorted(PROBLEMS)), detail=st.text(max_size=80),
       request_id=st.text(max_size=40),
       extra=st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=10), st.integers(
           min_value=-(2**63), max_value=2**63 - 1)), max_size=3))
def test_problem_bodies_are_always_valid_json(slug: str, detail: str, request_id: str,
                                              extra: dict[str, Any]) -> None:
    status, body = problem_body(slug, detail, request_id, extra)
    document = orjson.loads(body)
    assert json.loads(body.decode("utf-8")) == document
    assert document["status"] == status == PROBLEMS[slug][0]
    assert document["type"] == f"urn:apigw:problem:{slug}"
    assert document["detail"] == detail
    assert document["instance"] == request_id
    standard = {"type", "title", "status", "detail", "instance"}
    assert {name: document[name] for name in extra if name not in standard} == \
        {name: value for name, value in extra.items() if name not in standard}


def test_extension_members_never_replace_the_standard_ones() -> None:
    status, body = problem_body("bad-path", "the real detail", "req-1",
                                {"detail": "", "status": 200, "retry_after_s": 3})
    assert orjson.loads(body) == {
        "type": "urn:apigw:problem:bad-path", "title": PROBLEMS["bad-path"][1],
        "status": status, "detail": "the real detail", "instance": "req-1", "retry_after_s": 3}
