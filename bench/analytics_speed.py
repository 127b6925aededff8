"""One scheduled analytics run over 200 endpoints x 7 days of per-minute rollups.

Fills a temporary chDB store's rollup tables directly (INSERT ... SELECT from numbers(),
the aggregate states built with arrayReduce), so the run reads exactly what the collector's
materialized views would have written: events_1m for 7 days + the lookback, and
events_client_1m (20 clients a minute) for the detail lookback. Then times
`AnalyticsJob.run_once` (SQL + detectors + anomalies + write-back) against a throwaway
Redis, and the detectors alone on the same frame.

    .venv/bin/python bench/analytics_speed.py [--endpoints 200] [--days 7]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from analytics.job import AnalyticsJob
from analytics.settings import AnalyticsSettings
from apigw.redis_server import RedisServer
from apigw.signals import interrupt_on_termination
from collector.clickhouse import SharedClient
from collector.schema import migrate
from proxy.policy import RedisKeys
from proxy.policy_store import PolicyStore

_FILL_1M = """
INSERT INTO events_1m (minute, route_id, http_request_method, http_route, requests,
                       errors_5xx, errors_4xx, rate_limited, auth_failures, unmatched,
                       bytes_out, duration_sum_ms, duration_td, clients)
SELECT toDateTime({start:Int64} + (number % {minutes:UInt64}) * 60, 'UTC') AS minute,
       concat('r', toString(intDiv(number, {minutes:UInt64}))) AS route_id, 'GET',
       concat('/r', toString(intDiv(number, {minutes:UInt64})), '/{id}'),
       toUInt64(100 + 50 * sin(number % 1440 / 229.2) + rand() % 20) AS requests,
       toUInt64(rand() % 2), toUInt64(rand() % 3), toUInt64(0), toUInt64(rand() % 2),
       toUInt64(0), toUInt64(requests * 500), toFloat64(requests * 20),
       arrayReduce('quantilesTDigestState(0.5, 0.95, 0.99)',
                   [toFloat64(10 + rand() % 5), toFloat64(20 + rand() % 5),
                    toFloat64(30 + rand() % 5)]),
       arrayReduce('uniqState', arrayMap(x -> toString(x), range(20)))
FROM numbers({rows:UInt64})
"""

_FILL_CLIENTS = """
INSERT INTO events_client_1m
SELECT toDateTime({start:Int64} + (intDiv(number, 20) % {minutes:UInt64}) * 60, 'UTC'),
       concat('r', toString(intDiv(number, 20 * {minutes:UInt64}))), 'GET',
       concat('/r', toString(intDiv(number, 20 * {minutes:UInt64})), '/{id}'),
       concat('client-', toString(number % 20)),
       toUInt64(5 + rand() % 5), toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0),
       arrayReduce('uniqState', [toString(rand() % 30), toString(rand() % 30)])
FROM numbers({rows:UInt64})
"""


def fill(ch: SharedClient, endpoints: int, days: float, now: float,
         settings: AnalyticsSettings) -> int:
    minutes = int(days * 1440) + settings.lookback_minutes + settings.history_minutes + 10
    start = int(now // 60 * 60) - minutes * 60
    with ch.lock:
        ch.client.command(_FILL_1M, parameters={"start": start, "minutes": minutes,
                                                "rows": endpoints * minutes})
        detail = settings.lookback_minutes
        ch.client.command(_FILL_CLIENTS, parameters={
            "start": int(now // 60 * 60) - detail * 60, "minutes": detail,
            "rows": endpoints * detail * 20})
    return endpoints * minutes


async def main(endpoints: int, days: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        ch = SharedClient(f"chdb://{Path(tmp) / 'ch'}")
        redis = aioredis.Redis.from_url(server.url)
        try:
            migrate(ch.client)
            settings = AnalyticsSettings(data_dir=Path(tmp), redis_url=server.url,
                                         season_days=int(days))
            now = time.time()
            started = time.perf_counter()
            rows = fill(ch, endpoints, days, now, settings)
            print(f"filled {rows} endpoint-minutes in {time.perf_counter() - started:.1f} s")
            job = AnalyticsJob(settings, redis, ch, PolicyStore(redis, RedisKeys()))
            for attempt in range(2):
                report = await job.run_once(now)
                print(f"run {attempt + 1}: {report.duration_s:.2f} s, {report.endpoints} "
                      f"endpoints, {len(report.anomalies)} anomalies")
            started = time.perf_counter()
            frame = await job.frame(now)
            read_s = time.perf_counter() - started
            started = time.perf_counter()
            import pandas as pd

            job.detect(frame, since=pd.Timestamp((now // 60) * 60 - 9 * 60, unit="s", tz="UTC"))
            print(f"  of which: SQL + frame {read_s:.2f} s ({len(frame)} rows), detectors "
                  f"{time.perf_counter() - started:.2f} s")
            await job.close()
        finally:
            await redis.aclose()
            ch.close()
            server.stop()


if __name__ == "__main__":
    interrupt_on_termination()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--days", type=float, default=7.0)
    args = parser.parse_args()
    asyncio.run(main(args.endpoints, args.days))
