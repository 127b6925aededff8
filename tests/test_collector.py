"""The collector against a real Redis and a real embedded ClickHouse: counts must be exact."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from collector.clickhouse import SharedClient, make_client
from collector.consumer import COLUMNS, Collector, batch_token, build_batch, event_row
from collector.schema import DURATION_QUANTILES, migrate
from collector.settings import CollectorSettings
from proxy.event import EVENT_FIELDS, ROW_COLUMNS, RequestEvent, encode_batch, encode_rows
from tests.processes import ManagedProcess, managed

STREAM = "apigw:events"
DEAD = "apigw:events:dead"
ROUTES = [("orders", "GET", "/orders/{id}"), ("orders", "POST", "/orders"),
          ("users", "GET", "/users/{id}")]


@pytest.fixture
def ch(chdb_dsn: str) -> Iterator[SharedClient]:
    shared = SharedClient(chdb_dsn)
    try:
        migrate(shared.client)
        yield shared
    finally:
        shared.close()


def _settings(redis_url: str, chdb_dsn: str, name: str = "c1", **extra: Any) -> CollectorSettings:
    values: dict[str, Any] = {"redis_url": redis_url, "clickhouse_dsn": chdb_dsn,
                              "consumer_name": name, "block_ms": 50, "retry_initial_s": 0.05,
                              "retry_max_s": 0.2, **extra}
    return CollectorSettings(**values)


def make_events(n: int, start: int = 0, now: float | None = None) -> list[RequestEvent]:
    base = now if now is not None else time.time() - 120
    events = []
    for i in range(start, start + n):
        route_id, method, template = ROUTES[i % len(ROUTES)]
        events.append(RequestEvent(
            timestamp=base + i * 0.001, request_id=f"req-{i}", http_request_method=method,
            url_path=template.replace("{id}", str(i % 50)), http_response_status_code=(
                503 if i % 10 == 0 else 429 if i % 10 == 1 else 200),
            duration_ms=float(1 + i % 100), route_id=route_id, http_route=template,
            client_id=f"client-{i % 7}", client_address=f"10.0.0.{i % 7}",
            http_response_body_size=100, auth_outcome="failure" if i % 20 == 5 else "success",
            trace_id=f"{i:032x}"))
    return events


async def add_events(redis: aioredis.Redis, n: int, per_entry: int = 100,
                     start: int = 0) -> list[str]:
    """Write n events as entries of `per_entry` events; return the entry ids."""
    ids = []
    for offset in range(start, start + n, per_entry):
        batch = make_events(min(per_entry, start + n - offset), start=offset)
        entry_id = await redis.xadd(STREAM, {"v": b"1", "c": ROW_COLUMNS,
                                             "b": encode_rows(batch)})
        ids.append(entry_id.decode())
    return ids


def scalar(ch: SharedClient, sql: str) -> Any:
    with ch.lock:
        return ch.client.query(sql).result_rows[0][0]


def assert_counts(ch: SharedClient, n: int) -> None:
    """events and each rollup account for exactly n requests."""
    assert scalar(ch, "SELECT count() FROM events") == n
    assert scalar(ch, "SELECT uniqExact(request_id) FROM events") == n
    assert scalar(ch, "SELECT sum(requests) FROM events_1m") == n
    assert scalar(ch, "SELECT sum(requests) FROM events_client_1m") == n
    assert scalar(ch, "SELECT sum(requests) FROM events_status_1m") == n
    assert scalar(ch, "SELECT sum(requests) FROM events_address_1h") == n


async def pending(redis: aioredis.Redis, group: str = "collector") -> int:
    info = await redis.xpending(STREAM, group)
    return int(info["pending"])


async def test_events_land_exactly_once_with_consistent_rollups(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    n = 1_000
    await add_events(redis_client, n, per_entry=64)
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    assert await collector.drain() == n
    assert_counts(ch, n)
    assert collector.stats["rows_written"] == n
    assert collector.stats["dead_lettered"] == 0
    assert await pending(redis_client) == 0

    events = make_events(n)
    with ch.lock:
        minute = ch.client.query(
            "SELECT sum(errors_5xx), sum(errors_4xx), sum(rate_limited), sum(auth_failures), "
            "sum(unmatched), sum(bytes_out), sum(duration_sum_ms) FROM events_1m").result_rows[0]
        per_client = dict(ch.client.query(
            "SELECT client, sum(requests) FROM events_client_1m GROUP BY client").result_rows)
        per_route = ch.client.query(
            "SELECT route_id, http_request_method, http_route, sum(requests), "
            f"{DURATION_QUANTILES}, uniqMerge(clients) FROM events_1m "
            "GROUP BY route_id, http_request_method, http_route ORDER BY route_id, "
            "http_request_method").result_rows
        paths = ch.client.query(
            "SELECT uniqMerge(paths) FROM events_client_1m WHERE client = 'client-0' "
            "AND http_route = '/orders/{id}'").result_rows[0][0]
    status = [e.http_response_status_code for e in events]
    assert minute == (sum(s >= 500 for s in status), sum(400 <= s < 500 for s in status),
                      status.count(429), sum(e.auth_outcome == "failure" for e in events), 0,
                      100 * n, pytest.approx(sum(e.duration_ms for e in events)))
    assert per_client == {f"client-{k}": sum(e.client_id == f"client-{k}" for e in events)
                          for k in range(7)}
    assert [row[:4] for row in per_route] == [
        ("orders", "GET", "/orders/{id}", 334), ("orders", "POST", "/orders", 333),
        ("users", "GET", "/users/{id}", 333)]
    for *_, quantiles, clients in per_route:
        assert 1 <= quantiles[0] <= quantiles[1] <= quantiles[2] <= 100
        assert 40 <= quantiles[0] <= 60  # durations are uniform over 1..100
        assert clients == 7
    assert paths == len({e.url_path for e in events
                         if e.client_id == "client-0" and e.http_route == "/orders/{id}"})


async def test_a_row_keeps_every_field(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    millis = int(time.time() * 1000) - 60_000  # recent: older rows fall to the 30-day TTL
    event = RequestEvent(
        timestamp=millis / 1000, request_id="r-1", http_request_method="PUT",
        url_path="/a/1", http_response_status_code=502, duration_ms=12.5, trace_id="t" * 32,
        span_id="s" * 16, gateway_instance="gw-1", route_id="a", http_route="/a/{id}",
        url_query="x=1&token=[REDACTED]", url_scheme="https", server_address="api.example",
        network_protocol_version="2", client_address="192.0.2.1", user_agent_original="ua/1",
        http_request_body_size=10, http_response_body_size=20, upstream="127.0.0.1:9001",
        upstream_duration_ms=11.0, error_type="upstream_5xx", auth_outcome="success",
        auth_reason="", client_id="c", api_key_id="k", tenant="t", plan="gold",
        ratelimit_outcome="allowed", ratelimit_policy_id="p", ratelimit_mode="enforce",
        cache_outcome="miss", retries=2)
    await redis_client.xadd(STREAM, {"v": b"1", "b": encode_batch([event])})
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    assert await collector.drain() == 1
    with ch.lock:
        row = ch.client.query(
            "SELECT * EXCEPT timestamp, toUnixTimestamp64Milli(timestamp) FROM events"
        ).result_rows[0]
    expected = dataclasses.asdict(event)
    assert row[-1] == millis
    assert dict(zip(EVENT_FIELDS[1:], row[:-1], strict=True)) == {
        k: v for k, v in expected.items() if k != "timestamp"}


async def test_poison_entries_go_to_the_dead_letter_stream(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    await add_events(redis_client, 50, per_entry=50)
    bad_event = dataclasses.asdict(make_events(1, start=1000)[0]) | {
        "http_response_status_code": "teapot"}
    good_event = dataclasses.asdict(make_events(1, start=1001)[0])
    poison = [
        {"v": b"1", "b": b"this is not json"},
        {"v": b"9", "b": encode_batch(make_events(1))},
        {"something": b"else"},
        {"v": b"1", "b": orjson.dumps([{"request_id": "no other fields"}])},
        {"v": b"1", "b": orjson.dumps([good_event, bad_event])},  # one bad event of two
    ]
    poison_ids = [(await redis_client.xadd(STREAM, fields)).decode() for fields in poison]
    await add_events(redis_client, 50, per_entry=50, start=50)

    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    assert await collector.drain() == 101
    assert scalar(ch, "SELECT count() FROM events") == 101
    assert scalar(ch, "SELECT countIf(request_id = 'req-1001') FROM events") == 1
    assert collector.stats["dead_lettered"] == 5
    assert await pending(redis_client) == 0

    dead = await redis_client.xrange(DEAD)
    assert [fields[b"source_id"].decode() for _, fields in dead] == poison_ids
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert "not JSON" in reasons[0]
    assert "unsupported event schema version 9" in reasons[1]
    assert "lacks the fields v and b" in reasons[2]
    assert "lacks required fields" in reasons[3]
    assert "http_response_status_code" in reasons[4]
    assert dead[0][1][b"b"] == b"this is not json"  # the original fields travel along
    assert dead[2][1][b"something"] == b"else"
    assert orjson.loads(dead[4][1][b"b"]) == [bad_event]  # only the bad event


async def test_poison_rows_entries_go_to_the_dead_letter_stream(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    """The emitter's rows format: a bad `c`, rows of the wrong width and a bad value are dead
    letters (only the bad event of a batch); a `c` without optional fields fills defaults."""
    good, bad = make_events(2, start=2000)
    bad_row = list(dataclasses.astuple(bad))
    bad_row[EVENT_FIELDS.index("http_response_status_code")] = 70_000  # past UInt16
    required = [name for name in EVENT_FIELDS if name not in ("tenant", "plan")]
    short = dataclasses.asdict(make_events(1, start=2002)[0])
    entries = [
        {"v": b"1", "c": b"timestamp,,url_path", "b": b"[]"},
        {"v": b"1", "c": b"timestamp,timestamp", "b": b"[]"},
        {"v": b"1", "c": ROW_COLUMNS, "b": orjson.dumps([[1.0, "too few values"]])},
        {"v": b"1", "c": ROW_COLUMNS,
         "b": orjson.dumps([list(dataclasses.astuple(good)), bad_row])},
        {"v": b"1", "c": ",".join(required).encode(),
         "b": orjson.dumps([[short[name] for name in required]])},
    ]
    ids = [(await redis_client.xadd(STREAM, fields)).decode() for fields in entries]
    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    assert await collector.drain() == 2
    assert scalar(ch, "SELECT count() FROM events") == 2
    assert scalar(ch, "SELECT countIf(request_id = 'req-2000') FROM events") == 1
    assert scalar(ch, "SELECT tenant FROM events WHERE request_id = 'req-2002'") == ""
    dead = await redis_client.xrange(DEAD)
    assert [fields[b"source_id"].decode() for _, fields in dead] == ids[:4]
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert all("not distinct non-empty names" in reason for reason in reasons[:2]), reasons
    assert "rows of" in reasons[2]
    assert "http_response_status_code" in reasons[3]
    assert [event["request_id"] for event in orjson.loads(dead[3][1][b"b"])] == ["req-2001"]


async def test_crash_between_insert_and_ack_duplicates_nothing(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    class CrashAfterInsert(Collector):
        async def _ack(self, batch: Any) -> None:
            raise RuntimeError("crashed after the insert, before XACK")

    n = 500
    await add_events(redis_client, n, per_entry=50)
    settings = _settings(redis_url, chdb_dsn, name="c1", read_count=4)
    crashing = CrashAfterInsert(settings, redis_client, ch)
    with pytest.raises(RuntimeError, match="crashed"):
        await crashing.step(asyncio.Event())
    assert scalar(ch, "SELECT count() FROM events") == 200  # inserted, never acknowledged
    assert await pending(redis_client) == 8  # that batch, and the next one, read ahead

    restarted = Collector(settings, redis_client, ch)
    assert await restarted.drain() == n  # re-inserted the first batch: deduplicated
    assert_counts(ch, n)
    assert await pending(redis_client) == 0


async def test_a_dead_consumers_entries_are_reclaimed_once(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    class DiesAfterInsert(Collector):
        async def _ack(self, batch: Any) -> None:
            raise RuntimeError("died")

    n = 300
    await add_events(redis_client, n, per_entry=30)
    dead = DiesAfterInsert(_settings(redis_url, chdb_dsn, name="dead", read_count=3),
                           redis_client, ch)
    with pytest.raises(RuntimeError):
        await dead.step(asyncio.Event())
    # a second consumer whose batch never got inserted at all
    await redis_client.xreadgroup("collector", "dead-too", {STREAM: ">"}, count=2)
    await asyncio.sleep(0.15)

    alive = Collector(_settings(redis_url, chdb_dsn, name="alive", read_count=3,
                                claim_idle_ms=100), redis_client, ch)
    assert await alive.drain() == n
    assert alive.stats["reclaimed"] == 8  # 3 inserted + 3 read ahead, and the other's 2
    assert_counts(ch, n)
    assert await pending(redis_client) == 0


async def test_two_collectors_split_the_work(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    n = 2_000
    first = Collector(_settings(redis_url, chdb_dsn, name="a", read_count=5), redis_client, ch)
    second = Collector(_settings(redis_url, chdb_dsn, name="b", read_count=5), redis_client, ch)

    async def produce() -> None:
        for start in range(0, n, 200):
            await add_events(redis_client, 200, per_entry=20, start=start)
            await asyncio.sleep(0.01)

    await asyncio.gather(produce(), first.drain(idle_s=1.0), second.drain(idle_s=1.0))
    assert first.stats["rows_written"] > 0
    assert second.stats["rows_written"] > 0
    assert first.stats["rows_written"] + second.stats["rows_written"] == n
    assert_counts(ch, n)
    assert await pending(redis_client) == 0


async def test_clickhouse_outage_keeps_entries_pending_until_it_returns(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    n = 400
    ids = await add_events(redis_client, n, per_entry=100)
    collector = Collector(_settings(redis_url, chdb_dsn, read_count=2), redis_client, ch)
    ch.close()  # ClickHouse is gone: every insert fails
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        for _ in range(200):
            if collector.stats["insert_errors"] >= 3:
                break
            await asyncio.sleep(0.05)
        assert collector.stats["insert_errors"] >= 3
        assert collector.stats["rows_written"] == 0
        assert await pending(redis_client) == 4  # a batch and the one read ahead, not acked
        await collector.update_lag()
        assert collector.stats["lag_entries"] >= 2

        with ch.lock:
            ch.client = make_client(chdb_dsn)  # ClickHouse is back
        for _ in range(200):
            if collector.stats["rows_written"] == n:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert_counts(ch, n)
    assert await pending(redis_client) == 0
    assert len(ids) == 4


async def test_stop_during_an_outage_leaves_the_batch_for_the_next_run(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    await add_events(redis_client, 100, per_entry=50)
    settings = _settings(redis_url, chdb_dsn)
    ch.close()
    first = Collector(settings, redis_client, ch)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    while first.stats["insert_errors"] == 0:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert await pending(redis_client) == 2

    with ch.lock:
        ch.client = make_client(chdb_dsn)
    assert await Collector(settings, redis_client, ch).drain() == 100
    assert_counts(ch, 100)


async def test_lag_seconds_and_entries(
        redis_client: aioredis.Redis, redis_url: str, chdb_dsn: str, ch: SharedClient) -> None:
    from collector import metrics

    collector = Collector(_settings(redis_url, chdb_dsn), redis_client, ch)
    assert await collector.drain(idle_s=0.1) == 0
    old = int(time.time() * 1000) - 5_000
    await redis_client.xadd(STREAM, {"v": b"1", "b": encode_batch(make_events(3))},
                            id=f"{old}-0")
    await collector.update_lag()
    assert metrics.LAG_SECONDS._value.get() >= 4.5
    await collector.drain(idle_s=0.1)
    assert metrics.LAG_SECONDS._value.get() == 0
    assert collector.stats["lag_entries"] == 0


def test_converters_cover_every_event_field() -> None:
    assert [c.name for c in COLUMNS] == list(EVENT_FIELDS)
    row = event_row(dataclasses.asdict(make_events(1)[0]))
    assert len(row) == len(EVENT_FIELDS)
    assert isinstance(row[0], float)  # seconds; made DateTime64(3) ticks column-wise


def test_batch_token_depends_on_entry_ids_only() -> None:
    assert batch_token(["2-0", "1-0"]) == batch_token(["1-0", "2-0"])
    assert batch_token(["1-0"]) != batch_token(["1-1"])
    entries = [("1-0", {b"v": b"1", b"b": encode_batch(make_events(2))})]
    assert build_batch(entries).rows == 2


# -- the service process ---------------------------------------------------------------------


def _service_env(redis_url: str, chdb_dsn: str, port: int, name: str = "svc",
                 **extra: str) -> dict[str, str]:
    return {"APIGW_REDIS_URL": redis_url, "APIGW_CLICKHOUSE_DSN": chdb_dsn,
            "APIGW_LISTEN": f"127.0.0.1:{port}", "APIGW_CONSUMER_NAME": name,
            "APIGW_BLOCK_MS": "100", **extra}


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _add_events_sync(redis_url: str, n: int, per_entry: int) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        for start in range(0, n, per_entry):
            client.xadd(STREAM, {"v": b"1", "b": encode_batch(make_events(per_entry, start))})
    finally:
        client.close()


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _count_rows(chdb_dsn: str) -> tuple[int, int, int]:
    client = make_client(chdb_dsn)
    try:
        return tuple(client.query(  # type: ignore[return-value]
            "SELECT (SELECT count() FROM events), (SELECT sum(requests) FROM events_1m), "
            "(SELECT sum(requests) FROM events_client_1m)").result_rows[0])
    finally:
        client.close()


def test_service_serves_admin_endpoints_and_stops_cleanly(
        redis_url: str, chdb_dsn: str, port: int, tmp_path: Path) -> None:
    n = 1_000
    _add_events_sync(redis_url, n, per_entry=100)
    base = f"http://127.0.0.1:{port}"
    with managed("collector", [sys.executable, "-m", "collector.service"],
                 _service_env(redis_url, chdb_dsn, port), tmp_path) as service:
        service.wait_http(f"{base}/healthz")
        _wait(lambda: _get_json(f"{base}/readyz")[1]["stats"]["rows_written"] == n, 60,
              "the service to store the events")
        status, ready = _get_json(f"{base}/readyz")
        assert status == 200
        assert ready["redis"] == "ok"
        assert ready["clickhouse"] == "ok"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert f"apigw_collector_rows_written_total {float(n)}" in text
        assert "apigw_collector_lag_seconds" in text
        assert service.stop() == 0
        assert '"collector stopped"' in service.log()
    assert _count_rows(chdb_dsn) == (n, n, n)


def test_service_refuses_a_store_another_process_holds(
        redis_url: str, chdb_dsn: str, port: int, tmp_path: Path) -> None:
    holder = make_client(chdb_dsn)  # this test process owns the embedded store
    try:
        with managed("collector", [sys.executable, "-m", "collector.service"],
                     _service_env(redis_url, chdb_dsn, port), tmp_path) as service:
            assert service.process.wait(timeout=60) == 1
            assert "refusing to start" in service.log()
            assert "one process only" in service.log()
    finally:
        holder.close()


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(
        redis_url: str, chdb_dsn: str, port: int, tmp_path: Path) -> None:
    n = 40_000
    _add_events_sync(redis_url, n, per_entry=200)
    base = f"http://127.0.0.1:{port}"
    env = _service_env(redis_url, chdb_dsn, port, APIGW_READ_COUNT="5")
    first = ManagedProcess("collector-1", [sys.executable, "-m", "collector.service"], env,
                           tmp_path)
    try:
        first.wait_http(f"{base}/healthz")
        _wait(lambda: _get_json(f"{base}/readyz")[1]["stats"]["rows_written"] > 0, 60,
              "the first rows")
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
    finally:
        first.stop()
    client = sync_redis.Redis.from_url(redis_url)
    try:
        at_kill = _count_rows(chdb_dsn)[0]
        print(f"rows at SIGKILL: {at_kill}, pending entries: "
              f"{client.xpending(STREAM, 'collector')['pending']}")
        assert 0 < at_kill < n  # killed mid-stream
        with managed("collector-2", [sys.executable, "-m", "collector.service"], env,
                     tmp_path) as second:
            second.wait_http(f"{base}/healthz")
            _wait(lambda: int(client.xpending(STREAM, "collector")["pending"]) == 0 and
                  _get_json(f"{base}/readyz")[1]["stats"]["lag_entries"] == 0 and
                  client.xinfo_groups(STREAM)[0]["last-delivered-id"] ==
                  client.xinfo_stream(STREAM)["last-generated-id"], 120, "the backlog")
            assert second.stop() == 0
    finally:
        client.close()
    assert _count_rows(chdb_dsn) == (n, n, n)


def test_repeated_insert_after_reopening_the_store_is_deduplicated_in_rollups(
        chdb_dsn: str) -> None:
    """A batch inserted by the process that ran the migrations, then inserted again with the
    same token after a restart (crash between insert and XACK), counts once everywhere."""
    entries = [(f"100-{i}", {b"v": b"1", b"b": encode_batch(make_events(5, start=5 * i))})
               for i in range(3)]
    token = batch_token([entry_id for entry_id, _ in entries])
    for _ in range(2):  # the second client reloads the schema from disk, as a restart does
        ch = SharedClient(chdb_dsn)
        try:
            migrate(ch.client)
            ch.client.insert_arrow(
                "events", build_batch(entries).table,
                settings={"insert_deduplication_token": token,
                          "deduplicate_blocks_in_dependent_materialized_views": 1})
            assert_counts(ch, 15)
        finally:
            ch.close()
