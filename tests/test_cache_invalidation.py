"""Unsafe requests invalidate the cache (RFC 9111 4.4), through real sockets, for both
backends: every variant of the request's resource and its query-less path, the same-host
`Location` / `Content-Location`, only on a non-error response, and through whichever route
the write took."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.config import GatewayConfig
from tests import test_proxy as _proxy_tests
from tests.http_servers import serving
from tests.test_cache import get
from tests.test_proxy import GatewayFactory

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture


class Resources:
    """An origin where GET of any path+query counts and returns a cacheable JSON document
    (Vary: Accept-Language), and any other method answers the status in `X-Status`, with
    `Location` / `Content-Location` copied from `X-Location` / `X-Content-Location`."""

    def __init__(self) -> None:
        self.url = ""
        self.gets: Counter[str] = Counter()
        self.writes = 0


@pytest.fixture
async def resources() -> AsyncIterator[Resources]:
    state = Resources()

    async def read(request: web.Request) -> web.Response:
        target = request.path_qs
        state.gets[target] += 1
        body = {"target": target, "n": state.gets[target],
                "lang": request.headers.get("Accept-Language", "")}
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})

    async def write(request: web.Request) -> web.Response:
        state.writes += 1
        await request.read()
        headers = {name: request.headers[f"X-{name}"]
                   for name in ("Location", "Content-Location") if f"X-{name}" in request.headers}
        return web.Response(status=int(request.headers.get("X-Status", "204")), headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", read)
    app.router.add_route("*", "/{tail:.*}", write)
    async with serving(app) as state.url:
        yield state


def resources_config(url: str, backend: str = "memory", **cache: Any) -> GatewayConfig:
    """/items: one cached route for every method; /things: GETs cached on one route, writes
    on another, uncached; /plain: not cached at all."""
    settings = {"backend": backend, "vary_headers": ["X-Tenant"], **cache}
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"app": {"url": url}},
        "routes": [
            {"id": "items", "match": {"prefix": "/items"}, "upstream": "app",
             "cache": settings},
            {"id": "things-read", "match": {"prefix": "/things"}, "methods": ["GET", "HEAD"],
             "upstream": "app", "cache": settings},
            {"id": "things-write", "match": {"prefix": "/things"},
             "methods": ["POST", "PUT", "PATCH", "DELETE"], "upstream": "app"},
            {"id": "plain", "match": {"prefix": "/plain"}, "upstream": "app"},
        ],
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2, "policies": []},
    })


async def x_cache(client: aiohttp.ClientSession, url: str, **headers: str) -> str:
    return (await get(client, url, **headers))[1]


async def write(client: aiohttp.ClientSession, method: str, url: str, **headers: str) -> int:
    async with client.request(method, url, headers=headers, data=b"{}") as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_write_invalidates_every_variant_of_its_resource_and_its_bare_path(
        backend: str, resources: Resources, start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(resources_config(resources.url, backend))
    base = f"{gw.url}/items/1"
    variants: list[dict[str, str]] = [
        {"Accept-Language": "de"}, {"Accept-Language": "fr"},
        {"Accept-Language": "de", "X-Tenant": "t2"}]
    for headers in variants:
        assert await x_cache(client, base, **headers) == "MISS"
        assert await x_cache(client, base + "?page=2", **headers) == "MISS"
        assert await x_cache(client, base, **headers) == "HIT"
    assert await x_cache(client, base + "?other=1") == "MISS"
    assert await x_cache(client, f"{gw.url}/items/2") == "MISS"

    assert await write(client, "POST", base + "?page=2") == 204
    for headers in variants:  # the resource and its query-less path: every variant gone
        assert await x_cache(client, base, **headers) == "MISS", headers
        assert await x_cache(client, base + "?page=2", **headers) == "MISS", headers
    assert await x_cache(client, base + "?other=1") == "HIT"  # another query: untouched
    assert await x_cache(client, f"{gw.url}/items/2") == "HIT"  # another path: untouched
    assert await x_cache(client, base) == "MISS"
    for method in ("PUT", "PATCH", "DELETE"):  # each MISS below stores the resource again
        assert await x_cache(client, base) == "HIT"
        assert await write(client, method, base) == 204
        assert await x_cache(client, base) == "MISS", method


@pytest.mark.parametrize("status", [400, 404, 409, 500, 503])
async def test_an_error_response_invalidates_nothing(
        status: int, resources: Resources, start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(resources_config(resources.url))
    url = f"{gw.url}/items/5"
    assert await x_cache(client, url) == "MISS"
    assert await write(client, "DELETE", url, **{"X-Status": str(status)}) == status
    assert await x_cache(client, url) == "HIT"
    assert await write(client, "DELETE", url, **{"X-Status": "303"}) == 303  # 3xx: not an error
    assert await x_cache(client, url) == "MISS"


async def test_location_and_content_location_on_this_host_are_invalidated(
        resources: Resources, start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(resources_config(resources.url))
    host = gw.url.removeprefix("http://")
    for n in (7, 8, 9, 10):
        assert await x_cache(client, f"{gw.url}/items/{n}") == "MISS"
    created = {"X-Status": "201", "X-Location": "/items/7",
               "X-Content-Location": f"http://{host}/items/8?x=1"}
    assert await write(client, "POST", f"{gw.url}/items", **created) == 201
    elsewhere = {"X-Status": "201", "X-Location": "http://other.example/items/9",
                 "X-Content-Location": "10"}  # relative: resolved against /items/new
    assert await write(client, "POST", f"{gw.url}/items/new", **elsewhere) == 201
    results = {n: await x_cache(client, f"{gw.url}/items/{n}") for n in (7, 8, 9, 10)}
    assert results == {7: "MISS", 8: "MISS", 9: "HIT", 10: "MISS"}


async def test_a_write_through_another_route_invalidates_the_route_that_caches_the_get(
        resources: Resources, start_gateway: GatewayFactory,
        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(resources_config(resources.url))
    url = f"{gw.url}/things/3"
    assert await x_cache(client, url) == "MISS"
    assert await x_cache(client, url) == "HIT"
    async with client.put(url, data=b"{}") as response:  # the uncached things-write route
        assert response.status == 204
        assert "X-Cache" not in response.headers
    assert await x_cache(client, url) == "MISS"
    assert await x_cache(client, f"{gw.url}/items/3") == "MISS"
    assert await write(client, "POST", f"{gw.url}/plain/x",
                       **{"X-Status": "201", "X-Location": "/items/3"}) == 201
    assert await x_cache(client, f"{gw.url}/items/3") == "MISS"  # named by an uncached route
    assert resources.gets["/things/3"] == 2
