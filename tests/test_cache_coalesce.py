"""Request coalescing through real sockets: concurrent misses for one key send one request to
a slow real upstream and are all served from it; followers go upstream themselves when the
response is not storable, when the leader failed, or after `lock_timeout_s`."""

from __future__ import annotations

import asyncio
import time
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
from tests.test_cache import cached_config, get
from tests.test_proxy import GatewayFactory, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture

DELAY_S = 0.4
BROKEN_S = 3.0
CONCURRENCY = 20


class SlowOrigin:
    def __init__(self) -> None:
        self.url = ""
        self.hits: Counter[str] = Counter()


@pytest.fixture
async def slow() -> AsyncIterator[SlowOrigin]:
    state = SlowOrigin()

    async def answer(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            async for message in socket:
                await socket.send_str(message.data)
            return socket
        state.hits[name] += 1
        number = state.hits[name]
        await asyncio.sleep(float(request.query.get("delay", DELAY_S)))
        if name == "broken" and number == 1:  # the first one outlasts the route's timeout
            await asyncio.sleep(BROKEN_S)
        control = {"nostore": "no-store", "broken": "max-age=60"}.get(name, "max-age=60")
        headers = {"Cache-Control": control}
        if name == "vary":
            headers["Vary"] = "Accept-Language"
        return web.Response(body=orjson.dumps({"name": name, "n": number}), headers=headers,
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/slow/{name}", answer)
    async with serving(app) as state.url:
        yield state


async def burst(client: aiohttp.ClientSession, url: str, count: int = CONCURRENCY,
                **headers: str) -> list[tuple[int, str, bytes]]:
    results = await asyncio.gather(*(get(client, url, **headers) for _ in range(count)))
    return [(status, x_cache, body) for status, x_cache, body, _ in results]


async def test_concurrent_misses_send_one_request_upstream(
        slow: SlowOrigin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(slow.url))
    results = await burst(client, f"{gw.url}/slow/hot")
    assert slow.hits["hot"] == 1
    assert {body for _, _, body in results} == {b'{"name":"hot","n":1}'}
    assert [status for status, _, _ in results] == [200] * CONCURRENCY
    assert Counter(x_cache for _, x_cache, _ in results) == {"MISS": 1, "HIT": CONCURRENCY - 1}
    events = await read_events(gw.redis, CONCURRENCY)
    assert Counter(event["cache_outcome"] for event in events) == {
        "miss": 1, "coalesced": CONCURRENCY - 1}
    assert all(event["http_response_status_code"] == 200 for event in events)
    assert (await get(client, f"{gw.url}/slow/hot"))[1] == "HIT"  # and it was stored


async def test_followers_go_upstream_when_the_response_is_not_storable(
        slow: SlowOrigin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(slow.url))
    results = await burst(client, f"{gw.url}/slow/nostore", count=5)
    assert slow.hits["nostore"] == 5
    assert sorted(body for _, _, body in results) == [
        orjson.dumps({"name": "nostore", "n": n}) for n in range(1, 6)]
    assert {x_cache for _, x_cache, _ in results} == {"MISS"}


async def test_followers_of_another_variant_go_upstream(
        slow: SlowOrigin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(slow.url))
    url = f"{gw.url}/slow/vary"
    leader = asyncio.ensure_future(get(client, url, **{"Accept-Language": "de"}))
    await asyncio.sleep(DELAY_S / 4)  # the Vary'd names are unknown yet: all wait on it
    de, fr = await asyncio.gather(burst(client, url, count=2, **{"Accept-Language": "de"}),
                                  burst(client, url, count=3, **{"Accept-Language": "fr"}))
    first = await leader
    assert (first[0], first[1]) == (200, "MISS")
    assert [(x_cache, body) for _, x_cache, body in de] == [("HIT", first[2])] * 2
    assert {x_cache for _, x_cache, _ in fr} == {"MISS"}
    assert all(b'"n":1' not in body for _, _, body in fr)
    assert slow.hits["vary"] == 4


async def test_a_failed_leader_wakes_its_followers_at_once(
        slow: SlowOrigin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    config = cached_config(slow.url, lock_timeout_s=30).model_dump(mode="json")
    config["routes"][0]["timeouts"] = {"total_s": 1.0}
    gw = await start_gateway(GatewayConfig.model_validate(config))
    url = f"{gw.url}/slow/broken"
    leader = asyncio.ensure_future(get(client, url))
    await asyncio.sleep(DELAY_S / 4)
    started = time.monotonic()
    followers = await burst(client, url, count=3)
    elapsed = time.monotonic() - started
    assert (await leader)[0] == 504  # no response to store: the log hook woke the followers
    assert [status for status, _, _ in followers] == [200] * 3
    assert elapsed < BROKEN_S  # neither the leader's upstream nor the 30 s lock timeout
    assert slow.hits["broken"] == 4


@pytest.mark.parametrize(("settings", "expected_hits"), [
    ({"lock_timeout_s": 0.1}, CONCURRENCY // 4),  # the leader takes longer than the wait
    ({"coalesce": False}, CONCURRENCY // 4),
])
async def test_lock_timeout_and_coalescing_off_send_each_miss_upstream(
        settings: dict[str, Any], expected_hits: int, slow: SlowOrigin,
        start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(slow.url, **settings))
    started = time.monotonic()
    results = await burst(client, f"{gw.url}/slow/hot?delay=1", count=expected_hits)
    elapsed = time.monotonic() - started
    assert slow.hits["hot"] == expected_hits
    assert [status for status, _, _ in results] == [200] * expected_hits
    assert elapsed < 1.9  # the followers did not wait for the leader's answer


async def test_a_websocket_session_on_a_cached_route_holds_no_lock(
        slow: SlowOrigin, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(cached_config(slow.url, lock_timeout_s=30))
    url = f"{gw.url}/slow/hot"
    async with client.ws_connect(url) as socket:
        await socket.send_str("ping")
        assert (await socket.receive_str()) == "ping"
        started = time.monotonic()
        status, x_cache, _, _ = await get(client, url)  # a GET of the same key, meanwhile
        assert (status, x_cache) == (200, "MISS")
        assert time.monotonic() - started < 2 * DELAY_S + 1
    assert (await get(client, url))[1] == "HIT"
