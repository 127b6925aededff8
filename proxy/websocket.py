"""WebSocket proxying: an `Upgrade: websocket` request becomes two WebSockets and a pump.

The forward step hands a GET carrying `Upgrade: websocket` here (after the route's limits).
The upstream side is opened first (aiohttp `ws_connect` from the upstream's pool, same
headers as a normal request - forwarding headers, X-Request-Id, traceparent - with the
client's subprotocols offered); only when the upstream accepted is the client answered
101, with the subprotocol the upstream chose. Then messages are pumped both ways, text and
binary unchanged (pings are answered on each hop). A close frame from either side is passed
on with its code and reason, and the other side's reply completes both handshakes; a side
that vanishes without a close frame closes the other with 1011 (upstream gone) or 1001
(client gone).

The session is one event: status 101, duration = the whole session, request/response body
sizes = payload bytes client->upstream / upstream->client, `upstream_duration_ms` = the
upstream handshake. An upstream that refuses the upgrade is a 502
`upstream_websocket_refused`; a malformed upgrade request is a 400. Messages are held whole
(aiohttp reassembles frames): at most `MAX_MESSAGE` bytes each, larger ones close the
session with 1009.

Resilience as for HTTP (proxy/resilience.py): the upgrade goes through the upstream's
circuit breaker - while it is open the upgrade is answered 503 `circuit_open` with
Retry-After and the upstream is not contacted; the handshake's outcome feeds the breaker and
outlier detection (connect errors, timeouts and 5xx refusals are failures; a half-open
probe whose client leaves mid-handshake is given back). A session counts against its route's
`max_in_flight` from the upgrade until it ends, in the same count as the route's HTTP
requests (`WebSocketStep`, just before the forwarder): a full route answers the upgrade 503
`route_overloaded` with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from proxy.problem import problem_response

if TYPE_CHECKING:
    from collections.abc import Iterable

    from multidict import CIMultiDict

    from proxy.app import Exchange
    from proxy.config import Route
    from proxy.forward import Forwarder
    from proxy.pool import UpstreamPool

log = logging.getLogger(__name__)

MAX_MESSAGE: Final = 4 * 1024 * 1024
OVERLOADED_RETRY_AFTER_S: Final = 1  # as the forwarder answers a full route
CLOSE_TIMEOUT_S: Final = 5.0
_UPSTREAM_GONE: Final = 1011
_CLIENT_GONE: Final = 1001
_UNSENDABLE: Final = frozenset({1004, 1005, 1006, 1015})
_HANDSHAKE_HEADERS: Final = ("Sec-WebSocket-Key", "Sec-WebSocket-Version",
                             "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol",
                             "Sec-WebSocket-Accept")

WsSide = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def wants_websocket(ex: Exchange) -> bool:
    request = ex.request
    return request.method == "GET" and \
        request.headers.get("Upgrade", "").lower() == "websocket"


def _reject(ex: Exchange, reason: str, slug: str, detail: str,
            retry_after: int) -> web.Response:
    """A 503 problem with Retry-After, counted and recorded like the forwarder's."""
    from proxy.metrics import REJECTIONS

    ex.event.error_type = reason
    REJECTIONS.labels(ex.event.route_id, reason).inc()
    return problem_response(slug, detail, ex.request_id,
                            headers={**ex.response_headers, "Retry-After": str(retry_after)})


