"""Faults under steady load through the gateway: Redis, the collector, ClickHouse, upstreams.

The gateway runs in-process (its emitter's books are read directly), behind it two raw-socket
upstreams (one steady, one switched into failure modes); Redis is a redis-server of the test's
own with AOF on (stopped and started on the same port); the collector runs on a chDB directory
of the test's own (in-process, or as `python -m collector.service` when it is to be killed).

Each test checks, and records in tests/artifacts/fault_table.md:
- every failed request failed correctly (502/503/504 from a broken upstream; never a 500);
- p99 before, during and after; seconds until requests and the pipeline recovered;
- events emitted == rows stored + counted drops (+ dead letters): zero unexplained loss,
  and the events_1m rollup agrees with the rows.

Durations: short by default (CI); APIGW_FAULT_FULL=1 uses the issue's figures (Redis down
30 s, ClickHouse down 60 s), or set APIGW_FAULT_*_S one by one; APIGW_FAULT_RPS sets the load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from apigw.redis_server import RedisServer, free_port
from collector.clickhouse import make_client
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.server import make_redis, seed_policies, start_listener
from proxy.settings import ProxySettings
from tests.faults import (
    FaultResult,
    FlakyUpstream,
    InProcessCollector,
    Judge,
    Load,
    counts_of_store,
    dead_lettered,
    env_seconds,
    judge_ok_only,
    judge_upstream_fault,
    p99_ms,
    record,
    running,
    stream_caught_up,
    wait_until,
)
from tests.processes import ManagedProcess

pytestmark = pytest.mark.fault

RATE = float(os.environ.get("APIGW_FAULT_RPS", "100"))
BEFORE_S = 1.0
AFTER_S = 2.0
SWITCH_GUARD_S = 0.2  # a request sent this close to an upstream mode switch may meet either mode
CLIENT = {"X-Client-Id": "fault-client"}
STEADY_PATHS = [f"/ok/{n}" for n in range(10)]


def gateway_config(steady: str, flaky: str) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {
            "steady": {"url": steady, "timeouts": {"connect_s": 1, "read_s": 5, "total_s": 10}},
            "flaky": {"url": flaky, "timeouts": {"connect_s": 0.5, "read_s": 0.5,
                                                 "total_s": 2}}},
        "routes": [{"id": "ok", "match": {"prefix": "/ok"}, "upstream": "steady"},
                   {"id": "flaky", "match": {"prefix": "/flaky"}, "upstream": "flaky"}],
        "events": {"flush_interval_ms": 50},
        "ratelimit": {"policy_refresh_s": 0.5, "policies": [
            {"id": "per-client", "key_by": "client_id", "limit": 1_000_000, "window_s": 60,
             "mode": "enforce"}]},
    })


@dataclass
class Rig:
    url: str
    gateway: Gateway
    redis_server: RedisServer
    redis_url: str
    dsn: str
    steady: FlakyUpstream
    flaky: FlakyUpstream
    probe: aioredis.Redis  # the test's own view of Redis


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """Redis (AOF), two upstreams and the gateway; the collector is the test's business."""
    server = RedisServer(tmp_path / "redis", persist=True).start()
    steady, flaky = FlakyUpstream(), FlakyUpstream()
    gateway: Gateway | None = None
    runner: web.ServerRunner | None = None
    redis: aioredis.Redis | None = None
    probe = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        await steady.start()
        await flaky.start()
        port = free_port()
        settings = ProxySettings(redis_url=server.url, instance="fault-gw",
                                 listen=f"127.0.0.1:{port}", redis_timeout_s=0.1,
                                 shutdown_grace_s=2)
        config = gateway_config(steady.url, flaky.url)
        redis = make_redis(settings)
        await seed_policies(config, settings, redis)
        gateway = Gateway(config, settings, redis)
        await gateway.start()
        runner = await start_listener(gateway, settings.listen, shutdown_grace_s=2)
        yield Rig(f"http://127.0.0.1:{port}", gateway, server, server.url,
                  f"chdb://{tmp_path / 'clickhouse'}", steady, flaky, probe)
    finally:
        if runner is not None:
            await runner.cleanup()
        if gateway is not None and not gateway.stopping:
            await gateway.stop(timeout_s=5)
        if redis is not None:
            await redis.aclose()
        await probe.aclose()
        await steady.stop()
        await flaky.stop()
        server.stop()


