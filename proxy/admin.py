"""The admin port: /healthz, /readyz, /metrics, /config. Never on the client listener.

/healthz: the process answers. /readyz: 200 when the gateway serves traffic correctly (503
otherwise), with JSON detail (Redis reachable, policy cache, emitter backlog, workers).
/metrics: Prometheus text (aggregated over workers in multiprocess mode). /config: the
config version and the config itself with secrets redacted.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from yarl import URL

from proxy.config import GatewayConfig, config_version

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

_SECRET_KEY: Final = re.compile(r"(password|passwd|secret|token|credential|private|api_key"
                                r"|authorization)", re.IGNORECASE)
_URL_WITH_PASSWORD: Final = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)


def redact_url(value: str) -> str:
    """A URL with any password in its userinfo replaced by REDACTED."""
    if not _URL_WITH_PASSWORD.match(value):
        return value
    url = URL(value)
    return str(url.with_password("REDACTED")) if url.password is not None else value


def redact(value: Any) -> Any:
    """A JSON-able structure with secret-looking keys and URL passwords redacted."""
    if isinstance(value, dict):
        return {key: ("REDACTED" if _SECRET_KEY.search(str(key)) and
                      isinstance(item, str | int | float) else redact(item))
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def config_document(config: GatewayConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {"version": config_version(config),
                                "config": redact(config.model_dump(mode="json"))}
    if extra:
        document.update(redact(extra))
    return document


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


def build_admin_app(readiness: Readiness, config_view: Callable[[], dict[str, Any]],
                    registry: CollectorRegistry, *, threaded_metrics: bool = False
                    ) -> web.Application:
    """The admin application. `threaded_metrics` renders /metrics off the event loop (used in
    multiprocess mode, where collecting reads every worker's files)."""

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        try:
            ready, detail = await readiness()
        except Exception as exc:  # a failing check means not ready, and says why
            ready, detail = False, {"status": "not_ready", "error": repr(exc)[:300]}
        return _json(detail, 200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        if threaded_metrics:
            body = await asyncio.to_thread(generate_latest, registry)
        else:
            body = generate_latest(registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def config(request: web.Request) -> web.Response:
        return _json(config_view())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/config", config)
    return app
