"""The client listener's aiohttp server: client timeouts, and requests the parser refused.

Rejected requests. aiohttp answers a message it cannot parse (conflicting Content-Length and
Transfer-Encoding, duplicate Content-Length, obs-fold, an invalid method or target) with 400
and closes the connection before any handler runs. `RecordingServer` hooks the protocol's
`handle_error` so such a request still produces one RequestEvent (method `_OTHER`, empty
path, `error_type` naming the parser's complaint), and is never forwarded. On top of aiohttp:

- a request line longer than the parser's bound (`max_request_line_bytes`) is answered 414
  (`uri_too_long`), a header field over `max_header_field_bytes` or more than
  `max_header_fields` fields 431 (`headers_too_large`), where aiohttp says 400;
- an HTTP/0.9 request line (no version) is answered 400 (`unsupported_version`), never routed.

Client timeouts (`ClientTimeouts`, from ProxySettings), per connection, as nginx's:

- header: a new connection, or one that has started sending its next request, must deliver
  the complete request head within `header_s`. Past it: `408` and close if some bytes of a
  request arrived (one event, `client_header_timeout`), a plain close if nothing did.
- keep-alive: an idle connection between requests is closed after `keepalive_s` (aiohttp's).
- body: a request body that receives nothing for `body_s` while the gateway is reading it
  fails with `ClientBodyTimeout`; the request's handler answers (the forwarder: 408
  `client_body_timeout`, or 499 if the client left) and the connection is closed.

Limitation: bytes of a pipelined next request that arrive in the same segment as the end of
the previous body are not seen as a started head; that connection waits at most `keepalive_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import Counter

from proxy.event import RequestEvent

if TYPE_CHECKING:
    from proxy.app import Gateway

BadRequestHook = Callable[[BaseRequest, int, BaseException | None], None]
TimeoutHook = Callable[[str, int, str], None]  # (client address, status, error_type)
_ERROR_TYPES = {"BadHttpMethod": "invalid_method", "InvalidURLError": "invalid_target",
                "LineTooLong": "line_too_long", "InvalidHeader": "invalid_header",
                "TransferEncodingError": "invalid_transfer_encoding",
                "ContentLengthError": "invalid_content_length",
                "UnsupportedVersion": "unsupported_version"}
_TOO_LONG_TYPES: Final = {414: "uri_too_long", 431: "headers_too_large"}
_KEEPALIVE_S: Final = 75.0
_LINE_SLACK: Final = 256  # method, spaces and version around the target on a request line
_TIMEOUT_BODY: Final = b"request timeout: the request head was not received in time\n"
_TIMEOUT_RESPONSE: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TIMEOUT_BODY) + _TIMEOUT_BODY)

CLIENT_TIMEOUTS = Counter("apigw_client_timeouts_total",
                          "Client connections cut off by a client timeout.", ["kind"])


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Seconds; 0 turns a timeout off."""

    header_s: float = 10.0
    body_s: float = 30.0
    keepalive_s: float = _KEEPALIVE_S


@dataclass(frozen=True, slots=True)
class ParserLimits:
    """aiohttp's HTTP parser bounds (its defaults); past them 414/431."""

    max_request_line_bytes: int = 8190
    max_header_field_bytes: int = 8190
    max_header_fields: int = 128


class UnsupportedVersion(BadHttpMessage):
    """An HTTP/0.9 request line (no version)."""


class ClientBodyTimeout(BadHttpMessage):
    """The client sent nothing of its request body for `body_s` seconds."""


def error_type_of(exc: BaseException | None) -> str:
    if exc is None:
        return "malformed_request"
    name = type(exc).__name__
    return _ERROR_TYPES.get(name) or "malformed_request"


def bad_request_event(request: BaseRequest, status: int, exc: BaseException | None,
                      instance: str, request_id: str) -> RequestEvent:
    error_type = _TOO_LONG_TYPES.get(status) or error_type_of(exc)
    return RequestEvent(
        timestamp=time.time(), request_id=request_id, http_request_method="_OTHER",
        url_path="", http_response_status_code=status, duration_ms=0.0,
        gateway_instance=instance, client_address=request.remote or "",
        error_type=error_type)


def timeout_event(client_address: str, status: int, error_type: str, instance: str,
                  request_id: str) -> RequestEvent:
    return RequestEvent(
        timestamp=time.time(), request_id=request_id, http_request_method="_OTHER",
        url_path="", http_response_status_code=status, duration_ms=0.0,
        gateway_instance=instance, client_address=client_address, error_type=error_type)


