"""Faults of the proxy process itself, under steady load: `apigw proxy --workers 2`.

(e) one worker SIGKILLed: the parent restarts it, the other keeps serving.
(f) a config reload with an invalid file mid-load: rejected, the old config keeps serving; a
    valid one then applies without a failed request.

The books: events emitted (the workers' counters, aggregated on the admin port's /metrics)
against rows stored by an in-process collector on a chDB directory of the test's own, and the
loss its accountant counted (`event_loss`): the events in the killed worker's buffer are
counted `worker_killed`, exactly, from the final mark the parent read from the dead worker's
shared memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from apigw.redis_server import free_port
from collector.clickhouse import SharedClient
from collector.loss import lost_by_reason
from proxy.policy import RedisKeys
from tests.faults import (
    FaultResult,
    FlakyUpstream,
    InProcessCollector,
    Load,
    Sample,
    dead_lettered,
    judge_ok_only,
    metric_sum,
    record,
    running,
    stream_caught_up,
    wait_until,
)
from tests.processes import ManagedProcess, apigw_command

pytestmark = pytest.mark.fault

RATE = float(os.environ.get("APIGW_FAULT_RPS", "100"))
FLUSH_INTERVAL_S = 0.2  # the default events.flush_interval_ms
PATHS = [f"/ok/{n}" for n in range(10)]
_ROOT = Path(__file__).resolve().parent.parent
RELOAD_PRESENT = (_ROOT / "proxy" / "reload.py").exists() or "SIGHUP" in (
    _ROOT / "proxy" / "server.py").read_text()

_CONFIG = """
version: 1
upstreams:
  steady:
    url: {upstream}
routes:
  - id: ok
    match: {{prefix: /ok}}
    upstream: steady
{extra}
ratelimit:
  policies:
    - id: per-client
      key_by: client_id
      limit: 1000000
      window_s: 60
"""
# The kill test flushes once a second, so that the killed worker surely holds events.
_SLOW_FLUSH_S = 1.0
_SLOW_FLUSH = f"""events:
  flush_interval_ms: {int(_SLOW_FLUSH_S * 1000)}
"""
_NEW_ROUTE = """  - id: new
    match: {prefix: /new}
    upstream: steady
