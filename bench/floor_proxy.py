"""The floor of the benchmark: the least a Python proxy on uvloop can do per request.

Not a usable proxy: it exists to measure how fast any Python design on this machine could
be, so the goals can be read against it. Protocols only (no aiohttp server, no request
objects, no streams): the request head is found by its blank line and copied to one
keep-alive upstream connection per client connection with Host replaced and Connection
dropped; the upstream's response is copied back once its Content-Length is complete. GET
and Content-Length bodies only; no chunked bodies, no validation beyond that, no timeouts.

`--style`:
- `callbacks`: the upstream protocol writes to the client transport itself (no coroutine);
- `task`: one asyncio Task per request awaits a future the upstream protocol resolves (what
  any handler that awaits something - an auth check, a Redis call - needs);
- `aiohttp`: the gateway's own server and upstream parts with nothing of its chain: aiohttp's
  low-level server (`web.Server`, as the gateway's listener), the lean upstream pool
  (proxy/upstream_pool.py) and the one-write response (proxy/direct_response.py). Between
  this and `task` is what aiohttp's request handling and the gateway's client cost; between
  this and the gateway's `minimal` target, what its chain costs.
- `llhttp`: what a protocol-level listener in place of aiohttp's server could come down to:
  a Protocol feeding aiohttp's C request parser (llhttp, the parser aiohttp's server uses),
  one Task per parsed request, the same upstream pool and a one-write response built as
  `send_buffered` builds it, with no `BaseRequest`, no request-handler loop, no web
  response objects. Between this and `aiohttp` is what a protocol-level listener could
  save at most; between this and `task`, the parser and the gateway's upstream client.
  In order only without pipelining (a Task per request, answers written as they finish).

    python bench/floor_proxy.py --listen 127.0.0.1:8002 --upstream 127.0.0.1:9001 --style task
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import cast

import uvloop
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpRequestParser, RawRequestMessage
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from proxy.balancing import Endpoint
from proxy.direct_response import send_buffered
from proxy.upstream_pool import ConnectionPool

_HEAD_END = b"\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _content_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lower.find(b"\r\n", at + 2)
    return int(lower[at + 17:end if end >= 0 else None].strip())


def _take_message(buffer: bytearray) -> tuple[bytes, bytes] | None:
    """The first complete message in `buffer` (removed from it) as (head, rest after the
    head's last field: the blank line and the body); None until one has fully arrived.
    Raises ValueError on a Content-Length that is not a number."""
    end = buffer.find(_HEAD_END)
    if end < 0:
        return None
    head = bytes(buffer[:end])
    total = end + 4 + _content_length(head)
    if len(buffer) < total:
        return None
    rest = bytes(buffer[end:total])
    del buffer[:total]
    return head, rest


class UpstreamSide(asyncio.Protocol):
    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: deque[asyncio.Future[bytes] | None] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (message := _take_message(self.buffer)) is not None:
            response = message[0] + message[1]
            future = self.waiting.popleft()
            if future is None:
                self.client.send(response)
            elif not future.done():
                future.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class ClientWrites:
    """What both client-side protocols do with their connection: write, close."""

    transport: asyncio.Transport | None

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ClientSide(ClientWrites, asyncio.Protocol):
    def __init__(self, upstream_host: str, upstream_port: int, use_tasks: bool) -> None:
        self.upstream_address = (upstream_host, upstream_port)
        self.host_header = f"\r\nHost: {upstream_host}:{upstream_port}".encode()
        self.use_tasks = use_tasks
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.pending: list[bytes] = []
        self.buffer = bytearray()
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        _, protocol = await self.loop.create_connection(lambda: UpstreamSide(self),
                                                         *self.upstream_address)
        self.upstream = protocol
        for request in self.pending:
            self._forward(request)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            try:
                message = _take_message(self.buffer)
            except ValueError:
                self.send(_BAD_REQUEST)
                self.close()
                return
            if message is None:
                return
            head, rest = message
            request = self._rewrite(head) + rest
            if self.upstream is None:
                self.pending.append(request)
            else:
                self._forward(request)

    def _rewrite(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        kept = [line for line in lines[1:]
                if line[:5].lower() != b"host:" and line[:11].lower() != b"connection:"]
        return lines[0] + self.host_header + b"\r\n" + b"\r\n".join(kept)

    def _forward(self, request: bytes) -> None:
        upstream = self.upstream
        assert upstream is not None
        assert upstream.transport is not None
        if self.use_tasks:
            future: asyncio.Future[bytes] = self.loop.create_future()
            upstream.waiting.append(future)
            upstream.transport.write(request)
            self.loop.create_task(self._answer(future))
        else:
            upstream.waiting.append(None)
            upstream.transport.write(request)

    async def _answer(self, future: asyncio.Future[bytes]) -> None:
        self.send(await future)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


_DROPPED_REQUEST = frozenset({"connection", "host"})
_DROPPED_RESPONSE = frozenset({"connection", "content-length"})


async def serve_aiohttp(listen: str, upstream: str) -> None:
    host, _, port = listen.rpartition(":")
    target = Endpoint(0, f"http://{upstream}", 1)
    pool = ConnectionPool([target], max_connections=256, max_per_target=0, keepalive_s=60.0,
                          tls=None)

    async def forward(request: BaseRequest) -> web.StreamResponse:
        headers = CIMultiDict((name, value) for name, value in request.headers.items()
                              if name.lower() not in _DROPPED_REQUEST)
        headers["Host"] = target.host_header
        response = await pool.request(target, request.method, request.raw_path, headers, None,
                                      None, connect_s=5.0, read_s=5.0, total_s=10.0)
        try:
            body = await response.content.read()
            kept = [(name, value) for name, value in response.headers.items()
                    if name.lower() not in _DROPPED_RESPONSE]
            return await send_buffered(request, response.status, response.reason, kept, {},
                                       body)
        finally:
            response.release()

    runner = web.ServerRunner(web.Server(forward), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, int(port)).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await pool.close()


class ParsedClient(ClientWrites, BaseProtocol):
    """One client connection: aiohttp's C request parser and a Task per request, no more."""

    def __init__(self, pool: ConnectionPool, target: Endpoint) -> None:
        self.loop = asyncio.get_running_loop()
        super().__init__(self.loop)
        self.pool = pool
        self.target = target
        self.parser = HttpRequestParser(self, self.loop, 2**16, max_line_size=8190,
                                        max_field_size=8190)

    def data_received(self, data: bytes) -> None:
        try:
            messages, _, _ = self.parser.feed_data(data)
        except Exception:  # the parser rejected the bytes
            self.send(_BAD_REQUEST)
            self.close()
            return
        for message, _payload in messages:
            self.loop.create_task(self.handle(message))

    async def handle(self, message: RawRequestMessage) -> None:
        target = self.target
        headers = CIMultiDict((name, value) for name, value in message.headers.items()
                              if name.lower() not in _DROPPED_REQUEST)
        headers["Host"] = target.host_header
        response = await self.pool.request(target, message.method, message.path, headers,
                                           None, None, connect_s=5.0, read_s=5.0, total_s=10.0)
        try:
            body = await response.content.read()
            lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
            seen_date = seen_server = False
            for name, value in response.headers.items():
                lower = name.lower()
                if lower in _DROPPED_RESPONSE:
                    continue
                seen_date = seen_date or lower == "date"
                seen_server = seen_server or lower == "server"
                lines.append(f"{name}: {value}\r\n")
            lines.append(f"Content-Length: {len(body)}\r\n")
            if not seen_date:
                lines.append(f"Date: {rfc822_formatted_time()}\r\n")
            if not seen_server:
                lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
            if message.should_close:
                lines.append("Connection: close\r\n")
            lines.append("\r\n")
            self.send("".join(lines).encode("utf-8", "surrogateescape") + body)
            if message.should_close:
                self.close()
        finally:
            response.release()



async def serve_llhttp(listen: str, upstream: str) -> None:
    host, _, port = listen.rpartition(":")
    target = Endpoint(0, f"http://{upstream}", 1)
    pool = ConnectionPool([target], max_connections=256, max_per_target=0, keepalive_s=60.0,
                          tls=None)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ParsedClient(pool, target), host, int(port))
    try:
        async with server:
            await server.serve_forever()
    finally:
        await pool.close()


async def serve(listen: str, upstream: str, use_tasks: bool) -> None:
    host, _, port = listen.rpartition(":")
    upstream_host, _, upstream_port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientSide(upstream_host, int(upstream_port), use_tasks), host, int(port))
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8002", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    parser.add_argument("--style", choices=("callbacks", "task", "llhttp", "aiohttp"),
                        default="task")
    args = parser.parse_args()
    if args.style == "aiohttp":
        uvloop.run(serve_aiohttp(args.listen, args.upstream))
    elif args.style == "llhttp":
        uvloop.run(serve_llhttp(args.listen, args.upstream))
    else:
        uvloop.run(serve(args.listen, args.upstream, args.style == "task"))


if __name__ == "__main__":
    main()
