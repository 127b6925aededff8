"""The gateway of one worker: the request chain, and its lifecycle.

The chain is an explicit ordered list of steps; each concern is one module with the same
hooks (Kong's phases):

    STEPS = observe (proxy/metrics.py) -> identity (proxy/identity.py)
            -> cors preflight (proxy/authz.py) -> route (proxy/routing.py)
            -> ip access (proxy/authz.py)
            -> pre-auth rate limit, `ip` policies (proxy/ratelimit_step.py)
            -> authn (proxy/auth/step.py)
            -> scopes (proxy/authz.py) -> rate limit (proxy/ratelimit_step.py)
            -> cache (proxy/cache_step.py) -> transform (proxy/transform.py)
            -> aggregate (proxy/aggregate.py, answers aggregation routes)
            -> websocket sessions' in-flight slots (proxy/websocket.py)
            -> forward (proxy/forward.py, the terminal step)

`access(ex)` runs in that order; a step that returns a response ends the request there (404,
429, ...). `log(ex)` runs for every step that has one once the response is complete. A new
filter (auth, transforms, cache) is a class with these hooks and one line in `_steps()`.
Identity runs before routing so that unroutable requests still carry who sent them.

Every request, whatever happens (404, 429, 5xx, a client that disconnects, a bug), produces
exactly one RequestEvent, emitted in a `finally` without waiting on Redis.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast
from urllib.parse import unquote_plus

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from apigw.logs import error_text
from proxy.aggregate import AggregateStep
from proxy.auth.apikeys import ApiKeyVerifier
from proxy.auth.jwt import JwtVerifier
from proxy.auth.step import AuthnStep
from proxy.authz import CorsStep, IpAccessStep, ScopeStep
from proxy.cache_step import CacheStep
from proxy.config import GatewayConfig, config_version
from proxy.emitter import EventEmitter
from proxy.event import RequestEvent
from proxy.forward import ClientGone, Forwarder, UpstreamClient, request_id_from, trace_context
from proxy.identity import Caller, IdentityResolver, IdentityStep
from proxy.metrics import CONFIG_INFO, ObserveStep
from proxy.policy import RedisKeys
from proxy.policy_store import PolicyCache, PolicyStore
from proxy.problem import problem_response
from proxy.ratelimit_step import (
    PreAuthRateLimitStep,
    RateLimitChecks,
    RateLimitStep,
    build_limiter,
)
from proxy.response_filter import ResponseFilter
from proxy.routing import MAX_PATH, CompiledRoute, Router, RouteStep
from proxy.settings import ProxySettings
from proxy.tls import ServerCertificate
from proxy.tracing import GatewayTracer, RequestTrace, build_tracer
from proxy.transform import TransformStep
from proxy.websocket import WebSocketStep

log = logging.getLogger(__name__)
wire_log = logging.getLogger("proxy.wire")  # the HTTP server's own messages


def _quiet_malformed(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed request as an error with a traceback quoting the bad
    bytes (a log flood anyone can cause, and the bytes may hold credentials): keep a
    debug line with the status and the problem class only."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return True
    record.msg, record.args = "malformed request rejected", ()
    record.exc_info, record.exc_text = None, None
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    record.status, record.problem = exc.code, type(exc).__name__
    return wire_log.isEnabledFor(logging.DEBUG)


wire_log.addFilter(_quiet_malformed)

MAX_QUERY: Final = 2048
MAX_HEADER_FIELD: Final = 512
REDACTED: Final = "REDACTED"
STATUS_CLIENT_GONE: Final = 499  # nginx's "client closed request", for events only
_VERSIONS: Final = {(1, 1): "1.1", (1, 0): "1.0", (0, 9): "0.9"}


class Exchange:
    """One request on its way through the chain: what steps learn and hand on."""

    __slots__ = ("caller", "event", "observed", "path", "query", "ratelimit_checks",
                 "raw_segments", "request", "request_id", "response_filters",
                 "response_headers", "route", "segments", "trace", "traceparent",
                 "trusted_peer")

    def __init__(self, request: BaseRequest, event: RequestEvent, request_id: str,
                 traceparent: str, path: str, query: str) -> None:
        self.request = request
        self.event = event
        self.request_id = request_id
        self.traceparent = traceparent
        self.path = path  # as received, still percent-encoded, no query
        self.query = query  # as received
        self.raw_segments: list[str] = []  # normalised, still encoded (forwarded upstream)
        self.segments: list[str] = []  # normalised and decoded (matched)
        self.route: CompiledRoute | None = None
        self.caller: Caller | None = None
        self.trusted_peer = False
        self.response_headers: dict[str, str] = {"X-Request-Id": request_id}
        self.observed = False
        self.response_filters: list[ResponseFilter] = []  # cache, transform (response phase)
        self.trace: RequestTrace | None = None  # set only when tracing is on
        self.ratelimit_checks: RateLimitChecks | None = None  # set by the rate-limit steps


class AccessHook(Protocol):
    async def access(self, ex: Exchange) -> web.StreamResponse | None: ...


class LogHook(Protocol):
    def log(self, ex: Exchange) -> None: ...


def redact_query(query: str, names: frozenset[str]) -> str:
    """The query string with the values of credential parameters replaced by REDACTED."""
    if not query:
        return ""
    parts = query.split("&")
    changed = False
    for index, part in enumerate(parts):
        name = part.partition("=")[0]
        plain = unquote_plus(name) if ("%" in name or "+" in name) else name
        if plain.lower() in names:
            parts[index] = f"{name}={REDACTED}"
            changed = True
    redacted = "&".join(parts) if changed else query
    return redacted[:MAX_QUERY]


class Gateway:
    """One worker's gateway: config compiled, clients and background tasks, the handler."""

    def __init__(self, config: GatewayConfig, settings: ProxySettings,
                 redis: aioredis.Redis) -> None:
        self.config = config
        self.settings = settings
        self.redis = redis
        self.version = config_version(config)
        self.instance = settings.instance
        self.router = Router(config.routes)
        self.identity = IdentityResolver(config.identity)
        self.forwarder = Forwarder({name: UpstreamClient(name, upstream)
                                    for name, upstream in config.upstreams.items()})
        keys = RedisKeys(settings.key_prefix)
        self.store = PolicyStore(redis, keys)
        self.policies = PolicyCache(self.store, config.ratelimit.policies,
                                    config.ratelimit.policy_refresh_s)
        self.limiter = build_limiter(config.ratelimit, redis, keys, workers=settings.workers,
                                     timeout_s=settings.redis_timeout_s)
        auth = config.auth
        self.authn = AuthnStep(auth, JwtVerifier(auth.jwt, max_token_bytes=auth.max_token_bytes,
                                                 cache_size=auth.token_cache_size),
                               ApiKeyVerifier(auth.api_keys, redis, keys))
        events = config.events
        self.emitter: EventEmitter | None = None
        if events.enabled:
            self.emitter = EventEmitter(redis, settings.events_stream,
                                        batch_size=events.batch_size,
                                        flush_interval_s=events.flush_interval_ms / 1000.0,
                                        buffer_max=events.buffer_max,
                                        stream_maxlen=events.stream_maxlen,
                                        instance=settings.instance,
                                        heartbeat_key=keys.event_emitters)
        self._emit: Callable[[RequestEvent], None] = (
            self.emitter.emit if self.emitter is not None else _discard)
        key_param = config.auth.api_keys.query_param
        self._redact = frozenset(name.lower() for name in
                                 [*events.redact_query_params, *([key_param] if key_param else [])])
        self.steps: list[object] = self._steps()
        self._access = tuple(cast(AccessHook, step) for step in self.steps
                             if hasattr(step, "access"))
        self._log = tuple(cast(LogHook, step) for step in self.steps if hasattr(step, "log"))
        self.tracer: GatewayTracer | None = build_tracer(config.tracing)
        self.tls = ServerCertificate(config.tls) if config.tls is not None else None
        self.started = False
        self.stopping = False

    def _steps(self) -> list[object]:
        """THE CHAIN: the order requests go through. Add a filter with one line here. A step
        the configuration cannot use is left out (`when_used`); the rate-limit steps always
        stay, as policies arrive from Redis at run time."""
        routes = self.config.routes
        legacy_headers = self.config.ratelimit.legacy_headers
        return [
            ObserveStep(),
            IdentityStep(self.identity),
            *CorsStep.when_used(self.router, routes),
            RouteStep(self.router),
            *IpAccessStep.when_used(self.config.access, routes),
            PreAuthRateLimitStep(self.policies, self.limiter, legacy_headers=legacy_headers),
            *([self.authn] if any(route.auth is not None for route in routes) else []),
            *ScopeStep.when_used(self.config.auth.realm, routes),
            RateLimitStep(self.policies, self.limiter, legacy_headers=legacy_headers),
            *CacheStep.when_used(routes, self.router, self.redis, self.settings),
            *TransformStep.when_used(routes),
            *AggregateStep.when_used(routes, self.forwarder.upstreams),
            *WebSocketStep.when_used(routes, self.forwarder),
            self.forwarder,
        ]

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.forwarder.start()
        await self.policies.start()
        await self.authn.start()
        if self.emitter is not None:
            await self.emitter.start()
        CONFIG_INFO.labels(self.version).set(1)
        self.started = True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Release upstream pools and background tasks, then flush the events."""
        self.stopping = True
        await self.policies.stop()
        await self.limiter.close()
        await self.authn.stop()
        await self.forwarder.close()
        if self.emitter is not None:
            await self.emitter.stop(timeout_s=timeout_s)
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        redis_ok, redis_error, redis_reason = True, "", ""
        try:
            async with asyncio.timeout(0.5):
                await self.redis.ping()
        except Exception as exc:  # any failure means "not reachable", reported as such
            redis_ok, redis_error, redis_reason = False, type(exc).__name__, error_text(exc)
        fail_mode = self.config.ratelimit.fail_mode
        detail: dict[str, Any] = {
            "instance": self.instance, "config_version": self.version,
            "started": self.started, "stopping": self.stopping,
            "redis": {"reachable": redis_ok, "error": redis_error,
                      **({"reason": redis_reason} if redis_reason else {})},
            "policies": {"healthy": self.policies.healthy, "version": self.policies.version,
                         "loaded_from": self.policies.loaded_from,
                         "effective": len(self.policies.policies)},
            "ratelimit": {"fail_mode": fail_mode, "degraded": self.limiter.degraded},
        }
        if self.emitter is not None:
            stats = self.emitter.stats
            detail["events"] = {**stats, "buffer_max": self.config.events.buffer_max}
        ready = self.started and not self.stopping and (redis_ok or fail_mode == "open")
        detail["status"] = ("ready" if redis_ok and self.policies.healthy else "degraded") \
            if ready else "not_ready"
        return ready, detail

    # -- the request path ------------------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        headers = request.headers
        request_id = request_id_from(headers.get("X-Request-Id"))
        tracer, trace = self.tracer, None
        if tracer is None:
            trace_id, span_id, traceparent = trace_context(headers.get("traceparent"))
        else:  # the server span's ids are the event's and the propagated trace's
            trace = tracer.start(request)
            trace_id, span_id, traceparent = trace.trace_id, trace.span_id, trace.traceparent
        target = request.raw_path
        if not target.startswith("/") and target != "*":
            target = request.rel_url.raw_path_qs  # absolute-form request target
        path, _, query = target.partition("?")
        event = RequestEvent(
            timestamp=time.time(), request_id=request_id,
            http_request_method=request.method, url_path=path[:MAX_PATH],
            http_response_status_code=0, duration_ms=0.0, trace_id=trace_id, span_id=span_id,
            gateway_instance=self.instance, url_query=redact_query(query, self._redact),
            url_scheme=request.scheme,
            server_address=headers.get("Host", "")[:MAX_HEADER_FIELD],
            network_protocol_version=_VERSIONS.get((request.version.major, request.version.minor),
                                                   "1.1"),
            user_agent_original=headers.get("User-Agent", "")[:MAX_HEADER_FIELD])
        ex = Exchange(request, event, request_id, traceparent, path, query)
        ex.trace = trace
        response: web.StreamResponse | None = None
        try:
            for step in self._access:
                response = await step.access(ex)
                if response is not None:
                    break
            if response is None:  # only when the chain has no terminal step
                response = problem_response("internal-error", "no step answered",
                                            request_id)
            if not response.prepared:
                await response.prepare(request)
                await response.write_eof()
            event.http_response_status_code = response.status
            if not event.http_response_body_size and isinstance(response, web.Response):
                body = response.body
                if isinstance(body, bytes) and request.method != "HEAD":
                    event.http_response_body_size = len(body)
            return response
        except (ClientGone, ConnectionResetError):
            event.http_response_status_code = STATUS_CLIENT_GONE
            event.error_type = event.error_type or "client_disconnect"
            return web.Response(status=STATUS_CLIENT_GONE)
        except asyncio.CancelledError:
            event.http_response_status_code = STATUS_CLIENT_GONE
            event.error_type = event.error_type or "cancelled"
            raise
        except Exception:
            log.exception("request failed inside the gateway",
                          extra={"request_id": request_id, "route_id": event.route_id})
            event.error_type = "internal_error"
            if request.writer.output_size > 0:  # a response already started: cut it off
                event.http_response_status_code = response.status if response else 500
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)
            failure = problem_response("internal-error", "the gateway failed on this request",
                                       request_id)
            event.http_response_status_code = failure.status
            return failure
        finally:
            event.duration_ms = (time.perf_counter() - started) * 1000.0
            for hook in self._log:
                try:
                    hook.log(ex)
                except Exception:
                    log.exception("log hook failed", extra={"hook": type(hook).__name__})
            self._emit(event)
            if trace is not None:
                trace.end(event)


def _discard(event: RequestEvent) -> None:
    return None


def tune_gc(young_threshold: int = 7000) -> None:
    """For a serving worker, once started: move the startup heap (modules, config, compiled
    routes) out of the collector's reach with gc.freeze(), and collect the young generation
    less often. Without it the cyclic GC took ~10% of a loaded worker's CPU (bench/README.md).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)


def describe_steps(steps: Sequence[object]) -> list[str]:
    """The chain as names, for /config and logs."""
    return [type(step).__name__ for step in steps]