async def close_books(r: Rig, result: FaultResult, counts: Any) -> None:
    """Stop the gateway (its emitter flushes), wait for the collector, fill the books."""
    await r.gateway.stop(timeout_s=10)
    await wait_until(lambda: stream_caught_up(r.probe), 60, "the collector to catch up")
    stats = r.gateway.emitter.stats if r.gateway.emitter is not None else {}
    rows, rollup = await counts()
    result.emitted = stats["emitted"]
    result.dropped = stats["dropped"]
    result.dead_lettered = await dead_lettered(r.probe)
    result.rows, result.rollup_requests = rows, rollup
    result.unexplained = result.emitted - result.rows - result.dropped - result.dead_lettered


def assert_books(result: FaultResult, load: Load, judge: Judge) -> None:
    bad = result.incorrect_samples(load, judge)
    assert result.failed_incorrect == 0, f"wrong failures: {bad}"
    assert result.unexplained == 0, result
    assert result.rollup_requests == result.rows, result
    assert result.answered <= result.emitted, result  # an event for every answered request
    assert result.rows > 0


async def group_backlog(probe: aioredis.Redis) -> int:
    """Stream entries the collector group has not acknowledged (pending + undelivered)."""
    groups: Any = await probe.xinfo_groups("apigw:events")
    group = next((g for g in groups if g["name"] in (b"collector", "collector")), None)
    return -1 if group is None else int(group["pending"]) + int(group.get("lag") or 0)


async def backlog_cleared(r: Rig) -> bool:
    """The emitter's buffer and the consumer group's backlog are back to steady-state sizes."""
    stats = r.gateway.emitter.stats if r.gateway.emitter is not None else {"buffered": 0}
    if stats["buffered"] > RATE:  # more than ~1 s of traffic still waiting
        return False
    return 0 <= await group_backlog(r.probe) <= 4


async def test_redis_stopped_then_restarted(tmp_path: Path) -> None:
    """(a) Rate limiting fails open on the local limiter, events wait in the emitter's buffer;
    nothing fails, nothing is lost, everything lands once Redis is back."""
    down = env_seconds("APIGW_FAULT_REDIS_DOWN_S", 5, 30)
    result = FaultResult("a_redis_down", f"Redis stopped {down:g} s, restarted", down, RATE)
    async with rig(tmp_path) as r:
        collector = InProcessCollector(r.redis_url, r.dsn)
        await collector.start()
        try:
            load = Load(r.url, STEADY_PATHS, RATE, headers=CLIENT)
            async with running(load):
                await asyncio.sleep(BEFORE_S)
                load.mark("during")
                await asyncio.to_thread(r.redis_server.stop)
                await asyncio.sleep(down)
                assert r.gateway.emitter is not None
                buffered_at_peak = r.gateway.emitter.stats["buffered"]
                degraded = r.gateway.limiter.degraded
                await asyncio.to_thread(r.redis_server.start)
                fault_end = time.monotonic()
                load.mark("after")
                result.recover_pipeline_s = round(await wait_until(
                    lambda: backlog_cleared(r), 60, "the backlog to clear"), 2)
                await asyncio.sleep(max(0.0, AFTER_S - (time.monotonic() - fault_end)))
            result.fill_requests(load, judge_ok_only, fault_end)
            await close_books(r, result, collector.counts)
        finally:
            await collector.stop()
            await collector.close()
    result.note = (f"fail-open on the local limiter (degraded={degraded}); "
                   f"{buffered_at_peak} events buffered at the end of the outage")
    record(result)
    assert degraded
    assert buffered_at_peak > 0
    assert_books(result, load, judge_ok_only)


def _collector_env(r: Rig, admin_port: int) -> dict[str, str]:
    return {"APIGW_REDIS_URL": r.redis_url, "APIGW_CLICKHOUSE_DSN": r.dsn,
            "APIGW_LISTEN": f"127.0.0.1:{admin_port}", "APIGW_BLOCK_MS": "100",
            "APIGW_CLAIM_IDLE_MS": "1000", "APIGW_CLAIM_INTERVAL_S": "0.5",
            "APIGW_RETRY_INITIAL_S": "0.05", "APIGW_RETRY_MAX_S": "0.5",
            "APIGW_LOG_LEVEL": "INFO"}