class _RecordingHandler(RequestHandler):
    def __init__(self, manager: RecordingServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._hook = manager.on_bad_request
        self._on_timeout = manager.on_timeout
        self._timeouts = manager.timeouts
        self._inner = manager.request_handler
        self._request_handler = self._guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True  # no complete request since the last response
        self._head_started = False  # some bytes of the awaited request arrived
        self._early_bytes = False  # next-request bytes while the previous one is handled
        self._line_bytes = 0  # request-line bytes seen so far (no newline yet)
        self._line_length = -1  # the request line's length once its newline arrived
        self._too_long_status = 400
        self._body: StreamReader | None = None
        self._body_deadline = 0.0
        self._body_timer: asyncio.TimerHandle | None = None

    # -- HTTP/0.9, 414/431 ----------------------------------------------------------------

    async def _guard(self, request: BaseRequest) -> web.StreamResponse:
        if request.version < (1, 0):
            return self.handle_error(request, 400, UnsupportedVersion(
                "HTTP/0.9 requests are not supported"))
        return await self._inner(request)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong) or _too_many_headers(exc):
            status = 431 if _too_many_headers(exc) else self._too_long_status
            message = ("the request target is too long" if status == 414
                       else "the request headers are too large")
        try:
            self._hook(request, status, exc)
        except Exception:  # recording must never change the answer
            self.logger.exception("recording a rejected request failed")
        return super().handle_error(request, status, exc, message)

    def _track_line(self, data: bytes) -> None:
        if self._line_length >= 0 or not data:
            return
        newline = data.find(b"\n")
        if newline < 0:
            self._line_bytes += len(data)
        else:
            self._line_length = self._line_bytes + newline

    def _classify_head(self) -> None:
        """Called when the parser produced a message (or an error) for the current head."""
        limit = self.max_line_size + _LINE_SLACK
        line_too_long = self._line_length < 0 or self._line_length > limit
        self._too_long_status = 414 if line_too_long else 431
        self._line_bytes, self._line_length = 0, -1

    # -- timeouts -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if self._upgraded or self._payload_parser is not None:  # a WebSocket now
            super().data_received(data)
            return
        body = self._body
        body_open = body is not None and not body.is_eof()
        if not body_open:
            self._track_line(data)
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a complete head (or a parse error)
            self._classify_head()
            self._cancel_header_timer()
            self._awaiting_head = self._head_started = self._early_bytes = False
            payload = self._messages[-1][1] if self._messages else EMPTY_PAYLOAD
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                self._watch_body(payload)
        elif body_open:
            self._body_deadline = self._loop.time() + self._timeouts.body_s
        elif data:
            if self._awaiting_head:
                self._head_started = True
                self._arm_header_timer()
            else:
                self._early_bytes = True

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if not self._messages:
            self._awaiting_head = True
            if self._early_bytes:
                self._head_started = True
                self._early_bytes = False
                self._arm_header_timer()
        return result

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self._timeouts.header_s > 0:
            self._header_timer = self._loop.call_later(self._timeouts.header_s,
                                                       self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        transport = self.transport
        if (transport is None or self._force_close or self._close or self._messages
                or self._request_in_progress or not self._awaiting_head):
            return
        if self._head_started:
            CLIENT_TIMEOUTS.labels("header").inc()
            transport.write(_TIMEOUT_RESPONSE)
            self._record_timeout(408, "client_header_timeout")
        else:
            CLIENT_TIMEOUTS.labels("idle").inc()
        self.force_close()

    def _watch_body(self, payload: StreamReader) -> None:
        self._body = payload
        if self._timeouts.body_s <= 0:
            return
        self._body_deadline = self._loop.time() + self._timeouts.body_s
        if self._body_timer is None:
            self._body_timer = self._loop.call_at(self._body_deadline, self._body_timeout)

    def _body_timeout(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            self._body = None
            return
        now = self._loop.time()
        if self._reading_paused or self._buffer_paused:  # the gateway is not reading
            self._body_deadline = now + self._timeouts.body_s
        if now < self._body_deadline:
            self._body_timer = self._loop.call_at(self._body_deadline, self._body_timeout)
            return
        CLIENT_TIMEOUTS.labels("body").inc()
        self._body = None
        body.set_exception(ClientBodyTimeout("the request body stalled"))
        body.feed_eof()  # no lingering read of a body that will not come
        self.close()  # the parser still expects body bytes: never reuse this connection

    def _record_timeout(self, status: int, error_type: str) -> None:
        peer = self.peername
        address = peer[0] if isinstance(peer, tuple) else (peer or "")
        try:
            self._on_timeout(str(address), status, error_type)
        except Exception:  # recording must never change the answer
            self.logger.exception("recording a timed-out request failed")


def _too_many_headers(exc: BaseException | None) -> bool:
    return isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message


def _ignore_timeout(client_address: str, status: int, error_type: str) -> None:
    return None


class RecordingServer(web.Server):
    def __init__(self, handler: Any, on_bad_request: BadRequestHook, *,
                 on_timeout: TimeoutHook = _ignore_timeout,
                 timeouts: ClientTimeouts | None = None,
                 limits: ParserLimits | None = None, **kwargs: Any) -> None:
        self.timeouts = timeouts or ClientTimeouts(
            keepalive_s=float(kwargs.get("keepalive_timeout", _KEEPALIVE_S)))
        kwargs["keepalive_timeout"] = self.timeouts.keepalive_s
        limits = limits or ParserLimits()
        kwargs.update(max_line_size=limits.max_request_line_bytes,
                      max_field_size=limits.max_header_field_bytes,
                      max_headers=limits.max_header_fields)
        super().__init__(handler, **kwargs)
        self.on_bad_request = on_bad_request
        self.on_timeout = on_timeout

    def __call__(self) -> RequestHandler:
        return _RecordingHandler(self, loop=self._loop, **self._kwargs)


def listener_server(current: Callable[[], Gateway], handler: Any, timeouts: ClientTimeouts,
                    limits: ParserLimits, **kwargs: Any) -> RecordingServer:
    """The listener's server; rejected and timed-out requests become events of the gateway
    `current()` returns (the live one, across reloads)."""
    from proxy.forward import new_id

    def on_bad_request(request: BaseRequest, status: int, exc: BaseException | None) -> None:
        gateway = current()
        if gateway.emitter is not None:
            gateway.emitter.emit(bad_request_event(request, status, exc, gateway.instance,
                                                   new_id(128)))

    def on_timeout(client_address: str, status: int, error_type: str) -> None:
        gateway = current()
        if gateway.emitter is not None:
            gateway.emitter.emit(timeout_event(client_address, status, error_type,
                                               gateway.instance, new_id(128)))

    return RecordingServer(handler, on_bad_request, on_timeout=on_timeout, timeouts=timeouts,
                           limits=limits, **kwargs)
