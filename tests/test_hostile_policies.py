"""Hostile policy records written straight into Redis (bypassing the API and PolicyStore)
while traffic flows through a live `apigw proxy`: every one is skipped (or, for a record of a
policy the gateway already enforces, its last good version keeps applying), logged once as a
warning that carries no secret of the record, counted in apigw_policy_invalid_records_total,
and never costs a request a 5xx. Besides records: the version counter moved backwards or made
non-numeric, a history list and the policies hash replaced by a value of the wrong type."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from apigw.redis_server import free_port
from proxy.policy import Policy, RedisKeys, Source
from proxy.policy_store import PolicyStore
from tests.faults import FlakyUpstream, wait_until
from tests.processes import ManagedProcess, apigw_command, managed

pytestmark = pytest.mark.e2e

SECRET = "sEcReT-in-a-policy-record-4b7d"  # may be in a record; never in a log line
GUARD = 3  # the good policy: 3 requests per minute per client on route `a`
TEN_MB = 10 * 1024 * 1024
KEYS = RedisKeys()
NO_ANSWER = 0  # a background request that timed out or lost its connection

CONFIG = """
version: 1
upstreams:
  app: {{url: "{upstream}"}}
routes:
  - {{id: a, match: {{path: "/a/{{id}}"}}, methods: [GET], upstream: app}}
events: {{flush_interval_ms: 50}}
ratelimit:
  policy_refresh_s: 0.2
