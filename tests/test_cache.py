"""The response cache through real sockets: hits and misses, ETag revalidation (upstream 304
and client 304), no-store / private bypass, Vary, the byte bound of the LRU, one event per
request with its cache outcome."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.cache_step import CacheStep
from proxy.config import GatewayConfig
from tests import test_proxy as _proxy_tests
from tests.http_servers import serving
from tests.test_proxy import GatewayFactory, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture


def js(document: object, status: int = 200, headers: dict[str, str] | None = None
       ) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, headers=headers,
                        content_type="application/json")


class Origin:
    def __init__(self) -> None:
        self.url = ""
        self.hits: Counter[str] = Counter()
        self.etag_version = 1


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    state = Origin()

    async def fresh(request: web.Request) -> web.Response:
        state.hits["fresh"] += 1
        return js({"n": state.hits["fresh"]},
                                 headers={"Cache-Control": "max-age=60"})

    async def etag(request: web.Request) -> web.Response:
        tag = f'"v{state.etag_version}"'
        if request.headers.get("If-None-Match") == tag:
            state.hits["etag-304"] += 1
            return web.Response(status=304, headers={"ETag": tag,
                                                     "Cache-Control": "max-age=0"})
        state.hits["etag-200"] += 1
        return js({"version": state.etag_version},
                                 headers={"ETag": tag, "Cache-Control": "max-age=0"})

    async def directive(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        state.hits[name] += 1
        value = {"nostore": "no-store", "private": "private, max-age=60"}[name]
        return js({"n": state.hits[name]}, headers={"Cache-Control": value})

    async def vary(request: web.Request) -> web.Response:
        state.hits["vary"] += 1
        return js({"lang": request.headers.get("Accept-Language", "")},
                                 headers={"Cache-Control": "max-age=60",
                                          "Vary": "Accept-Language"})

    async def sized(request: web.Request) -> web.Response:
        state.hits["sized"] += 1
        size = int(request.query.get("kb", "1")) * 1024
        return web.Response(body=b"z" * size, headers={"Cache-Control": "max-age=60"})

    app = web.Application()
    app.router.add_get("/fresh/{id}", fresh)
    app.router.add_get("/etag", etag)
    app.router.add_get("/d/{name}", directive)
    app.router.add_get("/vary", vary)
    app.router.add_get("/sized", sized)
    async with serving(app) as state.url:
        yield state


def cached_config(url: str, **cache: Any) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"app": {"url": url}},
        "routes": [{"id": "cached", "match": {"prefix": "/"}, "upstream": "app",
                    "cache": cache},
                   {"id": "plain", "match": {"prefix": "/plain"}, "upstream": "app",
                    "strip_prefix": True}],
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2, "policies": []},
    })


async def get(client: aiohttp.ClientSession, url: str, **headers: str
              ) -> tuple[int, str, bytes, CIMultiDict[str]]:
    async with client.get(url, headers=headers) as response:
        body = await response.read()
        return response.status, response.headers.get("X-Cache", ""), body, CIMultiDict(
            response.headers)


async def test_hit_miss_and_events(origin: Origin, start_gateway: GatewayFactory,
                                   client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(origin.url))
    first = await get(client, f"{gw.url}/fresh/1")
    second = await get(client, f"{gw.url}/fresh/1")
    other = await get(client, f"{gw.url}/fresh/1?x=1")  # the query is part of the key
    assert (first[0], first[1]) == (200, "MISS")
    assert (second[0], second[1]) == (200, "HIT")
    assert second[2] == first[2] == b'{"n":1}'
    assert int(second[3]["Age"]) >= 0
    assert second[3]["X-Request-Id"] != first[3]["X-Request-Id"]
    assert other[1] == "MISS"
    assert other[2] == b'{"n":2}'
    async with client.head(f"{gw.url}/fresh/1") as response:  # HEAD from the stored GET
        assert response.headers["X-Cache"] == "HIT"
        assert await response.read() == b""
    no_cache = await get(client, f"{gw.url}/fresh/1", **{"Cache-Control": "no-cache"})
    assert no_cache[1] == "MISS"
    assert no_cache[2] == b'{"n":3}'
    assert (await get(client, f"{gw.url}/fresh/1"))[2] == b'{"n":3}'  # refreshed entry
    assert (await get(client, f"{gw.url}/plain/fresh/1"))[1] == ""  # uncached route
    assert origin.hits["fresh"] == 4
    events = await read_events(gw.redis, 7)
    outcomes = [event["cache_outcome"] for event in events]
    assert outcomes == ["miss", "hit", "miss", "hit", "miss", "hit", "none"]
    hit = events[1]
    assert hit["http_response_status_code"] == 200
    assert hit["upstream"] == ""
    assert hit["http_response_body_size"] == len(b'{"n":1}')


async def test_etag_revalidation_and_client_304(origin: Origin, start_gateway: GatewayFactory,
                                                client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(origin.url))
    first = await get(client, f"{gw.url}/etag")
    assert (first[0], first[1], first[3]["ETag"]) == (200, "MISS", '"v1"')
    # stale on arrival (max-age=0) but it has a validator: revalidated, upstream says 304
    second = await get(client, f"{gw.url}/etag")
    assert (second[0], second[1], second[2]) == (200, "HIT", b'{"version":1}')
    assert origin.hits["etag-304"] == 1
    assert origin.hits["etag-200"] == 1
    # the client's own validator: answered 304 from the entry (after revalidating)
    third = await get(client, f"{gw.url}/etag", **{"If-None-Match": '"v1"'})
    assert (third[0], third[1], third[2]) == (304, "HIT", b"")
    assert third[3]["ETag"] == '"v1"'
    # the resource changes: the revalidation gets a 200, stored anew
    origin.etag_version = 2
    fourth = await get(client, f"{gw.url}/etag", **{"If-None-Match": '"v1"'})
    assert (fourth[0], fourth[1], fourth[2]) == (200, "MISS", b'{"version":2}')
    assert origin.hits["etag-200"] == 2
    events = await read_events(gw.redis, 4)
    assert [event["cache_outcome"] for event in events] == ["miss", "hit", "hit", "miss"]
    assert events[2]["http_response_status_code"] == 304


async def test_no_store_private_and_request_no_store_bypass(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(origin.url))
    for name in ("nostore", "private"):
        bodies = [(await get(client, f"{gw.url}/d/{name}"))[2] for _ in range(2)]
        assert bodies == [b'{"n":1}', b'{"n":2}'], name
    await get(client, f"{gw.url}/fresh/9")
    bypass = await get(client, f"{gw.url}/fresh/9", **{"Cache-Control": "no-store"})
    assert bypass[1] == "BYPASS"
    assert bypass[2] == b'{"n":2}'
    async with client.post(f"{gw.url}/fresh/9") as response:
        assert response.headers["X-Cache"] == "BYPASS"
    events = await read_events(gw.redis, 7)
    assert [event["cache_outcome"] for event in events] == [
        "miss", "miss", "miss", "miss", "miss", "bypass", "bypass"]


async def test_vary_keys_on_the_named_request_header(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(origin.url))
    de = await get(client, f"{gw.url}/vary", **{"Accept-Language": "de"})
    fr = await get(client, f"{gw.url}/vary", **{"Accept-Language": "fr"})
    de_again = await get(client, f"{gw.url}/vary", **{"Accept-Language": "de"})
    assert (de[1], fr[1], de_again[1]) == ("MISS", "MISS", "HIT")
    assert fr[2] == b'{"lang":"fr"}'
    assert de_again[2] == b'{"lang":"de"}'
    assert origin.hits["vary"] == 2


async def test_lru_byte_bound_and_entry_size_limit(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(origin.url, max_bytes=40 * 1024,
                                           max_entry_bytes=16 * 1024))
    for kb in (1, 2, 3):  # 10 KiB apart in the key, ~10 KiB each
        await get(client, f"{gw.url}/sized?kb=10&k={kb}")
    assert (await get(client, f"{gw.url}/sized?kb=10&k=1"))[1] == "HIT"  # k=1 now newest
    await get(client, f"{gw.url}/sized?kb=10&k=4")  # over 40 KiB: k=2, the LRU, goes
    results = {k: (await get(client, f"{gw.url}/sized?kb=10&k={k}"))[1] for k in (1, 3, 4)}
    assert results == {1: "HIT", 3: "HIT", 4: "HIT"}
    assert (await get(client, f"{gw.url}/sized?kb=10&k=2"))[1] == "MISS"
    big = [await get(client, f"{gw.url}/sized?kb=64") for _ in range(2)]  # over 16 KiB
    assert [result[1] for result in big] == ["MISS", "MISS"]
    assert all(len(result[2]) == 64 * 1024 for result in big)
    step = next(s for s in gw.gateway.steps if isinstance(s, CacheStep))
    store = step._caches["cached"].store
    assert store.bytes <= 40 * 1024
    assert len(store) == 3


async def test_authenticated_route_keys_on_the_principal(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    from proxy.auth.apikeys import digest

    config = cached_config(origin.url).model_dump(mode="json")
    config["routes"][0]["auth"] = {"methods": ["api_key"]}
    config["auth"] = {"api_keys": {"pepper": "pepper", "keys": [
        {"id": f"key-{name}", "hash": digest(f"secret-{name}-0123456789", "pepper"),
         "owner": name} for name in ("a", "b")]}}
    gw = await start_gateway(GatewayConfig.model_validate(config))
    a1 = await get(client, f"{gw.url}/fresh/1", **{"X-API-Key": "secret-a-0123456789"})
    b1 = await get(client, f"{gw.url}/fresh/1", **{"X-API-Key": "secret-b-0123456789"})
    a2 = await get(client, f"{gw.url}/fresh/1", **{"X-API-Key": "secret-a-0123456789"})
    anonymous = await get(client, f"{gw.url}/fresh/1")
    assert (a1[1], b1[1], a2[1]) == ("MISS", "MISS", "HIT")
    assert (a1[2], b1[2], a2[2]) == (b'{"n":1}', b'{"n":2}', b'{"n":1}')
    assert anonymous[0] == 401
    assert anonymous[1] == ""


async def test_lru_store_keeps_its_indexes_consistent() -> None:
    from proxy.cache_store import Entry, LruStore

    store = LruStore("unit", max_bytes=10 * 1000)

    def entry(primary: tuple[str, ...]) -> Entry:
        return Entry(primary, 200, None, CIMultiDict(), b"", 0.0, 0.0, 60.0, 0.0, "", "", 1000)

    for user in range(12):  # 12 principals x 1 Vary value on one resource; room for 10
        primary = ("/me", "", f"user-{user}")
        await store.put((*primary, "de"), ("accept-language",), entry(primary))
    assert (len(store), store.bytes) == (10, 10 * 1000)
    assert await store.lookup(("/me", "", "user-0"), {"accept-language": "de"}, 1.0) == (
        None, None)  # evicted, and its Vary'd names with it
    key, found = await store.lookup(("/me", "", "user-11"), {"accept-language": "de"}, 1.0)
    assert found is not None
    assert key == ("/me", "", "user-11", "de")
    await store.put(("/other", "", "user-1", "de"), ("accept-language",),
                    entry(("/other", "", "user-1")))
    await store.invalidate(("/me", ""))
    assert (len(store), store.bytes) == (1, 1000)
    assert store._vary == {("/other", "", "user-1"): ("accept-language",)}
    assert store._resources == {("/other", ""): {("/other", "", "user-1", "de")}}
    expired = await store.lookup(("/other", "", "user-1"), {"accept-language": "de"}, 61.0)
    assert expired == (("/other", "", "user-1", "de"), None)
    assert (len(store), store.bytes, store._variants) == (0, 0, {})
