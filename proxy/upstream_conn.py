"""One keep-alive HTTP/1.1 connection to an upstream target: the forwarder's lean client.

An asyncio protocol (aiohttp's `BaseProtocol`, for its write flow control) that sends one
request at a time and parses the responses with aiohttp's compiled llhttp parser
(`aiohttp.http_parser.HttpResponseParser`, the C one when aiohttp's extensions are built).
The parser hands over each response's headers as a `CIMultiDictProxy` and its body as an
aiohttp `StreamReader` that the forwarder relays with backpressure: when the reader holds more
than twice `read_bufsize`, the socket stops being read until the client side catches up.

Request: the head is one `bytes` (`request_head`); the body is sent as is (held bytes with
Content-Length), copied from the client's StreamReader (Content-Length), or chunked (an
async iterator). A body being sent runs beside the wait for the response, so an upstream
that answers early (413, 401) is heard; such a connection is not reused.

Timeouts, one timer per connection: `read_s` between two reads from the socket while a
response is awaited (paused reading does not count, as aiohttp's `sock_read`), `total_s`
from the start of the exchange to the end of the body; an idle connection is closed after
the pool's keep-alive.

Failures are `UpstreamError`s carrying the event's error type and the problem slug:
`ConnectFailed` and `ConnectTimeout` (the request never left: safe to retry for any method),
`TlsFailed`, `ReadTimeout`, `UpstreamReset` (the connection closed before the response was
complete; mid-body, the body reader raises it, so the client sees a cut response, never a
complete-looking one) and `BadResponse` (not valid HTTP). A connection is reused only when
its response was read to the end, neither side said `Connection: close`, the request body
was sent whole and nothing else arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

CHUNK_END: Final = b"0\r\n\r\n"
_CRLF: Final = "\r\n"
_INFORMATIONAL: Final = range(100, 200)
_SWITCHING: Final = 101
_NO_BODY: Final = frozenset({204, 304})
_MAX_LINE: Final = 8190
_MAX_HEADERS: Final = 128

RequestBody = bytes | StreamReader | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """A failed exchange with an upstream: the event's error type and the problem slug."""

    error_type = "upstream_error"
    slug = "upstream-unreachable"


class ConnectFailed(UpstreamError):
    """No connection (refused, unreachable, name not resolved): the request never left."""

    error_type = "upstream_connect_error"


class ConnectTimeout(UpstreamError):
    """No connection (or no free one in the pool) within the connect timeout."""

    error_type = "upstream_connect_timeout"
    slug = "upstream-timeout"


class TlsFailed(UpstreamError):
    """The TLS handshake or the certificate verification failed (proxy/tls.py)."""

    error_type = "upstream_tls_error"


class ReadTimeout(UpstreamError):
    """Nothing read for `read_s`, or the exchange passed `total_s`."""

    error_type = "upstream_timeout"
    slug = "upstream-timeout"


class UpstreamReset(UpstreamError):
    """The connection closed (or failed) before the response was complete."""

    error_type = "upstream_reset"
    slug = "upstream-reset"


class BadResponse(UpstreamError):
    """The upstream's bytes are not a valid HTTP/1.x response."""

    error_type = "upstream_protocol_error"
    slug = "upstream-bad-response"


class HeadError(ValueError):
    """A request head that would not be one valid HTTP message (CR or LF in a field)."""


def request_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    """`METHOD target HTTP/1.1`, the fields, a blank line: one bytes object."""
    fields = _CRLF.join(map(": ".join, headers.items()))
    text = f"{method} {target} HTTP/1.1\r\n{fields}\r\n\r\n" if fields else \
        f"{method} {target} HTTP/1.1\r\n\r\n"
    lines = len(headers) + 2
    if text.count("\n") != lines or text.count("\r") != lines:
        raise HeadError("a request header or the target contains CR or LF")
    return text.encode("utf-8", "surrogateescape")  # the bytes the client sent, as they were


