"""The Redis backend of the response cache, with real redis-servers: two gateway instances
share entries and invalidations; entries carry PX; Redis stopped means BYPASS and 200s within
the time budget, counted, and the cache comes back with Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from pydantic import ValidationError

from apigw.redis_server import RedisServer
from proxy.config import GatewayConfig
from tests import test_cache as _cache_tests
from tests import test_cache_invalidation as _invalidation_tests
from tests import test_proxy as _proxy_tests
from tests.test_cache import Origin, cached_config, get
from tests.test_cache_invalidation import Resources, resources_config, write, x_cache
from tests.test_proxy import GatewayFactory, read_events

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture
origin = _cache_tests.origin  # fixture
resources = _invalidation_tests.resources  # fixture

PREFIX = "apigw:cache:{cached:"


async def cache_keys(redis: aioredis.Redis) -> list[bytes]:
    return sorted([key async for key in redis.scan_iter(match=PREFIX + "*")])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_two_gateways_share_entries_and_invalidations(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession,
        redis_client: aioredis.Redis) -> None:
    config = cached_config(origin.url, backend="redis", max_entry_bytes=16 * 1024)
    one = await start_gateway(config)
    two = await start_gateway(config)
    first = await get(client, f"{one.url}/fresh/1")
    second = await get(client, f"{two.url}/fresh/1")
    assert (first[0], first[1], second[0], second[1]) == (200, "MISS", 200, "HIT")
    assert second[2] == first[2] == b'{"n":1}'
    assert origin.hits["fresh"] == 1
    entries = [key for key in await cache_keys(redis_client) if b":e:" in key]
    assert len(entries) == 1
    assert 55_000 < await redis_client.pttl(entries[0]) <= 60_000  # PX = max-age=60

    async with client.delete(f"{two.url}/fresh/1") as response:  # a write on the other one
        assert response.status == 405  # the origin refuses it: an error invalidates nothing
    assert (await get(client, f"{one.url}/fresh/1"))[1] == "HIT"

    # a validator but max-age=0: kept for revalidation (PX = stale_keep_s), revalidated
    # by the other instance with the stored ETag, and served from the refreshed entry
    assert (await get(client, f"{one.url}/etag"))[1] == "MISS"
    revalidated = await get(client, f"{two.url}/etag")
    assert (revalidated[1], revalidated[2]) == ("HIT", b'{"version":1}')
    assert (origin.hits["etag-200"], origin.hits["etag-304"]) == (1, 1)
    etag_entries = [key for key in await cache_keys(redis_client)
                    if b":e:" in key and key not in entries]
    assert len(etag_entries) == 1
    assert 250_000 < await redis_client.pttl(etag_entries[0]) <= 300_000

    big = [await get(client, f"{gw.url}/sized?kb=64") for gw in (one, two)]  # > 16 KiB
    assert [result[1] for result in big] == ["MISS", "MISS"]
    assert len(await cache_keys(redis_client)) == 6  # two resources: entry, Vary, index each

    events = await read_events(one.redis, 8)
    outcomes = [event["cache_outcome"] for event in events]
    assert outcomes.count("hit") == 3


async def test_a_write_on_one_gateway_invalidates_on_the_other(
        resources: Resources, start_gateway: GatewayFactory, client: aiohttp.ClientSession,
        redis_client: aioredis.Redis) -> None:
    config = resources_config(resources.url, backend="redis")
    one = await start_gateway(config)
    two = await start_gateway(config)
    for headers in ({"Accept-Language": "de"}, {"Accept-Language": "fr"}):
        assert await x_cache(client, f"{one.url}/items/4", **headers) == "MISS"
        assert await x_cache(client, f"{two.url}/items/4", **headers) == "HIT"
    assert await x_cache(client, f"{one.url}/things/4") == "MISS"
    assert await write(client, "PUT", f"{two.url}/items/4?v=2") == 204
    assert await write(client, "PATCH", f"{one.url}/things/4") == 204  # the uncached route
    for headers in ({"Accept-Language": "de"}, {"Accept-Language": "fr"}):
        assert await x_cache(client, f"{one.url}/items/4", **headers) == "MISS"
    assert await x_cache(client, f"{two.url}/things/4") == "MISS"
    assert resources.gets["/items/4"] == 4
    assert resources.gets["/things/4"] == 2
    index = [key async for key in redis_client.scan_iter(match="apigw:cache:*:i")]
    assert len(index) == 2  # stored again after the invalidation: /items/4, /things/4


async def test_redis_down_bypasses_within_the_budget_and_recovers(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        gw = await start_gateway(cached_config(origin.url, backend="redis"),
                                 redis_url_override=server.url)
        assert (await get(client, f"{gw.url}/fresh/1"))[1] == "MISS"
        assert (await get(client, f"{gw.url}/fresh/1"))[1] == "HIT"
        unavailable = sample("apigw_cache_requests_total", route_id="cached",
                             outcome="unavailable")
        errors = sample("apigw_cache_backend_errors_total", route_id="cached",
                        operation="lookup")
        await asyncio.to_thread(server.stop)
        for _ in range(5):
            started = time.monotonic()
            status, x_cache, body, _ = await get(client, f"{gw.url}/fresh/1")
            assert time.monotonic() - started < 1.0  # the 0.2 s budget, not Redis's retries
            assert (status, x_cache) == (200, "BYPASS")
            assert body.startswith(b'{"n":')
        assert origin.hits["fresh"] == 6
        assert sample("apigw_cache_requests_total", route_id="cached",
                      outcome="unavailable") - unavailable == 5
        assert sample("apigw_cache_backend_errors_total", route_id="cached",
                      operation="lookup") - errors == 5
        assert sample("apigw_cache_backend_degraded") == 1
        async with client.post(f"{gw.url}/fresh/1") as response:  # invalidation: skipped
            assert response.status == 405

        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 10
        x_cache = "BYPASS"
        while x_cache == "BYPASS" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the backoff (1 s) then one probe
            x_cache = (await get(client, f"{gw.url}/fresh/1"))[1]
        assert x_cache == "MISS"  # an empty Redis again
        assert (await get(client, f"{gw.url}/fresh/1"))[1] == "HIT"
        assert sample("apigw_cache_backend_degraded") == 0
        reader = aioredis.Redis.from_url(server.url)
        try:  # the emitter held the events while Redis was down
            events = await read_events(reader, 8)
        finally:
            await reader.aclose()
        outcomes = [event["cache_outcome"] for event in events]
        assert outcomes.count("unavailable") >= 5
        assert outcomes.count("bypass") == 1  # the POST: not a GET
        assert outcomes[-2:] == ["miss", "hit"]
    finally:
        server.stop()


async def test_a_corrupt_entry_in_redis_is_a_counted_miss(
        origin: Origin, start_gateway: GatewayFactory, client: aiohttp.ClientSession,
        redis_client: aioredis.Redis) -> None:
    gw = await start_gateway(cached_config(origin.url, backend="redis"))
    assert (await get(client, f"{gw.url}/fresh/2"))[1] == "MISS"
    (entry,) = [key for key in await cache_keys(redis_client) if b":e:" in key]
    decode_errors = sample("apigw_cache_backend_errors_total", route_id="cached",
                           operation="decode")
    for garbage in (b"", b"\x01\x00\x00\x00\x05{not", b"\x02" + b"x" * 100,
                    b"\x01\x00\x00\x00\x02{}body"):
        await redis_client.set(entry, garbage, px=60_000)
        status, x_cache, body, _ = await get(client, f"{gw.url}/fresh/2")
        assert (status, x_cache) == (200, "MISS")  # fetched and stored again
        assert body.startswith(b'{"n":')
    assert sample("apigw_cache_backend_errors_total", route_id="cached",
                  operation="decode") - decode_errors == 4
    assert (await get(client, f"{gw.url}/fresh/2"))[1] == "HIT"


def test_cache_settings_are_checked() -> None:
    document = cached_config("http://127.0.0.1:1").model_dump(mode="json")
    for bad, field in (({"backend": "disk"}, "backend"), ({"lock_timeout_s": 0}, "lock_timeout_s"),
                       ({"stale_keep_s": -1}, "stale_keep_s"), ({"coalesce": "maybe"}, "coalesce")):
        document["routes"][0]["cache"] = bad
        with pytest.raises(ValidationError) as caught:
            GatewayConfig.model_validate(document)
        assert f"routes.0.cache.{field}" in str(caught.value)
