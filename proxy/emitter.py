"""The event emitter: per-request events onto a Redis Stream, batched, bounded, counted.

`emit()` only appends to an in-memory deque; a background task writes batches (one stream
entry per batch, see proxy/event.py) when `batch_size` events wait or every
`flush_interval_s`. While Redis is unreachable events stay buffered up to `buffer_max`; beyond
that new events are dropped, and every dropped event is counted by reason. At every moment
emitted == sent + dropped + buffered (a batch in flight stays buffered until Redis took it).
Delivery is at least once: a write that times out after Redis applied it is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from typing import Any, Final

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from proxy.event import SCHEMA_VERSION, RequestEvent, encode_batch

log = logging.getLogger(__name__)

_MAX_BATCHES_PER_TRIP: Final = 8  # a large backlog goes out as several XADDs in one pipeline
_DROP_LOG_EVERY_S: Final = 10.0
_SCHEMA: Final = str(SCHEMA_VERSION)

EMITTED = Counter("apigw_events_emitted_total", "Events handed to the emitter")
SENT = Counter("apigw_events_sent_total", "Events written to the Redis stream")
DROPPED = Counter("apigw_events_dropped_total", "Events lost, by reason", ["reason"])
BUFFERED = Gauge("apigw_events_buffered", "Events waiting in emitter buffers")
BATCHES = Counter("apigw_event_batches_total", "Stream entries (batches) written")
SEND_ERRORS = Counter("apigw_event_send_errors_total", "Failed writes to the event stream")


class EventEmitter:
    """Bounded, batched, never-blocking telemetry pipe from a proxy worker to Redis."""

    def __init__(self, redis: aioredis.Redis, stream: str, *, batch_size: int = 500,
                 flush_interval_s: float = 0.2, buffer_max: int = 100_000,
                 stream_maxlen: int = 1_000_000, send_timeout_s: float = 5.0,
                 max_backoff_s: float = 5.0) -> None:
        if batch_size < 1 or buffer_max < 1:
            raise ValueError("batch_size and buffer_max must be at least 1")
        self._redis = redis
        self._stream = stream
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._buffer_max = buffer_max
        self._stream_maxlen = stream_maxlen
        self._send_timeout_s = send_timeout_s
        self._max_backoff_s = max_backoff_s
        self._buffer: deque[RequestEvent] = deque()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._emitted = 0
        self._sent = 0
        self._dropped: dict[str, int] = {}
        self._send_errors = 0
        self._batches = 0
        self._reported = {"emitted": 0, "sent": 0, "batches": 0, "send_errors": 0}
        self._reported_dropped: dict[str, int] = {}
        self._drops_since_log = 0
        self._last_drop_log = 0.0

    # -- hot path ------------------------------------------------------------------------

    def emit(self, event: RequestEvent) -> None:
        """Queue one event. Never blocks, never raises; drops and counts when full."""
        self._emitted += 1
        if self._closed:
            self._drop("closed", 1)
        elif len(self._buffer) >= self._buffer_max:
            self._drop("buffer_full", 1)
        else:
            self._buffer.append(event)
            if len(self._buffer) >= self._batch_size and not self._wake.is_set():
                self._wake.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-emitter")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting events, flush what can be flushed within `timeout_s`, count the
        rest as dropped (reason `shutdown`)."""
        self._closed = True
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._buffer and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    await self._send_some()
            except (RedisError, OSError, TimeoutError) as exc:
                self._send_errors += 1
                log.warning("event flush at shutdown failed", extra={"error": repr(exc)[:200]})
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if self._buffer:
            left = len(self._buffer)
            self._buffer.clear()
            self._drop("shutdown", left)
        self._log_drops(force=True)
        self._report()

    @property
    def stats(self) -> dict[str, int]:
        return {"emitted": self._emitted, "sent": self._sent,
                "dropped": sum(self._dropped.values()), "buffered": len(self._buffer),
                "send_errors": self._send_errors, "batches": self._batches}

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return dict(self._dropped)

    # -- background ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                if backoff:  # not woken by emit(): a dead Redis must not cost a busy loop
                    async with asyncio.timeout(backoff):
                        await self._stopping.wait()
                elif len(self._buffer) < self._batch_size:
                    async with asyncio.timeout(self._flush_interval_s):
                        await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return  # stop() flushes the rest
            try:
                while self._buffer:
                    async with asyncio.timeout(self._send_timeout_s):
                        await self._send_some()
                    if len(self._buffer) < self._batch_size:
                        break  # a partial batch waits for the next tick
                if backoff:
                    log.info("event stream writable again", extra={"buffered": len(self._buffer)})
                backoff = 0.0
            except (RedisError, OSError, TimeoutError) as exc:
                self._send_errors += 1
                if not backoff:
                    log.warning("event stream write failed; buffering", extra={
                        "error": repr(exc)[:200], "buffered": len(self._buffer)})
                backoff = min(max(backoff * 2, 0.1), self._max_backoff_s)
            except Exception:
                self._send_errors += 1
                log.exception("event emitter failed; retrying")
                backoff = min(max(backoff * 2, 0.1), self._max_backoff_s)
            self._log_drops()
            self._report()

    async def _send_some(self) -> None:
        """Write up to _MAX_BATCHES_PER_TRIP batches from the head of the buffer in one round
        trip; remove them from the buffer only once Redis accepted them."""
        count = min(len(self._buffer), self._batch_size * _MAX_BATCHES_PER_TRIP)
        if count == 0:
            return
        events = list(itertools.islice(self._buffer, count))
        payloads: list[tuple[bytes, int]] = []
        invalid = 0
        for start in range(0, count, self._batch_size):
            payload, good = self._encode(events[start:start + self._batch_size])
            invalid += len(events[start:start + self._batch_size]) - good
            if good:
                payloads.append((payload, good))
        if payloads:
            pipe: Any
            async with self._redis.pipeline(transaction=False) as pipe:
                for payload, _ in payloads:
                    pipe.xadd(self._stream, {"v": _SCHEMA, "b": payload},
                              maxlen=self._stream_maxlen, approximate=True)
                await pipe.execute()
        for _ in range(count):
            self._buffer.popleft()
        self._sent += count - invalid
        self._batches += len(payloads)
        if invalid:
            self._drop("invalid_event", invalid)

    @staticmethod
    def _encode(events: list[RequestEvent]) -> tuple[bytes, int]:
        """The batch payload and how many events it holds; an event that cannot be
        serialised (a bug upstream of here) is left out instead of blocking the stream."""
        try:
            return encode_batch(events), len(events)
        except TypeError:
            good = []
            for event in events:
                try:
                    encode_batch([event])
                except TypeError:
                    event = _valid_utf8(event)
                    try:
                        encode_batch([event])
                    except TypeError:
                        continue
                good.append(event)
            if len(good) < len(events):
                log.error("unserialisable events dropped",
                          extra={"count": len(events) - len(good)})
            return (encode_batch(good), len(good)) if good else (b"", 0)

    def _drop(self, reason: str, count: int) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + count
        self._drops_since_log += count

    def _log_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._drops_since_log and (force or now - self._last_drop_log >= _DROP_LOG_EVERY_S):
            log.warning("events dropped", extra={"dropped": self._drops_since_log,
                                                 "by_reason": dict(self._dropped),
                                                 "buffered": len(self._buffer)})
            self._drops_since_log = 0
            self._last_drop_log = now

    def _report(self) -> None:
        """Move the plain counters into prometheus (kept off the per-event path)."""
        for name, metric, value in (("emitted", EMITTED, self._emitted),
                                    ("sent", SENT, self._sent),
                                    ("batches", BATCHES, self._batches),
                                    ("send_errors", SEND_ERRORS, self._send_errors)):
            delta = value - self._reported[name]
            if delta:
                metric.inc(delta)
                self._reported[name] = value
        for reason, value in self._dropped.items():
            delta = value - self._reported_dropped.get(reason, 0)
            if delta:
                DROPPED.labels(reason).inc(delta)
                self._reported_dropped[reason] = value
        BUFFERED.set(len(self._buffer))


def _valid_utf8(event: RequestEvent) -> RequestEvent:
    """The event with every string made valid UTF-8. aiohttp hands invalid bytes from the wire
    (a User-Agent, a path) on as lone surrogates, which JSON cannot carry: without this a
    client could make its requests invisible to analytics by sending one bad byte."""
    changes: dict[str, Any] = {
        f.name: value.encode("utf-8", "replace").decode("utf-8")
        for f in dataclasses.fields(event) if isinstance(value := getattr(event, f.name), str)}
    return dataclasses.replace(event, **changes)
