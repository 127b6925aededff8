"""`apigw analytics`: the scheduler alone in its own process, for a ClickHouse server deployment.

(With embedded chDB the control plane runs the scheduler instead: only one process may open
the store.) Serves GET /healthz, GET /readyz, GET /metrics, GET /report (last run) and
POST /run (run now, answer with the report). JSON logs; SIGTERM/SIGINT finish the run in
progress, release the leader lease and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from analytics.job import AnalyticsJob, Scheduler
from analytics.settings import AnalyticsSettings
from apigw import logs
from apigw.logs import error_text
from apigw.signals import stop_on_signals
from collector.clickhouse import SharedClient, is_embedded, redact_dsn
from proxy.policy import RedisKeys
from proxy.policy_store import PolicyStore

log = logging.getLogger(__name__)

SCHEDULER_KEY: Final = web.AppKey("scheduler", Scheduler)
REDIS_KEY: Final = web.AppKey("redis", aioredis.Redis)
STOP_TIMEOUT_S: Final = 60.0


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ValueError naming what was wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port_text)


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response({"type": "about:blank", "title": title, "status": status,
                              "detail": detail}, status=status,
                             content_type="application/problem+json")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER_KEY]
    problems: list[str] = []
    try:
        async with asyncio.timeout(1.0):
            await request.app[REDIS_KEY].ping()
    except Exception as exc:  # any failure means "not ready", with the reason
        problems.append(f"redis: {error_text(exc)}")
    if not scheduler.healthy:
        problems.append(f"last run failed: {scheduler.last_error}")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready", "runs": scheduler.runs})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _report(request: web.Request) -> web.Response:
    report = request.app[SCHEDULER_KEY].last_report
    if report is None:
        return _problem(404, "No run yet", "the first analytics run has not finished")
    return web.Response(text=report.model_dump_json(), content_type="application/json")


async def _run(request: web.Request) -> web.Response:
    try:
        report = await request.app[SCHEDULER_KEY].run_now()
    except (RedisError, OSError) as exc:  # Redis refused or is down: no traceback
        log.warning("on-demand analytics run failed: redis error",
                    extra={"error": error_text(exc)})
        return _problem(503, "Analytics run failed", f"Redis unavailable: {error_text(exc)}")
    except Exception as exc:
        log.exception("on-demand analytics run failed")
        return _problem(500, "Analytics run failed", f"{type(exc).__name__}: {exc}")
    return web.Response(text=report.model_dump_json(), content_type="application/json")


def build_app(scheduler: Scheduler, redis: aioredis.Redis) -> web.Application:
    app = web.Application()
    app[SCHEDULER_KEY] = scheduler
    app[REDIS_KEY] = redis
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/report", _report)
    app.router.add_post("/run", _run)
    return app


def _open_store(dsn: str) -> SharedClient:
    from collector.schema import migrate

    client = SharedClient(dsn)
    try:
        migrate(client.client)  # idempotent; lets analytics start before the collector
    except Exception:
        client.close()
        raise
    return client


async def _main(settings: AnalyticsSettings, host: str, port: int) -> None:
    stop = stop_on_signals()
    dsn = settings.resolved_clickhouse_dsn()
    if is_embedded(dsn):
        log.warning("analytics service on an embedded store: the control plane must not be "
                    "running on the same directory", extra={"dsn": redact_dsn(dsn)})
    ch = await asyncio.to_thread(_open_store, dsn)
    redis = aioredis.Redis.from_url(settings.redis_url)
    runner: web.AppRunner | None = None
    try:
        store = PolicyStore(redis, RedisKeys(settings.key_prefix))
        job = AnalyticsJob(settings, redis, ch, store)
        scheduler = Scheduler(job, settings.interval_s)
        runner = web.AppRunner(build_app(scheduler, redis), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("analytics service listening", extra={
            "listen": f"{host}:{port}", "dsn": redact_dsn(dsn),
            "interval_s": settings.interval_s, "auto_mode": str(settings.auto_mode)})
        task = asyncio.create_task(scheduler.run(stop))
        await stop.wait()
        log.info("stopping analytics service")
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("analytics run did not finish in time; abandoning it")
    finally:
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(Exception):
            await redis.aclose()
        await asyncio.to_thread(ch.close)


def serve(settings: AnalyticsSettings, listen: str | None = None) -> int:
    """Run the analytics service until SIGTERM/SIGINT; return the process exit code."""
    logs.configure("analytics", settings.log_level)
    try:
        host, port = parse_listen(listen or settings.listen)
    except ValueError as exc:
        log.error(str(exc))
        return 2
    try:
        asyncio.run(_main(settings, host, port))
    except Exception as exc:
        log.error("analytics service failed", exc_info=True,
                  extra={"error": f"{type(exc).__name__}: {exc}"})
        return 1
    log.info("analytics service stopped")
    return 0
