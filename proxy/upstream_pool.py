"""The keep-alive connections of one upstream: per target, within the pool's limits.

`ConnectionPool.request()` is the forwarder's way to the upstream (proxy/forward.py): take
an idle connection of the target (most recently used first) or open one, send the request
(proxy/upstream_conn.py), and return the response once its head arrived. The connection
comes back when the caller releases the response, and is kept only if it can carry another
request (its response read to the end, no `Connection: close`).

Limits, as the aiohttp connector had them (proxy/pool.py's config): `max_connections` open
connections for the whole upstream, `max_connections_per_target` (0: none) per target; an
idle connection is closed after `keepalive_s`. A request that finds the pool full waits for a
connection within its connect timeout (then `ConnectTimeout`, as a connect that took too
long). Connecting: `loop.create_connection`, with TLS for https targets (the verifying
context of proxy/tls.py, hostname checked against the target's host).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Final

from multidict import CIMultiDict
from yarl import URL

from proxy.balancing import Endpoint
from proxy.resilience import IDEMPOTENT
from proxy.upstream_conn import (
    ConnectFailed,
    ConnectTimeout,
    RequestBody,
    TlsFailed,
    UpstreamConnection,
    UpstreamReset,
    UpstreamResponse,
    request_head,
)

READ_BUFSIZE: Final = 64 * 1024
MAX_FIELD_SIZE: Final = 16 * 1024
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # always framed, even when empty


class _Target:
    """One target's connections: where it is, the idle ones, how many are open."""

    __slots__ = ("host", "idle", "open", "path", "port", "server_hostname", "ssl")

    def __init__(self, base: str, context: ssl.SSLContext | None) -> None:
        url = URL(base)
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.path = url.raw_path.rstrip("/")  # a base path prefixes every request target
        https = url.scheme == "https"
        self.ssl = context if https else None
        self.server_hostname = self.host if https else None
        self.idle: list[UpstreamConnection] = []
        self.open = 0


class ConnectionPool:
    """Keep-alive connections to the targets of one upstream (see the module docstring)."""

    def __init__(self, endpoints: list[Endpoint], *, max_connections: int,
                 max_per_target: int, keepalive_s: float,
                 tls: ssl.SSLContext | None) -> None:
        self._targets = [_Target(ep.base, tls) for ep in endpoints]
        self._limit = max_connections
        self._per_target = max_per_target or max_connections
        self._keepalive_s = keepalive_s
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(self, ep: Endpoint, method: str, target: str, headers: CIMultiDict[str],
                      body: RequestBody, length: int | None, *, connect_s: float | None,
                      read_s: float | None, total_s: float | None) -> UpstreamResponse:
        """Send one request to `ep` (path `target`); the response's head has arrived.

        The body's framing headers are set here (Content-Length, or chunked for an iterator)."""
        headers.popall("Content-Length", None)
        if body is None:
            if method in _BODY_METHODS:
                headers["Content-Length"] = "0"
        elif isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        elif length is not None:
            headers["Content-Length"] = str(length)
        else:
            headers["Transfer-Encoding"] = "chunked"
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + total_s if total_s else float("inf")
        place = self._targets[ep.index]
        head = request_head(method, place.path + target, headers)
        if isinstance(body, bytes):
            length = len(body)
        replayable = method in IDEMPOTENT and (body is None or isinstance(body, bytes))
        while True:
            connection = self._idle(place, now)
            reused = connection is not None
            if connection is None:
                connection = await self._acquire(place, ep.index, now, connect_s, deadline)
            try:
                waiter = connection.send(head, body, length, method == "HEAD",
                                         read_s or float("inf"), deadline)
                message, content = await waiter
            except UpstreamReset:
                connection.abort()
                self._release(connection)
                if reused and replayable and not connection.answered:
                    continue  # the upstream closed a kept-alive connection as we sent: a new one
                raise
            except BaseException:
                connection.abort()
                self._release(connection)
                raise
            return UpstreamResponse(connection, message, content, self._release)

    # -- connections -------------------------------------------------------------------------

    async def _acquire(self, place: _Target, key: int, now: float, connect_s: float | None,
                       deadline: float) -> UpstreamConnection:
        limit = min(connect_s or float("inf"), deadline - now)
        try:
            async with asyncio.timeout(limit if limit != float("inf") else None):
                while self._open >= self._limit or place.open >= self._per_target:
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        if not waiter.done():
                            waiter.cancel()
                    connection = self._idle(place, asyncio.get_running_loop().time())
                    if connection is not None:
                        return connection
                return await self._connect(place, key)
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {place.host}:{place.port} within "
                                 f"{limit:g} s") from None

    def _idle(self, place: _Target, now: float) -> UpstreamConnection | None:
        """The most recently used live idle connection; expired or closed ones are dropped."""
        idle = place.idle
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if transport is not None and not transport.is_closing() and \
                    now - connection.idle_since < self._keepalive_s:
                return connection
            connection.abort()  # connection_lost() gives its slot back
        return None

    async def _connect(self, place: _Target, key: int) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        self._open += 1
        place.open += 1
        connection = UpstreamConnection(loop, key, read_bufsize=READ_BUFSIZE,
                                        max_field_size=MAX_FIELD_SIZE,
                                        keepalive_s=self._keepalive_s)
        connection.on_lost = self._lost
        try:
            await loop.create_connection(lambda: connection, place.host, place.port,
                                         ssl=place.ssl, server_hostname=place.server_hostname)
        except BaseException as exc:
            connection.abort()
            if connection.on_lost is not None:  # never connected: give the slot back here
                connection.on_lost = None
                self._forget(place)
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise TlsFailed(f"TLS with {place.host}:{place.port} failed: "
                                f"{getattr(exc, 'reason', None) or exc}") from exc
            if isinstance(exc, OSError):
                raise ConnectFailed(f"cannot connect to {place.host}:{place.port}: "
                                    f"{exc.strerror or exc}") from exc
            raise
        return connection

    def _release(self, connection: UpstreamConnection) -> None:
        if connection.finished() and not self._closed:
            connection.idle()
            self._targets[connection.key].idle.append(connection)
            self._wake()
        else:
            connection.abort()

    def _lost(self, connection: UpstreamConnection) -> None:
        place = self._targets[connection.key]
        if connection in place.idle:
            place.idle.remove(connection)
        self._forget(place)

    def _forget(self, place: _Target) -> None:
        self._open -= 1
        place.open -= 1
        self._wake()

    def _wake(self) -> None:
        """Every waiter re-checks (in arrival order); the pool is rarely full."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        self._closed = True
        for place in self._targets:
            idle, place.idle = place.idle, []
            for connection in idle:
                connection.abort()
        self._wake()

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(place.idle) for place in self._targets)

