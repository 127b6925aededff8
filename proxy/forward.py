"""Forwarding to upstreams: pools of targets (proxy/pool.py), bodies streamed both ways.

Requests go out through the pool's lean client (proxy/upstream_pool.py: keep-alive
connections per target, aiohttp's C parser, no ClientSession); a route with response filters
(cache, transform) uses the pool's aiohttp session instead, because proxy/response_filter.py
works on an aiohttp response. Both give the same error classes (`classify`).

Request headers: hop-by-hop headers are removed (Connection and every header it names,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*), Host becomes the target's,
X-Forwarded-For/Proto/Host, RFC 7239 Forwarded (`for=...;proto=...;host=...`, IPv6 as
`"[::1]"`) and Via are set, X-Request-Id and traceparent are propagated. X-Forwarded-*,
Forwarded and X-Real-Ip from a peer that is not a trusted proxy are dropped and replaced by
what the gateway saw; from a trusted proxy they are kept and this hop is appended.
Response headers: hop-by-hop removed, Via added, X-Request-Id set. Bodies: small responses
of known length (<= 64 KiB) are read at once; everything else streams with backpressure,
never held whole in memory. Content is passed through as-is (no decompression).

Failures before the response starts become RFC 9457 problems: connect refused -> 502
`upstream_connect_error`, connect timeout -> 504 `upstream_connect_timeout`, read/total
timeout -> 504 `upstream_timeout`, reset -> 502 `upstream_reset`, invalid HTTP -> 502
`upstream_protocol_error`. A failure mid-body closes the client connection (the response is
visibly truncated) and is recorded the same way. A client that goes away is recorded as
`client_disconnect` with status 499. `upstream_duration_ms` is the time until the upstream's
response headers arrived (or it failed), retries included.

Resilience around each attempt (proxy/resilience.py): the route's `max_in_flight` (503
`route_overloaded` with Retry-After, no queue), the upstream's circuit breaker (503
`circuit_open`), the route's retries (event `retries`; metric
apigw_upstream_retries_total{decision}); outcomes feed outlier detection (proxy/health.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.balancing import Endpoint
from proxy.config import Route
from proxy.direct_response import send_buffered
from proxy.limits import BodyTooLarge, RouteLimits, header_bytes
from proxy.listener import ClientBodyTimeout
from proxy.pool import UpstreamPool
from proxy.problem import problem_response
from proxy.resilience import RetryPolicy, failure_class, timeout_for
from proxy.upstream_conn import UpstreamError, UpstreamResponse
from proxy.websocket import proxy_websocket, wants_websocket

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.event import RequestEvent
    from proxy.routing import CompiledRoute

log = logging.getLogger(__name__)

VIA: Final = "1.1 apigw"
SMALL_BODY: Final = 64 * 1024
HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "te", "trailer", "trailers",
                               "transfer-encoding", "upgrade", "expect"})
_FORWARDING: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                                "forwarded", "x-real-ip"})
_REPLACED: Final = frozenset({"host", "x-request-id", "traceparent", "via"})
_DROPPED: Final = HOP_BY_HOP | _REPLACED
_DROPPED_UNTRUSTED: Final = _DROPPED | _FORWARDING
_RESPONSE_DROPPED: Final = HOP_BY_HOP | {"via"}
_RESPONSE_DROPPED_SMALL: Final = _RESPONSE_DROPPED | {"content-length"}  # the body is re-sent
_MAX_REQUEST_ID: Final = 128
_CLIENT_BODY_FAILURES: Final = frozenset({"client_body_error", "client_body_timeout",
                                          "payload_too_large"})
_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_HEX: Final = frozenset("0123456789abcdef")
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
_ID_FORMATS: Final = {bits: f"%0{bits // 4}x" for bits in (64, 128)}


# --- request id and W3C trace context -------------------------------------------------------

def new_id(bits: int) -> str:
    return _ID_FORMATS[bits] % random.getrandbits(bits)


def request_id_from(value: str | None) -> str:
    """The client's X-Request-Id when it is 1-128 safe characters, else a new one."""
    if value and len(value) <= _MAX_REQUEST_ID and _ID_CHARS.issuperset(value):
        return value
    return new_id(128)


