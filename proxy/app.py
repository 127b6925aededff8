"""The gateway of one worker: the request chain, and its lifecycle.

The chain is an explicit ordered list of steps; each concern is one module with the same
hooks (Kong's phases):

    STEPS = observe (proxy/metrics.py) -> identity (proxy/identity.py)
            -> route (proxy/routing.py) -> rate limit (RateLimitStep below)
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
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast
from urllib.parse import unquote_plus

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.web_request import BaseRequest

from proxy.config import GatewayConfig, config_version
from proxy.emitter import EventEmitter
from proxy.event import RequestEvent
from proxy.forward import ClientGone, Forwarder, UpstreamClient, request_id_from, trace_context
from proxy.identity import Caller, IdentityResolver, IdentityStep
from proxy.metrics import CONFIG_INFO, ObserveStep
from proxy.policy import Mode, RedisKeys
from proxy.policy_store import PolicyCache, PolicyStore
from proxy.problem import problem_response
from proxy.ratelimit import (
    FailoverRateLimiter,
    LocalRateLimiter,
    RateLimitUnavailable,
    RedisRateLimiter,
)
from proxy.routing import MAX_PATH, CompiledRoute, Router, RouteStep
from proxy.settings import ProxySettings

log = logging.getLogger(__name__)

MAX_QUERY: Final = 2048
MAX_HEADER_FIELD: Final = 512
REDACTED: Final = "REDACTED"
STATUS_CLIENT_GONE: Final = 499  # nginx's "client closed request", for events only
_VERSIONS: Final = {(1, 1): "1.1", (1, 0): "1.0", (0, 9): "0.9"}


class Exchange:
    """One request on its way through the chain: what steps learn and hand on."""

    __slots__ = ("caller", "event", "observed", "path", "query", "raw_segments", "request",
                 "request_id", "response_headers", "route", "segments", "traceparent",
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


def ratelimit_headers(policy_id: str, limit: int, window_s: float, remaining: int,
                      reset_s: float) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers-10 fields for one policy."""
    return {"RateLimit-Policy": f'"{policy_id}";q={limit};w={max(1, math.ceil(window_s))}',
            "RateLimit": f'"{policy_id}";r={max(0, remaining)};t={max(0, math.ceil(reset_s))}'}