class UpstreamResponse:
    """A response whose body is still being read: status, headers, and `content`."""

    __slots__ = ("_done", "connection", "content", "content_length", "headers", "reason",
                 "status")

    def __init__(self, connection: UpstreamConnection, message: RawResponseMessage,
                 content: StreamReader, done: Callable[[UpstreamConnection], None]) -> None:
        self.connection = connection
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        length = message.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._done: Callable[[UpstreamConnection], None] | None = done

    def release(self) -> None:
        """Hand the connection back: kept for the next request only if it can be reused."""
        done, self._done = self._done, None
        if done is not None:
            done(self.connection)

    def close(self) -> None:
        """Give up on the rest of the body: the connection is closed, never reused."""
        self.connection.abort()
        self.release()


class UpstreamConnection(BaseProtocol):
    """One connection, one request at a time (see the module docstring)."""

    __slots__ = ("_body_task", "_deadline", "_expected", "_head_only", "_last_read",
                 "_payload", "_read_s", "_responses", "_timer", "_waiter", "answered",
                 "idle_since", "keepalive_s", "key", "max_field_size", "on_lost",
                 "read_bufsize", "reusable")

    def __init__(self, loop: asyncio.AbstractEventLoop, key: int, *, read_bufsize: int,
                 max_field_size: int, keepalive_s: float) -> None:
        super().__init__(loop)
        self.key = key  # the pool's target index
        self.read_bufsize = read_bufsize
        self.max_field_size = max_field_size
        self.keepalive_s = keepalive_s
        self._responses = self._parser = self._new_parser(with_body=True)
        self._waiter: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None  # the body being received
        self._expected = False  # a request was sent and its response is not complete
        self._head_only = False  # the current request is HEAD
        self._body_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_s = 0.0
        self._deadline = 0.0  # total deadline of the current exchange
        self._last_read = 0.0
        self.idle_since = 0.0
        self.answered = False  # some byte of the current response arrived
        self.reusable = True
        self.on_lost: Callable[[UpstreamConnection], None] | None = None  # the pool's

    def _new_parser(self, with_body: bool) -> HttpResponseParser:
        return HttpResponseParser(self, self._loop, self.read_bufsize, max_line_size=_MAX_LINE,
                                  max_field_size=self.max_field_size, max_headers=_MAX_HEADERS,
                                  payload_exception=BadResponse, response_with_body=with_body,
                                  read_until_eof=True, auto_decompress=False)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_read = self._loop.time()
            self.answered = True
        if not self._expected:  # bytes nobody asked for: this connection is not HTTP/1.1-safe
            if data:
                self.reusable = False
                self.abort()
            return
        try:
            messages, upgraded, _ = self._responses.feed_data(data)
        except Exception as exc:  # llhttp rejected the bytes
            self._fail(BadResponse(f"invalid HTTP response: {exc}"))
            return
        payload = self._payload
        if payload is not None and payload.is_eof():  # the previous body just ended
            self._payload = None
            self._expected = False
        for message, payload in messages:
            code = message.code
            if code in _INFORMATIONAL and code != _SWITCHING:
                continue  # 100 Continue, 103 Early Hints: the final response follows
            if message.should_close or upgraded:
                self.reusable = False
            waiter = self._waiter
            if waiter is None or waiter.done():  # a second response to one request
                self.reusable = False
                self.abort()
                return
            self._waiter = None
            if self._head_only or payload is EMPTY_PAYLOAD or code in _NO_BODY or \
                    payload.is_eof():
                self._expected = False
            else:
                self._payload = payload
            waiter.set_result((message, EMPTY_PAYLOAD if code in _NO_BODY else payload))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost finishes the body or fails it

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.reusable = False
        self._cancel_timer()
        payload = self._payload
        try:
            self._responses.feed_eof()  # a body read until EOF ends here
        except Exception as error:  # Content-Length or chunks incomplete: a cut body
            if payload is not None:
                payload.set_exception(UpstreamReset(
                    f"the upstream closed the connection mid-body: {error}"))
                self._payload = None
        self._fail(UpstreamReset("the upstream closed the connection"
                                 + (f": {exc}" if exc is not None else "")))
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self)

    def pause_reading(self) -> None:
        super().pause_reading()
        self._last_read = float("inf")  # the client side is slow, not the upstream

    def resume_reading(self, resume_parser: bool = True) -> None:
        if not self._reading_paused:  # aiohttp's StreamReader calls it at every body's end
            return  # and every drained read: nothing is held back unless paused
        self._last_read = self._loop.time()
        super().resume_reading(resume_parser)

    # -- one exchange ----------------------------------------------------------------------

    def send(self, head: bytes, body: RequestBody, length: int | None, head_only: bool,
             read_s: float,
             deadline: float) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        """Write the request; the future resolves to the response's head and body reader."""
        self.answered = False
        transport = self.transport
        if transport is None or transport.is_closing():
            raise UpstreamReset("the connection closed before the request was sent")
        loop = self._loop
        waiter: asyncio.Future[tuple[RawResponseMessage, StreamReader]] = loop.create_future()
        self._waiter = waiter
        self._expected = True
        self._read_s = read_s
        self._deadline = deadline
        self._last_read = loop.time()
        self._arm(min(self._last_read + read_s, deadline))
        if head_only:
            self._head_only = True
            self._responses = self._parser = self._new_parser(with_body=False)
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            self._body_task = loop.create_task(self._send_body(body, length))
        return waiter

    async def _send_body(self, body: StreamReader | AsyncIterator[bytes],
                         length: int | None) -> None:
        chunks = body.iter_any() if isinstance(body, StreamReader) else body
        sent = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                self._write(chunk if length is not None
                            else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if self._paused:
                    await self._drain_helper()
            if length is None:
                self._write(CHUNK_END)
            elif sent != length:
                raise UpstreamReset(f"the request body ended after {sent} of {length} bytes")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a half-sent body: this connection cannot be reused
            self._fail(exc)
            self.abort()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise UpstreamReset("the upstream closed the connection while the request body "
                                "was sent")
        transport.write(data)

    def finished(self) -> bool:
        """The exchange is over and the connection may carry another request."""
        if self._payload is not None:  # the body did not end
            return False
        task = self._body_task
        if task is not None:
            self._body_task = None
            if not task.done():
                task.cancel()
                return False
        if self._head_only:
            self._head_only = False
            self._responses = self._parser = self._new_parser(with_body=True)
        transport = self.transport
        if not self.reusable or self._expected or transport is None or transport.is_closing():
            return False
        if self._reading_paused:  # the body was complete but not all read: listen again
            self.resume_reading(resume_parser=False)
        return True

    def abort(self) -> None:
        self.reusable = False
        task = self._body_task
        if task is not None and not task.done():
            task.cancel()
        transport = self.transport
        if transport is not None:
            transport.abort()

    def _fail(self, exc: BaseException) -> None:
        """Deliver `exc` to whoever waits (the head or the body) and drop the connection."""
        self.reusable = False
        self._expected = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        payload, self._payload = self._payload, None
        if payload is not None and not payload.is_eof():
            payload.set_exception(exc)
        transport = self.transport
        if transport is not None:
            transport.abort()

    # -- the timer: read / total timeouts while busy, keep-alive while idle -----------------

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires earlier and re-arms itself
            timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        if self._expected:
            read_by = self._last_read + self._read_s
            if now >= self._deadline:
                self._fail(ReadTimeout(f"no complete response within the total timeout "
                                       f"({self._deadline - now:+.3f} s)"))
            elif now >= read_by:
                self._fail(ReadTimeout(f"nothing read from the upstream for {self._read_s:g} s"))
            else:
                self._arm(min(read_by, self._deadline))
            return
        expires = self.idle_since + self.keepalive_s
        if now >= expires:
            self.abort()
        else:
            self._arm(expires)

    def idle(self) -> None:
        """Called when the connection goes back to the pool."""
        self.idle_since = now = self._loop.time()
        self._arm(now + self.keepalive_s)