def trace_context(traceparent: str | None) -> tuple[str, str, str]:
    """(trace id, this hop's span id, outgoing traceparent); continue a valid incoming trace."""
    span_id = new_id(64)
    if traceparent and len(traceparent) >= 55:
        version, trace_id, parent, flags = (traceparent[:2], traceparent[3:35],
                                            traceparent[36:52], traceparent[53:55])
        if (version != "ff" and traceparent[2] == "-" and traceparent[35] == "-"
                and traceparent[52] == "-" and (len(traceparent) == 55 or version != "00")
                and _HEX.issuperset(version) and _HEX.issuperset(trace_id)
                and _HEX.issuperset(parent) and _HEX.issuperset(flags)
                and trace_id != "0" * 32 and parent != "0" * 16):
            return trace_id, span_id, f"00-{trace_id}-{span_id}-{flags}"
    trace_id = new_id(128)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


# --- headers ----------------------------------------------------------------------------------

def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    value = headers.get("Connection")
    return _tokens(value) if value else frozenset()


@functools.lru_cache(maxsize=64)  # "keep-alive", "close", "Upgrade": a handful of values
def _tokens(value: str) -> frozenset[str]:
    return frozenset(token.strip().lower() for token in value.split(","))


def _forwarded_value(value: str) -> str:
    """A Forwarded parameter value: a token as-is, anything else as a quoted-string."""
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=256)  # the same clients and hosts, request after request
def forwarded_element(peer: str, proto: str, host: str | None) -> str:
    """This hop's RFC 7239 element: for=<client>;proto=<scheme>[;host=<host>]."""
    node = f"[{peer}]" if ":" in peer else (peer or "unknown")
    element = f"for={_forwarded_value(node)};proto={proto}"
    if host:
        element += f";host={_forwarded_value(host)}"
    return element


