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
then reads and writes that connection's streams itself. A call whose caller gives up (the
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
import contextlib
import hashlib
from collections import deque
from typing import Any, Final

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

_READ_SIZE: Final = 65536
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


class RedisLane:
    """One pipelined connection for script calls; concurrent calls share it in order."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: AbstractConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
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
        writer = self._writer
        if writer is None or writer.is_closing():
            if deadline is None:
                writer = await self._connect()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        writer = await self._connect()
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
            loop.call_soon(self._send, writer)
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

    def _send(self, writer: asyncio.StreamWriter) -> None:
        if writer is not self._writer:  # dropped since: its calls have failed already
            return
        if writer.is_closing():  # closed since the calls were queued: they cannot be answered
            self._abandon(RedisConnectionError("the Redis lane's connection closed"))
            return
        unsent, self._unsent = self._unsent, []
        writer.write(b"".join(unsent))

    async def _connect(self) -> asyncio.StreamWriter:
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
                reader, writer = connection._reader, connection._writer
                if reader is None or writer is None:
                    raise RedisConnectionError("the Redis connection has no streams")
                self._connection, self._writer = connection, writer
                self._read_task = asyncio.get_running_loop().create_task(
                    self._read(reader, connection))
                connecting.set_result(None)
            except BaseException as exc:
                connecting.set_exception(exc if isinstance(exc, Exception)
                                         else RedisConnectionError("connect interrupted"))
                connecting.exception()  # retrieved here; other callers get their own error
                raise
            finally:
                self._connecting = None
        writer = self._writer
        if writer is None or writer.is_closing():
            raise RedisConnectionError("the Redis lane's connection closed")
        return writer

    async def _read(self, reader: asyncio.StreamReader, connection: AbstractConnection) -> None:
        parser = hiredis.Reader(replyError=ResponseError, notEnoughData=False)
        waiters = self._waiters
        error: Exception = RedisConnectionError("Redis closed the connection")
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if not waiters:
                        raise RedisConnectionError("Redis sent a reply nobody asked for")
                    waiter = waiters.popleft()
                    if not waiter.done():
                        if isinstance(reply, ResponseError) and \
                                str(reply).startswith(_NOSCRIPT):
                            reply = NoScriptError(str(reply))
                        waiter.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken stream or a bad reply: this connection is done
            error = exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(
                f"the Redis lane failed: {type(exc).__name__}: {exc}")
        if self._connection is connection:
            self._abandon(error)

    # -- dropping the connection ------------------------------------------------------------

    def _abandon(self, error: Exception) -> None:
        """Fail every waiting call and forget the connection (closed in the background)."""
        task = self._read_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._read_task = None
        connection, self._connection, self._writer = self._connection, None, None
        waiters, self._waiters = self._waiters, deque()
        self._unsent = []
        self._deadlines = deque()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        if connection is not None:
            transport = getattr(connection._writer, "transport", None)
            if transport is not None:
                transport.abort()

    async def _drop(self, error: Exception) -> None:
        task = self._read_task
        connection = self._connection
        self._abandon(error)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if connection is not None:
            await connection.disconnect(nowait=True)
