"""The response phase: steps that need to see (and may change) the upstream's response.

A step that registers a filter on `ex.response_filters` during `access` (cache, transform)
gets `on_response(ex, response)` once the upstream answered, innermost step first (chain
order reversed: transform before cache, so the cache stores what the client gets).

The body is buffered only when some filter asks for it (`body_limit`) and it fits the
largest such limit; a larger (or HEAD/204/304) response streams through as usual and the
filters see `body=None` - they may still change status and headers. Used by the forwarder
(`respond`) and by aggregation routes (`finish`), which have a body already. A filter may
also have `async settle(ex)`, awaited once the filters ran and before the response is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.forward import relay_body, response_headers

if TYPE_CHECKING:
    from proxy.app import Exchange


@dataclass(slots=True)
class BufferedResponse:
    """A response on its way out; `body` is None when it streams."""

    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes | None


class ResponseFilter(Protocol):
    def body_limit(self, ex: Exchange, status: int, headers: CIMultiDict[str]) -> int:
        """Bytes of body this filter wants whole (0: headers are enough)."""
        ...

    def on_response(self, ex: Exchange, response: BufferedResponse) -> None: ...


def _wants_body(ex: Exchange, status: int, headers: CIMultiDict[str]) -> int:
    if ex.request.method == "HEAD" or status in (204, 304) or status < 200:
        return 0
    return max(f.body_limit(ex, status, headers) for f in ex.response_filters)


async def respond(ex: Exchange, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """The forwarder's answer when filters are registered: buffer if wanted, filter, send."""
    headers = response_headers(upstream.headers, {}, keep_length=True)
    status = upstream.status
    limit = _wants_body(ex, status, headers)
    prefix = b""
    body: bytes | None = None
    length = upstream.content_length
    if limit and (length is None or length <= limit):
        parts: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = await upstream.content.readany()
            if not chunk:
                body = b"".join(parts)
                break
            parts.append(chunk)
            size += len(chunk)
        else:
            prefix = b"".join(parts)  # over the limit: stream what was read, then the rest
    response = BufferedResponse(status, upstream.reason, headers, body)
    apply_filters(ex, response)
    if response.body is not None or ex.request.method == "HEAD" or response.status in (
            204, 304) or response.status < 200:
        return await finish(ex, response)
    return await _stream(ex, upstream, response, prefix)


def apply_filters(ex: Exchange, response: BufferedResponse) -> None:
    for response_filter in reversed(ex.response_filters):
        response_filter.on_response(ex, response)


async def settle(ex: Exchange) -> None:
    """A filter's optional `async settle(ex)`: work that must be done before the client sees
    the response (the cache's write or invalidation in Redis)."""
    for response_filter in ex.response_filters:
        pending = getattr(response_filter, "settle", None)
        if pending is not None:
            await pending(ex)


async def finish(ex: Exchange, response: BufferedResponse) -> web.StreamResponse:
    """Send a buffered (or empty) response with the exchange's own headers."""
    await settle(ex)
    headers = response.headers
    if response.body is not None:
        headers.popall("Content-Length", None)
    headers.update(ex.response_headers)
    out = web.Response(status=response.status, reason=response.reason, headers=headers,
                       body=response.body)
    ex.event.http_response_status_code = response.status
    await out.prepare(ex.request)
    await out.write_eof()
    if response.body is not None and ex.request.method != "HEAD":
        ex.event.http_response_body_size = len(response.body)
    return out


async def _stream(ex: Exchange, upstream: aiohttp.ClientResponse, response: BufferedResponse,
                  prefix: bytes) -> web.StreamResponse:
    await settle(ex)
    request = ex.request
    event = ex.event
    response.headers.update(ex.response_headers)
    stream = web.StreamResponse(status=response.status, reason=response.reason,
                                headers=response.headers)
    event.http_response_status_code = response.status
    await stream.prepare(request)
    return await relay_body(request, stream, upstream, event, prefix)
