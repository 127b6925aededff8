"""Loss accounting (collector/loss.py) against a real Redis and chDB: stream entries written as
the emitter writes them, heartbeats as the emitter beats, then the collector and its
accountant. The end-to-end cases (MAXLEN trimming through the gateway, a SIGKILLed worker) are
in tests/test_pipeline_loss.py and tests/test_fault_workers.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from collector.clickhouse import SharedClient
from collector.consumer import Collector
from collector.loss import LossAccountant, holes, lost_by_reason, ranges_of
from collector.schema import migrate
from collector.settings import CollectorSettings
from proxy.event import RequestEvent, encode_batch, encode_dropped
from proxy.policy import RedisKeys

STREAM = "apigw:events"
KEYS = RedisKeys()
EMITTER = "gw-test:4242:0badcafe"


@pytest.fixture
def ch(chdb_dsn: str) -> Iterator[SharedClient]:
    client = SharedClient(chdb_dsn)
    try:
        with client.lock:
            migrate(client.client)
        yield client
    finally:
        client.close()


def _settings(redis_url: str, chdb_dsn: str, name: str = "c1",
              grace_s: float = 60) -> CollectorSettings:
    return CollectorSettings(redis_url=redis_url, clickhouse_dsn=chdb_dsn, consumer_name=name,
                             block_ms=20, read_count=2, loss_check_interval_s=0.1,
                             emitter_grace_s=grace_s, loss_clock_margin_ms=0)


def _event(seq: int, emitter: str = EMITTER) -> RequestEvent:
    return RequestEvent(timestamp=time.time(), request_id=f"r-{emitter}-{seq}",
                        http_request_method="GET", url_path=f"/orders/{seq}",
                        http_response_status_code=200, duration_ms=1.0, route_id="orders",
                        http_route="/orders/{id}", gateway_emitter=emitter,
                        gateway_event_seq=seq)


async def _entry(redis: aioredis.Redis, seqs: list[int], emitter: str = EMITTER) -> None:
    await redis.xadd(STREAM, {"v": "1", "b": encode_batch([_event(s, emitter) for s in seqs])})


async def _beat(redis: aioredis.Redis, assigned: int, handed: int, closed: bool = False,
                emitter: str = EMITTER, at: float | None = None) -> None:
    await redis.hset(KEYS.event_emitters, emitter, orjson.dumps({
        "assigned": assigned, "handed": handed, "at": at or time.time(), "closed": closed}))


def _ranges(ch: SharedClient) -> list[tuple[str, int, int, str]]:
    with ch.lock:
        return [(str(e), int(a), int(b), str(r)) for e, a, b, r in ch.client.query(
            "SELECT emitter, seq_from, seq_to, reason FROM event_loss FINAL "
            "ORDER BY emitter, seq_from").result_rows]


def test_holes_and_ranges() -> None:
    assert holes(1, 10, []) == [(1, 10)]
    assert holes(1, 10, [(1, 3), (5, 5), (4, 4), (9, 12)]) == [(6, 8)]
    assert holes(3, 7, [(1, 2), (8, 9)]) == [(3, 7)]
    assert holes(1, 5, [(1, 5), (2, 3)]) == []
    assert ranges_of("e", [5, 3, 4, 9, 4], "x") == [
        ranges_of("e", [3, 4, 5], "x")[0], ranges_of("e", [9], "x")[0]]
    assert [(r.seq_from, r.seq_to, r.events) for r in ranges_of("e", [5, 3, 4, 9], "x")] == [
        (3, 5, 3), (9, 9, 1)]


async def test_a_closed_emitter_is_settled_exactly(redis_client: aioredis.Redis, redis_url: str,
                                                   chdb_dsn: str, ch: SharedClient) -> None:
    """Entries 1-4, 6-8 (5 vanished: trimmed), a dropped marker for 9-10, the batch 11-12 stored
    twice (a resent write), and a closing heartbeat: 14 assigned, 12 handed."""
    await _entry(redis_client, [1, 2, 3, 4])
    await _entry(redis_client, [6, 7, 8])
    await redis_client.xadd(STREAM, encode_dropped(EMITTER, [(9, 10, "buffer_full")]))
    await _entry(redis_client, [11, 12])
    await _entry(redis_client, [11, 12])
    await _beat(redis_client, assigned=14, handed=12, closed=True)
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    await collector.drain(idle_s=0.2)
    found = await collector.accountant.check()
    assert [(r.seq_from, r.seq_to, r.reason) for r in found] == [
        (5, 5, "trimmed"), (13, 14, "worker_killed")]
    assert _ranges(ch) == [(EMITTER, 5, 5, "trimmed"), (EMITTER, 9, 10, "dropped_buffer_full"),
                           (EMITTER, 13, 14, "worker_killed")]
    with ch.lock:
        assert lost_by_reason(ch.client) == {"trimmed": 1, "dropped_buffer_full": 2,
                                             "worker_killed": 2}
    # settled: forgotten in Redis, and a second check finds nothing new
    assert not await redis_client.hexists(KEYS.event_emitters, EMITTER)
    assert await collector.accountant.check() == []
    # a new accountant (a restarted collector) does not count anything twice either
    await _beat(redis_client, assigned=14, handed=12, closed=True)
    again = LossAccountant(_settings(redis_url, chdb_dsn), redis_client, ch)
    assert await again.check() == []


async def test_a_live_emitter_is_settled_up_to_an_earlier_heartbeat(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    await _entry(redis_client, [1, 2])
    await _entry(redis_client, [5, 6])  # 3-4 trimmed
    await _beat(redis_client, assigned=7, handed=6)
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    await collector.drain(idle_s=0.2)
    accountant = collector.accountant
    assert await accountant.check() == []  # first sight of this heartbeat: nothing vouched yet
    await _entry(redis_client, [7, 8])
    await _beat(redis_client, assigned=9, handed=8)
    await collector.drain(idle_s=0.2)
    found = await accountant.check()  # settles up to the previous heartbeat's handed (6)
    assert [(r.seq_from, r.seq_to, r.reason) for r in found] == [(3, 4, "trimmed")]
    assert await redis_client.hexists(KEYS.event_emitters, EMITTER)  # still live
    await _beat(redis_client, assigned=9, handed=8)
    assert await accountant.check() == []  # 7-8 stored


async def test_a_dead_worker_is_settled_from_its_parents_record(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    await _entry(redis_client, [1, 2, 3])
    await _beat(redis_client, assigned=5, handed=3)
    await redis_client.hset(KEYS.event_emitter_deaths, EMITTER,
                            orjson.dumps({"assigned": 11, "at": time.time()}))
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    await collector.drain(idle_s=0.2)
    found = await collector.accountant.check()
    assert [(r.seq_from, r.seq_to, r.reason) for r in found] == [(4, 11, "worker_killed")]
    assert not await redis_client.exists(KEYS.event_emitters, KEYS.event_emitter_deaths)


async def test_a_silent_emitter_is_finished_after_the_grace_period(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    """No parent recorded the death (the whole proxy was killed): the heartbeat stops changing.
    A heartbeat from the past alone (clock skew, a Redis outage) is not taken for a death:
    the grace period runs on the accountant's clock, from when it saw the heartbeat."""
    await _entry(redis_client, [1, 2, 3])
    await _beat(redis_client, assigned=6, handed=3, at=time.time() - 3600)
    collector = Collector(_settings(redis_url, chdb_dsn, grace_s=0.5), redis_client, ch)
    await collector.drain(idle_s=0.2)
    accountant = collector.accountant
    assert await accountant.check() == []  # just seen: live
    await asyncio.sleep(0.6)
    found = await accountant.check()
    assert [(r.seq_from, r.seq_to, r.reason) for r in found] == [(4, 6, "worker_killed")]
    assert not await redis_client.hexists(KEYS.event_emitters, EMITTER)