def upstream_request_headers(ex: Exchange, upstream_host: str,
                             trusted_peer: bool) -> CIMultiDict[str]:
    request = ex.request
    incoming = request.headers
    named = _connection_tokens(incoming)
    drop = _DROPPED if trusted_peer else _DROPPED_UNTRUSTED
    headers: CIMultiDict[str] = CIMultiDict([
        (name, value) for name, value in incoming.items()
        if not ((lower := name.lower()) in drop or lower.startswith("proxy-")
                or (named and lower in named))])
    add = headers.add  # below: names the filter dropped, so nothing is replaced
    peer = request.remote or ""
    scheme = request.scheme
    host = incoming.get("Host")
    element = forwarded_element(peer, scheme, host)
    if trusted_peer:  # a trusted proxy's X-Forwarded-* and Forwarded are kept, this hop added
        previous = ", ".join(incoming.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        if "X-Forwarded-Proto" not in headers:
            add("X-Forwarded-Proto", scheme)
        if host and "X-Forwarded-Host" not in headers:
            add("X-Forwarded-Host", host)
        previous_forwarded = ", ".join(incoming.getall("Forwarded", ()))
        headers["Forwarded"] = (f"{previous_forwarded}, {element}" if previous_forwarded
                                else element)
    else:
        add("X-Forwarded-For", peer)
        add("X-Forwarded-Proto", scheme)
        if host:
            add("X-Forwarded-Host", host)
        add("Forwarded", element)
    via = incoming.get("Via")
    add("Via", f"{via}, {VIA}" if via else VIA)
    add("Host", upstream_host)
    add("X-Request-Id", ex.request_id)
    add("traceparent", ex.traceparent)
    return headers


def _kept_response_headers(upstream: CIMultiDictProxy[str],
                           drop: frozenset[str]) -> list[tuple[str, str]]:
    """The upstream headers passed on (hop-by-hop and `drop` removed), plus this hop's Via."""
    named = _connection_tokens(upstream)
    pairs = [(name, value) for name, value in upstream.items()
             if not ((lower := name.lower()) in drop or lower.startswith("proxy-")
                     or (named and lower in named))]
    via = upstream.get("Via")
    pairs.append(("Via", f"{via}, {VIA}" if via else VIA))
    return pairs


def response_headers(upstream: CIMultiDictProxy[str], extra: Mapping[str, str],
                     keep_length: bool) -> CIMultiDict[str]:
    headers = CIMultiDict(_kept_response_headers(
        upstream, _RESPONSE_DROPPED if keep_length else _RESPONSE_DROPPED_SMALL))
    headers.update(extra)
    return headers


def small_response_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The upstream headers a buffered response keeps (its length is re-sent), plus Via."""
    return _kept_response_headers(upstream, _RESPONSE_DROPPED_SMALL)


# --- errors -----------------------------------------------------------------------------------

def classify(exc: BaseException) -> tuple[str, str]:
    """(event error_type, problem slug) for an exception raised while talking to an upstream."""
    if isinstance(exc, UpstreamError):  # the lean client's own (proxy/upstream_conn.py)
        return exc.error_type, exc.slug
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "upstream_connect_timeout", "upstream-timeout"
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's read timeouts
        return "upstream_timeout", "upstream-timeout"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch
                  | ssl.SSLError):  # handshake or certificate verification (proxy/tls.py)
        return "upstream_tls_error", "upstream-unreachable"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "upstream_connect_error", "upstream-unreachable"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
                  | aiohttp.ClientPayloadError | ConnectionResetError):
        return "upstream_reset", "upstream-reset"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "upstream_protocol_error", "upstream-bad-response"
    return "upstream_error", "upstream-unreachable"


def _client_gone(request: BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- forwarding ---------------------------------------------------------------------------------

class RoutePlan:
    """What forwarding needs of one route, built on its first request."""

    __slots__ = ("in_flight", "limits", "max_body", "max_in_flight", "pool", "retry", "timeout")

    def __init__(self, route: Route, pool: UpstreamPool) -> None:
        self.pool = pool
        self.timeout = timeout_for(pool.timeout, route.timeouts)
        self.retry = RetryPolicy(route.retry) if route.retry is not None else None
        self.max_in_flight = route.max_in_flight
        self.in_flight = 0
        self.limits = route.limits
        self.max_body = route.limits.max_body_bytes if route.limits is not None else None


class _Retry(Exception):
    """Internal: this attempt failed in a way the route retries."""


class Forwarder:
    """The terminal step: picks a target, sends the request, streams the response back.

    Around each attempt: the route's in-flight limit, the upstream's circuit breaker, the
    route's retry policy; outcomes feed outlier detection and the breaker.
    """

    def __init__(self, upstreams: Mapping[str, UpstreamPool]) -> None:
        self.upstreams = dict(upstreams)
        self._plans: dict[str, RoutePlan] = {}

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()

    def plan(self, route: CompiledRoute) -> RoutePlan:
        plan = self._plans.get(route.id)
        if plan is None:
            plan = self._plans[route.id] = RoutePlan(route.route, self.upstreams[route.upstream])
        return plan

    async def access(self, ex: Exchange) -> web.StreamResponse:
        route = ex.route
        assert route is not None
        plan = self._plans.get(route.id) or self.plan(route)
        if plan.limits is not None:
            refused = await self._check_limits(ex, plan.limits)
            if refused is not None:
                return refused
        if wants_websocket(ex):  # a session, not a request: max_in_flight does not apply
            suffix = route.upstream_path(ex.raw_segments) + ("?" + ex.query if ex.query else "")
            return await proxy_websocket(ex, plan.pool, suffix, upstream_request_headers(
                ex, "", ex.trusted_peer), plan.timeout)
        limit = plan.max_in_flight
        if limit is None:
            return await self._forward(ex, plan)
        if plan.in_flight >= limit:
            return self._reject(ex, "route_overloaded", "route-overloaded",
                                f"route {route.id} has {limit} requests in flight", 1)
        plan.in_flight += 1
        try:
            return await self._forward(ex, plan)
        finally:
            plan.in_flight -= 1

    def _reject(self, ex: Exchange, reason: str, slug: str, detail: str,
                retry_after: int | None = None) -> web.Response:
        from proxy.metrics import REJECTIONS

        ex.event.error_type = reason
        REJECTIONS.labels(ex.event.route_id, reason).inc()
        headers = ex.response_headers if retry_after is None else {
            **ex.response_headers, "Retry-After": str(retry_after)}
        return problem_response(slug, detail, ex.request_id, headers=headers)

    async def _check_limits(self, ex: Exchange,
                            limits: RouteLimits) -> web.StreamResponse | None:
        request = ex.request
        max_url = limits.max_url_bytes
        if max_url is not None:
            size = len(ex.path) + (len(ex.query) + 1 if ex.query else 0)
            if size > max_url:
                return self._reject(ex, "uri_too_long", "uri-too-long",
                                    f"the request target has {size} bytes; this route "
                                    f"accepts at most {max_url}")
        max_headers = limits.max_header_bytes
        if max_headers is not None:
            size = header_bytes(request.raw_headers)
            if size > max_headers:
                return self._reject(ex, "headers_too_large", "headers-too-large",
                                    f"the request headers have {size} bytes; this route "
                                    f"accepts at most {max_headers}")
        max_body = limits.max_body_bytes
        length = request.content_length
        if max_body is not None and length is not None and length > max_body:
            ex.event.http_request_body_size = length
            refused = self._reject(ex, "payload_too_large", "payload-too-large",
                                   f"the request body has {length} bytes; this route "
                                   f"accepts at most {max_body}")
            return await _answer_and_close(ex, refused)  # the body is never read
        return None

    async def _forward(self, ex: Exchange, plan: RoutePlan) -> web.StreamResponse:
        route = ex.route
        assert route is not None
        pool = plan.pool
        request = ex.request
        event = ex.event
        suffix = route.upstream_path(ex.raw_segments) + ("?" + ex.query if ex.query else "")
        headers = upstream_request_headers(ex, "", ex.trusted_peer)
        has_body = request.body_exists
        length = request.content_length
        held: bytes | None = None
        retry = plan.retry
        if has_body:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if length is not None:
                event.http_request_body_size = length
                if retry is not None and length <= retry.config.max_body_bytes:
                    held = await request.read()
        replayable = not has_body or held is not None
        lean = not ex.response_filters
        if retry is not None:
            retry.deposit()
        breaker = pool.breaker
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        admitted = False
        ep: Endpoint | None = None
        while True:
            if breaker is not None and not admitted and not breaker.allow():
                return self._reject(ex, "circuit_open", "circuit-open",
                                    f"upstream {pool.name} is failing; its circuit is open",
                                    breaker.retry_after_s())
            admitted = False
            previous = ep if attempt else None
            ep = pool.pick(ex)
            if ep is previous and pool.single is None:
                ep = pool.pick(ex)  # a retry prefers another target (Envoy's previous_hosts)
            event.upstream = ep.address
            headers["Host"] = ep.host_header
            body: bytes | StreamReader | AsyncIterator[bytes] | None = None
            if has_body:
                body = held if held is not None else (
                    request.content if length is not None
                    else _counted(request, event, plan.max_body))
            ep.outstanding += 1
            trace, span, status, error_type = ex.trace, None, 0, ""
            if trace is not None:  # a client span per attempt, named in its traceparent
                span, headers["traceparent"] = trace.client(
                    request.method, URL(ep.base + suffix, encoded=True), attempt)
            response: UpstreamResponse | aiohttp.ClientResponse
            try:
                try:
                    if lean:
                        timeout = plan.timeout
                        response = await pool.connections.request(
                            ep, request.method, suffix, headers, body, length,
                            connect_s=timeout.connect, read_s=timeout.sock_read,
                            total_s=timeout.total)
                    else:  # response filters take an aiohttp response (response_filter.py)
                        response = await pool.session.request(
                            request.method, URL(ep.base + suffix, encoded=True),
                            headers=headers, data=body, allow_redirects=False, compress=None,
                            timeout=plan.timeout)
                except ClientGone:
                    pool.abandon()
                    raise
                except Exception as exc:  # every failure becomes a problem and an error class
                    event.upstream_duration_ms = (loop.time() - started) * 1000.0
                    error_type = self._attempt_error(ex, exc, pool)
                    if error_type in _CLIENT_BODY_FAILURES:
                        pool.abandon()
                        return await self._failure(ex, exc, error_type)
                    pool.record(ep, error_type, 0)
                    failure = failure_class(error_type, 0)
                    if retry is not None and attempt < retry.config.attempts and \
                            self._may_retry(ex, retry, failure, replayable, pool):
                        admitted = breaker is not None
                        attempt += 1
                        event.retries = attempt
                        await asyncio.sleep(retry.backoff_s(attempt - 1))
                        continue
                    return await self._failure(ex, exc, error_type)
                event.upstream_duration_ms = (loop.time() - started) * 1000.0
                status = response.status
                pool.record(ep, "", status)
                if status >= 500 and retry is not None and attempt < retry.config.attempts \
                        and self._may_retry(ex, retry, failure_class("", status), replayable,
                                            pool):
                    response.close()
                    admitted = breaker is not None
                    attempt += 1
                    event.retries = attempt
                    await asyncio.sleep(retry.backoff_s(attempt - 1))
                    continue
                try:
                    return await self._respond(ex, response)
                finally:
                    response.release()
            finally:
                ep.outstanding -= 1
                if trace is not None and span is not None:
                    trace.end_client(span, status, error_type)

    def _may_retry(self, ex: Exchange, retry: RetryPolicy, failure: str, replayable: bool,
                   pool: UpstreamPool) -> bool:
        from proxy.metrics import RETRIES

        route_id = ex.event.route_id
        if not retry.allows(ex.event.http_request_method, failure, replayable):
            RETRIES.labels(route_id, "not_retryable").inc()
            return False
        if not retry.withdraw():
            RETRIES.labels(route_id, "budget_exhausted").inc()
            return False
        breaker = pool.breaker
        if breaker is not None and not breaker.allow():
            RETRIES.labels(route_id, "circuit_open").inc()
            return False
        RETRIES.labels(route_id, "retried").inc()
        return True

    def _attempt_error(self, ex: Exchange, exc: Exception, pool: UpstreamPool) -> str:
        """The error class of a failed attempt; raises ClientGone when the client left."""
        if _client_gone(ex.request):
            pool.abandon()
            ex.event.error_type = ex.event.error_type or "client_disconnect"
            raise ClientGone from None
        if ex.event.error_type == "payload_too_large":
            return "payload_too_large"
        body_error = ex.request.content.exception()
        if isinstance(body_error, ClientBodyTimeout):
            return "client_body_timeout"
        if body_error is not None:
            return "client_body_error"
        return classify(exc)[0]

    async def _respond(self, ex: Exchange,
                       upstream: UpstreamResponse | aiohttp.ClientResponse
                       ) -> web.StreamResponse:
        if ex.response_filters and isinstance(upstream, aiohttp.ClientResponse):
            from proxy.response_filter import respond

            return await respond(ex, upstream)
        request = ex.request
        event = ex.event
        status = upstream.status
        event.http_response_status_code = status
        length = upstream.content_length
        if request.method == "HEAD" or status in (204, 304) or status < 200:
            headers = response_headers(upstream.headers, ex.response_headers, keep_length=True)
            empty = web.StreamResponse(status=status, reason=upstream.reason, headers=headers)
            await empty.prepare(request)
            await empty.write_eof()
            return empty
        if length is not None and length <= SMALL_BODY:
            try:
                content = upstream.content
                body = content.read_nowait() if content.is_eof() else await content.read()
            except (UpstreamError, aiohttp.ClientError, TimeoutError) as exc:  # cut: 502/504
                return await self._failure(ex, exc, classify(exc)[0])
            event.http_response_body_size = len(body)
            return await send_buffered(request, status, upstream.reason or "",
                                       small_response_headers(upstream.headers),
                                       ex.response_headers, body)
        headers = response_headers(upstream.headers, ex.response_headers, keep_length=True)
        stream = web.StreamResponse(status=status, reason=upstream.reason, headers=headers)
        await stream.prepare(request)
        return await relay_body(request, stream, upstream, event)

    async def _failure(self, ex: Exchange, exc: Exception,
                       error_type: str) -> web.StreamResponse:
        event = ex.event
        if error_type == "payload_too_large":
            refused = self._reject(ex, error_type, "payload-too-large",
                                   f"the request body passed {ex.event.http_request_body_size} "
                                   "bytes, over this route's limit")
            return await _answer_and_close(ex, refused)
        if error_type == "client_body_timeout":
            event.error_type = error_type
            stalled = problem_response("request-timeout", "the request body stalled: nothing "
                                       "arrived within the client body timeout",
                                       ex.request_id, headers=ex.response_headers)
            return await _answer_and_close(ex, stalled)
        if error_type == "client_body_error":
            event.error_type = error_type
            return problem_response("bad-request", "the request body could not be read",
                                    ex.request_id, headers=ex.response_headers)
        slug = classify(exc)[1]
        event.error_type = error_type
        if error_type == "upstream_error":
            log.warning("upstream request failed", extra={"upstream": event.upstream,
                                                          "error": repr(exc)})
        route = ex.route
        detail = (f"upstream {route.upstream if route else '?'} ({event.upstream}) failed: "
                  f"{error_type.replace('_', ' ')}"
                  + (f" after {event.retries} retries" if event.retries else ""))
        return problem_response(slug, detail, ex.request_id, headers=ex.response_headers)


UpstreamClient = UpstreamPool  # the name app.py wires


async def _answer_and_close(ex: Exchange, response: web.Response) -> web.Response:
    """Send `response` and close the connection: the request body is left unread (aiohttp
    would otherwise linger reading it)."""
    response.force_close()
    await response.prepare(ex.request)
    await response.write_eof()
    ex.event.http_response_body_size = len(response.body) if isinstance(response.body,
                                                                         bytes) else 0
    transport = ex.request.transport
    if transport is not None:
        transport.close()
    return response


async def relay_body(request: BaseRequest, stream: web.StreamResponse,
                     upstream: UpstreamResponse | aiohttp.ClientResponse, event: RequestEvent,
                     prefix: bytes = b"") -> web.StreamResponse:
    """Copy the upstream body to the prepared `stream`, recording the bytes sent; an upstream
    that fails mid-body cuts the client connection so the truncation is visible."""
    sent = 0
    try:
        if prefix:
            await stream.write(prefix)
            sent += len(prefix)
        async for chunk in upstream.content.iter_any():
            await stream.write(chunk)
            sent += len(chunk)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        event.http_response_body_size = sent
        event.error_type = "client_disconnect"
        raise ClientGone from None
    except Exception as exc:
        event.http_response_body_size = sent
        event.error_type = classify(exc)[0]
        if request.transport is not None:
            request.transport.close()
        return stream
    event.http_response_body_size = sent
    await stream.write_eof()
    return stream


class ClientGone(Exception):
    """The client went away; nothing more can be sent."""


async def _counted(request: BaseRequest, event: RequestEvent,
                   limit: int | None = None) -> AsyncIterator[bytes]:
    """A chunked request body, counted (and cut off at `limit`) as it streams through."""
    async for chunk in request.content.iter_any():
        event.http_request_body_size += len(chunk)
        if limit is not None and event.http_request_body_size > limit:
            event.error_type = "payload_too_large"
            raise BodyTooLarge
        yield chunk

