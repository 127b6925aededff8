"""The lean upstream client (proxy/upstream_conn.py, proxy/upstream_pool.py) against real
loopback servers that misbehave on purpose: cut bodies, chunked bodies, keep-alive,
`Connection: close`, slow heads, a full pool."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from proxy.balancing import Endpoint
from proxy.upstream_conn import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    ReadTimeout,
    TlsFailed,
    UpstreamReset,
    request_head,
)
from proxy.upstream_pool import ConnectionPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Server:
    """A raw TCP server on 127.0.0.1: counts connections, records request heads."""

    handler: Handler
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
            self.bodies.append(body)
        else:
            self.bodies.append(await reader.readexactly(length))
        return head


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter],
                                    Awaitable[None]],
                  context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(handler=lambda r, w: asyncio.sleep(0))
    server.handler = lambda reader, writer: handler(server, reader, writer)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


def pool_for(port: int, *, scheme: str = "http", limit: int = 8, per_target: int = 0,
             keepalive_s: float = 30.0, tls: ssl.SSLContext | None = None
             ) -> tuple[ConnectionPool, Endpoint]:
    ep = Endpoint(0, f"{scheme}://127.0.0.1:{port}", 1)
    return ConnectionPool([ep], max_connections=limit, max_per_target=per_target,
                          keepalive_s=keepalive_s, tls=tls), ep


async def get(pool: ConnectionPool, ep: Endpoint, path: str = "/", method: str = "GET",
              body: bytes | StreamReader | AsyncIterator[bytes] | None = None,
              length: int | None = None, read_s: float = 2.0,
              total_s: float = 5.0) -> tuple[int, bytes]:
    response = await pool.request(ep, method, path, CIMultiDict({"Host": "upstream"}), body,
                                  length, connect_s=1.0, read_s=read_s, total_s=total_s)
    try:
        return response.status, await response.content.read()
    finally:
        response.release()


async def keep_alive(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    while True:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()


async def test_keep_alive_reuses_one_connection_and_sends_one_head() -> None:
    async with serving(keep_alive) as server:
        pool, ep = pool_for(server.port)
        for _ in range(5):
            assert await get(pool, ep, "/a?b=1") == (200, b"ok")
            assert pool.idle_connections == 1
        assert server.connections == 1
        assert server.heads[0] == b"GET /a?b=1 HTTP/1.1\r\nHost: upstream\r\n\r\n"
        assert pool.open_connections == 1
        await pool.close()


async def test_connection_close_is_not_reused() -> None:
    async def closing(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.5)  # the client must not wait for our close to reuse it

    async with serving(closing) as server:
        pool, ep = pool_for(server.port)
        for _ in range(3):
            assert await get(pool, ep) == (200, b"ok")
            assert pool.idle_connections == 0  # never offered to the next request
        assert server.connections == 3
        await pool.close()


async def test_chunked_and_close_delimited_responses() -> None:
    async def chunked(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await server.read_request(reader)  # reused after a complete chunked body
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")  # no length: read until close
        writer.close()

    async with serving(chunked) as server:
        pool, ep = pool_for(server.port)
        assert await get(pool, ep) == (200, b"hello world")
        assert await get(pool, ep) == (200, b"until the end")
        assert server.connections == 1
        await pool.close()


async def test_close_mid_body_is_a_cut_body_never_a_complete_one() -> None:
    async def cut(server: Server, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    async def cut_chunked(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n")
        await writer.drain()
        writer.close()

    for handler in (cut, cut_chunked):
        async with serving(handler) as server:
            pool, ep = pool_for(server.port)
            response = await pool.request(ep, "GET", "/", CIMultiDict(), None, None,
                                          connect_s=1.0, read_s=2.0, total_s=5.0)
            assert response.status == 200
            with pytest.raises(UpstreamReset, match="mid-body"):
                await response.content.read()
            response.release()
            assert pool.idle_connections == 0
            await asyncio.sleep(0)
            assert pool.open_connections == 0
            await pool.close()


async def test_close_before_the_response_is_a_reset() -> None:
    async def hang_up(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()

    async with serving(hang_up) as server:
        pool, ep = pool_for(server.port)
        with pytest.raises(UpstreamReset):
            await get(pool, ep)
        await pool.close()


async def test_slow_head_is_a_read_timeout_and_total_bounds_a_trickle() -> None:
    async def slow(server: Server, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(2.0)

    async def trickle(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0.05)
            writer.write(b"x")
            await writer.drain()

    async with serving(slow) as server:
        pool, ep = pool_for(server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReadTimeout, match="nothing read"):
            await get(pool, ep, read_s=0.2)
        assert 0.15 < loop.time() - started < 1.0
        await pool.close()
    async with serving(trickle) as server:
        pool, ep = pool_for(server.port)
        started = loop.time()
        with pytest.raises(ReadTimeout, match="total"):  # each read is in time, the whole not
            await get(pool, ep, read_s=0.5, total_s=0.4)
        assert loop.time() - started < 1.0
        await pool.close()


async def test_invalid_response_is_a_bad_response() -> None:
    async def garbage(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with serving(garbage) as server:
        pool, ep = pool_for(server.port)
        with pytest.raises(BadResponse):
            await get(pool, ep)
        await pool.close()


async def test_connect_refused_and_pool_wait_timeout() -> None:
    async with serving(keep_alive) as server:
        free = server.port
    pool, ep = pool_for(free)  # nothing listens there any more
    with pytest.raises(ConnectFailed):
        await get(pool, ep)
    assert pool.open_connections == 0

    async def slow(server: Server, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(1.5)
        writer.write(OK)
        await writer.drain()

    async with serving(slow) as server:
        pool, ep = pool_for(server.port, limit=1)
        first = asyncio.create_task(get(pool, ep))
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectTimeout, match="no connection"):  # waited its connect_s
            await get(pool, ep)
        assert await first == (200, b"ok")
        assert server.connections == 1
        await pool.close()


async def test_request_bodies_content_length_and_chunked_and_head() -> None:
    async def echo(server: Server, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        while True:
            head = await server.read_request(reader)
            body = server.bodies[-1]
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
            await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"", b"two"):
            yield part

    async with serving(echo) as server:
        pool, ep = pool_for(server.port)
        assert await get(pool, ep, method="POST", body=b"held") == (201, b"held")
        assert await get(pool, ep, method="POST", body=parts()) == (201, b"one,two")
        assert await get(pool, ep, method="HEAD") == (200, b"")  # no body despite the length
        assert await get(pool, ep, method="POST") == (201, b"")
        heads = server.heads
        assert b"Content-Length: 4\r\n" in heads[0]
        assert b"Transfer-Encoding: chunked\r\n" in heads[1]
        assert b"Content-Length: 0\r\n" in heads[3]
        assert server.connections == 1  # HEAD did not confuse the next response
        await pool.close()


async def test_early_answer_to_a_streamed_body_is_heard_and_not_reused() -> None:
    async def refuse(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.0)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1024
            await asyncio.sleep(0.01)

    async with serving(refuse) as server:
        pool, ep = pool_for(server.port)
        assert await get(pool, ep, method="POST", body=endless()) == (413, b"")
        assert pool.idle_connections == 0
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0  # the half-sent body closed it
        await pool.close()


def test_request_head_refuses_line_breaks() -> None:
    assert request_head("GET", "/x", CIMultiDict({"A": "b"})) == \
        b"GET /x HTTP/1.1\r\nA: b\r\n\r\n"
    with pytest.raises(ValueError, match="CR or LF"):
        request_head("GET", "/x", CIMultiDict({"A": "b\r\nInjected: yes"}))


async def test_tls_is_verified(tmp_path: Path) -> None:
    from tests.test_tls import make_pki  # the test CA of the TLS tests

    pki = make_pki(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pki.cert, pki.key)
    async with serving(keep_alive, server_context) as server:
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        pool, ep = pool_for(server.port, scheme="https", tls=trusting)
        assert await get(pool, ep) == (200, b"ok")
        await pool.close()
        pool, ep = pool_for(server.port, scheme="https", tls=ssl.create_default_context())
        with pytest.raises(TlsFailed):
            await get(pool, ep)
        await pool.close()


async def test_a_kept_alive_connection_closed_under_a_request_is_replaced_once() -> None:
    async def stale(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        first_connection = server.connections % 2 == 1
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        if first_connection:  # the next request finds it closed by "keep-alive timeout"
            await server.read_request(reader)
            return
        await keep_alive(server, reader, writer)

    async with serving(stale) as server:
        pool, ep = pool_for(server.port)
        assert await get(pool, ep) == (200, b"ok")
        assert await get(pool, ep) == (200, b"ok")  # retried on a new connection, unseen
        assert server.connections == 2
        await pool.close()
    async with serving(stale) as server:
        pool, ep = pool_for(server.port)
        assert await get(pool, ep) == (200, b"ok")
        with pytest.raises(UpstreamReset):  # not idempotent: the upstream may have acted on it
            await get(pool, ep, method="POST", body=b"x")
        assert server.connections == 1
        await pool.close()