"""


def _record(policy_id: str, **fields: Any) -> str:
    return json.dumps({"id": policy_id, "route_id": "a", "limit": 1, "window_s": 60,
                       "match_key": SECRET, **fields})


# (what, hash field, stored value): each must be skipped with one warning naming the field.
RECORDS: list[tuple[str, str | bytes, str | bytes]] = [
    ("invalid JSON", "bad-json", _record("bad-json")[:-9]),
    ("not JSON at all", "bad-text", f"match_key={SECRET}; limit=1"),
    ("empty value", "bad-empty", ""),
    ("wrong types", "bad-types", _record("bad-types", route_id=["a"], limit="lots",
                                         window_s={"s": 1})),
    ("huge limit", "bad-huge", _record("bad-huge", limit=10**18)),
    ("negative window", "bad-window", _record("bad-window", window_s=-60)),
    ("NaN window", "bad-nan", _record("bad-nan").replace('"window_s": 60', '"window_s": NaN')),
    ("10 MB record", "bad-big", _record("bad-big", reason=SECRET + "x" * TEN_MB)),
    ("unknown field", "bad-extra", _record("bad-extra", fail_open_forever=True)),
    ("key_by injection", "bad-keyby", _record("bad-keyby", key_by="client_id}:{apigw:policies")),
    ("key_by header injection", "bad-header",
     _record("bad-header", key_by="header:X-A\r\nX-Injected: 1")),
    ("hash tag in the id", "x}:{apigw:rl", _record("x}:{apigw:rl")),
    ("record claims another policy's id", "masquerade",
     _record("guard", match_key=None, limit=1_000_000, window_s=1)),
    ("non-UTF-8 bytes", b"bad-\xff\xfe", b'{"id": "bad-\xff", "limit": 1, "window_s": 1}'),
    ("nesting bomb (under the size limit)", "bad-deep", "[" * 50_000),
    ("last good kept: the enforced policy overwritten with junk", "guard",
     _record("guard", limit=-1)),
]


@dataclass
class Traffic:
    """Steady background requests from clients that are never over a limit."""

    url: str
    statuses: Counter[int]
    stop: asyncio.Event

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                try:
                    async with session.get(f"{self.url}/a/{n}",
                                           headers={"X-Client-Id": f"bg-{n}"}) as response:
                        await response.read()
                        self.statuses[response.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.statuses[NO_ANSWER] += 1
                await asyncio.sleep(0.01)


@pytest.fixture
async def upstream() -> AsyncIterator[FlakyUpstream]:
    server = FlakyUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _warnings(proxy: ManagedProcess) -> list[dict[str, Any]]:
    lines = []
    for line in proxy.log().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("msg") == "invalid policy record skipped":
                lines.append(entry)
    return lines


async def _metric(session: aiohttp.ClientSession, admin: str, name: str) -> float:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _readyz(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(f"{admin}/readyz") as response:
        body: dict[str, Any] = await response.json()
        return body


async def _probe(session: aiohttp.ClientSession, proxy: str, client: str, count: int) -> list[int]:
    statuses = []
    for n in range(count):
        async with session.get(f"{proxy}/a/{n}", headers={"X-Client-Id": client}) as response:
            await response.read()
            statuses.append(response.status)
    return statuses


async def _notify(redis: aioredis.Redis) -> None:
    """What a writer does after a change (here: after a write that bypassed the store)."""
    await redis.incr(KEYS.policies_version)
    await redis.publish(KEYS.policies_channel, "changed")


async def test_hostile_records_against_a_live_gateway(tmp_path: Path, redis_url: str,
                                                      upstream: FlakyUpstream) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.format(upstream=upstream.url))
    port, admin_port = free_port(), free_port()
    proxy_url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    redis = aioredis.Redis.from_url(redis_url)
    store = PolicyStore(redis, KEYS)
    guard = Policy(id="guard", route_id="a", key_by="client_id", limit=GUARD, window_s=60,
                   source=Source.OPERATOR)
    await store.put(guard, actor="test", reason="the good policy")
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_LOG_LEVEL": "INFO"}
    traffic = Traffic(proxy_url, Counter(), asyncio.Event())
    cases = 0
    background: asyncio.Task[None] | None = None
    try:
        with managed("proxy", apigw_command(
                "proxy", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--admin",
                f"127.0.0.1:{admin_port}", "--workers", "1"), env, tmp_path) as proxy:
            await asyncio.to_thread(proxy.wait_http, f"{admin}/readyz", 60)
            background = asyncio.create_task(traffic.run())
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                assert await _probe(session, proxy_url, "probe-start", GUARD + 1) \
                    == [200] * GUARD + [429]

                async def guard_holds(case: str, limit: int = GUARD) -> None:
                    client = "probe-" + re.sub(r"[^a-z0-9]+", "-", case.lower())
                    statuses = await _probe(session, proxy_url, client, limit + 1)
                    assert statuses == [200] * limit + [429], case
                    ready = await _readyz(session, admin)
                    assert ready["policies"]["healthy"] is True, (case, ready)

                # --- hostile records ---------------------------------------------------
                for what, field, value in RECORDS:
                    counted = await _metric(session, admin, "apigw_policy_invalid_records_total")
                    warned = len(_warnings(proxy))
                    await redis.hset(KEYS.policies, field, value)
                    await _notify(redis)
                    await wait_until(_more_warnings(proxy, warned), 5, f"a warning about: {what}")
                    assert await _metric(session, admin,
                                         "apigw_policy_invalid_records_total") > counted, what
                    await guard_holds(what)
                    cases += 1

                # Each bad record was reported once, though every case reloaded them all.
                shown = Counter(entry["policy_id"] for entry in _warnings(proxy))
                assert len(shown) == len(RECORDS), shown
                assert set(shown.values()) == {1}, shown
                assert all(entry["level"] == "warning" and entry["error"]
                           for entry in _warnings(proxy))

                # --- not records: the version counter, and keys of the wrong type ------------
                await _hostile_counters(redis, session, proxy_url, admin, guard_holds)
                cases += 2
                await redis.set(KEYS.policy_history("bad-json"), "not a list")
                await _notify(redis)
                await asyncio.sleep(0.6)
                await guard_holds("history of the wrong type")
                cases += 1
                await _policies_of_the_wrong_type(redis, session, proxy_url, admin)
                cases += 1

                # A change through the store still reaches the gateway after all that.
                wider = guard.model_copy(update={"limit": GUARD + 1, "burst": GUARD + 1})
                await store.put(wider, actor="test", reason="after the hostile records")
                await wait_until(lambda: _probe_ok(session, proxy_url, GUARD + 1), 5,
                                 "the new limit")
            traffic.stop.set()
            await background
    finally:
        traffic.stop.set()
        await redis.aclose()
        if background is not None and not background.done():
            background.cancel()
    assert cases == len(RECORDS) + 4
    assert traffic.statuses.total() > 100, traffic.statuses
    assert set(traffic.statuses) == {200}, traffic.statuses  # never a 5xx, nor a wrong 429
    text = proxy.log()
    assert SECRET not in text, "a secret of a hostile record reached the log"
    assert "Traceback" not in text, text[-3000:]
    assert max(len(line) for line in text.splitlines()) < 2000  # no record echoed into a line


def _more_warnings(proxy: ManagedProcess, than: int) -> Callable[[], bool]:
    return lambda: len(_warnings(proxy)) > than


_fresh = itertools.count()


async def _probe_ok(session: aiohttp.ClientSession, proxy: str, limit: int) -> bool:
    client = f"probe-new-limit-{next(_fresh)}"
    return await _probe(session, proxy, client, limit + 1) == [200] * limit + [429]


async def _hostile_counters(redis: aioredis.Redis, session: aiohttp.ClientSession, proxy: str,
                            admin: str, guard_holds: Callable[..., Awaitable[None]]) -> None:
    # Backwards: a policy written directly with the counter moved down is still picked up (the
    # gateway reloads on any change of the counter, not only on an increase).
    ready = await _readyz(session, admin)
    version = int(ready["policies"]["version"])
    assert version > 2
    late = Policy(id="late", route_id="a", key_by="client_id", match_key="late-client", limit=1,
                  window_s=60, version=1)
    await redis.hset(KEYS.policies, "late", late.to_json())
    await redis.set(KEYS.policies_version, 2)  # no publish: only the poll can notice
    await wait_until(lambda: _late_limited(session, proxy), 5, "the policy behind the counter")
    await guard_holds("counter moved backwards")
    # Not a number: the gateway keeps its policies, says so, and recovers when it is repaired.
    await redis.set(KEYS.policies_version, "not-a-number")
    await redis.publish(KEYS.policies_channel, "changed")
    await asyncio.sleep(0.6)
    statuses = await _probe(session, proxy, "probe-nan-counter", GUARD + 1)
    assert statuses == [200] * GUARD + [429]
    await redis.set(KEYS.policies_version, version + 10)
    await redis.publish(KEYS.policies_channel, "changed")
    await asyncio.sleep(0.6)
    await guard_holds("counter repaired")


async def _late_limited(session: aiohttp.ClientSession, proxy: str) -> bool:
    return await _probe(session, proxy, "late-client", 2) == [200, 429]


async def _policies_of_the_wrong_type(redis: aioredis.Redis, session: aiohttp.ClientSession,
                                      proxy: str, admin: str) -> None:
    """The policies hash replaced by a string: the last good copy keeps applying."""
    await redis.rename(KEYS.policies, "saved-policies")
    await redis.set(KEYS.policies, "not a hash")
    await _notify(redis)

    async def unhealthy() -> bool:
        return (await _readyz(session, admin))["policies"]["healthy"] is False

    await wait_until(unhealthy, 5, "the policy cache to notice")
    statuses = await _probe(session, proxy, "probe-wrong-type", GUARD + 1)
    assert statuses == [200] * GUARD + [429]
    await redis.delete(KEYS.policies)
    await redis.rename("saved-policies", KEYS.policies)
    await _notify(redis)

    async def healthy() -> bool:
        return (await _readyz(session, admin))["policies"]["healthy"] is True

    await wait_until(healthy, 10, "the policy cache to recover")
