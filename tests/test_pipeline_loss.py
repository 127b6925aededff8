"""The whole event pipeline, with counts: requests through the real gateway -> emitter ->
Redis Stream -> collector -> ClickHouse (chDB). Every answered request is exactly one row,
through a collector SIGKILL, a poison entry, a ClickHouse outage with two collectors, and a
Redis outage (6 s here to keep CI short; the issue asks for 30 s - what decides the outcome
is the emitter's buffer bound, not the duration), where every lost event is counted as
dropped, and stream entries trimmed by `MAXLEN ~` before any collector read them, which the
loss accountant counts as `trimmed` to the event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from apigw.redis_server import RedisServer, free_port
from collector.clickhouse import SharedClient, make_client
from collector.consumer import Collector
from collector.loss import lost_by_reason
from collector.schema import migrate
from collector.settings import CollectorSettings
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.policy import RedisKeys
from proxy.server import seed_policies, start_listener
from proxy.settings import ProxySettings
from tests.processes import ManagedProcess, apigw_command

STREAM = "apigw:events"
DEAD = "apigw:events:dead"


async def _order(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["id"]})


@dataclass
class Pipeline:
    url: str
    gateway: Gateway
    redis: aioredis.Redis
    redis_url: str


@asynccontextmanager
async def gateway(redis_url: str, buffer_max: int = 100_000, batch_size: int = 50,
                  stream_maxlen: int = 10_000) -> AsyncIterator[Pipeline]:
    """A real upstream and the gateway in-process, events batched 50 at a time."""
    upstream = web.Application()
    upstream.router.add_get("/orders/{id}", _order)
    up_runner = web.AppRunner(upstream, access_log=None)
    await up_runner.setup()
    up_port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up_port).start()
    config = GatewayConfig.model_validate({
        "version": 1, "upstreams": {"app": {"url": f"http://127.0.0.1:{up_port}"}},
        "routes": [{"id": "orders", "match": {"path": "/orders/{id}"}, "upstream": "app"}],
        "events": {"batch_size": batch_size, "flush_interval_ms": 20, "buffer_max": buffer_max,
                   "stream_maxlen": stream_maxlen}})
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, instance="loss-gw",
                             listen=f"127.0.0.1:{port}", events_stream=STREAM)
    redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2)
    gw: Gateway | None = None
    runner: web.ServerRunner | None = None
    try:
        await seed_policies(config, settings, redis)
        gw = Gateway(config, settings, redis)
        await gw.start()
        runner = await start_listener(gw, settings.listen, shutdown_grace_s=2)
        yield Pipeline(f"http://127.0.0.1:{port}", gw, redis, redis_url)
    finally:
        if runner is not None:
            await runner.cleanup()
        if gw is not None:
            await gw.stop(timeout_s=2)
        await redis.aclose()
        await up_runner.cleanup()


async def send(url: str, n: int, start: int = 0, concurrency: int = 32) -> list[str]:
    """n GET requests; returns the request ids the gateway answered with (all must be 200)."""
    ids: list[str] = []
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            async with limit, session.get(f"{url}/orders/{i}") as response:
                assert response.status == 200
                await response.read()
                ids.append(response.headers["X-Request-Id"])

        await asyncio.gather(*(one(i) for i in range(start, start + n)))
    return ids


async def all_sent(gw: Gateway, emitted: int, timeout: float = 20) -> None:
    assert gw.emitter is not None
    await until(lambda: gw.emitter is not None and gw.emitter.stats["emitted"] == emitted
                and gw.emitter.stats["buffered"] == 0, timeout, "events to leave the emitter")


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def until_books(ch: SharedClient, check: Callable[[int, dict[str, int]], bool],
                      timeout: float, what: str) -> tuple[int, dict[str, int]]:
    """Poll ClickHouse (in a thread) until check(rows, lost by reason) holds."""
    deadline = time.monotonic() + timeout
    while True:
        rows, lost, _ = await asyncio.to_thread(books, ch)
        if check(rows, lost):
            return rows, lost
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: rows {rows}, lost {lost}")
        await asyncio.sleep(0.1)


def counts(ch: Any) -> tuple[int, int, int, int]:
    """events rows, distinct request ids, and requests in both rollups."""
    row = ch.query("SELECT (SELECT count() FROM events), (SELECT uniqExact(request_id) FROM "
                   "events), (SELECT sum(requests) FROM events_1m), (SELECT sum(requests) FROM "
                   "events_client_1m)").result_rows[0]
    return int(row[0]), int(row[1]), int(row[2] or 0), int(row[3] or 0)


def settings(redis_url: str, dsn: str, name: str, **extra: Any) -> CollectorSettings:
    return CollectorSettings(**{"redis_url": redis_url, "clickhouse_dsn": dsn,
                                "consumer_name": name, "block_ms": 50, "retry_initial_s": 0.05,
                                "retry_max_s": 0.3, "loss_check_interval_s": 0.1, **extra})


def books(ch: SharedClient) -> tuple[int, dict[str, int], list[tuple[str, int, int, str]]]:
    """Rows, counted loss by reason, and the loss ranges recorded."""
    with ch.lock:
        rows = int(ch.client.command("SELECT count() FROM events"))  # type: ignore[arg-type]
        ranges = [(str(e), int(a), int(b), str(r)) for e, a, b, r in ch.client.query(
            "SELECT emitter, seq_from, seq_to, reason FROM event_loss FINAL "
            "ORDER BY emitter, seq_from").result_rows]
        return rows, lost_by_reason(ch.client), ranges


def _rows_written(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("apigw_collector_rows_written_total "):
            return float(line.split()[1])
    return 0.0


async def test_sigkilled_collector_and_a_poison_entry_lose_and_duplicate_nothing(
        redis_url: str, chdb_dsn: str, tmp_path: Path) -> None:
    n = 3_000
    async with gateway(redis_url) as pipe:
        ids = await send(pipe.url, n // 2)
        await all_sent(pipe.gateway, n // 2)
        poison = (await pipe.redis.xadd(STREAM, {"v": "1", "b": b"{not json"})).decode()
        ids += await send(pipe.url, n - n // 2, start=n // 2)
        await all_sent(pipe.gateway, n)

        port = free_port()
        env = {"APIGW_REDIS_URL": redis_url, "APIGW_CLICKHOUSE_DSN": chdb_dsn,
               "APIGW_LISTEN": f"127.0.0.1:{port}", "APIGW_CONSUMER_NAME": "svc",
               "APIGW_READ_COUNT": "2", "APIGW_BLOCK_MS": "100"}
        first = ManagedProcess("collector-1", apigw_command("collector"), env, tmp_path)
        try:
            first.wait_http(f"http://127.0.0.1:{port}/healthz")
            await until(lambda: _rows_written(port) > 0, 60, "the first rows")
            os.killpg(first.process.pid, signal.SIGKILL)  # mid-stream, mid-batch
            first.process.wait(timeout=10)
        finally:
            first.stop()
        pending = (await pipe.redis.xpending(STREAM, "collector"))["pending"]
        assert pending > 0  # it died holding a batch (and the one it read ahead)

        second = ManagedProcess("collector-2", apigw_command("collector"), env, tmp_path)
        try:
            second.wait_http(f"http://127.0.0.1:{port}/healthz")

            async def drained() -> bool:
                info = (await pipe.redis.xinfo_groups(STREAM))[0]
                stream = await pipe.redis.xinfo_stream(STREAM)
                return bool(info["pending"] == 0 and
                            info["last-delivered-id"] == stream["last-generated-id"])

            deadline = time.monotonic() + 60
            while not await drained():
                assert time.monotonic() < deadline, "backlog not drained"
                await asyncio.sleep(0.1)
            assert second.stop() == 0
        finally:
            second.stop()
        dead = await pipe.redis.xrange(DEAD)

    client = make_client(chdb_dsn)  # the collector processes are gone: the store is free
    try:
        assert counts(client) == (n, n, n, n)
        stored = {row[0] for row in client.query("SELECT request_id FROM events").result_rows}
    finally:
        client.close()
    assert stored == set(ids)
    assert [(fields[b"source_id"].decode(), b"not JSON" in fields[b"reason"])
            for _, fields in dead] == [(poison, True)]


async def test_clickhouse_outage_with_two_collectors_stores_every_request_once(
        redis_url: str, chdb_dsn: str) -> None:
    n = 2_000
    ch = SharedClient(chdb_dsn)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        migrate(ch.client)
        async with gateway(redis_url) as pipe:
            collectors = [Collector(settings(redis_url, chdb_dsn, name, read_count=3),
                                    pipe.redis, ch) for name in ("a", "b")]
            tasks = [asyncio.create_task(c.run(stop)) for c in collectors]
            ids = await send(pipe.url, n // 2)
            await until(lambda: sum(c.stats["rows_written"] for c in collectors) > 0, 20,
                        "rows before the outage")
            await asyncio.to_thread(ch.close)  # ClickHouse goes away while traffic flows
            ids += await send(pipe.url, n - n // 2, start=n // 2)
            await all_sent(pipe.gateway, n)
            await until(lambda: all(c.stats["insert_errors"] > 0 for c in collectors), 20,
                        "both collectors to fail inserts")
            during = sum(c.stats["rows_written"] for c in collectors)
            assert during < n
            with ch.lock:
                ch.client = make_client(chdb_dsn)  # and comes back
            await until(lambda: sum(c.stats["rows_written"] for c in collectors) == n, 60,
                        "every event stored")
            assert all(c.stats["rows_written"] > 0 for c in collectors)
            assert (await pipe.redis.xpending(STREAM, "collector"))["pending"] == 0
    finally:
        stop.set()
        for task in tasks:
            await asyncio.wait_for(task, timeout=10)
        with ch.lock:
            assert counts(ch.client) == (n, n, n, n)
            stored = {row[0] for row in ch.client.query(
                "SELECT request_id FROM events").result_rows}
        ch.close()
    assert stored == set(ids)


async def test_redis_outage_gateway_serves_and_every_lost_event_is_counted(
        chdb_dsn: str, tmp_path: Path) -> None:
    outage_s = 6.0
    server = RedisServer(tmp_path / "redis", persist=True).start()
    ch = SharedClient(chdb_dsn)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    answered: list[str] = []
    try:
        migrate(ch.client)
        async with gateway(server.url, buffer_max=300) as pipe:
            collector = Collector(settings(server.url, chdb_dsn, "c"), pipe.redis, ch)
            task = asyncio.create_task(collector.run(stop))

            async def traffic(seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:  # about 200 requests/s
                    answered.extend(await send(pipe.url, 10, start=len(answered)))
                    await asyncio.sleep(0.05)

            await traffic(1.5)
            server.stop()  # Redis goes away; the gateway must keep answering 200
            await traffic(outage_s)
            server = RedisServer(tmp_path / "redis", port=server.port, persist=True).start()
            await traffic(1.5)
            emitter = pipe.gateway.emitter
            assert emitter is not None
            await all_sent(pipe.gateway, len(answered), timeout=30)
            await until(lambda: collector.stats["rows_written"] == emitter.stats["sent"], 30,
                        "the collector to store what was sent")
            stats = emitter.stats
            dropped = emitter.dropped_by_reason
            # the emitter's "dropped" marker reached the collector: the loss is on the books
            _, lost = await until_books(ch, lambda _rows, lost: bool(lost), 30,
                                        "the dropped marker")
    finally:
        stop.set()
        if task is not None:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=10)
        with ch.lock:
            rows = counts(ch.client)
        ch.close()
        server.stop()
    print(f"answered {len(answered)}, emitted {stats['emitted']}, sent {stats['sent']}, "
          f"dropped {dropped}, rows {rows[0]}")
    assert stats["emitted"] == len(answered)  # one event per answered request
    assert stats["dropped"] > 0  # the outage outlasted the buffer: some were lost ...
    assert set(dropped) == {"buffer_full"}
    assert rows == (len(answered) - stats["dropped"],) * 4  # ... exactly those counted
    assert stats["sent"] == rows[0]
    assert lost == {"dropped_buffer_full": stats["dropped"]}  # ... and so does ClickHouse


async def test_entries_trimmed_before_any_collector_read_them_are_counted_exactly(
        redis_url: str, chdb_dsn: str) -> None:
    """A tiny `MAXLEN ~` and no collector: most entries are trimmed unread. Then the collector:
    rows + counted `trimmed` == requests, while the gateway lives (gaps below a heartbeat's
    `handed` mark) and after it stopped (nothing more is found)."""
    n = 2_000
    ch = SharedClient(chdb_dsn)
    redis = aioredis.Redis.from_url(redis_url)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        migrate(ch.client)
        async with gateway(redis_url, batch_size=5, stream_maxlen=20) as pipe:
            ids = await send(pipe.url, n)
            await all_sent(pipe.gateway, n)
            left = await redis.xlen(STREAM)
            assert left < 400  # >= 400 entries were written (batches of <= 5 events)
            collector = Collector(settings(redis_url, chdb_dsn, "c"), redis, ch)
            task = asyncio.create_task(collector.run(stop))
            rows, lost = await until_books(
                ch, lambda rows, lost: rows > 0 and rows + sum(lost.values()) == n, 30,
                "rows + counted loss to add up to the requests")
            assert rows < n / 2
            assert lost == {"trimmed": n - rows}
            assert collector.accountant.lost == {"trimmed": n - rows}
            emitter = pipe.gateway.emitter
            assert emitter is not None
            identity = emitter.identity
        # the gateway stopped (closing heartbeat): the emitter is settled and forgotten, and
        # nothing is counted twice
        deadline = time.monotonic() + 20
        while await redis.hexists(RedisKeys().event_emitters, identity):
            assert time.monotonic() < deadline, "the finished emitter was not settled"
            await asyncio.sleep(0.1)
        final_rows, final_lost, ranges = await asyncio.to_thread(books, ch)
        assert (final_rows, final_lost) == (rows, lost)
        with ch.lock:
            seqs = sorted(int(r[0]) for r in ch.client.query(
                "SELECT gateway_event_seq FROM events WHERE gateway_emitter = {e:String}",
                parameters={"e": identity}).result_rows)
            stored_ids = {str(r[0]) for r in ch.client.query(
                "SELECT request_id FROM events").result_rows}
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, timeout=10)
        await redis.aclose()
        ch.close()
    # the stored numbers and the trimmed ranges partition 1..n exactly
    trimmed = [seq for _, low, high, _ in ranges for seq in range(low, high + 1)]
    assert sorted(seqs + trimmed) == list(range(1, n + 1))
    assert {e for e, _, _, _ in ranges} == {identity}
    assert stored_ids <= set(ids)


pytestmark = pytest.mark.timeout(120)
