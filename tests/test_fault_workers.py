"""Faults of the proxy process itself, under steady load: `apigw proxy --workers 2`.

(e) one worker SIGKILLed: the parent restarts it, the other keeps serving.
(f) a config reload with an invalid file mid-load: rejected, the old config keeps serving; a
    valid one then applies without a failed request.

The books: events emitted (the workers' counters, aggregated on the admin port's /metrics)
against rows stored by an in-process collector on a chDB directory of the test's own.
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

import pytest

from apigw.redis_server import free_port
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
    await collector.start()
    proxy = Proxy(tmp_path, _CONFIG.format(upstream=upstream.url, extra=""), redis_url)
    try:
        await asyncio.to_thread(proxy.process.wait_http, f"{proxy.admin}/readyz", 90)
        before = await asyncio.to_thread(proxy.ready)
        victim = before["workers"]["pids"][0]
        load = Load(proxy.url, PATHS, RATE, headers={"X-Client-Id": "fault-client"})
        async with running(load):
            await asyncio.sleep(1.5)
            load.mark("during")
            await asyncio.sleep(0.3)  # so every request in flight at the kill is "during"
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()

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
        result.dead_lettered = await dead_lettered(collector.redis)
        result.rows, result.rollup_requests = await collector.counts()
    finally:
        proxy.process.stop()
        await collector.stop()
        await collector.close()
        await upstream.stop()
    result.emitted = int(metric_sum(metrics, "apigw_events_emitted_total"))
    result.dropped = int(metric_sum(metrics, "apigw_events_dropped_total"))
    # The events the killed worker held in memory die with it; nothing can count them. The
    # workers' own counters show those it had reported; the client's count shows the rest.
    lost_reported = result.emitted - result.rows - result.dropped - result.dead_lettered
    lost_answered = result.answered - result.rows - result.dropped - result.dead_lettered
    result.unexplained = max(lost_reported, lost_answered, 0)
    result.recover_pipeline_s = result.fault_s
    result.note = (f"worker restarted after {result.fault_s:g} s (restarts="
                   f"{after['workers']['restarts']}); events lost with the killed worker's "
                   f"buffer, uncounted: {result.unexplained} (counters say {lost_reported}, "
                   f"clients say {lost_answered}); bound: its share of one flush interval")
    record(result)
    log = proxy.process.log()
    assert "Traceback" not in log, log[-3000:]
    assert after["workers"]["restarts"] >= 1
    bad = result.incorrect_samples(load, _judge_worker_kill)
    assert result.failed_incorrect == 0, bad
    assert result.rollup_requests == result.rows
    # Requests answered after the restart all succeeded, and the survivor kept serving.
    assert sum(1 for s in load.samples if s.phase == "during" and s.status == 200) > 0
    # Loss only from the killed worker's unflushed buffer: at most ~2 flush intervals of
    # the whole load (the killed worker carried about half of it).
    assert result.unexplained <= RATE * FLUSH_INTERVAL_S * 2 + 5, result


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
