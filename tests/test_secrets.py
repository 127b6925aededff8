"""Secrets never leave the request: planted in headers, cookies, query strings and bodies,
sent through the whole loop (proxy -> Redis Stream -> collector -> chDB), then searched for in
every log line of both processes, every ClickHouse row (events and both rollups), every stream
entry (events and dead letters), every Redis key and value, and both /metrics pages."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from apigw.redis_server import free_port
from collector.clickhouse import make_client
from collector.schema import ROLLUP_TABLES
from tests.faults import FlakyUpstream, stream_caught_up, wait_until
from tests.processes import ManagedProcess, apigw_command

pytestmark = pytest.mark.e2e

SECRETS = {
    "bearer": "sEcReT-bearer-7f3a9c",
    "basic": "c2VjcmV0LWJhc2ljLTQ0OTk=",
    "cookie": "sEcReT-cookie-b81d",
    "api_key_param": "sEcReT-apikey-q-55e1",
    "token_param": "sEcReT-token-q-0c2e",
    "password_param": "sEcReT-password-q-9d",
    "api_key_header": "sEcReT-apikey-h-71aa",
    "body": "sEcReT-body-6e02",
    "proxy_auth": "sEcReT-proxy-auth-3b",
    "malformed": "sEcReT-in-a-malformed-header-1d",
}

CONFIG = """
version: 1
upstreams:
  app: {{url: "{upstream}"}}
  dead: {{url: "http://127.0.0.1:{dead_port}", timeouts: {{connect_s: 0.5}}}}
routes:
  - {{id: orders, match: {{path: "/orders/{{id}}"}}, upstream: app}}
  - {{id: upload, match: {{path: /upload}}, methods: [POST], upstream: app}}
  - {{id: down, match: {{prefix: /down}}, upstream: dead}}
events: {{flush_interval_ms: 50}}
ratelimit:
  policies:
    - {{id: per-client, key_by: client_id, limit: 100000, window_s: 60}}
