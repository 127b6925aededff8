"""Forwarding to upstreams: one keep-alive pool per upstream, bodies streamed both ways.

Request headers: hop-by-hop headers are removed (Connection and every header it names,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*), Host becomes the upstream's,
X-Forwarded-For/Proto/Host and Via are set, X-Request-Id and traceparent are propagated.
X-Forwarded-*, Forwarded and X-Real-Ip from a peer that is not a trusted proxy are dropped
and replaced by what the gateway saw. Response headers: hop-by-hop removed, Via added,
X-Request-Id set. Bodies: small responses of known length (<= 64 KiB) are read at once;
everything else streams with backpressure, never held whole in memory. Content is passed
through as-is (no decompression).

Failures before the response starts become RFC 9457 problems: connect refused -> 502
`upstream_connect_error`, connect timeout -> 504 `upstream_connect_timeout`, read/total
timeout -> 504 `upstream_timeout`, reset -> 502 `upstream_reset`, invalid HTTP -> 502
`upstream_protocol_error`. A failure mid-body closes the client connection (the response is
visibly truncated) and is recorded the same way. A client that goes away is recorded as
`client_disconnect` with status 499. `upstream_duration_ms` is the time until the upstream's
response headers arrived (or it failed).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Upstream
from proxy.problem import problem_response

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.event import RequestEvent

log = logging.getLogger(__name__)

VIA: Final = "1.1 apigw"
SMALL_BODY: Final = 64 * 1024
HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "te", "trailer", "trailers",
                               "transfer-encoding", "upgrade", "expect"})
_FORWARDING: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                                "forwarded", "x-real-ip"})
_REPLACED: Final = frozenset({"host", "x-request-id", "traceparent", "via"})
_SKIP_AUTO: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_MAX_REQUEST_ID: Final = 128
_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_HEX: Final = frozenset("0123456789abcdef")


# --- request id and W3C trace context -------------------------------------------------------

def new_id(bits: int) -> str:
    return f"{random.getrandbits(bits):0{bits // 4}x}"


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
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


def upstream_request_headers(ex: Exchange, upstream_host: str,
                             trusted_peer: bool) -> CIMultiDict[str]:
    request = ex.request
    incoming = request.headers
    named = _connection_tokens(incoming)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if (lower in HOP_BY_HOP or lower in _REPLACED or lower.startswith("proxy-")
                or (named and lower in named) or (not trusted_peer and lower in _FORWARDING)):
            continue
        headers.add(name, value)
    peer = request.remote or ""
    previous = ", ".join(incoming.getall("X-Forwarded-For", ())) if trusted_peer else ""
    headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
    if "X-Forwarded-Proto" not in headers:
        headers["X-Forwarded-Proto"] = request.scheme
    host = incoming.get("Host")
    if host and "X-Forwarded-Host" not in headers:
        headers["X-Forwarded-Host"] = host
    via = incoming.get("Via")
    headers["Via"] = f"{via}, {VIA}" if via else VIA
    headers["Host"] = upstream_host
    headers["X-Request-Id"] = ex.request_id
    headers["traceparent"] = ex.traceparent
    return headers


def response_headers(upstream: CIMultiDictProxy[str], extra: Mapping[str, str],
                     keep_length: bool) -> CIMultiDict[str]:
    named = _connection_tokens(upstream)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if (lower in HOP_BY_HOP or lower.startswith("proxy-") or (named and lower in named)
                or lower == "via" or (not keep_length and lower == "content-length")):
            continue
        headers.add(name, value)
    via = upstream.get("Via")
    headers["Via"] = f"{via}, {VIA}" if via else VIA
    headers.update(extra)
    return headers


# --- errors -----------------------------------------------------------------------------------

def classify(exc: BaseException) -> tuple[str, str]:
    """(event error_type, problem slug) for an exception raised while talking to an upstream."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "upstream_connect_timeout", "upstream-timeout"
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's read timeouts
        return "upstream_timeout", "upstream-timeout"
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


# --- the upstream pool ------------------------------------------------------------------------

