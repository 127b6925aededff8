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
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import MutableSequence
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from proxy.event import ROW_COLUMNS, SCHEMA_VERSION, RequestEvent, encode_dropped, encode_rows
from proxy.policy import RedisKeys

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

DropRange = tuple[int, int, str]  # seq_from, seq_to (inclusive), reason


def emitter_identity(instance: str) -> str:
    """A new emitter's identity: gateway instance, pid, random nonce."""
    return f"{instance or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class SeqLedger:
    """Where a worker's emitters publish their identity and last assigned number in memory
    shared with the proxy's parent process, so that the parent can record the exact final
    mark of a worker that was SIGKILLed (proxy/server.py). `counts[i]` is slot i's mark and
    `names` holds `slots` identities of `NAME_BYTES` bytes, NUL-padded; an emitter takes the
    next slot round-robin and clears it when it stops."""

    NAME_BYTES: Final = 128

    def __init__(self, counts: MutableSequence[int], names: Any) -> None:
        self.counts = counts
        self.names = names
        self.slots = len(counts)
        self._next = 0

    def claim(self, identity: str) -> int:
        slot = self._next % self.slots
        self._next += 1
        raw = identity.encode()
        start = slot * self.NAME_BYTES
        self.counts[slot] = 0
        self.names[start:start + self.NAME_BYTES] = raw.ljust(self.NAME_BYTES, b"\0")
        return slot

    def release(self, slot: int) -> None:
        start = slot * self.NAME_BYTES
        self.names[start:start + self.NAME_BYTES] = b"\0" * self.NAME_BYTES
        self.counts[slot] = 0

    def marks(self) -> dict[str, int]:
        """Identity -> last assigned number of every slot in use (read by the parent)."""
        result: dict[str, int] = {}
        for slot in range(self.slots):
            start = slot * self.NAME_BYTES
            name = bytes(self.names[start:start + self.NAME_BYTES]).rstrip(b"\0")
            if name:
                result[name.decode(errors="replace")] = int(self.counts[slot])
        return result


_ledger: SeqLedger | None = None


def use_ledger(ledger: SeqLedger | None) -> None:
    """Make emitters created from now on in this process publish their marks to `ledger`."""
    global _ledger
    _ledger = ledger


