"""Per-request cost and accuracy of each rate-limit mode (redis, hybrid, local), GCRA and
sliding window, against a throwaway redis-server on loopback.

    .venv/bin/python -m bench.ratelimit_modes [--requests 20000] [--workers 4]

Cost: sequential checks of one hot key that stays under its limit (so every check is a real
admission), microseconds per check, measured in one process - what a worker pays per request.
Accuracy: `workers` limiter stacks (one Redis connection each, as separate workers have)
send `4 x limit` concurrent checks for one key: allowed count vs the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from apigw.redis_server import RedisServer
from apigw.signals import interrupt_on_termination
from proxy.config import RateLimit
from proxy.policy import Algorithm, Policy, RedisKeys
from proxy.ratelimit_step import build_limiter


def _client(url: str) -> aioredis.Redis:
    # Blocking pool: redis-py's default pool raises MaxConnectionsError beyond 100 commands
    # in flight, which the failover would count as "Redis down".
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=30)
    return aioredis.Redis(connection_pool=pool)


async def _cost(url: str, backend: str, algorithm: Algorithm, requests: int) -> float:
    redis = _client(url)
    try:
        limiter = build_limiter(RateLimit(backend=backend), redis,  # type: ignore[arg-type]
                                RedisKeys("bench"), workers=1, timeout_s=1.0)
        policy = Policy(id=f"cost-{backend}-{algorithm}", limit=10_000_000, window_s=60,
                        algorithm=algorithm)
        for _ in range(200):  # warm up (script load, connection)
            await limiter.check(policy, "warm")
        started = time.perf_counter()
        for _ in range(requests):
            await limiter.check(policy, "hot")
        return (time.perf_counter() - started) / requests * 1e6
    finally:
        await redis.aclose()


async def _accuracy(url: str, backend: str, algorithm: Algorithm, workers: int,
                    limit: int) -> int:
    clients = [_client(url) for _ in range(workers)]
    try:
        # a generous timeout: this measures the algorithm, not the failover under overload
        limiters = [build_limiter(RateLimit(backend=backend), c,  # type: ignore[arg-type]
                                  RedisKeys("bench"), workers=workers, timeout_s=30.0)
                    for c in clients]
        policy = Policy(id=f"acc-{backend}-{algorithm}-{time.time_ns()}", limit=limit,
                        window_s=86_400, algorithm=algorithm)  # no refill during the burst
        decisions = await asyncio.gather(*(limiters[n % workers].check(policy, "hot")
                                           for n in range(4 * limit)))
        return sum(d.allowed for d in decisions)
    finally:
        for c in clients:
            await c.aclose()


async def run(requests: int, workers: int, limit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            print(f"{'mode':8} {'algorithm':15} {'us/check':>9} {'allowed':>8} {'limit':>6}"
                  f"  (accuracy: {workers} workers, {4 * limit} concurrent requests)")
            for backend in ("redis", "hybrid", "local"):
                for algorithm in (Algorithm.GCRA, Algorithm.SLIDING_WINDOW):
                    cost = await _cost(server.url, backend, algorithm, requests)
                    allowed = await _accuracy(server.url, backend, algorithm, workers, limit)
                    print(f"{backend:8} {algorithm.value:15} {cost:9.1f} {allowed:8d} "
                          f"{limit:6d}")
        finally:
            server.stop()


def main() -> None:
    interrupt_on_termination()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args()
    import uvloop

    uvloop.run(run(args.requests, args.workers, args.limit))


if __name__ == "__main__":
    main()