"""


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class Proxy:
    def __init__(self, tmp_path: Path, config_text: str, redis_url: str) -> None:
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(config_text)
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.process = ManagedProcess(
            "proxy", apigw_command("proxy", "--config", str(self.config), "--listen",
                                   f"127.0.0.1:{self.port}", "--admin",
                                   f"127.0.0.1:{self.admin_port}", "--workers", "2"),
            {"APIGW_REDIS_URL": redis_url, "APIGW_LOG_LEVEL": "INFO",
             "APIGW_SHUTDOWN_GRACE_S": "2"}, tmp_path)

    def ready(self) -> dict[str, Any]:
        status, detail = _get_json(f"{self.admin}/readyz")
        return dict(detail) if status == 200 else {}


def _emitter_books(ch: SharedClient) -> list[tuple[str, int, int, int]]:
    """Per emitter: distinct numbers stored, numbers counted lost, the highest number seen."""
    with ch.lock:
        rows = ch.client.query(
            "SELECT emitter, sum(stored), sum(lost), max(top) FROM ("
            " SELECT gateway_emitter AS emitter, uniqExact(gateway_event_seq) AS stored,"
            "  toUInt64(0) AS lost, max(gateway_event_seq) AS top FROM events GROUP BY emitter"
            " UNION ALL SELECT emitter, 0, sum(events), max(seq_to) FROM event_loss FINAL"
            "  GROUP BY emitter) GROUP BY emitter ORDER BY emitter").result_rows
    return [(str(e), int(stored), int(lost), int(top)) for e, stored, lost, top in rows]


async def _victim_marks(redis: aioredis.Redis, keys: RedisKeys) -> tuple[int, int] | None:
    """(final mark the parent recorded, `assigned` of the killed emitter's last heartbeat)."""
    deaths: Any = await redis.hgetall(keys.event_emitter_deaths)
    if not deaths:
        return None
    emitter, raw = next(iter(deaths.items()))
    beat: Any = await redis.hget(keys.event_emitters, emitter)
    last_beat = int(orjson.loads(beat)["assigned"]) if beat else 0
    return int(orjson.loads(raw)["assigned"]), last_beat


async def _busiest(redis: aioredis.Redis, keys: RedisKeys, pids: list[int]) -> int:
    """The worker whose emitter numbered the most events (keep-alive connections make the
    kernel's share uneven): killing it loses a buffer that is not empty."""
    beats: Any = await redis.hgetall(keys.event_emitters)
    assigned = {int(emitter.decode().split(":")[-2]): int(orjson.loads(raw)["assigned"])
                for emitter, raw in beats.items()}
    return max(pids, key=lambda pid: assigned.get(pid, -1))


def _judge_worker_kill(sample: Sample) -> str:
    """Requests in flight on the killed worker lose their connection: the only correct
    failure. Any status >= 400 is wrong."""
    if sample.status is not None and sample.status < 400 and not sample.error:
        return "ok"
    if sample.status is None and sample.phase == "during" and sample.error in (
            "ServerDisconnectedError", "ClientOSError", "ClientConnectorError"):
        return "correct"
    return "incorrect"


async def test_one_worker_sigkilled_is_restarted_the_other_keeps_serving(
        tmp_path: Path, redis_url: str) -> None:
    result = FaultResult("e_worker_sigkill", "1 of 2 proxy workers SIGKILLed", 0.0, RATE)
    upstream = FlakyUpstream()
    await upstream.start()
    collector = InProcessCollector(redis_url, f"chdb://{tmp_path / 'clickhouse'}")
    collector.settings = collector.settings.model_copy(update={"loss_check_interval_s": 0.2})
    await collector.start()
    keys = RedisKeys()
    marks: tuple[int, int] | None = None
    proxy = Proxy(tmp_path, _CONFIG.format(upstream=upstream.url, extra="") + _SLOW_FLUSH,
                  redis_url)
    try:
        await asyncio.to_thread(proxy.process.wait_http, f"{proxy.admin}/readyz", 90)
        before = await asyncio.to_thread(proxy.ready)
        load = Load(proxy.url, PATHS, RATE, headers={"X-Client-Id": "fault-client"})
        async with running(load):
            await asyncio.sleep(1.5)
            load.mark("during")
            await asyncio.sleep(0.3)  # so every request in flight at the kill is "during"
            assert collector.redis is not None
            victim = await _busiest(collector.redis, keys, before["workers"]["pids"])
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            probe = collector.redis

            async def recorded() -> bool:
                nonlocal marks
                marks = await _victim_marks(probe, keys)
                return marks is not None

            # read before the accountant settles the dead emitter (>= 2 s: its clock margin)
            await wait_until(recorded, 10, "the parent to record the death", interval=0.02)

            def restarted() -> bool:
                workers = proxy.ready().get("workers", {})
                return workers.get("ready") == 2 and victim not in workers.get("pids", [])

            await wait_until(lambda: asyncio.to_thread(restarted), 60, "the worker's restart")
            fault_end = time.monotonic()
            result.fault_s = round(fault_end - killed_at, 2)
            load.mark("after")
            await asyncio.sleep(2.0)
        await asyncio.sleep(FLUSH_INTERVAL_S * 3)  # the workers flush and report
        metrics = await asyncio.to_thread(_get_text, f"{proxy.admin}/metrics")
        after = await asyncio.to_thread(proxy.ready)
        result.fill_requests(load, _judge_worker_kill, fault_end)
        assert proxy.process.stop() == 0
        assert collector.redis is not None
        probe = collector.redis
        await wait_until(lambda: stream_caught_up(probe), 60, "the collector")

        async def settled() -> bool:  # every emitter (the dead one too) is on the books
            return not await probe.exists(keys.event_emitters, keys.event_emitter_deaths)

        await wait_until(settled, 60, "the loss accountant to settle every emitter")
        result.dead_lettered = await dead_lettered(collector.redis)
        result.rows, result.rollup_requests = await collector.counts()
        assert collector.ch is not None
        ch = collector.ch
        lost = await asyncio.to_thread(lambda: lost_by_reason(ch.client))
        per_emitter = await asyncio.to_thread(_emitter_books, ch)
    finally:
        proxy.process.stop()
        await collector.stop()
        await collector.close()
        await upstream.stop()
    result.emitted = int(metric_sum(metrics, "apigw_events_emitted_total"))
    # Counted loss: what the emitters dropped themselves plus what the accountant found.
    result.dropped = sum(lost.values())
    assert marks is not None
    killed = lost.get("worker_killed", 0)
    # Requests in flight at the kill may have been numbered without their answer reaching
    # the client (counted lost, not answered): the books may exceed the answers by those.
    in_flight = sum(1 for s in load.samples if s.status is None)
    accounted = result.rows + result.dropped + result.dead_lettered
    result.unexplained = max(result.answered - accounted, 0)
    result.recover_pipeline_s = result.fault_s
    result.note = (f"worker restarted after {result.fault_s:g} s (restarts="
                   f"{after['workers']['restarts']}); the killed worker's buffer: {killed} "
                   f"events counted worker_killed (its final mark {marks[0]}, read by the "
                   f"parent; its last heartbeat said {marks[1]}: without the parent "
                   f"{marks[0] - marks[1]} would have stayed uncounted)")
    record(result)
    log = proxy.process.log()
    assert "Traceback" not in log, log[-3000:]
    assert after["workers"]["restarts"] >= 1
    bad = result.incorrect_samples(load, _judge_worker_kill)
    assert result.failed_incorrect == 0, bad
    assert result.rollup_requests == result.rows
    # Requests answered after the restart all succeeded, and the survivor kept serving.
    assert sum(1 for s in load.samples if s.phase == "during" and s.status == 200) > 0
    # Every answered request is a row or counted loss, and the only loss is the killed
    # worker's buffer: at most ~2 flush intervals of the whole load (it carried about half).
    assert result.unexplained == 0, result
    assert 0 <= accounted - result.answered <= in_flight, (result, in_flight)
    assert set(lost) <= {"worker_killed"}, lost
    assert killed <= RATE * _SLOW_FLUSH_S * 2 + 5, result
    assert marks[0] >= marks[1]
    # Per emitter the numbers 1..top are each stored or counted, none twice (the restarted
    # worker may have had no traffic: keep-alive connections stay with the survivor).
    assert len(per_emitter) >= 2, per_emitter
    for emitter, stored, counted, top in per_emitter:
        assert stored + counted == top, (emitter, stored, counted, top)


@pytest.mark.xfail(not RELOAD_PRESENT, strict=True,
                   reason="finding: no hot reload yet (issue 3); SIGHUP terminates the proxy "
                          "parent instead of reloading its config")
async def test_invalid_config_reload_mid_load_is_rejected_and_old_config_serves(
        tmp_path: Path, redis_url: str) -> None:
    result = FaultResult("f_reload_invalid", "config reload: invalid file, then a valid one",
                         0.0, RATE)
    upstream = FlakyUpstream()
    await upstream.start()
    collector = InProcessCollector(redis_url, f"chdb://{tmp_path / 'clickhouse'}")
    await collector.start()
    proxy = Proxy(tmp_path, _CONFIG.format(upstream=upstream.url, extra=""), redis_url)
    try:
        await asyncio.to_thread(proxy.process.wait_http, f"{proxy.admin}/readyz", 90)
        version = (await asyncio.to_thread(_get_json, f"{proxy.admin}/config"))[1]["version"]
        load = Load(proxy.url, PATHS, RATE, headers={"X-Client-Id": "fault-client"})
        async with running(load):
            await asyncio.sleep(1.0)
            load.mark("during")
            started = time.monotonic()
            proxy.config.write_text("version: 1\nroutes: [{id: broken, match: {prefix: /x}\n")
            os.kill(proxy.process.process.pid, signal.SIGHUP)
            await asyncio.sleep(2.0)
            assert proxy.process.process.poll() is None, "the proxy died on SIGHUP"
            kept = (await asyncio.to_thread(_get_json, f"{proxy.admin}/config"))[1]["version"]
            proxy.config.write_text(_CONFIG.format(upstream=upstream.url, extra=_NEW_ROUTE))
            os.kill(proxy.process.process.pid, signal.SIGHUP)

            async def applied() -> bool:
                return await asyncio.to_thread(_status, f"{proxy.url}/new/1") == 200

            await wait_until(applied, 10, "the valid config to apply")
            fault_end = time.monotonic()
            result.fault_s = round(fault_end - started, 2)
            load.mark("after")
            await asyncio.sleep(1.0)
        result.fill_requests(load, judge_ok_only, fault_end)
        new_version = (await asyncio.to_thread(_get_json, f"{proxy.admin}/config"))[1]["version"]
        await asyncio.sleep(FLUSH_INTERVAL_S * 3)  # the workers flush and report
        metrics = await asyncio.to_thread(_get_text, f"{proxy.admin}/metrics")
        assert proxy.process.stop() == 0
        assert collector.redis is not None
        probe = collector.redis
        await wait_until(lambda: stream_caught_up(probe), 60, "the collector")
        result.dead_lettered = await dead_lettered(probe)
        result.rows, result.rollup_requests = await collector.counts()
    finally:
        proxy.process.stop()
        await collector.stop()
        await collector.close()
        await upstream.stop()
    result.emitted = int(metric_sum(metrics, "apigw_events_emitted_total"))
    result.dropped = int(metric_sum(metrics, "apigw_events_dropped_total"))
    result.unexplained = result.emitted - result.rows - result.dropped - result.dead_lettered
    result.note = ("invalid file rejected, old config kept; valid file applied; the replaced "
                   "gateways' events flushed")
    record(result)
    log = proxy.process.log()
    assert kept == version
    assert new_version != version
    assert re.search(r"invalid|reject", log, re.IGNORECASE), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert result.failed == 0, result.incorrect_samples(load, judge_ok_only)
    assert result.unexplained == 0, result
    assert result.rows >= result.answered, result
    assert result.rollup_requests == result.rows