class WebSocketStep:
    """Chain step just before the forwarder: a WebSocket session holds one of its route's
    `max_in_flight` slots until it ends (see the module docstring); everything else passes."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    @classmethod
    def when_used(cls, routes: Iterable[Route], forwarder: Forwarder) -> list[WebSocketStep]:
        """The step, when some route limits its requests in flight (else nothing to do)."""
        return [cls(forwarder)] if any(route.max_in_flight is not None
                                       for route in routes) else []

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route = ex.route
        if route is None or not wants_websocket(ex):
            return None
        plan = self.forwarder.plan(route)
        limit = plan.max_in_flight
        if limit is None:
            return None
        if plan.in_flight >= limit:
            return _reject(ex, "route_overloaded", "route-overloaded",
                           f"route {route.id} has {limit} requests in flight",
                           OVERLOADED_RETRY_AFTER_S)
        plan.in_flight += 1
        try:
            return await self.forwarder.access(ex)
        finally:
            plan.in_flight -= 1


def _close_code(code: object) -> int:
    if isinstance(code, int) and 1000 <= code < 5000 and code not in _UNSENDABLE:
        return code
    return 1000


class _Session:
    """Which side ended the session, and how."""

    __slots__ = ("error_type", "sent_down", "sent_up")

    def __init__(self) -> None:
        self.sent_up = 0  # client -> upstream payload bytes
        self.sent_down = 0
        self.error_type = ""


async def _pump(source: WsSide, sink: WsSide, session: _Session, upward: bool) -> None:
    """Copy messages from `source` to `sink` until `source` closes; pass the close on."""
    while True:
        message = await source.receive()
        kind = message.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            size = len(message.data)
            if upward:
                session.sent_up += size
            else:
                session.sent_down += size
            try:
                if kind is WSMsgType.TEXT:
                    await sink.send_str(message.data)
                else:
                    await sink.send_bytes(message.data)
            except (ConnectionError, RuntimeError):
                # the other side is going; its own pump reports how
                await source.close(code=_CLIENT_GONE if upward else _UPSTREAM_GONE)
                return
            continue
        if kind is WSMsgType.CLOSE:  # a clean close: pass it on, then answer it
            reason = message.extra.encode()[:123] if isinstance(message.extra, str) else b""
            await sink.close(code=_close_code(message.data), message=reason)
            await source.close(code=_close_code(message.data))
            return
        if kind is WSMsgType.CLOSING:  # our sink's close() interrupted this read
            return
        # CLOSED or ERROR: the source vanished without a close frame (or sent garbage)
        if kind is WSMsgType.ERROR and isinstance(message.data, aiohttp.WebSocketError):
            await source.close(code=message.data.code)
        session.error_type = session.error_type or (
            "client_disconnect" if upward else "upstream_reset")
        await sink.close(code=_UPSTREAM_GONE if not upward else _CLIENT_GONE)
        return


async def proxy_websocket(ex: Exchange, pool: UpstreamPool, suffix: str,
                          headers: CIMultiDict[str],
                          handshake: aiohttp.ClientTimeout) -> web.StreamResponse:
    """Proxy one WebSocket session; `headers` are the upstream request headers."""
    from proxy.forward import classify

    request = ex.request
    event = ex.event
    if not web.WebSocketResponse().can_prepare(request).ok:
        event.error_type = "invalid_websocket_upgrade"
        return problem_response("bad-request", "not a valid WebSocket upgrade request",
                                ex.request_id, headers=ex.response_headers)
    protocols = [token.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", ())
                 for token in value.split(",") if token.strip()]
    for name in _HANDSHAKE_HEADERS:
        headers.popall(name, None)
    breaker = pool.breaker
    if breaker is not None and not breaker.allow():
        return _reject(ex, "circuit_open", "circuit-open",
                       f"upstream {pool.name} is failing; its circuit is open",
                       breaker.retry_after_s())
    ep = pool.pick(ex)
    event.upstream = ep.address
    headers["Host"] = ep.host_header
    loop = asyncio.get_running_loop()
    started = loop.time()
    ep.outstanding += 1
    try:
        try:
            async with asyncio.timeout(handshake.total):
                upstream = await pool.session.ws_connect(
                    URL(ep.base + suffix, encoded=True), headers=headers, protocols=protocols,
                    autoclose=False, autoping=True, max_msg_size=MAX_MESSAGE,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S))
        except aiohttp.WSServerHandshakeError as exc:
            event.upstream_duration_ms = (loop.time() - started) * 1000.0
            pool.record(ep, "", exc.status)
            event.error_type = "upstream_websocket_refused"
            return problem_response("upstream-bad-response",
                                    f"upstream {pool.name} ({ep.address}) refused the "
                                    f"WebSocket upgrade with status {exc.status}",
                                    ex.request_id, headers=ex.response_headers)
        except Exception as exc:  # connect, TLS, timeout: the usual upstream classes
            event.upstream_duration_ms = (loop.time() - started) * 1000.0
            error_type, slug = classify(exc)
            pool.record(ep, error_type, 0)
            event.error_type = error_type
            return problem_response(slug, f"upstream {pool.name} ({ep.address}) failed: "
                                    f"{error_type.replace('_', ' ')}", ex.request_id,
                                    headers=ex.response_headers)
        except BaseException:  # cancelled mid-handshake (the client left): no verdict
            pool.abandon()
            raise
        event.upstream_duration_ms = (loop.time() - started) * 1000.0
        pool.record(ep, "", 101)
        session = _Session()
        client: web.WebSocketResponse | None = None
        try:
            client = web.WebSocketResponse(
                protocols=(upstream.protocol,) if upstream.protocol else (),
                autoclose=False, autoping=True, max_msg_size=MAX_MESSAGE)
            client.headers.update(ex.response_headers)
            client.headers["Via"] = "1.1 apigw"
            await client.prepare(request)
            event.http_response_status_code = 101
            up = asyncio.create_task(_pump(client, upstream, session, upward=True))
            down = asyncio.create_task(_pump(upstream, client, session, upward=False))
            try:
                await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await asyncio.wait((up, down))
            finally:
                for task in (up, down):
                    task.cancel()
                for task in (up, down):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            event.http_request_body_size = session.sent_up
            event.http_response_body_size = session.sent_down
            event.error_type = event.error_type or session.error_type
            await upstream.close()
            if client is not None and client.prepared and not client.closed:
                await client.close(code=_UPSTREAM_GONE)
        return client
    finally:
        ep.outstanding -= 1