class RateLimitStep:
    """Chain step: the most specific policy for (route, method, tenant, key) decides.

    enforce + over limit -> 429 with Retry-After and RateLimit headers; shadow + over limit
    -> forwarded, recorded as shadow_limited; Redis down -> the limiter's fail mode (open:
    local limiter; closed: 503). An unexpected limiter error lets the request through.
    """

    def __init__(self, policies: PolicyCache, limiter: FailoverRateLimiter) -> None:
        self.policies = policies
        self.limiter = limiter
        self._last_error_log = 0.0

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route, caller, event = ex.route, ex.caller, ex.event
        assert route is not None
        assert caller is not None
        selected = self.policies.select(route.id, event.http_request_method, caller.tenant,
                                        caller.key_of)
        if selected is None:
            return None
        policy, key = selected
        if policy.mode is Mode.OFF:
            return None
        event.ratelimit_policy_id = policy.id
        event.ratelimit_mode = policy.mode.value
        try:
            decision = await self.limiter.check(policy, key)
        except RateLimitUnavailable:
            event.ratelimit_outcome = "error"
            event.error_type = "ratelimit_unavailable"
            return problem_response("rate-limit-unavailable",
                                    "rate limiting is unavailable and fails closed",
                                    ex.request_id,
                                    headers={**ex.response_headers, "Retry-After": "1"})
        except Exception as exc:  # a limiter bug must not take traffic down: fail open
            event.ratelimit_outcome = "error"
            now = time.monotonic()
            if now - self._last_error_log > 10.0:
                self._last_error_log = now
                log.warning("rate-limit check failed; request allowed",
                            extra={"policy_id": policy.id, "error": repr(exc)[:200]})
            return None
        if decision.allowed:
            event.ratelimit_outcome = "allowed"
        elif policy.mode is Mode.SHADOW:
            event.ratelimit_outcome = "shadow_limited"
            return None
        else:
            event.ratelimit_outcome = "limited"
        if policy.mode is not Mode.ENFORCE:
            return None
        headers = ratelimit_headers(policy.id, decision.limit, policy.window_s,
                                    decision.remaining, decision.reset_after_s)
        ex.response_headers.update(headers)
        if decision.allowed:
            return None
        retry_after = max(1, math.ceil(decision.retry_after_s))
        return problem_response(
            "rate-limited", f"limit of {policy.limit} requests per {policy.window_s:g}s "
            f"exceeded; retry after {retry_after}s", ex.request_id,
            headers={**ex.response_headers, "Retry-After": str(retry_after)},
            extra={"policy": policy.id})


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
        self.limiter = FailoverRateLimiter(
            RedisRateLimiter(redis, keys),
            LocalRateLimiter(divisor=config.ratelimit.expected_replicas * settings.workers),
            fail_mode=config.ratelimit.fail_mode, timeout_s=settings.redis_timeout_s)
        events = config.events
        self.emitter: EventEmitter | None = None
        if events.enabled:
            self.emitter = EventEmitter(redis, settings.events_stream,
                                        batch_size=events.batch_size,
                                        flush_interval_s=events.flush_interval_ms / 1000.0,
                                        buffer_max=events.buffer_max,
                                        stream_maxlen=events.stream_maxlen)
        self._emit: Callable[[RequestEvent], None] = (
            self.emitter.emit if self.emitter is not None else _discard)
        self._redact = frozenset(name.lower() for name in events.redact_query_params)
        self.steps: list[object] = self._steps()
        self._access = tuple(cast(AccessHook, step) for step in self.steps
                             if hasattr(step, "access"))
        self._log = tuple(cast(LogHook, step) for step in self.steps if hasattr(step, "log"))
        self._server: web.Server | None = None
        self.started = False
        self.stopping = False

    def _steps(self) -> list[object]:
        """THE CHAIN: the order requests go through. Add a filter with one line here."""
        return [
            ObserveStep(),
            IdentityStep(self.identity),
            RouteStep(self.router),
            RateLimitStep(self.policies, self.limiter),
            self.forwarder,
        ]

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.forwarder.start()
        await self.policies.start()
        if self.emitter is not None:
            await self.emitter.start()
        CONFIG_INFO.labels(self.version).set(1)
        self._server = web.Server(self.handle, access_log=None, auto_decompress=False,
                                  keepalive_timeout=75.0)
        self.started = True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Release upstream pools and background tasks, then flush the events."""
        self.stopping = True
        await self.policies.stop()
        await self.forwarder.close()
        if self.emitter is not None:
            await self.emitter.stop(timeout_s=timeout_s)

    @property
    def app(self) -> web.Server:
        """The low-level aiohttp server (one handler); exists after start()."""
        if self._server is None:
            raise RuntimeError("Gateway.start() has not been awaited")
        return self._server

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        redis_ok, redis_error = True, ""
        try:
            async with asyncio.timeout(0.5):
                await self.redis.ping()
        except Exception as exc:  # any failure means "not reachable", reported as such
            redis_ok, redis_error = False, type(exc).__name__
        fail_mode = self.config.ratelimit.fail_mode
        detail: dict[str, Any] = {
            "instance": self.instance, "config_version": self.version,
            "started": self.started, "stopping": self.stopping,
            "redis": {"reachable": redis_ok, "error": redis_error},
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
        trace_id, span_id, traceparent = trace_context(headers.get("traceparent"))
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


def _discard(event: RequestEvent) -> None:
    return None


def describe_steps(steps: Sequence[object]) -> list[str]:
    """The chain as names, for /config and logs."""
    return [type(step).__name__ for step in steps]
