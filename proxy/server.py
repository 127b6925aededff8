"""Run the proxy: one in-process worker, or a supervisor with N workers sharing the port.

`serve(config_path, settings)` loads and validates the config (a ConfigError prints a clear
message on stderr and returns 2), seeds the YAML policies into Redis (logged and skipped when
Redis is down) and serves until SIGTERM/SIGINT: stop accepting, let in-flight requests finish
within `shutdown_grace_s`, flush the events, exit 0.

With `workers > 1` the parent spawns N worker processes that each bind the listen port with
SO_REUSEPORT; the parent restarts a worker that dies, serves the admin port, and aggregates
the workers' metrics with prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a
temp dir, is set before any metric is imported). Workers are spawned, not forked, so none
inherits an event loop or a Redis connection.

Hot reload (proxy/reload.py): SIGHUP, or a change of the config file (polled every
APIGW_CONFIG_WATCH_S seconds, default 2, 0 = off), re-reads and validates the YAML; each
worker swaps its Gateway atomically and the old one drains. With N workers the supervisor
validates first (an invalid file stops there, logged), keeps the new config for workers it
respawns, and sends SIGHUP to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from apigw.logs import configure, error_text, new_event_loop
from apigw.signals import stop_on_signals
from proxy.config import ConfigError, GatewayConfig, load_config
from proxy.reload import watch_file
from proxy.settings import ProxySettings, parse_listen
from proxy.tls import TlsError, TlsListener, check_tls, server_context

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from aiohttp import web

    from proxy.app import Gateway
    from proxy.emitter import SeqLedger
    from proxy.reload import LiveGateway

log = logging.getLogger(__name__)

_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_CRASH_WINDOW_S: Final = 30.0
_CRASH_LIMIT: Final = 5
_LEDGER_SLOTS: Final = 4  # emitters alive at once in a worker (a reload overlaps two)
_DEATH_WRITE_MAX_BACKOFF_S: Final = 5.0


def serve(config_path: Path, settings: ProxySettings) -> int:
    """Blocking: run the proxy until a signal; return the exit code."""
    configure("proxy", settings.log_level)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"apigw proxy: invalid config\n{exc}", file=sys.stderr)
        return 2
    try:
        check_tls(config)
    except TlsError as exc:
        print(f"apigw proxy: invalid config\n{exc}", file=sys.stderr)
        return 2
    multiproc_dir = ""
    if settings.workers > 1:
        multiproc_dir = tempfile.mkdtemp(prefix="apigw-metrics-")
        if "prometheus_client" in sys.modules and not os.environ.get(_MULTIPROC_ENV):
            log.warning("prometheus_client was imported before multiprocess mode was set; "
                        "the parent's own metrics are not aggregated")
        os.environ[_MULTIPROC_ENV] = multiproc_dir
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            if settings.workers == 1:
                return runner.run(_run_single(config, settings, config_path))
            return runner.run(_Supervisor(config, settings, config_path).run())
    finally:
        if multiproc_dir:
            os.environ.pop(_MULTIPROC_ENV, None)
            shutil.rmtree(multiproc_dir, ignore_errors=True)


# --- pieces shared by both modes -------------------------------------------------------------

def make_redis(settings: ProxySettings) -> aioredis.Redis:
    import redis.asyncio as aioredis

    # A blocking pool: a burst of concurrent requests waits briefly for a connection instead
    # of failing with MaxConnectionsError (which the limiter would take for "Redis down").
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_wait_s, socket_connect_timeout=1.0, socket_timeout=5.0,
        health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


async def seed_policies(config: GatewayConfig, settings: ProxySettings,
                        redis: aioredis.Redis) -> None:
    from proxy.policy import RedisKeys
    from proxy.policy_store import PolicyStore

    policies = config.ratelimit.policies
    try:
        async with asyncio.timeout(5.0):
            written = await PolicyStore(redis, RedisKeys(settings.key_prefix)).seed(policies)
    except Exception as exc:  # Redis down: the workers still serve the YAML baseline
        log.warning("could not seed policies into Redis; continuing with the config baseline",
                    extra={"error": error_text(exc), "policies": len(policies)})
        return
    log.info("policies seeded", extra={"policies": len(policies), "written": written})


async def start_listener(gateway: Gateway | LiveGateway, listen: str, *,
                         reuse_port: bool = False, shutdown_grace_s: float = 10.0,
                         ssl_context: ssl.SSLContext | None = None) -> web.ServerRunner:
    """Serve the gateway on HOST:PORT (over TLS with `ssl_context`); `runner.cleanup()`
    stops accepting and drains. The server is proxy/listener.py's: client timeouts and parser
    bounds from the gateway's settings, refused requests recorded as events."""
    from aiohttp import web

    from proxy.app import wire_log
    from proxy.listener import ClientTimeouts, ParserLimits, listener_server
    from proxy.reload import LiveGateway

    host, port = parse_listen(listen)
    settings = gateway.settings

    def current() -> Gateway:  # the live one across reloads: rejections are its events
        return gateway.gateway if isinstance(gateway, LiveGateway) else gateway

    server = listener_server(
        current, gateway.handle,
        ClientTimeouts(settings.client_header_timeout_s, settings.client_body_timeout_s,
                       settings.keepalive_timeout_s),
        ParserLimits(settings.max_request_line_bytes, settings.max_header_field_bytes,
                     settings.max_header_fields),
        access_log=None, auto_decompress=False, logger=wire_log)
    runner = web.ServerRunner(server, shutdown_timeout=shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024,
                       ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def start_admin(app: web.Application, listen: str) -> web.AppRunner:
    from aiohttp import web

    host, port = parse_listen(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def listener_tls(live: LiveGateway) -> ssl.SSLContext | None:
    """The listener's TLS context (None: plain HTTP); each handshake uses the certificate of
    the live config, so a reload or a renewed file changes it (proxy/tls.py)."""
    config = live.config.tls
    if config is None:
        return None

    def current() -> ssl.SSLContext | None:
        tls = live.gateway.tls
        return tls.current() if tls is not None else None

    return TlsListener(server_context(config), current).context


async def _serve_gateway(config: GatewayConfig, settings: ProxySettings,
                         redis: aioredis.Redis, stop: asyncio.Event,
                         on_ready: Callable[[LiveGateway], Any], reuse_port: bool,
                         config_path: Path | None, watch_s: float) -> int:
    """Start a gateway, serve until `stop`, drain and flush. Shared by single and worker.

    SIGHUP (and, when `watch_s` > 0, a change of the file) reloads `config_path`."""
    from proxy.app import Gateway, tune_gc
    from proxy.deferred_metrics import flush_all, flush_every
    from proxy.reload import LiveGateway

    gateway = Gateway(config, settings, redis)
    await gateway.start()
    tune_gc()
    live = LiveGateway(gateway, settings, redis, config_path,
                       drain_s=max(settings.shutdown_grace_s, 1.0))
    try:
        runner = await start_listener(live, settings.listen, reuse_port=reuse_port,
                                      shutdown_grace_s=settings.shutdown_grace_s,
                                      ssl_context=listener_tls(live))
    except OSError as exc:
        log.error("cannot listen", extra={"listen": settings.listen, "error": str(exc)})
        await gateway.stop()
        return 1
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, live.trigger)
    watcher = asyncio.create_task(watch_file(config_path, watch_s, live.trigger),
                                  name="config-watch")
    flusher = asyncio.create_task(flush_every(settings.metrics_flush_s), name="metrics-flush")
    try:
        await on_ready(live)
        log.info("proxy listening", extra={"listen": settings.listen,
                                           "config_version": gateway.version,
                                           "routes": len(config.routes)})
        await stop.wait()
        log.info("shutting down: draining in-flight requests",
                 extra={"grace_s": settings.shutdown_grace_s})
        live.gateway.stopping = True
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in (watcher, flusher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()
        await live.stop()
        flush_all()  # the last requests' counts, before a worker's process ends
    emitter = live.gateway.emitter
    if emitter is not None:
        log.info("events flushed", extra=emitter.stats)
    return 0


# --- one process ----------------------------------------------------------------------------

async def _run_single(config: GatewayConfig, settings: ProxySettings,
                      config_path: Path | None = None) -> int:
    from prometheus_client import REGISTRY

    from proxy.admin import build_admin_app, config_document

    stop = stop_on_signals()
    redis = make_redis(settings)
    admin: web.AppRunner | None = None
    try:
        await seed_policies(config, settings, redis)

        async def on_ready(live: LiveGateway) -> None:
            nonlocal admin
            from proxy.app import describe_steps

            def view() -> dict[str, Any]:
                extra = {"workers": 1, "chain": describe_steps(live.gateway.steps),
                         "reloads": live.reloads}
                return config_document(live.config, extra)

            app = build_admin_app(live.readiness, view, REGISTRY)
            admin = await start_admin(app, settings.admin_listen)

        try:
            return await _serve_gateway(config, settings, redis, stop, on_ready,
                                        reuse_port=False, config_path=config_path,
                                        watch_s=settings.config_watch_s)
        except OSError as exc:
            log.error("cannot listen on the admin port",
                      extra={"listen": settings.admin_listen, "error": str(exc)})
            return 1
    finally:
        if admin is not None:
            await admin.cleanup()
        await redis.aclose()


# --- N workers --------------------------------------------------------------------------------

def _worker_main(config: GatewayConfig, settings: ProxySettings, ready: ProcessEvent,
                 config_path: Path | None = None, ledger: tuple[Any, Any] | None = None) -> None:
    """Entry point of a spawned worker process."""
    configure("proxy", settings.log_level)
    if ledger is not None:  # event numbers shared with the parent (loss accounting)
        from proxy.emitter import SeqLedger, use_ledger

        use_ledger(SeqLedger(*ledger))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's reload handler is set
    settings = settings.for_worker()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        code = runner.run(_run_worker(config, settings, ready, config_path))
    sys.exit(code)


async def _run_worker(config: GatewayConfig, settings: ProxySettings,
                      ready: ProcessEvent, config_path: Path | None) -> int:
    stop = stop_on_signals()
    redis = make_redis(settings)

    async def on_ready(live: LiveGateway) -> None:
        await live.catch_up()  # a SIGHUP sent before the handler was set was ignored
        ready.set()

    try:  # the supervisor watches the file and sends SIGHUP
        return await _serve_gateway(config, settings, redis, stop, on_ready, reuse_port=True,
                                    config_path=config_path, watch_s=0)
    finally:
        await redis.aclose()


class _Worker:
    def __init__(self, slot: int, process: SpawnProcess, ready: ProcessEvent,
                 ledger: SeqLedger) -> None:
        self.slot = slot
        self.process = process
        self.ready = ready
        self.ledger = ledger


class _Supervisor:
    """The parent of N workers: starts, watches and restarts them; serves the admin port."""

    def __init__(self, config: GatewayConfig, settings: ProxySettings,
                 config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._crashes: list[float] = []
        self.stopping = False
        self._redis: aioredis.Redis | None = None
        self._death_writes: set[asyncio.Task[None]] = set()

    def _spawn(self, slot: int) -> None:
        from proxy.emitter import SeqLedger

        ready = self.context.Event()
        counts = self.context.RawArray("q", _LEDGER_SLOTS)
        names = self.context.RawArray("c", _LEDGER_SLOTS * SeqLedger.NAME_BYTES)
        process = self.context.Process(target=_worker_main, name=f"apigw-proxy-{slot}",
                                       args=(self.config, self.settings, ready,
                                             self.config_path, (counts, names)))
        process.start()
        self.workers[slot] = _Worker(slot, process, ready, SeqLedger(counts, names))
        log.info("worker started", extra={"slot": slot, "worker_pid": process.pid})

    async def run(self) -> int:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from proxy.admin import build_admin_app, config_document
        from proxy.metrics import WORKERS

        stop = stop_on_signals()
        redis = make_redis(self.settings)
        self._redis = redis
        admin: web.AppRunner | None = None
        code = 0
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def reload() -> None:
            task = asyncio.create_task(self._reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        watcher = asyncio.create_task(
            watch_file(self.config_path, self.settings.config_watch_s, reload),
            name="config-watch")
        try:
            await seed_policies(self.config, self.settings, redis)
            for slot in range(self.settings.workers):
                self._spawn(slot)
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            extra = {"workers": self.settings.workers}
            app = build_admin_app(lambda: self.readiness(redis),
                                  lambda: config_document(self.config, extra), registry,
                                  threaded_metrics=True)
            try:
                admin = await start_admin(app, self.settings.admin_listen)
            except OSError as exc:
                log.error("cannot listen on the admin port",
                          extra={"listen": self.settings.admin_listen, "error": str(exc)})
                return 1
            while not stop.is_set():
                if not self._reap_and_restart():
                    code = 1
                    break
                WORKERS.set(sum(w.process.is_alive() for w in self.workers.values()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        await stop.wait()
            log.info("shutting down workers", extra={"grace_s": self.settings.shutdown_grace_s})
        finally:
            self.stopping = True
            loop.remove_signal_handler(signal.SIGHUP)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self._stop_workers()
            if self._death_writes:
                await asyncio.wait(self._death_writes, timeout=5)
                for task in self._death_writes:
                    task.cancel()
            if admin is not None:
                await admin.cleanup()
            await redis.aclose()
        return code

    def _record_death(self, worker: _Worker) -> None:
        """A worker died without stopping its emitters: record the exact last number each of
        them assigned, so the collector counts the events lost with its buffer."""
        marks = worker.ledger.marks()
        if not marks or self._redis is None:
            return
        from proxy.policy import RedisKeys

        key = RedisKeys(self.settings.key_prefix).event_emitter_deaths
        now = time.time()
        records = {emitter: json.dumps({"assigned": assigned, "at": now})
                   for emitter, assigned in marks.items()}
        log.warning("worker died holding events; recording its marks",
                    extra={"worker_pid": worker.process.pid, "emitters": marks})
        redis = self._redis

        async def write() -> None:
            delay = 0.5
            while True:  # until Redis takes it (or the proxy stops)
                try:
                    await redis.hset(key, mapping=records)  # type: ignore[arg-type]
                    return
                except Exception as exc:  # Redis down: the record waits here
                    log.warning("dead worker's event marks not recorded yet; retrying",
                                extra={"error": repr(exc)[:200], "retry_in_s": delay})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _DEATH_WRITE_MAX_BACKOFF_S)

        task = asyncio.get_running_loop().create_task(write())
        self._death_writes.add(task)
        task.add_done_callback(self._death_writes.discard)

    async def _reload(self) -> None:
        """Validate the file; if good, keep it for respawns and tell every worker (SIGHUP)."""
        if self.config_path is None:
            return
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error("config reload rejected; workers keep the current config",
                      extra={"path": str(self.config_path), "error": str(exc)[:2000]})
            return
        self.config = config
        for worker in self.workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGHUP)
        log.info("config reload sent to workers", extra={"workers": len(self.workers)})

    def _reap_and_restart(self) -> bool:
        """Restart dead workers; False when they crash in a loop (give up)."""
        from prometheus_client import multiprocess

        from proxy.metrics import WORKER_RESTARTS

        for slot, worker in list(self.workers.items()):
            if worker.process.is_alive():
                continue
            worker.process.join(0)
            pid, exitcode = worker.process.pid, worker.process.exitcode
            if pid is not None:
                multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
            self._record_death(worker)
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < _CRASH_WINDOW_S] + [now]
            if len(self._crashes) > _CRASH_LIMIT:
                log.error("workers keep dying; giving up",
                          extra={"slot": slot, "exitcode": exitcode,
                                 "deaths": len(self._crashes), "window_s": _CRASH_WINDOW_S})
                return False
            log.warning("worker died; restarting",
                        extra={"slot": slot, "worker_pid": pid, "exitcode": exitcode})
            self.restarts += 1
            WORKER_RESTARTS.inc()
            self._spawn(slot)
        return True

    async def _stop_workers(self) -> None:
        for worker in self.workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 10.0
        while True:
            alive = [w.process.sentinel for w in self.workers.values() if w.process.is_alive()]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                break
            await asyncio.to_thread(multiprocessing.connection.wait, alive, min(remaining, 1.0))
        for worker in self.workers.values():
            if worker.process.is_alive():
                log.error("worker did not stop in time; killing",
                          extra={"worker_pid": worker.process.pid})
                worker.process.kill()
                worker.process.join(5)
                self._record_death(worker)
            worker.process.join(5)
            if worker.process.exitcode not in (0, None):
                log.warning("worker exited with an error",
                            extra={"worker_pid": worker.process.pid,
                                   "exitcode": worker.process.exitcode})

    async def readiness(self, redis: aioredis.Redis) -> tuple[bool, dict[str, Any]]:
        redis_ok, redis_error, redis_reason = True, "", ""
        try:
            async with asyncio.timeout(0.5):
                await redis.ping()
        except Exception as exc:  # any failure means "not reachable", reported as such
            redis_ok, redis_error, redis_reason = False, type(exc).__name__, error_text(exc)
        alive = [w for w in self.workers.values() if w.process.is_alive()]
        ready = [w for w in alive if w.ready.is_set()]
        fail_mode = self.config.ratelimit.fail_mode
        expected = self.settings.workers
        is_ready = (not self.stopping and len(ready) == expected
                    and (redis_ok or fail_mode == "open"))
        detail = {"status": ("ready" if redis_ok else "degraded") if is_ready else "not_ready",
                  "workers": {"expected": expected, "alive": len(alive), "ready": len(ready),
                              "restarts": self.restarts,
                              "pids": [w.process.pid for w in alive]},
                  "redis": {"reachable": redis_ok, "error": redis_error,
                            **({"reason": redis_reason} if redis_reason else {})},
                  "ratelimit": {"fail_mode": fail_mode}}
        return is_ready, detail
