"""Hot reload: swap a worker's whole Gateway for one built from a new config, atomically.

`LiveGateway` is what the listener serves. Each request is handed to the gateway that is
current when it arrives, and finishes on it. `apply(config)` builds and starts a new Gateway
(router, forwarder pools, chain, policy cache, emitter), swaps the reference - one assignment,
so no request ever sees half a config - then lets the old one drain its in-flight requests
(up to `drain_s`) and stops it in the background. `reload()` re-reads the YAML: an invalid
file is a log line and `apigw_config_reloads_total{outcome="invalid"}`, and the old config
keeps serving. Triggers: SIGHUP, and `watch()` polling the file's mtime and size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from proxy.config import ConfigError, GatewayConfig, config_version, load_config

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from proxy.app import Gateway
    from proxy.settings import ProxySettings

log = logging.getLogger(__name__)


class _Serving:
    __slots__ = ("active", "drained", "gateway", "retired")

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.active = 0
        self.retired = False
        self.drained = asyncio.Event()


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


async def watch_file(path: Path | None, interval_s: float,
                     on_change: Callable[[], None]) -> None:
    """Poll `path` every `interval_s` (0: never) and call `on_change` when it changed."""
    if path is None or interval_s <= 0:
        return
    stamp = file_stamp(path)
    while True:
        await asyncio.sleep(interval_s)
        current = file_stamp(path)
        if current is not None and current != stamp:
            stamp = current
            on_change()


class LiveGateway:
    """The current Gateway of one worker, replaceable while serving."""

    def __init__(self, gateway: Gateway, settings: ProxySettings, redis: aioredis.Redis,
                 config_path: Path | None = None, drain_s: float = 30.0) -> None:
        self._serving = _Serving(gateway)
        self.settings = settings
        self.redis = redis
        self.config_path = config_path
        self.drain_s = drain_s
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[Any]] = set()
        self.reloads = 0

    @property
    def gateway(self) -> Gateway:
        return self._serving.gateway

    @property
    def config(self) -> GatewayConfig:
        return self._serving.gateway.config

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        serving = self._serving
        serving.active += 1
        try:
            return await serving.gateway.handle(request)
        finally:
            serving.active -= 1
            if serving.retired and not serving.active:
                serving.drained.set()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        ready, detail = await self.gateway.readiness()
        detail["reloads"] = self.reloads
        return ready, detail

    # -- reloading --------------------------------------------------------------------------

    async def reload(self) -> str:
        """Re-read the config file and apply it; returns the outcome (also a metric)."""
        if self.config_path is None:
            return self._count("error")
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error("config reload rejected; the current config keeps serving",
                      extra={"path": str(self.config_path), "error": str(exc)[:2000],
                             "config_version": self.gateway.version})
            return self._count("invalid")
        return await self.apply(config)

    async def catch_up(self) -> str | None:
        """Reload if the file no longer holds the config this gateway started with; call once
        the SIGHUP handler is installed. A spawned worker ignores SIGHUP until then, so a
        reload sent while it was starting is lost; this replaces it. Returns the reload's
        outcome, or None when the file is absent, unchanged (nothing counted) or invalid (the
        supervisor rejects that file itself; the spawn-time config keeps serving)."""
        if self.config_path is None:
            return None
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.warning("config file invalid at worker start; the spawn-time config serves",
                        extra={"path": str(self.config_path), "error": str(exc)[:2000],
                               "config_version": self.gateway.version})
            return None
        if config_version(config) == self.gateway.version:
            return None
        log.info("config file changed while starting; catching up",
                 extra={"from_version": self.gateway.version,
                        "config_version": config_version(config)})
        return await self.apply(config)

    async def apply(self, config: GatewayConfig) -> str:
        from proxy.app import Gateway

        async with self._lock:
            old = self._serving
            version = config_version(config)
            if version == old.gateway.version:
                return self._count("unchanged")
            try:
                new = Gateway(config, self.settings, self.redis)
                await new.start()
            except Exception as exc:  # the config validated but could not be built
                log.exception("config reload failed; the current config keeps serving",
                              extra={"config_version": version, "error": repr(exc)[:500]})
                return self._count("error")
            self._serving = _Serving(new)
            old.retired = True
            if not old.active:
                old.drained.set()
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            self.reloads += 1
            log.info("config reloaded", extra={"from_version": old.gateway.version,
                                               "config_version": version,
                                               "routes": len(config.routes)})
            return self._count("success")

    async def _retire(self, old: _Serving) -> None:
        from proxy.metrics import CONFIG_INFO

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_s):
                await old.drained.wait()
        if old.active:
            log.warning("old config still had requests in flight after the drain deadline",
                        extra={"in_flight": old.active, "drain_s": self.drain_s})
        await old.gateway.stop()
        if old.gateway.version != self.gateway.version:
            with contextlib.suppress(KeyError):
                CONFIG_INFO.remove(old.gateway.version)

    def _count(self, outcome: str) -> str:
        from proxy.metrics import CONFIG_RELOADS

        CONFIG_RELOADS.labels(outcome).inc()
        return outcome

    def trigger(self) -> None:
        """Schedule a reload (from a signal handler)."""
        task = asyncio.create_task(self.reload())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the current gateway and wait for retiring ones."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self.gateway.stopping = True
        await self.gateway.stop(timeout_s=timeout_s)
