"""EventEmitter against real redis-servers: batching, bounds, exact drop counts, recovery."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from apigw.redis_server import RedisServer
from proxy.emitter import EventEmitter, SeqLedger, use_ledger
from proxy.event import RequestEvent, decode_batch, decode_dropped
from proxy.policy import RedisKeys

STREAM = "t:events"
HEARTBEATS = RedisKeys().event_emitters


def _event(n: int) -> RequestEvent:
    return RequestEvent(timestamp=time.time(), request_id=f"{n}-{uuid.uuid4().hex[:8]}",
                        http_request_method="GET", url_path=f"/orders/{n}",
                        http_response_status_code=200, duration_ms=1.5, route_id="orders",
                        http_route="/orders/{id}")


async def _read_all(client: aioredis.Redis) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    entries: Any = await client.xrange(STREAM)
    for _entry_id, fields in entries:
        if b"b" in fields:
            events.extend(decode_batch(fields[b"v"], fields[b"b"], fields.get(b"c")))
    return events


async def _dropped(client: aioredis.Redis) -> list[tuple[str, int, int, str]]:
    """Every range reported in "dropped" marker entries, in stream order."""
    entries: Any = await client.xrange(STREAM)
    return [(d.emitter, d.seq_from, d.seq_to, d.reason) for _entry_id, fields in entries
            if fields.get(b"k") == b"dropped" for d in decode_dropped(fields[b"d"])]


async def _heartbeat(client: aioredis.Redis, emitter: EventEmitter) -> dict[str, Any]:
    raw: Any = await client.hget(HEARTBEATS, emitter.identity)
    return dict(orjson.loads(raw))


async def _eventually(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {timeout}s")


def _balanced(emitter: EventEmitter) -> bool:
    s = emitter.stats
    return s["emitted"] == s["sent"] + s["dropped"] + s["buffered"]


async def test_every_event_reaches_the_stream_in_batches(redis_client: aioredis.Redis) -> None:
    emitter = EventEmitter(redis_client, STREAM, batch_size=100, flush_interval_s=0.05,
                           buffer_max=10_000, stream_maxlen=100_000)
    await emitter.start()
    try:
        for n in range(1234):
            emitter.emit(_event(n))
            if n % 200 == 0:
                await asyncio.sleep(0)
        await _eventually(lambda: emitter.stats["sent"] == 1234, 5.0)
    finally:
        await emitter.stop()
    events = await _read_all(redis_client)
    assert len(events) == 1234
    assert [e["url_path"] for e in events] == [f"/orders/{n}" for n in range(1234)]
    # numbered without gaps, all by this emitter (instance:pid:nonce)
    assert [e["gateway_event_seq"] for e in events] == list(range(1, 1235))
    assert {e["gateway_emitter"] for e in events} == {emitter.identity}
    assert emitter.identity.count(":") == 2
    assert 13 <= await redis_client.xlen(STREAM) <= 20  # batches, not one entry per event
    assert emitter.stats["dropped"] == 0
    assert _balanced(emitter)
    beat = await _heartbeat(redis_client, emitter)
    assert (beat["assigned"], beat["handed"], beat["closed"]) == (1234, 1234, True)
    assert await _dropped(redis_client) == []


async def test_an_idle_emitter_keeps_beating(redis_client: aioredis.Redis) -> None:
    emitter = EventEmitter(redis_client, STREAM, batch_size=100, flush_interval_s=0.05)
    await emitter.start()
    try:
        emitter.emit(_event(0))
        await _eventually(lambda: emitter.stats["sent"] == 1, 5.0)
        first = await _heartbeat(redis_client, emitter)
        await asyncio.sleep(0.3)
        later = await _heartbeat(redis_client, emitter)
        assert later["at"] > first["at"]
        assert (later["assigned"], later["handed"], later["closed"]) == (1, 1, False)
        assert await redis_client.xlen(STREAM) == 1  # beats are not stream entries
    finally:
        await emitter.stop()
    assert EventEmitter(redis_client, STREAM).identity != emitter.identity


async def test_stop_flushes_what_is_buffered(redis_client: aioredis.Redis) -> None:
    emitter = EventEmitter(redis_client, STREAM, batch_size=1000, flush_interval_s=60,
                           buffer_max=10_000, stream_maxlen=100_000)
    await emitter.start()
    for n in range(250):
        emitter.emit(_event(n))
    await emitter.stop(timeout_s=5)
    assert len(await _read_all(redis_client)) == 250
    assert emitter.stats == {"emitted": 250, "sent": 250, "dropped": 0, "buffered": 0,
                             "send_errors": 0, "batches": 1}
    emitter.emit(_event(999))  # after stop: counted, not lost silently, no exception
    assert emitter.dropped_by_reason == {"closed": 1}
    assert _balanced(emitter)


async def test_redis_down_bounds_buffer_counts_drops_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    client = aioredis.Redis.from_url(server.url)
    emitter = EventEmitter(client, STREAM, batch_size=50, flush_interval_s=0.05,
                           buffer_max=300, stream_maxlen=100_000, send_timeout_s=0.5,
                           max_backoff_s=0.3)
    await emitter.start()
    try:
        for n in range(100):
            emitter.emit(_event(n))
        await _eventually(lambda: emitter.stats["sent"] == 100, 5.0)

        server.stop()
        for n in range(100, 1100):
            emitter.emit(_event(n))
            if n % 100 == 0:
                await asyncio.sleep(0.02)
        stats = emitter.stats
        assert stats["buffered"] <= 300
        assert stats["dropped"] == 1100 - 100 - stats["buffered"] - (stats["sent"] - 100)
        assert emitter.dropped_by_reason.get("buffer_full", 0) == stats["dropped"]
        assert _balanced(emitter)
        await _eventually(lambda: emitter.stats["send_errors"] > 0, 5.0)

        server = RedisServer(tmp_path / "r", port=server.port).start()
        await _eventually(lambda: emitter.stats["buffered"] == 0, 10.0)
        stats = emitter.stats
        assert _balanced(emitter)
        assert stats["sent"] == 1100 - stats["dropped"]
        # The restarted server is empty: it holds exactly the backlog, the oldest events of the
        # outage in order (the newest were the ones dropped).
        stored = await _read_all(client)
        assert len(stored) == stats["sent"] - 100
        assert [e["url_path"] for e in stored] == [f"/orders/{n}"
                                                  for n in range(100, 100 + len(stored))]
        # ... and a marker saying exactly which numbers were dropped, and why
        assert [e["gateway_event_seq"] for e in stored] == list(range(101, 101 + len(stored)))
        assert await _dropped(client) == [(emitter.identity, 101 + len(stored), 1100,
                                           "buffer_full")]
        beat = await _heartbeat(client, emitter)
        assert (beat["assigned"], beat["handed"]) == (1100, 100 + len(stored))
    finally:
        await emitter.stop(timeout_s=1)
        await client.aclose()
        server.stop()


async def test_stop_with_redis_down_counts_the_rest_as_dropped(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    client = aioredis.Redis.from_url(server.url)
    emitter = EventEmitter(client, STREAM, batch_size=1000, flush_interval_s=60,
                           buffer_max=1000, stream_maxlen=100_000, send_timeout_s=0.3)
    try:
        await emitter.start()
        server.stop()
        for n in range(40):
            emitter.emit(_event(n))
        started = time.monotonic()
        await emitter.stop(timeout_s=0.5)
        assert time.monotonic() - started < 2.0
        assert emitter.stats["sent"] == 0
        assert emitter.stats["buffered"] == 0
        assert emitter.dropped_by_reason == {"shutdown": 40}
    finally:
        await client.aclose()
        server.stop()


async def test_unserialisable_event_is_dropped_not_blocking(
        redis_client: aioredis.Redis) -> None:
    emitter = EventEmitter(redis_client, STREAM, batch_size=10, flush_interval_s=0.05,
                           buffer_max=100, stream_maxlen=1000)
    await emitter.start()
    try:
        bad = _event(1)
        bad.url_path = object()  # type: ignore[assignment]  # a bug elsewhere in the proxy
        emitter.emit(_event(0))
        emitter.emit(bad)
        emitter.emit(_event(2))
        await _eventually(lambda: emitter.stats["buffered"] == 0, 5.0)
    finally:
        await emitter.stop()
    assert [e["url_path"] for e in await _read_all(redis_client)] == ["/orders/0", "/orders/2"]
    assert emitter.dropped_by_reason == {"invalid_event": 1}
    assert await _dropped(redis_client) == [(emitter.identity, 2, 2, "invalid_event")]
    assert _balanced(emitter)


async def test_emitters_publish_their_last_number_to_the_parents_ledger(
        redis_client: aioredis.Redis) -> None:
    """The memory a proxy worker shares with its parent: every number as it is assigned, the
    slot cleared when the emitter stops (a dead worker's parent reads what is left)."""
    context = multiprocessing.get_context("spawn")
    ledger = SeqLedger(context.RawArray("q", 2),
                       context.RawArray("c", 2 * SeqLedger.NAME_BYTES))
    use_ledger(ledger)
    try:
        first = EventEmitter(redis_client, STREAM, flush_interval_s=60)
        second = EventEmitter(redis_client, STREAM, flush_interval_s=60)
        too_long = EventEmitter(redis_client, STREAM, instance="x" * 200)
    finally:
        use_ledger(None)
    for n in range(7):
        first.emit(_event(n))
    second.emit(_event(99))
    too_long.emit(_event(100))
    assert ledger.marks() == {first.identity: 7, second.identity: 1}
    await first.start()
    await first.stop()
    assert ledger.marks() == {second.identity: 1}
    await second.stop()
    await too_long.stop()
    assert ledger.marks() == {}
