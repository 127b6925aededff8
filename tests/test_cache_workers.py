"""The Redis cache backend across the worker processes of one real `apigw` proxy (two
workers sharing the port): one MISS for the whole proxy, not one per worker, and a write
served by either worker invalidates for both."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from apigw.redis_server import free_port
from tests import test_cache_invalidation as _invalidation_tests
from tests.processes import serve_process
from tests.test_cache_invalidation import Resources
from tests.test_proxy import STREAM, read_events

resources = _invalidation_tests.resources  # fixture

REQUESTS = 24


def write_config(path: Path, upstream: str) -> None:
    path.write_text(f"""
version: 1
upstreams:
  app: {{url: "{upstream}"}}
routes:
  - id: items
    match: {{prefix: /items}}
    upstream: app
    cache: {{backend: redis}}
events: {{flush_interval_ms: 50}}
ratelimit: {{policies: []}}
""")


async def fetch_each_on_a_new_connection(url: str, method: str = "GET") -> list[str]:
    """X-Cache of each request; a new connection each time, so both workers get some."""
    results = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for _ in range(REQUESTS if method == "GET" else 1):
            async with client.request(method, url) as response:
                await response.read()
                assert response.status in (200, 204), response.status
                results.append(response.headers.get("X-Cache", ""))
    return results


async def test_two_workers_share_one_redis_cache(resources: Resources, redis_url: str,
                                                 redis_client: aioredis.Redis,
                                                 tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    write_config(config, resources.url)
    port, admin = free_port(), free_port()
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_LISTEN": f"127.0.0.1:{port}",
           "APIGW_ADMIN_LISTEN": f"127.0.0.1:{admin}", "APIGW_WORKERS": "2",
           "APIGW_SHUTDOWN_GRACE_S": "2", "APIGW_EVENTS_STREAM": STREAM}
    process = serve_process(config, env, tmp_path)
    try:
        await asyncio.to_thread(process.wait_http, f"http://127.0.0.1:{admin}/readyz", 60)
        url = f"http://127.0.0.1:{port}/items/1"
        first = await fetch_each_on_a_new_connection(url)
        assert Counter(first) == {"MISS": 1, "HIT": REQUESTS - 1}
        assert await fetch_each_on_a_new_connection(url, "POST") == ["BYPASS"]
        second = await fetch_each_on_a_new_connection(url)
        assert Counter(second) == {"MISS": 1, "HIT": REQUESTS - 1}
        assert resources.gets["/items/1"] == 2
        events = await read_events(redis_client, 2 * REQUESTS + 1)
        hits_by_worker = Counter(event["gateway_instance"] for event in events
                                 if event["cache_outcome"] == "hit")
        assert len(hits_by_worker) == 2, hits_by_worker  # both workers served from Redis
    finally:
        await asyncio.to_thread(process.stop)
