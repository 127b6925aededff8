"""`apigw keys` as a real subprocess against a real Redis, with the key checked through an
in-process gateway: issue -> accepted -> revoke -> refused within 2 s; the plaintext key is
nowhere in Redis (keys, values, the audit stream)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

import tests.test_proxy as proxy_tests
from tests.auth_keys import KeySet, make_keys
from tests.test_auth_gateway import PEPPER, auth_config
from tests.test_proxy import GatewayFactory, read_events

upstream = proxy_tests.upstream
start_gateway = proxy_tests.start_gateway
client = proxy_tests.client

ROOT = Path(__file__).resolve().parent.parent


def keys_cli(redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "APIGW_REDIS_URL": redis_url, "APIGW_APIKEY_PEPPER": PEPPER,
               **env}
    environ.pop("APIGW_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "apigw.cli", "keys", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                          env=environ)


async def everything_in(redis: aioredis.Redis) -> bytes:
    """Every key name and value in the database, concatenated (strings, hashes, lists, sets,
    sorted sets, streams)."""
    parts: list[Any] = []
    async for name in redis.scan_iter(count=500):
        parts.append(name)
        kind: Any = await redis.type(name)
        value: Any
        if kind == b"string":
            parts.append(await redis.get(name) or b"")
        elif kind == b"hash":
            value = await redis.hgetall(name)
            parts.extend(k + v for k, v in value.items())
        elif kind == b"list":
            value = await redis.lrange(name, 0, -1)
            parts.extend(value)
        elif kind == b"set":
            value = await redis.smembers(name)
            parts.extend(value)
        elif kind == b"zset":
            value = await redis.zrange(name, 0, -1)
            parts.extend(value)
        elif kind == b"stream":
            value = await redis.xrange(name)
            for _, fields in value:
                parts.extend(k + v for k, v in fields.items())
    return b"\n".join(parts)


async def test_issue_authenticates_revoke_refuses_within_two_seconds(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession,
        redis_url: str) -> None:
    keys: KeySet = make_keys()
    gw = await start_gateway(auth_config(upstream, keys))
    issued = await asyncio.to_thread(
        keys_cli, redis_url, "issue", "--id", "cli-1", "--owner", "mobile-app", "--plan", "pro",
        "--tenant", "initech", "--scopes", "orders:read,orders:write", "--expires-in", "3600")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert len(issued.stdout.splitlines()) == 1
    assert key.startswith("ak_")
    assert key not in issued.stderr
    assert "only time" in issued.stderr

    async with client.get(f"{gw.url}/orders/1", headers={
            "X-API-Key": key, "X-Request-Id": "cli-ok"}) as response:
        assert response.status == 200
    again = await asyncio.to_thread(keys_cli, redis_url, "issue", "--id", "cli-1",
                                    "--owner", "someone-else")
    assert again.returncode == 2
    assert "exists" in again.stderr

    listed = await asyncio.to_thread(keys_cli, redis_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["owner"], r["plan"], r["tenant"], r["status"]) for r in rows] == [
        ("cli-1", "mobile-app", "pro", "initech", "active")]
    assert rows[0]["expires_at"] > time.time() + 3500
    table = await asyncio.to_thread(keys_cli, redis_url, "list")
    assert "cli-1" in table.stdout
    assert "active" in table.stdout
    assert key not in listed.stdout + table.stdout
    assert "hmac-sha256" not in listed.stdout + table.stdout

    revoked = await asyncio.to_thread(keys_cli, redis_url, "revoke", "cli-1",
                                      "--reason", "leaked in a crash report",
                                      "--actor", "cli:test")
    assert revoked.returncode == 0, revoked.stderr
    revoked_at = time.monotonic()
    status = 200
    while status != 401 and time.monotonic() - revoked_at < 2.0:
        async with client.get(f"{gw.url}/orders/1", headers={"X-API-Key": key}) as response:
            status = response.status
        if status != 401:
            await asyncio.sleep(0.05)
    assert status == 401, "the revoked key is still accepted after 2 s"
    print(f"revoked key refused after {time.monotonic() - revoked_at:.3f}s")
    async with client.get(f"{gw.url}/orders/1", headers={
            "X-API-Key": key, "X-Request-Id": "cli-revoked"}) as response:
        assert response.status == 401

    events = {e["request_id"]: e for e in await read_events(gw.redis, 2)}
    ok = events["cli-ok"]
    assert (ok["auth_outcome"], ok["client_id"], ok["api_key_id"], ok["tenant"],
            ok["plan"]) == ("success", "mobile-app", "cli-1", "initech", "pro")
    assert events["cli-revoked"]["auth_reason"] == "revoked"

    listed = await asyncio.to_thread(keys_cli, redis_url, "list", "--json")
    assert orjson.loads(listed.stdout)["status"] == "revoked"
    audit: Any = await gw.redis.xrange("apigw:audit")
    records = [orjson.loads(fields[b"r"]) for _, fields in audit]
    mine = [(r["action"], r["actor"]) for r in records if r["subject"] == "apikey:cli-1"]
    assert [action for action, _ in mine] == ["apikey.create", "apikey.revoke"]
    assert mine[0][1].startswith("cli:")
    assert mine[1][1] == "cli:test"
    assert any(r["reason"] == "leaked in a crash report" for r in records)
    stored = await everything_in(gw.redis)
    assert b"apikey.revoke" in stored  # the scan does reach the audit stream
    assert key.encode() not in stored


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    unreachable = "redis://127.0.0.1:1/0"
    cases = [
        (("issue", "--id", "bad id", "--owner", "x"), "--id"),
        (("issue", "--id", "k1", "--owner", "x", "--expires-in", "-5"), "--expires-in"),
        (("issue", "--id", "k1", "--owner", "x", "--scopes", "a b"), "scope"),
        (("issue", "--id", "k1", "--owner", "x"), "Redis at redis://127.0.0.1:1/0"),
        ((), "choose one of"),
    ]
    for args, expected in cases:
        result = keys_cli(unreachable, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    broken = tmp_path / "gw.yaml"
    broken.write_text("version: 1\nroutes: nope\n")
    result = keys_cli(unreachable, "issue", "--config", str(broken), "--id", "k1",
                      "--owner", "x")
    assert result.returncode == 2
    assert "invalid gateway config" in result.stderr