def _collector_process(r: Rig, admin_port: int, log_dir: Path, name: str) -> ManagedProcess:
    process = ManagedProcess(name, [sys.executable, "-m", "collector.service"],
                             _collector_env(r, admin_port), log_dir)
    process.wait_http(f"http://127.0.0.1:{admin_port}/healthz", timeout=60)
    return process


async def test_collector_sigkilled_then_restarted(tmp_path: Path) -> None:
    """(b) The stream holds the backlog; a new collector process reclaims the dead one's
    pending entries; the insert deduplication token keeps a re-insert from counting twice."""
    down = env_seconds("APIGW_FAULT_COLLECTOR_DOWN_S", 3, 30)
    result = FaultResult("b_collector_sigkill", f"collector SIGKILLed, back after {down:g} s",
                         down, RATE)
    admin_port = free_port()
    logs: list[str] = []
    async with rig(tmp_path) as r:
        first = await asyncio.to_thread(_collector_process, r, admin_port, tmp_path, "collector-1")
        second: ManagedProcess | None = None
        try:
            load = Load(r.url, STEADY_PATHS, RATE, headers=CLIENT)
            async with running(load):
                await asyncio.sleep(BEFORE_S + 1.0)  # rows are flowing
                load.mark("during")
                os.killpg(first.process.pid, signal.SIGKILL)
                await asyncio.to_thread(first.process.wait, 10)
                pending_at_kill = int((await r.probe.xpending("apigw:events",
                                                              "collector"))["pending"])
                await asyncio.sleep(down)
                second = await asyncio.to_thread(_collector_process, r, admin_port, tmp_path,
                                                 "collector-2")
                fault_end = time.monotonic()
                load.mark("after")
                result.recover_pipeline_s = round(await wait_until(
                    lambda: backlog_cleared(r), 60, "the backlog to clear"), 2)
                await asyncio.sleep(max(0.0, AFTER_S - (time.monotonic() - fault_end)))
            result.fill_requests(load, judge_ok_only, fault_end)
            await r.gateway.stop(timeout_s=10)
            await wait_until(lambda: stream_caught_up(r.probe), 60, "the collector to catch up")
        finally:
            first.stop()
            if second is not None:
                assert second.stop() == 0
                logs.append(second.log())
        stats = r.gateway.emitter.stats if r.gateway.emitter is not None else {}
        result.emitted, result.dropped = stats["emitted"], stats["dropped"]
        result.dead_lettered = await dead_lettered(r.probe)
        result.rows, result.rollup_requests = await asyncio.to_thread(counts_of_store, r.dsn)
        result.unexplained = result.emitted - result.rows - result.dropped - result.dead_lettered
    result.note = (f"{pending_at_kill} stream entries pending at the kill, reclaimed by the new "
                   "consumer")
    record(result)
    assert "Traceback" not in "".join(logs)
    assert_books(result, load, judge_ok_only)


