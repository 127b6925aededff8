"""Lua script calls on one pipelined Redis connection: the rate limiter's path to Redis.

redis-py spends ~45 us of CPU on one EVALSHA (connection pool, retry wrapper, command
packing and a reader per call; bench/README.md). The limiter makes one call per request, so
it has its own lane: one connection per worker on which concurrent calls are pipelined and
answered in order (Redis answers one connection's commands in the order they arrive), parsed
by hiredis, Redis's own C parser. The calls made in one turn of the event loop go out in one
write, at the end of that turn: under load one send (and one wake-up of Redis) serves many
requests.

The connection is made by redis-py's connection class with the client's own settings, so the
URL, TLS, credentials, database and protocol of `APIGW_REDIS_URL` apply unchanged; the lane
then takes over that connection's transport with a protocol of its own (`_LaneProtocol`):
replies are parsed and handed to their callers in the transport's data callback, with no
stream reader and no reading task to wake in between. A call whose caller gives up (the
failover limiter's timeout) or a connection that fails or closes fails every call waiting
on it and drops the connection; the next call connects again.

Deadlines: `run(..., timeout_s=...)` bounds a call (connecting included) without a timer of
its own. The lane keeps the waiting calls' deadlines in call order and one timer, armed at
the earliest; when it fires, a call still unanswered past its deadline means Redis is not
answering this connection: every waiting call fails with `LaneTimeout` and the connection is
dropped, as when a caller gives up. What `asyncio.timeout` around each call cost (a timer
scheduled and cancelled per request, ~28k instructions) is gone from the hot path.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any, Final

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

_NOSCRIPT: Final = "NOSCRIPT"


class LaneTimeout(TimeoutError):
    """No reply from Redis within a call's deadline."""


