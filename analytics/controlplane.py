"""The control plane: collector + analytics scheduler + API in ONE process.

Embedded ClickHouse (chDB) lets one process open a store, so in embedded mode this process owns
it: it opens the `SharedClient` once, migrates the schema, and shares the client with the
collector task, the scheduler task and the API. With a ClickHouse server the three can also run
as separate processes (`apigw collector`, `apigw analytics`, `apigw api`).

Shutdown order (SIGTERM/SIGINT): stop accepting API requests, let the collector finish the
batch in hand, stop the scheduler, then close ClickHouse and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from analytics.api import ApiSettings, build_api, parse_listen, run_app
from analytics.job import AnalyticsJob, Scheduler
from analytics.settings import AnalyticsSettings
from apigw.settings import CommonSettings
from apigw.signals import stop_on_signals
from collector.clickhouse import SharedClient, redact_dsn
from collector.consumer import Collector
from collector.schema import apply_retention, migrate
from collector.settings import CollectorSettings
from proxy.policy import RedisKeys
from proxy.policy_store import PolicyStore

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0


class ControlPlaneSettings(ApiSettings):
    """The API's settings; the collector's and the job's are read from the same environment."""

    def _common(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CommonSettings.model_fields}

    def collector_settings(self) -> CollectorSettings:
        return CollectorSettings(**self._common())

    def analytics_settings(self) -> AnalyticsSettings:
        return AnalyticsSettings(**self._common())


def _prepare_store(ch: SharedClient, retention_days: int) -> list[str]:
    with ch.lock:
        applied = migrate(ch.client)
        apply_retention(ch.client, retention_days)
        return applied


async def _stop_task(task: asyncio.Task[None], name: str) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), _STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("component did not stop in time; cancelling", extra={"component": name})
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    except Exception:
        log.exception("component failed while stopping", extra={"component": name})


async def run_controlplane(settings: ControlPlaneSettings, host: str, port: int,
                           stop: asyncio.Event) -> None:
    """Run everything until `stop` is set (or a component fails, which is re-raised)."""
    collector_settings = settings.collector_settings()
    analytics_settings = settings.analytics_settings()
    dsn = settings.resolved_clickhouse_dsn()
    redis = aioredis.Redis.from_url(settings.redis_url)
    ch = await asyncio.to_thread(SharedClient, dsn)
    log.info("clickhouse open", extra={"dsn": redact_dsn(dsn)})
    failure: BaseException | None = None
    try:
        applied = await asyncio.to_thread(_prepare_store, ch, collector_settings.retention_days)
        log.info("schema ready", extra={"applied": applied})
        store = PolicyStore(redis, RedisKeys(settings.key_prefix))
        collector = Collector(collector_settings, redis, ch)
        scheduler = Scheduler(AnalyticsJob(analytics_settings, redis, ch, store),
                              analytics_settings.interval_s)
        collector_stop, scheduler_stop = asyncio.Event(), asyncio.Event()
        components = {
            "api": asyncio.create_task(run_app(build_api(settings, redis, ch, store, scheduler),
                                               host, port, stop)),
            "collector": asyncio.create_task(collector.run(collector_stop)),
            "scheduler": asyncio.create_task(scheduler.run(scheduler_stop)),
        }
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, *components.values()],
                               return_when=asyncio.FIRST_COMPLETED)
            for name, task in components.items():
                if task.done() and not stop.is_set():
                    failure = task.exception() or RuntimeError(f"{name} stopped by itself")
                    log.error("component stopped; shutting down",
                              extra={"component": name, "error": repr(failure)})
        finally:
            stop.set()
            stopping.cancel()
            await _stop_task(components["api"], "api")
            collector_stop.set()
            await _stop_task(components["collector"], "collector")
            scheduler_stop.set()
            await _stop_task(components["scheduler"], "scheduler")
    finally:
        await asyncio.to_thread(ch.close)
        await redis.aclose()
        log.info("control plane stopped")
    if failure is not None:
        raise failure


async def _main(settings: ControlPlaneSettings, host: str, port: int) -> None:
    stop = stop_on_signals()
    await run_controlplane(settings, host, port, stop)


def serve(settings: ControlPlaneSettings, listen: str | None = None) -> int:
    """Blocking entry point of `apigw controlplane`; returns the exit code."""
    from apigw import logs
    from apigw.logs import new_event_loop

    logs.configure("controlplane", settings.log_level)
    try:
        host, port = parse_listen(listen or settings.listen)
        settings.collector_settings()
        settings.analytics_settings()
    except (ValueError, ValidationError) as exc:
        log.error("invalid settings", extra={"error": str(exc)})
        return 2
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_main(settings, host, port))
    except Exception:
        log.exception("control plane failed")
        return 1
    return 0