def _refuses_unreachable_clickhouse(r: Rig, tmp_path: Path) -> tuple[int, str]:
    """A collector pointed at a closed port exits with a clear error (no traceback)."""
    env = {**os.environ, **_collector_env(r, free_port()),
           "APIGW_CLICKHOUSE_DSN": f"http://default:s3cr3t-pw@127.0.0.1:{free_port()}/default"}
    done = subprocess.run([sys.executable, "-m", "collector.service"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


async def test_clickhouse_unreachable_then_back(tmp_path: Path) -> None:
    """(c) Inserts fail and are retried with back-off; nothing is acknowledged, the stream
    holds the backlog, and the same batches land once ClickHouse is back."""
    down = env_seconds("APIGW_FAULT_CLICKHOUSE_DOWN_S", 5, 60)
    result = FaultResult("c_clickhouse_down", f"ClickHouse unreachable {down:g} s", down, RATE)
    async with rig(tmp_path) as r:
        collector = InProcessCollector(r.redis_url, r.dsn)
        await collector.start()
        assert collector.ch is not None
        assert collector.collector is not None
        try:
            load = Load(r.url, STEADY_PATHS, RATE, headers=CLIENT)
            async with running(load):
                await asyncio.sleep(BEFORE_S)
                load.mark("during")
                await asyncio.to_thread(collector.ch.close)  # every insert now fails
                refusal = asyncio.create_task(
                    asyncio.to_thread(_refuses_unreachable_clickhouse, r, tmp_path))
                await asyncio.sleep(down)
                insert_errors = collector.collector.stats["insert_errors"]
                lag_at_peak = await group_backlog(r.probe)

                def reconnect() -> None:
                    assert collector.ch is not None
                    with collector.ch.lock:
                        collector.ch.client = make_client(r.dsn)

                await asyncio.to_thread(reconnect)
                fault_end = time.monotonic()
                load.mark("after")
                result.recover_pipeline_s = round(await wait_until(
                    lambda: backlog_cleared(r), 60, "the backlog to clear"), 2)
                await asyncio.sleep(max(0.0, AFTER_S - (time.monotonic() - fault_end)))
                code, output = await refusal
            result.fill_requests(load, judge_ok_only, fault_end)
            await close_books(r, result, collector.counts)
        finally:
            await collector.stop()
            await collector.close()
    result.note = (f"{insert_errors} failed inserts retried, lag {lag_at_peak} entries at the "
                   "peak; a collector started against the dead server refused with exit 1")
    record(result)
    assert insert_errors > 0
    assert code == 1, output
    assert "refusing to start" in output, output
    assert "Traceback" not in output, output
    assert "s3cr3t-pw" not in output, output
    assert_books(result, load, judge_ok_only)


async def test_upstream_hangs_resets_5xx_and_half_bodies(tmp_path: Path) -> None:
    """(d) Each failure mode of one upstream gives 502/503/504 (or a visibly cut body) on its
    route only; the other route keeps answering 200 with its latency unchanged."""
    each = env_seconds("APIGW_FAULT_UPSTREAM_S", 1.5, 10)
    modes = ("hang", "reset", "5xx", "half")
    result = FaultResult("d_upstream_faults", f"upstream {'/'.join(modes)}, {each:g} s each",
                         each * len(modes), RATE)
    judge = judge_upstream_fault("/flaky", truncation_ok=True)
    paths = [p for n in range(5) for p in (f"/ok/{n}", f"/flaky/{n}")]
    async with rig(tmp_path) as r:
        collector = InProcessCollector(r.redis_url, r.dsn)
        await collector.start()
        try:
            load = Load(r.url, paths, RATE, headers=CLIENT)
            async with running(load):
                await asyncio.sleep(BEFORE_S)
                for mode in modes:
                    load.mark(mode)
                    r.flaky.mode = mode
                    await asyncio.sleep(each)
                r.flaky.mode = "ok"
                fault_end = time.monotonic()
                load.mark("after")
                await asyncio.sleep(AFTER_S)
            result.fill_requests(load, judge, fault_end)
            steady_p99 = {phase: p99_ms(s for s in load.samples
                                        if s.phase == phase and s.path.startswith("/ok"))
                          for phase in ("before", *modes)}
            # a request sent just before a switch reaches the upstream after it (it meets the
            # next mode: the gateway's own events are exact per mode); per mode, judge the
            # requests sent clear of both switches - the books above count every request
            edges = sorted(load.phase_started.values())
            per_mode = {mode: sorted({str(s.status or s.error) for s in load.samples
                                      if s.phase == mode and s.path.startswith("/flaky")
                                      and all(abs(s.started - edge) > SWITCH_GUARD_S
                                              for edge in edges)})
                        for mode in modes}
            await close_books(r, result, collector.counts)
        finally:
            await collector.stop()
            await collector.close()
    result.note = ("flaky route answers per mode: "
                   + "; ".join(f"{m} -> {'/'.join(v)}" for m, v in per_mode.items())
                   + f"; steady route p99 ms per phase: {steady_p99}")
    record(result)
    assert_books(result, load, judge)
    assert per_mode["hang"] == ["504"], per_mode
    assert "502" in per_mode["reset"], per_mode
    assert per_mode["5xx"] == ["503"], per_mode
    assert result.failed > 0
    # The steady route is not dragged down by the broken one (generous bound: shared CPU).
    assert steady_p99["hang"] < max(1000.0, 5 * steady_p99["before"]), steady_p99