class LaneScript:
    """A Lua script run through a lane by its SHA1 (EVAL once when Redis lacks it)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        # SHA1 is what Redis names scripts by (EVALSHA), not a security measure here
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()


class _LaneProtocol(asyncio.Protocol):
    """The lane connection's transport callbacks: replies are parsed as they arrive and
    resolve the waiting calls in order."""

    def __init__(self, lane: RedisLane, connection: AbstractConnection) -> None:
        self._lane = lane
        self._connection = connection
        self._parser = hiredis.Reader(replyError=ResponseError, notEnoughData=False)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        waiters = self._lane._waiters
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if not waiters:
                    raise RedisConnectionError("Redis sent a reply nobody asked for")
                waiter = waiters.popleft()
                if not waiter.done():
                    if isinstance(reply, ResponseError) and str(reply).startswith(_NOSCRIPT):
                        reply = NoScriptError(str(reply))
                    waiter.set_result(reply)
        except Exception as exc:  # a bad reply: this connection is done
            error = exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(
                f"the Redis lane failed: {type(exc).__name__}: {exc}")
            self._lane._lost(self._connection, error)

    def eof_received(self) -> bool:
        self._lane._lost(self._connection, RedisConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lane._lost(self._connection, RedisConnectionError(
            "Redis closed the connection" if exc is None
            else f"the Redis lane failed: {type(exc).__name__}: {exc}"))


class RedisLane:
    """One pipelined connection for script calls; concurrent calls share it in order."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: AbstractConnection | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._unsent: list[bytes] = []
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def run(self, script: LaneScript, keys: list[str], args: list[Any],
                  timeout_s: float | None = None) -> Any:
        """EVALSHA the script (EVAL when the server does not have it cached); with
        `timeout_s`, raises LaneTimeout when the reply (both, if it takes two) has not come
        within that many seconds."""
        deadline = (None if timeout_s is None
                    else asyncio.get_running_loop().time() + timeout_s)
        reply = await self._call(("EVALSHA", script.sha, len(keys), *keys, *args), deadline)
        if isinstance(reply, NoScriptError):
            reply = await self._call(("EVAL", script.source, len(keys), *keys, *args),
                                     deadline)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def close(self) -> None:
        self._closed = True
        await self._drop(RedisConnectionError("the rate limiter's Redis lane closed"))

    # -- one call ---------------------------------------------------------------------------

    async def _call(self, command: tuple[Any, ...], deadline: float | None = None) -> Any:
        transport = self._transport
        if transport is None or transport.is_closing():
            if deadline is None:
                transport = await self._connect()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        transport = await self._connect()
                except TimeoutError as exc:
                    raise LaneTimeout("no connection to Redis within the deadline") from exc
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(waiter)
        if deadline is not None:
            self._deadlines.append((deadline, waiter))
            timer = self._deadline_timer
            if timer is None or deadline < timer.when():
                if timer is not None:
                    timer.cancel()
                self._deadline_timer = loop.call_at(deadline, self._check_deadlines)
        if not self._unsent:
            loop.call_soon(self._send, transport)
        self._unsent.append(hiredis.pack_command(command))
        try:
            return await waiter
        except asyncio.CancelledError:
            if not waiter.done():  # its answer is still to come: the connection is not usable
                self._abandon(RedisConnectionError("a call on the Redis lane was abandoned"))
            raise

    def _check_deadlines(self) -> None:
        """The deadline timer: a call past its deadline drops the connection; otherwise the
        timer is armed again at the earliest deadline still waiting."""
        self._deadline_timer = None
        pending = [(deadline, waiter) for deadline, waiter in self._deadlines
                   if not waiter.done()]
        if not pending:
            self._deadlines.clear()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if any(deadline <= now for deadline, _ in pending):
            self._abandon(LaneTimeout("no reply from Redis within the deadline"))
            return
        self._deadlines = deque(pending)
        self._deadline_timer = loop.call_at(min(deadline for deadline, _ in pending),
                                            self._check_deadlines)

    def _send(self, transport: asyncio.WriteTransport) -> None:
        if transport is not self._transport:  # dropped since: its calls have failed already
            return
        if transport.is_closing():  # closed since the calls were queued: unanswerable
            self._abandon(RedisConnectionError("the Redis lane's connection closed"))
            return
        unsent, self._unsent = self._unsent, []
        transport.write(b"".join(unsent))

    async def _connect(self) -> asyncio.WriteTransport:
        if self._closed:
            raise RedisConnectionError("the rate limiter's Redis lane is closed")
        connecting = self._connecting
        if connecting is not None:  # another call is connecting: share it
            await asyncio.shield(connecting)
        else:
            connecting = self._connecting = asyncio.get_running_loop().create_future()
            try:
                connection: AbstractConnection = (
                    self._pool.make_connection())  # type: ignore[no-untyped-call]
                await connection.connect()  # type: ignore[no-untyped-call]
                self._connection, self._transport = connection, self._take_over(connection)
                connecting.set_result(None)
            except BaseException as exc:
                connecting.set_exception(exc if isinstance(exc, Exception)
                                         else RedisConnectionError("connect interrupted"))
                connecting.exception()  # retrieved here; other callers get their own error
                raise
            finally:
                self._connecting = None
        transport = self._transport
        if transport is None or transport.is_closing():
            raise RedisConnectionError("the Redis lane's connection closed")
        return transport

    def _take_over(self, connection: AbstractConnection) -> asyncio.WriteTransport:
        """Move the connected redis-py connection's transport (its handshake done) from
        redis-py's stream reader to the lane's protocol."""
        reader, writer = connection._reader, connection._writer
        if reader is None or writer is None:
            raise RedisConnectionError("the Redis connection has no streams")
        transport = writer.transport  # (uvloop's TLS transport is no WriteTransport subclass)
        if transport.is_closing():
            raise RedisConnectionError("the Redis lane's connection closed")
        protocol = _LaneProtocol(self, connection)
        transport.set_protocol(protocol)
        if reader.at_eof() or reader.exception() is not None:  # closed while handing over
            transport.abort()
            raise RedisConnectionError("the Redis lane's connection closed")
        return transport

    def _lost(self, connection: AbstractConnection, error: Exception) -> None:
        if self._connection is connection:
            self._abandon(error)

    # -- dropping the connection ------------------------------------------------------------

    def _abandon(self, error: Exception) -> None:
        """Fail every waiting call and forget the connection (closed in the background)."""
        self._connection = None
        transport, self._transport = self._transport, None
        waiters, self._waiters = self._waiters, deque()
        self._unsent = []
        self._deadlines = deque()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        if transport is not None:
            transport.abort()

    async def _drop(self, error: Exception) -> None:
        connection = self._connection
        self._abandon(error)
        if connection is not None:
            await connection.disconnect(nowait=True)
