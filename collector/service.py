"""`apigw collector`: the collector as its own process, for a ClickHouse server DSN.

It migrates the schema, sets the retention, runs the `Collector` and serves an admin endpoint
(/healthz, /readyz, /metrics). SIGTERM or SIGINT: the batch in hand is finished (or, if
ClickHouse is down, left pending for the next run), then it exits 0. With the embedded store
the control plane runs the collector instead (`Collector.run(stop)` in its own event loop):
only one process may open a chDB directory, and this one refuses to start if it can't.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from apigw import logs
from apigw.logs import error_text
from apigw.signals import stop_on_signals
from collector.clickhouse import SharedClient, is_embedded, redact_dsn
from collector.consumer import Collector
from collector.schema import apply_retention, migrate
from collector.settings import CollectorSettings

log = logging.getLogger(__name__)

_CHECK_TIMEOUT_S = 2.0


class StoreUnavailableError(RuntimeError):
    """ClickHouse could not be opened; the message says why and what to do."""


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9091)")
    return host.strip("[]"), int(port)


def open_store(dsn: str) -> SharedClient:
    """Open ClickHouse, migrate the schema; StoreUnavailableError with a clear reason if not."""
    try:
        return SharedClient(dsn)
    except Exception as exc:
        hint = ("an embedded store can be opened by one process only: is `apigw controlplane` "
                "(or another collector) running on this directory? Stop it, or use a "
                "ClickHouse server DSN (http://...) to run several processes"
                if is_embedded(dsn) else "is the ClickHouse server up and the DSN right?")
        raise StoreUnavailableError(f"cannot open ClickHouse {redact_dsn(dsn)}: "
                                    f"{str(exc)[:300]}; {hint}") from exc


def prepare_store(ch: SharedClient, retention_days: int) -> list[str]:
    """Migrate and apply the retention; returns the migrations applied."""
    with ch.lock:
        applied = migrate(ch.client)
        apply_retention(ch.client, retention_days)
    return applied


def build_admin(collector: Collector) -> web.Application:
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        redis_ok, ch_ok = await asyncio.gather(_redis_ok(collector), _clickhouse_ok(collector))
        ready = redis_ok == "ok" and ch_ok == "ok"
        body: dict[str, Any] = {"ready": ready, "redis": redis_ok, "clickhouse": ch_ok,
                                "stats": collector.stats}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def _redis_ok(collector: Collector) -> str:
    try:
        await asyncio.wait_for(collector.redis.ping(), _CHECK_TIMEOUT_S)
    except Exception as exc:
        return f"unreachable: {error_text(exc)}"
    return "ok"


async def _clickhouse_ok(collector: Collector) -> str:
    if collector.last_insert_error is not None:
        return f"inserts failing: {collector.last_insert_error}"

    def ping() -> str:
        # An insert in progress holds the lock: that is a sign of life too.
        if not collector.ch.lock.acquire(timeout=_CHECK_TIMEOUT_S):
            return "ok"
        try:
            collector.ch.client.command("SELECT 1")
        finally:
            collector.ch.lock.release()
        return "ok"

    try:
        return await asyncio.to_thread(ping)
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"


async def run_service(settings: CollectorSettings, host: str, port: int,
                      stop: asyncio.Event) -> None:
    """Run until `stop` is set. Raises StoreUnavailableError or OSError (port in use)."""
    dsn = settings.resolved_clickhouse_dsn()
    ch = await asyncio.to_thread(open_store, dsn)
    redis = aioredis.Redis.from_url(settings.redis_url)
    runner: web.AppRunner | None = None
    try:
        applied = await asyncio.to_thread(prepare_store, ch, settings.retention_days)
        log.info("schema ready", extra={"applied": applied, "dsn": redact_dsn(dsn),
                                        "retention_days": settings.retention_days})
        collector = Collector(settings, redis, ch)
        runner = web.AppRunner(build_admin(collector), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("admin endpoint listening", extra={"listen": f"{host}:{port}"})
        await collector.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await redis.aclose()
        await asyncio.to_thread(ch.close)


async def _main(settings: CollectorSettings, host: str, port: int) -> None:
    stop = stop_on_signals()
    await run_service(settings, host, port, stop)


def serve(settings: CollectorSettings, listen: str | None = None) -> int:
    """Blocking entry point of `apigw collector`; returns the exit code."""
    from apigw.logs import new_event_loop

    logs.configure("collector", settings.log_level)
    try:
        host, port = parse_listen(listen or settings.listen)
    except ValueError as exc:
        log.error("invalid settings", extra={"error": str(exc)})
        return 2
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_main(settings, host, port))
    except StoreUnavailableError as exc:
        log.error("refusing to start", extra={"error": str(exc)})
        return 1
    except OSError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":  # python -m collector.service
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(serve(CollectorSettings()))
