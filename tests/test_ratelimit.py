"""GCRA in Redis and in process, and the failover between them, against real redis-servers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from apigw.redis_server import RedisServer
from proxy.policy import Policy, RedisKeys
from proxy.ratelimit import (
    Decision,
    FailoverRateLimiter,
    HybridRateLimiter,
    LocalRateLimiter,
    RateLimitUnavailable,
    RedisRateLimiter,
)


def _policy(limit: int, window_s: float, burst: int | None = None, version: int = 1,
            policy_id: str = "p") -> Policy:
    return Policy(id=policy_id, limit=limit, window_s=window_s, burst=burst, version=version)


async def test_exactly_burst_at_once_then_denied_with_retry_after(
        redis_client: aioredis.Redis) -> None:
    limiter = RedisRateLimiter(redis_client, RedisKeys("t"))
    policy = _policy(limit=10, window_s=10, burst=5)  # one per second, five at once
    decisions = [await limiter.check(policy, "alice") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    denied = decisions[-1]
    assert denied.backend == "redis"
    assert denied.limit == 10
    assert 0.9 < denied.retry_after_s <= 1.0
    assert 4.9 < denied.reset_after_s <= 5.0
    assert decisions[0].retry_after_s == 0


async def test_refills_at_the_rate(redis_client: aioredis.Redis) -> None:
    limiter = RedisRateLimiter(redis_client, RedisKeys("t"))
    policy = _policy(limit=5, window_s=1, burst=2)  # one per 200 ms
    assert [(await limiter.check(policy, "k")).allowed for _ in range(3)] == [True, True, False]
    await asyncio.sleep(0.25)  # one interval -> one more
    assert [(await limiter.check(policy, "k")).allowed for _ in range(2)] == [True, False]
    await asyncio.sleep(1.0)  # a long pause refills the burst, never more
    assert [(await limiter.check(policy, "k")).allowed for _ in range(3)] == [True, True, False]


async def test_state_key_has_a_ttl_and_keys_are_independent(
        redis_client: aioredis.Redis) -> None:
    keys = RedisKeys("t")
    limiter = RedisRateLimiter(redis_client, keys)
    policy = _policy(limit=2, window_s=60)
    assert [(await limiter.check(policy, "a")).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.check(policy, "b")).allowed
    newer = _policy(limit=2, window_s=60, version=2)  # a new version starts a fresh budget
    assert (await limiter.check(newer, "a")).allowed
    ttl_ms = await redis_client.pttl(keys.ratelimit("p", 1, "a"))
    assert 0 < ttl_ms <= 60_001


async def test_concurrent_checks_allow_exactly_the_limit(redis_url: str) -> None:
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=32)
    client = aioredis.Redis(connection_pool=pool)
    try:
        limiter = RedisRateLimiter(client, RedisKeys("t"))
        policy = _policy(limit=50, window_s=60)
        decisions = await asyncio.gather(*(limiter.check(policy, "hot") for _ in range(200)))
        assert sum(d.allowed for d in decisions) == 50
    finally:
        await client.aclose()


async def test_cost_above_one_and_long_keys(redis_client: aioredis.Redis) -> None:
    limiter = RedisRateLimiter(redis_client, RedisKeys("t"))
    policy = _policy(limit=10, window_s=60)
    long_key = "x" * 5000
    assert (await limiter.check(policy, long_key, cost=7)).remaining == 3
    assert not (await limiter.check(policy, long_key, cost=4)).allowed
    assert (await limiter.check(policy, long_key, cost=3)).allowed
    assert all(len(key) < 300 for key in await redis_client.keys("t:rl:*"))


def test_local_limiter_same_semantics() -> None:
    limiter = LocalRateLimiter()
    policy = _policy(limit=10, window_s=10, burst=5)
    decisions = [limiter.check_now(policy, "a", now=100.0) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[-1].retry_after_s == pytest.approx(1.0)
    assert decisions[-1].backend == "local"
    assert not limiter.check_now(policy, "a", now=100.99).allowed
    assert limiter.check_now(policy, "a", now=101.0).allowed
    assert limiter.check_now(policy, "b", now=101.0).allowed  # independent keys
    # After a long pause the key is back to a full burst, not more.
    assert sum(limiter.check_now(policy, "a", now=1000.0).allowed for _ in range(9)) == 5


def test_local_limiter_divides_limits_and_bounds_keys() -> None:
    limiter = LocalRateLimiter(divisor=4, max_keys=100)
    policy = _policy(limit=40, window_s=60)
    assert sum(limiter.check_now(policy, "a", now=0.0).allowed for _ in range(40)) == 10
    for index in range(500):
        limiter.check_now(policy, f"k{index}", now=1.0)
    assert len(limiter) == 100


async def test_local_limiter_concurrent_exact() -> None:
    limiter = LocalRateLimiter()
    policy = _policy(limit=50, window_s=60)
    decisions = await asyncio.gather(*(limiter.check(policy, "hot") for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50


async def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_failover_open_uses_local_limits_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    client = aioredis.Redis.from_url(server.url)
    try:
        limiter = FailoverRateLimiter(RedisRateLimiter(client, RedisKeys("t")),
                                      LocalRateLimiter(divisor=2), "open", timeout_s=0.2,
                                      min_backoff_s=0.2, max_backoff_s=0.5)
        policy = _policy(limit=10, window_s=60)
        first = await limiter.check(policy, "a")
        assert first.backend == "redis"
        assert not limiter.degraded

        server.stop()
        started = time.monotonic()
        decisions = [await limiter.check(policy, "b") for _ in range(8)]
        assert limiter.degraded
        assert {d.backend for d in decisions} == {"local"}
        assert sum(d.allowed for d in decisions) == 5  # 10 divided by 2 replicas
        assert time.monotonic() - started < 1.0  # a dead Redis costs one timeout, not eight

        server = RedisServer(tmp_path / "r", port=server.port).start()

        async def recovered() -> bool:
            return (await limiter.check(policy, "c")).backend == "redis"

        await _wait_for(recovered)
        assert not limiter.degraded
    finally:
        await client.aclose()
        server.stop()


async def test_failover_closed_raises_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    client = aioredis.Redis.from_url(server.url)
    try:
        limiter = FailoverRateLimiter(RedisRateLimiter(client, RedisKeys("t")),
                                      LocalRateLimiter(), "closed", timeout_s=0.2,
                                      min_backoff_s=0.2, max_backoff_s=0.5)
        policy = _policy(limit=10, window_s=60)
        assert (await limiter.check(policy, "a")).allowed
        server.stop()
        for _ in range(3):
            with pytest.raises(RateLimitUnavailable):
                await limiter.check(policy, "a")
        assert limiter.degraded

        server = RedisServer(tmp_path / "r", port=server.port).start()

        async def recovered() -> bool:
            try:
                return (await limiter.check(policy, "a")).backend == "redis"
            except RateLimitUnavailable:
                return False

        await _wait_for(recovered)
        assert not limiter.degraded
    finally:
        await client.aclose()
        server.stop()


async def test_failover_answers_locally_when_redis_is_busy_past_the_timeout(
        redis_client: aioredis.Redis) -> None:
    limiter = FailoverRateLimiter(RedisRateLimiter(redis_client, RedisKeys("t")),
                                  LocalRateLimiter(), "open", timeout_s=0.05,
                                  min_backoff_s=0.2, max_backoff_s=0.5)
    policy = _policy(limit=10, window_s=60)
    try:
        assert (await limiter.check(policy, "busy")).backend == "redis"
        blocker = aioredis.Redis(connection_pool=redis_client.connection_pool)
        busy = asyncio.ensure_future(blocker.eval(  # keeps the one Redis thread for 0.4 s
            "local t = redis.call('TIME') local n = t "
            "while (n[1] - t[1]) * 1000000 + (n[2] - t[2]) < 400000 do "
            "n = redis.call('TIME') end return 1", 0))
        await asyncio.sleep(0.02)  # the script is running
        decision = await limiter.check(policy, "busy")
        assert decision.backend == "local"  # Redis would have answered, 0.4 s late
        assert limiter.degraded
        await busy
    finally:
        await limiter.close()


class _CountingLimiter:
    """A real RedisRateLimiter that counts its round trips."""

    def __init__(self, inner: RedisRateLimiter) -> None:
        self.inner = inner
        self.calls = 0

    async def check(self, policy: Policy, key: str, cost: int = 1) -> Decision:
        self.calls += 1
        return await self.inner.check(policy, key, cost)

    async def close(self) -> None:
        await self.inner.close()


async def test_hybrid_workers_stay_within_the_documented_bound(redis_url: str) -> None:
    workers, batch = 4, 10
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(workers)]
    try:
        backends = [_CountingLimiter(RedisRateLimiter(c, RedisKeys("t"))) for c in clients]
        limiters = [HybridRateLimiter(b, batch=batch) for b in backends]
        policy = _policy(limit=100, window_s=60)
        decisions = await asyncio.gather(*(limiters[n % workers].check(policy, "hot")
                                           for n in range(400)))
        allowed = sum(d.allowed for d in decisions)
        assert 100 - workers * (batch - 1) <= allowed <= 100
        round_trips = sum(b.calls for b in backends)
        print(f"hybrid: {allowed} allowed of 400, {round_trips} Redis round trips")
        assert round_trips < 40, round_trips  # far fewer than one per request
        # A limited key is answered locally until its retry_after.
        before = sum(b.calls for b in backends)
        more = [await limiters[0].check(policy, "hot") for _ in range(50)]
        assert not any(d.allowed for d in more)
        assert sum(b.calls for b in backends) - before <= 1
        assert all(d.retry_after_s > 0 for d in more)
    finally:
        for client in clients:
            await client.aclose()


async def test_hybrid_refills_ahead_so_a_busy_key_rarely_waits_and_never_holds_more_than_a_batch(
        redis_client: aioredis.Redis) -> None:
    batch = 10
    backend = _CountingLimiter(RedisRateLimiter(redis_client, RedisKeys("t")))
    limiter = HybridRateLimiter(backend, batch=batch)
    policy = _policy(limit=1000, window_s=60)
    answered_locally = 0
    for _ in range(200):
        if limiter.check_held(policy, "busy") is not None:
            answered_locally += 1
        else:
            assert (await limiter.check(policy, "busy")).allowed
        assert limiter.held_tokens(policy, "busy") <= batch
        for _ in range(5):  # room for a refill's round trip, as other requests would give
            await asyncio.sleep(0)
    assert answered_locally >= 195, answered_locally
    assert backend.calls <= 200 // (batch // 2) + 2, backend.calls
    counted = await RedisRateLimiter(redis_client, RedisKeys("t")).check(policy, "busy", 0)
    assert 1000 - 200 - batch <= counted.remaining <= 1000 - 200  # reserved, never over


class _FailingLimiter:
    def __init__(self, inner: RedisRateLimiter) -> None:
        self.inner = inner
        self.fail = False

    async def check(self, policy: Policy, key: str, cost: int = 1) -> Decision:
        if self.fail:
            raise ConnectionError("redis went away")
        return await self.inner.check(policy, key, cost)

    async def close(self) -> None:
        await self.inner.close()


async def test_hybrid_failed_refill_spends_what_it_holds_then_asks_in_the_foreground(
        redis_client: aioredis.Redis) -> None:
    backend = _FailingLimiter(RedisRateLimiter(redis_client, RedisKeys("t")))
    limiter = HybridRateLimiter(backend, batch=10)
    policy = _policy(limit=1000, window_s=60)
    assert (await limiter.check(policy, "k")).allowed  # reserves 10, spends 1
    backend.fail = True
    spent_locally = 0
    while (decision := limiter.check_held(policy, "k")) is not None:
        assert decision.allowed
        spent_locally += 1
        await asyncio.sleep(0)
    assert spent_locally == 9  # the failed refills took nothing away
    with pytest.raises(ConnectionError):  # the failover limiter above decides from here
        await limiter.check(policy, "k")


async def test_hybrid_small_limits_stay_exact(redis_client: aioredis.Redis) -> None:
    limiter = HybridRateLimiter(RedisRateLimiter(redis_client, RedisKeys("t")), batch=10)
    policy = _policy(limit=3, window_s=60)  # burst 3 -> batch 1: exact
    decisions = [await limiter.check(policy, "k") for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
