"""PolicyStore and PolicyCache against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from apigw.redis_server import RedisServer
from proxy.policy import Mode, Policy, RedisKeys, Source
from proxy.policy_store import INVALID_RECORDS, AuditRecord, PolicyCache, PolicyStore


@pytest.fixture
def keys() -> RedisKeys:
    return RedisKeys("t")


@pytest.fixture
def store(redis_client: aioredis.Redis, keys: RedisKeys) -> PolicyStore:
    return PolicyStore(redis_client, keys)


@pytest.fixture
async def caches() -> AsyncIterator[list[PolicyCache]]:
    """Caches a test starts are stopped here, even when the test fails."""
    started: list[PolicyCache] = []
    try:
        yield started
    finally:
        for cache in started:
            await cache.stop()


def _policy(policy_id: str = "p", **fields: object) -> Policy:
    values: dict[str, object] = {"limit": 10, "window_s": 60}
    values.update(fields)
    return Policy(id=policy_id, **values)  # type: ignore[arg-type]


def _keys_of(values: dict[str, str]) -> Callable[[str], str]:
    return lambda key_by: values.get(key_by, "")


async def _eventually(check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {timeout}s")


async def test_put_bumps_versions_and_keeps_history(store: PolicyStore) -> None:
    first = await store.put(_policy(limit=10), actor="alice", reason="initial")
    second = await store.put(_policy(limit=20), actor="bob", reason="more")
    assert (first.version, second.version) == (1, 2)
    assert second.updated_by == "bob"
    assert second.reason == "more"
    assert await store.get("p") == second
    assert [p.version for p in await store.history("p")] == [2, 1]
    assert await store.version() == 2
    assert [p.id for p in await store.list()] == ["p"]


async def test_new_policy_keeps_a_larger_given_version(store: PolicyStore) -> None:
    assert (await store.put(_policy(version=7), actor="a", reason="r")).version == 7
    assert (await store.put(_policy(version=1), actor="a", reason="r")).version == 8


async def test_concurrent_puts_get_distinct_versions(redis_url: str, keys: RedisKeys) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = PolicyStore(client, keys)
        written = await asyncio.gather(*(
            store.put(_policy(limit=n + 1), actor=f"w{n}", reason="race") for n in range(12)))
        assert sorted(p.version for p in written) == list(range(1, 13))
        assert len(await store.history("p")) == 12
        assert len(await store.audit_log(subject="p")) == 12
    finally:
        await client.aclose()


async def test_every_change_is_audited(store: PolicyStore) -> None:
    await store.put(_policy(limit=10), actor="alice", reason="create", evidence="ticket-1")
    await store.put(_policy(limit=5), actor="bob", reason="tighten")
    await store.rollback("p", actor="carol", reason="too tight")
    assert await store.delete("p", actor="dave", reason="gone")
    assert not await store.delete("p", actor="dave", reason="again")
    await store.audit(AuditRecord(actor="analytics", action="recommendation.create",
                                  subject="rec-1", reason="spike"))
    log = await store.audit_log()
    assert [r.action for r in log] == ["recommendation.create", "policy.delete",
                                       "policy.rollback", "policy.update", "policy.create"]
    assert all(r.id for r in log)
    created = log[-1]
    assert created.before is None
    assert created.after is not None
    assert created.after["limit"] == 10
    assert created.evidence == "ticket-1"
    update = log[-2]
    assert update.before is not None
    assert update.before["limit"] == 10
    assert [r.action for r in await store.audit_log(count=2, subject="p")] == [
        "policy.delete", "policy.rollback"]


async def test_rollback_writes_a_new_version_with_old_content(store: PolicyStore) -> None:
    await store.put(_policy(limit=10), actor="config", reason="base")
    await store.put(_policy(limit=3, source=Source.ANALYTICS), actor="analytics",
                    reason="spike")
    rolled = await store.rollback("p", actor="sre", reason="false positive")
    assert (rolled.version, rolled.limit, rolled.source) == (3, 10, Source.CONFIG)
    assert rolled.updated_by == "sre"
    again = await store.rollback("p", actor="sre", reason="undo", to_version=2)
    assert (again.version, again.limit) == (4, 3)
    with pytest.raises(KeyError):
        await store.rollback("p", actor="sre", reason="x", to_version=99)
    await store.delete("p", actor="sre", reason="remove")
    restored = await store.rollback("p", actor="sre", reason="restore")
    assert (restored.version, restored.limit) == (5, 3)


async def test_expired_version_reverts_to_previous(store: PolicyStore) -> None:
    now = time.time()
    await store.put(_policy(limit=100), actor="config", reason="base")
    await store.put(_policy(limit=5, source=Source.ANALYTICS, expires_at=now + 60),
                    actor="analytics", reason="spike")
    assert [p.limit for p in await store.effective(now)] == [5]
    assert [(p.limit, p.version) for p in await store.effective(now + 61)] == [(100, 1)]
    # An expiring policy with nothing earlier disappears when it expires.
    await store.put(_policy("q", expires_at=now + 10), actor="op", reason="temporary")
    assert {p.id for p in await store.effective(now + 11)} == {"p"}
    # revert_expired makes the revert an audited version of its own.
    assert await store.revert_expired(now + 61) == 2
    current = await store.get("p")
    assert current is not None
    assert (current.limit, current.version) == (100, 3)
    assert await store.get("q") is None
    assert {r.action for r in await store.audit_log(count=2)} == {"policy.expire"}


async def test_seed_rules(store: PolicyStore) -> None:
    baseline = [_policy("a", limit=10), _policy("b", limit=20)]
    assert await store.seed(baseline) == 2
    assert await store.seed(baseline) == 0  # unchanged config is not rewritten
    assert await store.seed([_policy("a", limit=11), _policy("b", limit=20)]) == 1
    a = await store.get("a")
    assert a is not None
    assert (a.limit, a.version, a.source) == (11, 2, Source.CONFIG)
    # A runtime override wins over the baseline until it expires.
    await store.put(_policy("b", limit=2, source=Source.OPERATOR), actor="sre", reason="abuse")
    assert await store.seed([_policy("a", limit=11), _policy("b", limit=30)]) == 0
    b = await store.get("b")
    assert b is not None
    assert b.limit == 2
    await store.put(_policy("b", limit=2, source=Source.ANALYTICS, expires_at=time.time() - 1),
                    actor="analytics", reason="expired")
    assert await store.seed([_policy("b", limit=30)]) == 1
    b = await store.get("b")
    assert b is not None
    assert (b.limit, b.source) == (30, Source.CONFIG)


async def test_seed_from_many_workers_writes_once(redis_url: str, keys: RedisKeys) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(4)]
    try:
        counts = await asyncio.gather(*(PolicyStore(c, keys).seed([_policy("a"), _policy("b")])
                                        for c in clients))
        assert sum(counts) == 2
        assert len(await PolicyStore(clients[0], keys).audit_log()) == 2
    finally:
        for client in clients:
            await client.aclose()


async def test_malformed_record_skipped_and_last_good_kept(
        store: PolicyStore, redis_client: aioredis.Redis, keys: RedisKeys,
        caches: list[PolicyCache]) -> None:
    await store.put(_policy("good", limit=10), actor="a", reason="r")
    await store.put(_policy("flaky", limit=7), actor="a", reason="r")
    cache = PolicyCache(store, [], refresh_s=0.2)
    caches.append(cache)
    await cache.start()
    assert {p.id for p in cache.policies} == {"good", "flaky"}

    before = INVALID_RECORDS._value.get()
    await redis_client.hset(keys.policies, "flaky", '{"id": "flaky", "limit": -1}')
    await redis_client.hset(keys.policies, "junk", "not json")
    await redis_client.publish(keys.policies_channel, "flaky")
    await store.put(_policy("good", limit=12), actor="a", reason="r")

    def reloaded() -> bool:
        return any(p.id == "good" and p.limit == 12 for p in cache.policies)

    await _eventually(reloaded, 2.0)
    flaky = [p for p in cache.policies if p.id == "flaky"]
    assert flaky
    assert flaky[0].limit == 7
    assert "junk" not in {p.id for p in cache.policies}
    assert INVALID_RECORDS._value.get() >= before + 2
    assert {p.id for p in await store.list()} == {"good"}
    # A worker that starts now never saw the good version: it takes it from the history.
    fresh = PolicyCache(store, [], refresh_s=0.2)
    caches.append(fresh)
    await fresh.start()
    assert {(p.id, p.limit) for p in fresh.policies} == {("good", 12), ("flaky", 7)}
    assert {(p.id, p.limit) for p in await store.effective()} == {("good", 12), ("flaky", 7)}


async def test_cache_sees_changes_within_a_second_by_pubsub(
        store: PolicyStore, caches: list[PolicyCache]) -> None:
    await store.put(_policy(limit=10), actor="a", reason="r")
    cache = PolicyCache(store, [], refresh_s=30)  # the poll cannot help within this test
    caches.append(cache)
    await cache.start()
    await asyncio.sleep(0.2)  # let the subscription settle
    await store.put(_policy(limit=3), actor="a", reason="r")
    took = await _eventually(lambda: [p.limit for p in cache.policies] == [3], 1.0)
    assert took < 1.0
    assert cache.healthy
    assert cache.version == 2


async def test_cache_sees_changes_by_polling_without_pubsub(
        store: PolicyStore, redis_client: aioredis.Redis, keys: RedisKeys,
        caches: list[PolicyCache]) -> None:
    cache = PolicyCache(store, [], refresh_s=0.3)
    caches.append(cache)
    await cache.start()
    # An operator's raw write with no PUBLISH: only the version poll can notice it.
    await redis_client.hset(keys.policies, "p", _policy(limit=4).to_json())
    await redis_client.incr(keys.policies_version)
    await _eventually(lambda: [p.limit for p in cache.policies] == [4], 1.0)


async def test_cache_applies_expiry_without_redis_traffic(
        store: PolicyStore, caches: list[PolicyCache]) -> None:
    await store.put(_policy(limit=100), actor="config", reason="base")
    await store.put(_policy(limit=5, source=Source.ANALYTICS, expires_at=time.time() + 0.5),
                    actor="analytics", reason="spike")
    cache = PolicyCache(store, [], refresh_s=30)
    caches.append(cache)
    await cache.start()
    found = cache.select("r", "GET", "", _keys_of({"client_id": "c"}))
    assert found is not None
    assert found[0].limit == 5
    await asyncio.sleep(0.6)
    found = cache.select("r", "GET", "", _keys_of({"client_id": "c"}))
    assert found is not None
    assert (found[0].limit, found[0].version) == (100, 1)


async def test_select_most_specific_and_targeted(
        store: PolicyStore, caches: list[PolicyCache]) -> None:
    for policy in [
        _policy("global"),
        _policy("orders", route_id="orders"),
        _policy("orders-post", route_id="orders", method="POST"),
        _policy("tenant-acme", tenant="acme", key_by="tenant"),
        _policy("abuser", route_id="orders", match_key="evil", limit=1),
        _policy("disabled", route_id="orders", method="GET", mode=Mode.OFF),
    ]:
        await store.put(policy, actor="a", reason="r")
    cache = PolicyCache(store, [], refresh_s=30)
    caches.append(cache)
    await cache.start()

    def pick(route: str, method: str, tenant: str, client: str) -> tuple[str, str] | None:
        found = cache.select(route, method, tenant, _keys_of({"client_id": client,
                                                             "tenant": tenant}))
        return None if found is None else (found[0].id, found[1])

    assert pick("orders", "GET", "", "good") == ("orders", "good")  # `off` is skipped
    assert pick("orders", "POST", "", "good") == ("orders-post", "good")
    assert pick("orders", "GET", "", "evil") == ("abuser", "evil")
    assert pick("orders", "POST", "", "evil") == ("abuser", "evil")
    assert pick("users", "GET", "", "evil") == ("global", "evil")
    assert pick("users", "GET", "acme", "x") == ("tenant-acme", "acme")
    assert pick("orders", "GET", "acme", "x") == ("orders", "x")
    # Memoised per (route, method, tenant), and cleared on reload.
    await store.delete("global", actor="a", reason="r")
    await _eventually(lambda: pick("users", "GET", "", "x") is None, 1.0)


async def test_select_both_is_select_of_the_rate_policy_and_of_the_quota(
        store: PolicyStore, caches: list[PolicyCache]) -> None:
    for policy in [
        _policy("per-client", key_by="client_id"),
        _policy("per-ip", route_id="orders", key_by="ip", limit=50),
        _policy("daily", route_id="orders", key_by="client_id", quota_period="day",
                limit=1000),
        _policy("evil-only", route_id="users", match_key="evil", limit=1),
    ]:
        await store.put(policy, actor="a", reason="r")
    cache = PolicyCache(store, [], refresh_s=30)
    caches.append(cache)
    await cache.start()
    keys = _keys_of({"client_id": "c", "ip": "10.0.0.1"})

    def ids(found: tuple[object, object]) -> tuple[str | None, str | None]:
        return tuple(None if f is None else f[0].id for f in found)  # type: ignore[index,return-value]

    for route, method, pre_auth in [("orders", "GET", False), ("orders", "GET", True),
                                    ("users", "GET", False), ("users", "GET", True),
                                    ("other", "POST", True)]:
        both = cache.select_both(route, method, "", keys, pre_auth=pre_auth)
        assert both == (cache.select(route, method, "", keys, pre_auth=pre_auth),
                        cache.select(route, method, "", keys, quota=True, pre_auth=pre_auth))
    assert ids(cache.select_both("orders", "GET", "", keys)) == ("per-ip", "daily")
    assert ids(cache.select_both("orders", "GET", "", keys, pre_auth=True)) == ("per-ip", None)
    assert ids(cache.select_both("users", "GET", "", keys)) == ("per-client", None)
    assert ids(cache.select_both("users", "GET", "", _keys_of({"client_id": "evil"}))) == (
        "evil-only", None)
    assert cache.select_both("users", "GET", "", keys, pre_auth=True) == (None, None)

    def broken(key_by: str) -> str:
        raise RuntimeError("bad key function")

    assert cache.select_both("orders", "GET", "", broken) == (None, None)


async def test_select_never_raises(store: PolicyStore, caches: list[PolicyCache]) -> None:
    cache = PolicyCache(store, [_policy()], refresh_s=30)
    caches.append(cache)

    def broken(key_by: str) -> str:
        raise RuntimeError("bad key function")

    assert cache.select("r", "GET", "", broken) is None


async def test_cache_uses_baseline_when_redis_is_down_and_recovers(
        tmp_path: Path, keys: RedisKeys, caches: list[PolicyCache]) -> None:
    server = RedisServer(tmp_path / "r")  # not started yet: Redis is down
    client = aioredis.Redis.from_url(server.url)
    try:
        store = PolicyStore(client, keys)
        cache = PolicyCache(store, [_policy("base", limit=9)], refresh_s=0.2,
                            io_timeout_s=0.5, max_backoff_s=0.5)
        caches.append(cache)
        await cache.start()
        assert not cache.healthy
        assert [p.id for p in cache.policies] == ["base"]
        assert cache.select("r", "GET", "", _keys_of({"client_id": "c"})) is not None

        server.start()
        await store.put(_policy("live", limit=3), actor="a", reason="r")
        await _eventually(lambda: cache.healthy and [p.id for p in cache.policies] == ["live"],
                          5.0)
        server.stop()
        await _eventually(lambda: not cache.healthy, 5.0)
        assert [p.id for p in cache.policies] == ["live"]  # the last good copy keeps applying
    finally:
        await client.aclose()
        server.stop()