async def test_nothing_is_settled_while_the_emitters_entries_wait(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    """A finished emitter whose entries are not all acknowledged yet is left for later."""
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    await collector.drain(idle_s=0.1)  # creates the group
    await _entry(redis_client, [1, 2])
    await _beat(redis_client, assigned=2, handed=2, closed=True)
    assert await collector.accountant.check() == []  # the entry is undelivered
    assert await redis_client.hexists(KEYS.event_emitters, EMITTER)
    await collector.drain(idle_s=0.2)
    assert await collector.accountant.check() == []  # stored: nothing lost
    assert not await redis_client.hexists(KEYS.event_emitters, EMITTER)


async def test_a_poison_marker_is_dead_lettered(redis_client: aioredis.Redis, redis_url: str,
                                                chdb_dsn: str, ch: SharedClient) -> None:
    await redis_client.xadd(STREAM, {"v": "1", "k": "dropped", "d": b'{"emitter": 3}'})
    await redis_client.xadd(STREAM, {"v": "1", "k": "weird", "d": b"{}"})
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    await collector.drain(idle_s=0.2)
    dead: Any = await redis_client.xrange("apigw:events:dead")
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert len(reasons) == 2
    assert "dropped marker is not valid" in reasons[0]
    assert "unknown entry kind" in reasons[1]
    assert _ranges(ch) == []


async def test_only_one_accountant_acts(redis_client: aioredis.Redis, redis_url: str,
                                        chdb_dsn: str, ch: SharedClient) -> None:
    first = LossAccountant(_settings(redis_url, chdb_dsn, "a"), redis_client, ch)
    second = LossAccountant(_settings(redis_url, chdb_dsn, "b"), redis_client, ch)
    assert await first._lease(0.1)
    assert not await second._lease(0.1)
    assert await first._lease(0.1)  # renewed by its holder