class EventEmitter:
    """Bounded, batched, never-blocking telemetry pipe from a proxy worker to Redis."""

    def __init__(self, redis: aioredis.Redis, stream: str, *, batch_size: int = 500,
                 flush_interval_s: float = 0.2, buffer_max: int = 100_000,
                 stream_maxlen: int = 1_000_000, send_timeout_s: float = 5.0,
                 max_backoff_s: float = 5.0, instance: str = "",
                 heartbeat_key: str | None = None) -> None:
        if batch_size < 1 or buffer_max < 1:
            raise ValueError("batch_size and buffer_max must be at least 1")
        self.identity = emitter_identity(instance)
        self._heartbeat_key = heartbeat_key or RedisKeys().event_emitters
        self._ledger = _ledger
        fits = len(self.identity.encode()) <= SeqLedger.NAME_BYTES  # else: heartbeats only
        self._ledger_slot = self._ledger.claim(self.identity) if self._ledger and fits else -1
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
        self._handed = 0  # the last number handed to Redis (events go out in order)
        self._unreported: list[DropRange] = []  # dropped ranges not yet in a marker
        self._last_beat = 0.0
        self._closing = False  # the next heartbeat is the last one

    # -- hot path ------------------------------------------------------------------------

    def emit(self, event: RequestEvent) -> None:
        """Number and queue one event. Never blocks, never raises; drops and counts when
        full."""
        self._emitted += 1
        seq = self._emitted
        if self._ledger_slot >= 0:
            self._ledger.counts[self._ledger_slot] = seq  # type: ignore[union-attr]
        if self._closed:
            self._drop("closed", 1, seq)
        elif len(self._buffer) >= self._buffer_max:
            self._drop("buffer_full", 1, seq)
        else:
            event.gateway_emitter = self.identity
            event.gateway_event_seq = seq
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
        while self._buffer:  # numbers in the buffer can have gaps (earlier drops)
            self._drop("shutdown", 1, self._buffer.popleft().gateway_event_seq)
        await self._say_goodbye(deadline)
        if self._ledger_slot >= 0:
            self._ledger.release(self._ledger_slot)  # type: ignore[union-attr]
            self._ledger_slot = -1
        self._log_drops(force=True)
        self._report()

    async def _say_goodbye(self, deadline: float) -> None:
        """Report the last drops with a closing heartbeat: the accountant then settles this
        emitter at once instead of waiting for its heartbeat to go stale. One short try: if
        Redis is unreachable, the stale heartbeat says the same later."""
        self._closing = True
        try:
            async with asyncio.timeout(max(0.2, deadline - time.monotonic())):
                await self._send_some()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("closing heartbeat not written", extra={"error": repr(exc)[:200]})

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
                while True:  # with an empty buffer: drop reports and the heartbeat only
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
        """Write up to _MAX_BATCHES_PER_TRIP batches from the head of the buffer, the drop
        reports and the heartbeat in one round trip; remove the events from the buffer only
        once Redis accepted them. With nothing to send, beat at most once per flush interval.
        """
        count = min(len(self._buffer), self._batch_size * _MAX_BATCHES_PER_TRIP)
        now = time.monotonic()
        closing = self._closing
        if (count == 0 and not self._unreported and not closing
                and now - self._last_beat < self._flush_interval_s):
            return
        events = list(itertools.islice(self._buffer, count))
        payloads: list[bytes] = []
        invalid: list[int] = []
        for start in range(0, count, self._batch_size):
            payload, bad = self._encode(events[start:start + self._batch_size])
            invalid.extend(bad)
            if payload:
                payloads.append(payload)
        reports, self._unreported = self._unreported, []
        trip_drops = [(seq, seq, "invalid_event") for seq in invalid]
        handed = events[-1].gateway_event_seq if events else self._handed
        pipe: Any
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.xadd(self._stream, {"v": _SCHEMA, "c": ROW_COLUMNS, "b": payload},
                              maxlen=self._stream_maxlen, approximate=True)
                if reports or trip_drops:
                    pipe.xadd(self._stream, encode_dropped(self.identity,
                                                           [*reports, *trip_drops]),
                              maxlen=self._stream_maxlen, approximate=True)
                pipe.hset(self._heartbeat_key, self.identity, orjson.dumps({
                    "assigned": self._emitted, "handed": handed, "at": time.time(),
                    "closed": closing}))
                await pipe.execute()
        except BaseException:
            self._unreported = reports + self._unreported  # reported with the next trip
            raise
        self._last_beat = now
        self._handed = handed
        for _ in range(count):
            self._buffer.popleft()
        self._sent += count - len(invalid)
        self._batches += len(payloads)
        if invalid:  # already reported in this trip's marker
            self._count_drop("invalid_event", len(invalid))

    @staticmethod
    def _encode(events: list[RequestEvent]) -> tuple[bytes, list[int]]:
        """The batch payload (b"" if no event in it is valid) and the numbers of the events
        left out: an event that cannot be serialised (a bug upstream of here) is dropped
        instead of blocking the stream."""
        try:
            return encode_rows(events), []
        except TypeError:
            good = []
            bad = []
            for event in events:
                try:
                    encode_rows([event])
                except TypeError:
                    event = _valid_utf8(event)
                    try:
                        encode_rows([event])
                    except TypeError:
                        bad.append(event.gateway_event_seq)
                        continue
                good.append(event)
            if bad:
                log.error("unserialisable events dropped", extra={"count": len(bad)})
            return (encode_rows(good) if good else b""), bad

    def _drop(self, reason: str, count: int, first_seq: int) -> None:
        """Count `count` dropped events numbered from `first_seq` and queue their report."""
        self._count_drop(reason, count)
        last = first_seq + count - 1
        if self._unreported:
            low, high, previous = self._unreported[-1]
            if previous == reason and high + 1 == first_seq:
                self._unreported[-1] = (low, last, reason)
                return
        self._unreported.append((first_seq, last, reason))

    def _count_drop(self, reason: str, count: int) -> None:
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
