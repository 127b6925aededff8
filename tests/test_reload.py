"""Hot reload: swapping configs under load without a failed request, rejecting an invalid
file while the old config keeps serving, and SIGHUP / file watch on a real process."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import REGISTRY

from apigw.redis_server import free_port
from proxy.app import Gateway
from proxy.config import load_config
from proxy.reload import LiveGateway
from proxy.server import start_listener
from proxy.settings import ProxySettings
from tests import test_proxy as _proxy_tests
from tests.processes import ManagedProcess, serve_process
from tests.test_proxy import STREAM

client = _proxy_tests.client  # fixture



@pytest.fixture
async def two_upstreams() -> AsyncIterator[tuple[str, str]]:
    runners = []
    urls = []
    for name in ("blue", "green"):
        async def handler(request: web.Request, name: str = name) -> web.Response:
            await asyncio.sleep(0.005)
            return web.Response(text=name)

        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}")
    try:
        yield urls[0], urls[1]
    finally:
        for runner in runners:
            await runner.cleanup()


def yaml_for(upstream: str, extra_route: str = "") -> str:
    return f"""
version: 1
upstreams:
  app: {{url: "{upstream}"}}
routes:
  - id: all
    match: {{prefix: /}}
    upstream: app
{extra_route}
events: {{flush_interval_ms: 50}}
"""


def metric(outcome: str) -> float:
    return REGISTRY.get_sample_value("apigw_config_reloads_total", {"outcome": outcome}) or 0.0


async def test_reload_under_load_without_failures(
        two_upstreams: tuple[str, str], redis_url: str, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    blue, green = two_upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(yaml_for(blue))
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, instance="reload-test",
                             listen=f"127.0.0.1:{port}", events_stream=STREAM)
    redis = aioredis.Redis.from_url(redis_url)
    gateway = Gateway(load_config(path), settings, redis)
    await gateway.start()
    live = LiveGateway(gateway, settings, redis, path, drain_s=5)
    runner = await start_listener(live, settings.listen, shutdown_grace_s=2)
    url = f"http://127.0.0.1:{port}/x"
    results: list[tuple[int, str]] = []
    done = asyncio.Event()

    async def load() -> None:
        while not done.is_set():
            async with client.get(url) as response:
                results.append((response.status, await response.text()))

    try:
        workers = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.3)
        before = metric("success")
        for n in range(6):  # flip blue <-> green while 8 clients keep going
            path.write_text(yaml_for(green if n % 2 == 0 else blue))
            assert await live.reload() == "success"
            await asyncio.sleep(0.15)
        path.write_text("version: 1\nupstreams: {}\nroutes: []\n")  # invalid: rejected
        invalid_before = metric("invalid")
        assert await live.reload() == "invalid"
        assert metric("invalid") == invalid_before + 1
        await asyncio.sleep(0.2)
        done.set()
        await asyncio.gather(*workers)
        assert metric("success") == before + 6
        assert len(results) > 100
        failed = [result for result in results if result[0] != 200]
        assert not failed, failed[:5]
        bodies = [body for _, body in results]
        assert "green" in bodies
        assert "blue" in bodies
        assert bodies[-1] == "blue"  # the last valid config still serves
        assert live.config.upstreams["app"].url == blue
        assert await live.apply(live.config) == "unchanged"
    finally:
        done.set()
        await runner.cleanup()
        await live.stop(timeout_s=1)
        await redis.aclose()


def _reloads_total(metrics: str, outcome: str) -> float:
    """apigw_config_reloads_total{outcome} in a Prometheus text page (0 when absent)."""
    found = re.search(rf'^apigw_config_reloads_total\{{outcome="{outcome}"\}} (\S+)$', metrics,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def _eventually(url: str, expected: bytes, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    body = b""
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(_get, url)
        if status == 200 and body == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never got {expected!r}; last {body!r}")


async def test_sighup_and_file_watch_on_a_real_process(
        two_upstreams: tuple[str, str], redis_url: str, tmp_path: Path) -> None:
    blue, green = two_upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(yaml_for(blue))
    port, admin = free_port(), free_port()
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_LISTEN": f"127.0.0.1:{port}",
           "APIGW_ADMIN_LISTEN": f"127.0.0.1:{admin}", "APIGW_CONFIG_WATCH_S": "0.2",
           "APIGW_SHUTDOWN_GRACE_S": "2"}
    process = serve_process(path, env, tmp_path)
    try:
        await asyncio.to_thread(process.wait_http, f"http://127.0.0.1:{admin}/readyz", 60)
        await _eventually(f"http://127.0.0.1:{port}/x", b"blue")
        path.write_text(yaml_for(green))  # picked up by the file watch
        await _eventually(f"http://127.0.0.1:{port}/x", b"green")
        path.write_text("routes: [oops")  # invalid: logged, green keeps serving
        await asyncio.sleep(0.8)
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/x") == (200, b"green")
        assert "config reload rejected" in process.log()
        # SIGHUP re-reads the file (watch also would; SIGHUP is immediate)
        path.write_text(yaml_for(blue, "  - id: extra\n    match: {path: /extra}\n"
                                       "    upstream: app\n"))
        process.process.send_signal(signal.SIGHUP)
        await _eventually(f"http://127.0.0.1:{port}/x", b"blue")
        _, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin}/config")
        assert b'"extra"' in body
        process.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.process.wait, 30) == 0
        assert "Traceback" not in process.log(), process.log()[-3000:]
    finally:
        process.stop()


async def test_sighup_reaches_every_worker_of_a_two_worker_process(
        two_upstreams: tuple[str, str], redis_url: str, redis_client: aioredis.Redis,
        tmp_path: Path) -> None:
    """`apigw proxy --workers 2` under keep-alive and fresh-connection traffic: a valid file +
    SIGHUP to the supervisor reaches both workers (a new route, served by each worker, and by
    keep-alive connections opened before), an invalid one is rejected while the old config
    keeps serving, and not one request fails."""
    import orjson

    from proxy.config import config_version
    from tests.processes import apigw_command
    from tests.test_proxy import read_events

    blue, green = two_upstreams
    with_extra = yaml_for(blue, "  - {id: extra, match: {path: /extra}, upstream: green}\n"
                          ).replace("upstreams:\n", f'upstreams:\n  green: {{url: "{green}"}}\n')
    path = tmp_path / "gw.yaml"
    path.write_text(yaml_for(blue))
    port, admin = free_port(), free_port()
    env = {"APIGW_REDIS_URL": redis_url, "APIGW_CONFIG_WATCH_S": "0",  # SIGHUP only
           "APIGW_SHUTDOWN_GRACE_S": "2", "APIGW_EVENTS_STREAM": STREAM}
    process = ManagedProcess("proxy", apigw_command(
        "proxy", "--config", str(path), "--listen", f"127.0.0.1:{port}",
        "--admin", f"127.0.0.1:{admin}", "--workers", "2"), env, tmp_path)
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    results: list[tuple[str, int, str]] = []
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=10)
    keepalive = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                  timeout=timeout)
    # Four keep-alive connections opened before any reload, used only by the checks.
    pinned = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=60), timeout=timeout)

    async def load(session: aiohttp.ClientSession, kind: str) -> None:
        while not done.is_set():
            try:
                async with session.get(f"{base}/x") as response:
                    results.append((kind, response.status, await response.text()))
            except (aiohttp.ClientError, TimeoutError) as exc:
                results.append((kind, 0, repr(exc)))

    async def one_extra(session: aiohttp.ClientSession) -> str:
        async with session.get(f"{base}/extra") as response:
            assert response.status == 200
            return await response.text()

    async def extra_bodies(session: aiohttp.ClientSession, n: int) -> list[str]:
        """`n` requests to /extra, four at a time."""
        bodies: list[str] = []
        for _ in range(0, n, 4):
            bodies += await asyncio.gather(*(one_extra(session) for _ in range(4)))
        return bodies

    async def reload_to(text: str) -> None:
        path.write_text(text)
        process.process.send_signal(signal.SIGHUP)  # the supervisor, by its own pid

    try:
        await asyncio.to_thread(process.wait_http, f"{admin_url}/readyz", 60)
        _, body = await asyncio.to_thread(_get, f"{admin_url}/readyz")
        pids = orjson.loads(body)["workers"]["pids"]
        assert len(pids) == 2
        tasks = [asyncio.create_task(load(keepalive, "keepalive")) for _ in range(6)]
        tasks += [asyncio.create_task(load(fresh, "fresh")) for _ in range(3)]
        await asyncio.sleep(0.5)
        assert set(await extra_bodies(pinned, 8)) == {"blue"}  # the catch-all, for now

        await reload_to(with_extra)
        deadline = time.monotonic() + 15
        while set(await extra_bodies(fresh, 20)) != {"green"}:
            assert time.monotonic() < deadline, "the new route never reached every worker"
            await asyncio.sleep(0.1)
        # Keep-alive connections opened before the reload see it too.
        assert set(await extra_bodies(pinned, 20)) == {"green"}
        events = await read_events(redis_client, 40)
        switched = {e["gateway_instance"] for e in events if e["route_id"] == "extra"}
        assert {instance.rsplit("-", 1)[1] for instance in switched} == {
            str(pid) for pid in pids}, (switched, pids)

        await reload_to("routes: [oops")  # invalid: rejected by the supervisor
        await asyncio.sleep(1.0)
        assert "config reload rejected" in process.log()
        assert set(await extra_bodies(fresh, 20)) == {"green"}
        assert set(await extra_bodies(pinned, 8)) == {"green"}

        await reload_to(yaml_for(blue))  # valid again: the route goes away everywhere
        deadline = time.monotonic() + 15
        while set(await extra_bodies(fresh, 20)) != {"blue"}:
            assert time.monotonic() < deadline, "the removal never reached every worker"
            await asyncio.sleep(0.1)
        assert set(await extra_bodies(pinned, 8)) == {"blue"}
        await asyncio.sleep(0.3)
        done.set()
        await asyncio.gather(*tasks)

        failed = [result for result in results if result[1:] != (200, "blue")]
        assert not failed, failed[:5]
        kinds = {kind: sum(1 for k, _, _ in results if k == kind)
                 for kind in ("keepalive", "fresh")}
        assert min(kinds["keepalive"] / 50, kinds["fresh"] / 20) > 1, kinds
        _, body = await asyncio.to_thread(_get, f"{admin_url}/readyz")
        workers = orjson.loads(body)["workers"]
        assert (workers["pids"], workers["restarts"]) == (pids, 0)
        _, body = await asyncio.to_thread(_get, f"{admin_url}/config")
        assert orjson.loads(body)["version"] == config_version(load_config(path))
        _, body = await asyncio.to_thread(_get, f"{admin_url}/metrics")
        reloads = {outcome: _reloads_total(body.decode(), outcome)
                   for outcome in ("success", "invalid")}
        assert reloads == {"success": 4.0, "invalid": 0.0}  # 2 workers x 2 valid files
        process.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.process.wait, 30) == 0
        assert "Traceback" not in process.log(), process.log()[-3000:]
    finally:
        done.set()
        await keepalive.close()
        await fresh.close()
        await pinned.close()
        process.stop()


async def test_worker_started_with_a_stale_config_catches_up_with_the_file(
        two_upstreams: tuple[str, str], redis_url: str, tmp_path: Path) -> None:
    """A worker spawned with the config of before a reload whose SIGHUP it ignored (it was
    still starting) serves the file's config once ready, not its spawn-time one."""
    import multiprocessing

    from proxy.server import _worker_main

    blue, green = two_upstreams
    path = tmp_path / "gw.yaml"
    path.write_text(yaml_for(blue))
    spawn_time = load_config(path)
    path.write_text(yaml_for(green))  # the reload this worker never heard of
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, instance="catch-up-test",
                             listen=f"127.0.0.1:{port}", events_stream=STREAM,
                             shutdown_grace_s=1)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    worker = context.Process(target=_worker_main, name="apigw-catch-up-test",
                             args=(spawn_time, settings, ready, path))
    worker.start()
    try:
        assert await asyncio.to_thread(ready.wait, 60), "the worker never became ready"
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/x") == (200, b"green")
    finally:
        if worker.pid is not None and worker.is_alive():
            worker.terminate()  # SIGTERM to its own pid: drains and exits
        await asyncio.to_thread(worker.join, 15)
        if worker.is_alive():
            worker.kill()
            await asyncio.to_thread(worker.join, 5)
    assert worker.exitcode == 0