class UpstreamClient:
    """One upstream: its base URL, its keep-alive pool and timeouts."""

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        url = URL(config.url)
        self.base = config.url
        self.host_header = url.raw_authority
        self.target = f"{url.host}:{url.port}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeouts = self.config.timeouts
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, limit_per_host=0,
                                         keepalive_timeout=60.0, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO, trust_env=False, read_bufsize=64 * 1024,
            max_field_size=16 * 1024,
            timeout=aiohttp.ClientTimeout(total=timeouts.total_s, connect=timeouts.connect_s,
                                          sock_read=timeouts.read_s))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream {self.name!r} used before start()")
        return self._session


class Forwarder:
    """The terminal step: sends the request upstream and the response back to the client."""

    def __init__(self, upstreams: Mapping[str, UpstreamClient]) -> None:
        self.upstreams = dict(upstreams)

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()

    async def access(self, ex: Exchange) -> web.StreamResponse:
        route = ex.route
        assert route is not None
        upstream = self.upstreams[route.upstream]
        request = ex.request
        event = ex.event
        event.upstream = upstream.target
        path = route.upstream_path(ex.raw_segments)
        url = URL(upstream.base + path + ("?" + ex.query if ex.query else ""), encoded=True)
        headers = upstream_request_headers(ex, upstream.host_header, ex.trusted_peer)
        body: object = None
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = request.content_length
            if length is not None:
                event.http_request_body_size = length
                body = request.content
            else:
                body = _counted(request, event)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with upstream.session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False,
                    compress=None) as response:
                event.upstream_duration_ms = (loop.time() - started) * 1000.0
                return await self._respond(ex, response)
        except ClientGone:
            raise
        except Exception as exc:  # every failure becomes a problem response and an error class
            if not event.upstream_duration_ms:
                event.upstream_duration_ms = (loop.time() - started) * 1000.0
            return self._failure(ex, exc)

    async def _respond(self, ex: Exchange,
                       upstream: aiohttp.ClientResponse) -> web.StreamResponse:
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
            body = await upstream.read()
            headers = response_headers(upstream.headers, ex.response_headers, keep_length=False)
            event.http_response_body_size = len(body)
            small = web.Response(status=status, reason=upstream.reason, headers=headers,
                                 body=body)
            await small.prepare(request)
            await small.write_eof()
            return small
        headers = response_headers(upstream.headers, ex.response_headers, keep_length=True)
        stream = web.StreamResponse(status=status, reason=upstream.reason, headers=headers)
        await stream.prepare(request)
        sent = 0
        try:
            async for chunk in upstream.content.iter_any():
                await stream.write(chunk)
                sent += len(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            event.http_response_body_size = sent
            event.error_type = "client_disconnect"
            raise ClientGone from None
        except Exception as exc:  # upstream failed mid-body: make the truncation visible
            event.http_response_body_size = sent
            event.error_type = classify(exc)[0]
            if request.transport is not None:
                request.transport.close()
            return stream
        event.http_response_body_size = sent
        await stream.write_eof()
        return stream

    def _failure(self, ex: Exchange, exc: Exception) -> web.StreamResponse:
        event = ex.event
        request = ex.request
        if _client_gone(request):
            event.error_type = event.error_type or "client_disconnect"
            raise ClientGone from None
        if request.content.exception() is not None:
            event.error_type = "client_body_error"
            return problem_response("bad-request", "the request body could not be read",
                                    ex.request_id, headers=ex.response_headers)
        error_type, slug = classify(exc)
        event.error_type = error_type
        if error_type == "upstream_error":
            log.warning("upstream request failed", extra={"upstream": event.upstream,
                                                          "error": repr(exc)})
        route = ex.route
        detail = (f"upstream {route.upstream if route else '?'} ({event.upstream}) failed: "
                  f"{error_type.replace('_', ' ')}")
        return problem_response(slug, detail, ex.request_id, headers=ex.response_headers)


class ClientGone(Exception):
    """The client went away; nothing more can be sent."""


async def _counted(request: BaseRequest, event: RequestEvent) -> AsyncIterator[bytes]:
    """A chunked request body, counted as it streams through."""
    async for chunk in request.content.iter_any():
        event.http_request_body_size += len(chunk)
        yield chunk