"""


async def _send_everything(proxy: str, port: int) -> int:
    sent = 0
    headers = {"Authorization": f"Bearer {SECRETS['bearer']}",
               "Cookie": f"session={SECRETS['cookie']}; theme=dark",
               "X-Api-Key": SECRETS["api_key_header"],
               "Proxy-Authorization": f"Basic {SECRETS['proxy_auth']}",
               "X-Client-Id": "secret-test"}
    query = (f"?api_key={SECRETS['api_key_param']}&token={SECRETS['token_param']}"
             f"&password={SECRETS['password_param']}&page=2")
    async with aiohttp.ClientSession() as session:
        for path in ("/orders/1", "/orders/2" + query, "/nowhere" + query, "/down/x" + query,
                     "/orders/1/../2" + query):
            async with session.get(proxy + path, headers=headers) as response:
                await response.read()
                sent += 1
        async with session.get(proxy + "/orders/3",
                               headers={"Authorization": f"Basic {SECRETS['basic']}"}) as r:
            await r.read()
            sent += 1
        for _ in range(2):
            async with session.post(proxy + "/upload" + query, headers=headers,
                                    data=f'{{"password": "{SECRETS["body"]}"}}') as response:
                await response.read()
                sent += 1
        async with session.post(proxy + "/orders/9", headers=headers,  # 405
                                data=SECRETS["body"]) as response:
            await response.read()
            sent += 1
    # A malformed request whose bad header carries a secret (the parser rejects it).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /orders/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                 SECRETS["malformed"].encode() + b"\x00\r\n\r\n")
    await writer.drain()
    await reader.read(1000)
    writer.close()
    return sent


def _clickhouse_text(dsn: str) -> tuple[str, int]:
    client = make_client(dsn)
    try:
        parts = []
        rows = 0
        summary = client.query("SELECT http_request_method, url_path, "
                               "http_response_status_code, error_type FROM events").result_rows
        parts.append(repr(summary))
        for table in ("events", *ROLLUP_TABLES):
            states = client.query(
                "SELECT name FROM system.columns WHERE database = currentDatabase() AND "
                "table = {t:String} AND type LIKE 'AggregateFunction%'",
                parameters={"t": table}).result_rows
            star = f"* EXCEPT ({', '.join(n for (n,) in states)})" if states else "*"
            columns = ", ".join([star, *(f"hex({name})" for (name,) in states)])
            result = client.query(f"SELECT {columns} FROM {table}")
            rows += len(result.result_rows) if table == "events" else 0
            parts.extend(repr(row) for row in result.result_rows)
        return "\n".join(parts), rows
    finally:
        client.close()


async def _redis_text(redis: aioredis.Redis) -> str:
    parts: list[str] = []
    async for key in redis.scan_iter(count=1000):
        parts.append(repr(key))
        kind = (await redis.type(key)).decode()
        value: Any
        if kind == "string":
            value = await redis.get(key)
        elif kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "stream":
            value = await redis.xrange(key)
        elif kind == "set":
            value = await redis.smembers(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        parts.append(repr(value))
    return "\n".join(parts)


async def test_planted_secrets_appear_nowhere(tmp_path: Path, redis_url: str) -> None:
    upstream = FlakyUpstream()
    await upstream.start()
    dsn = f"chdb://{tmp_path / 'clickhouse'}"
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.format(upstream=upstream.url, dead_port=free_port()))
    port, admin, collector_admin = free_port(), free_port(), free_port()
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_CLICKHOUSE_DSN": dsn,
           "APIGW_LOG_LEVEL": "DEBUG", "APIGW_BLOCK_MS": "100"}
    proxy = ManagedProcess("proxy", apigw_command(
        "proxy", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--admin",
        f"127.0.0.1:{admin}", "--workers", "1"), env, tmp_path)
    collector = ManagedProcess("collector", [sys.executable, "-m", "collector.service"],
                               {**env, "APIGW_LISTEN": f"127.0.0.1:{collector_admin}"},
                               tmp_path)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await asyncio.to_thread(proxy.wait_http, f"http://127.0.0.1:{admin}/readyz", 60)
        await asyncio.to_thread(collector.wait_http,
                                f"http://127.0.0.1:{collector_admin}/healthz", 60)
        sent = await _send_everything(f"http://127.0.0.1:{port}", port)
        await asyncio.sleep(0.5)
        await wait_until(lambda: stream_caught_up(redis), 30, "the collector")
        async with aiohttp.ClientSession() as session:
            metrics = ""
            for url in (f"http://127.0.0.1:{admin}/metrics", f"http://127.0.0.1:{admin}/config",
                        f"http://127.0.0.1:{admin}/readyz",
                        f"http://127.0.0.1:{collector_admin}/metrics"):
                async with session.get(url) as response:
                    metrics += await response.text()
        redis_text = await _redis_text(redis)
    finally:
        proxy.stop()
        collector.stop()
        await redis.aclose()
        await upstream.stop()
    stored, rows = await asyncio.to_thread(_clickhouse_text, dsn)
    # Every request is a row (the malformed one too, where the gateway records those).
    assert sent <= rows <= sent + 1, stored[:3000]
    assert "REDACTED" in stored  # the query parameters were there, and redacted
    places = {"proxy log": proxy.log(), "collector log": collector.log(),
              "clickhouse rows": stored, "redis keys and values": redis_text,
              "metrics, config and readiness": metrics}
    assert len(proxy.log().splitlines()) > 5  # DEBUG logging was on and said something
    leaks = [f"{what} in {where}" for where, text in places.items()
             for what, secret in SECRETS.items() if secret in text]
    assert not leaks, leaks
    assert "Traceback" not in proxy.log() + collector.log()


# --- posture: loopback by default, Redis AUTH through the URL -----------------------------------

def test_every_listener_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from analytics.api_context import ApiSettings
    from analytics.controlplane import ControlPlaneSettings
    from analytics.settings import AnalyticsSettings
    from collector.settings import CollectorSettings
    from proxy.settings import ProxySettings

    for name in list(__import__("os").environ):
        if name.startswith("APIGW_"):
            monkeypatch.delenv(name)
    found = {}
    for cls in (ProxySettings, CollectorSettings, AnalyticsSettings, ApiSettings,
                ControlPlaneSettings):
        settings = cls()
        for field in cls.model_fields:
            if "listen" in field:
                found[f"{cls.__name__}.{field}"] = getattr(settings, field)
    assert {"ProxySettings.listen", "ProxySettings.admin_listen"} <= found.keys()
    assert all(value.startswith("127.0.0.1:") for value in found.values()), found


async def test_redis_auth_through_the_url(tmp_path: Path) -> None:
    from apigw.redis_server import find_redis_server, is_reachable
    from proxy.server import make_redis
    from proxy.settings import ProxySettings

    port = free_port()
    server = await asyncio.create_subprocess_exec(
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--requirepass", "s3cret-redis-pw", "--dir", str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_until(lambda: is_reachable("127.0.0.1", port) or _auth_required(port), 10,
                         "redis-server")
        good = make_redis(ProxySettings(redis_url=f"redis://:s3cret-redis-pw@127.0.0.1:{port}/0"))
        bad = make_redis(ProxySettings(redis_url=f"redis://:wrong@127.0.0.1:{port}/0"))
        try:
            assert await good.ping()
            with pytest.raises(aioredis.AuthenticationError):
                await bad.ping()
        finally:
            await good.aclose()
            await bad.aclose()
    finally:
        server.terminate()
        await server.wait()


def _auth_required(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"-NOAUTH")
    except OSError:
        return False
