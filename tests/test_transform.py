"""Transformations through real sockets: request and response headers, path rewrite with
template parameters, query, JSON body reshaping both ways, and the size bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from apigw.redis_server import free_port
from proxy.config import ConfigError, GatewayConfig, parse_config
from proxy.transform import BodyOps, apply_body
from tests import test_proxy as _proxy_tests
from tests.test_proxy import GatewayFactory

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture


@pytest.fixture
async def mirror() -> AsyncIterator[str]:
    """Answers with what it received, as JSON, plus a few headers to transform."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        parsed: Any = None
        if body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = body.decode()
        sent = {str(name): value for name, value in request.headers.items()}
        document = {"path": request.raw_path, "headers": sent,
                    "body": parsed, "internal": {"secret": 1, "keep": 2}, "old": "x"}
        if request.query.get("pad"):
            document["pad"] = "p" * int(request.query["pad"])
        return web.Response(body=orjson.dumps(document), content_type="application/json",
                            headers={"X-Powered-By": "origin", "X-Old-Name": "v"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


TRANSFORM = {
    "max_body_bytes": 2048,
    "request": {
        "headers": {"remove": ["X-Debug"], "rename": {"X-Old": "X-New"},
                    "add": {"X-Source": "gateway"}},
        "path": "/v2/orders/{id}",
        "query": {"remove": ["debug"], "add": {"version": "2"}},
        "body": {"remove": ["internal"], "rename": {"customer.id": "customer_id"},
                 "add": {"meta.via": "apigw"}},
    },
    "response": {
        "headers": {"remove": ["X-Powered-By"], "rename": {"X-Old-Name": "X-New-Name"},
                    "add": {"X-Transformed": "yes"}},
        "body": {"remove": ["internal.secret"], "rename": {"old": "new"},
                 "add": {"gateway": True}},
    },
}


def transform_config(url: str) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"app": {"url": url}},
        "routes": [{"id": "orders", "match": {"path": "/orders/{id}"}, "upstream": "app",
                    "transform": TRANSFORM}],
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2, "policies": []},
    })


async def test_request_and_response_transformed(mirror: str, start_gateway: GatewayFactory,
                                                client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(transform_config(mirror))
    body = {"customer": {"id": 7, "name": "n"}, "internal": "drop me", "qty": 2}
    async with client.post(f"{gw.url}/orders/42?debug=1&keep=a%20b",
                           headers={"X-Debug": "1", "X-Old": "o", "Expect": "100-continue"},
                           json=body) as response:
        assert response.status == 200
        seen = await response.json()
        headers = response.headers
    assert seen["path"] == "/v2/orders/42?keep=a%20b&version=2"
    sent = seen["headers"]
    assert "X-Debug" not in sent
    assert sent["X-New"] == "o"
    assert "X-Old" not in sent
    assert sent["X-Source"] == "gateway"
    assert seen["body"] == {"customer": {"name": "n"}, "qty": 2, "customer_id": 7,
                            "meta": {"via": "apigw"}}
    assert int(sent["Content-Length"]) == len(orjson.dumps(seen["body"]))
    # the response: headers and body reshaped
    assert "X-Powered-By" not in headers
    assert headers["X-New-Name"] == "v"
    assert headers["X-Transformed"] == "yes"
    assert seen["internal"] == {"keep": 2}
    assert seen["new"] == "x"
    assert "old" not in seen
    assert seen["gateway"] is True


async def test_bodies_over_the_bound_and_non_json_pass_untouched(
        mirror: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(transform_config(mirror))
    big = {"internal": "x" * 4096}
    async with client.post(f"{gw.url}/orders/1", json=big) as response:
        seen = await response.json()
    assert seen["body"] == big  # request over 2048 bytes: untouched
    async with client.post(f"{gw.url}/orders/1", data=b"plain text",
                           headers={"Content-Type": "text/plain"}) as response:
        seen = await response.json()
    assert seen["body"] == "plain text"
    async with client.get(f"{gw.url}/orders/1?pad=5000") as response:
        seen = await response.json()
        assert response.headers["X-Transformed"] == "yes"  # headers still transformed
    assert "old" in seen
    assert seen["internal"] == {"secret": 1, "keep": 2}


def test_dotted_body_operations_and_config_checks() -> None:
    document: dict[str, Any] = {"a": {"b": 1, "c": 2}, "x": 3}
    apply_body(document, BodyOps(remove=["a.c", "missing.path"], rename={"a.b": "z.y"},
                                 add={"a.new": [1]}))
    assert document == {"a": {"new": [1]}, "x": 3, "z": {"y": 1}}
    with pytest.raises(ValueError, match="dotted path"):
        BodyOps(remove=["a..b"])
    text = """
version: 1
upstreams: {app: {url: "http://127.0.0.1:1"}}
routes:
  - id: r
    match: {path: "/orders/{id}"}
    upstream: app
    transform: {request: {path: "/v2/{nope}"}}
"""
    with pytest.raises(ConfigError, match="nope"):
        parse_config(text)
