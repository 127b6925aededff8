"""The ClickHouse schema: migrations, the events contract, rollups, retention (real chDB)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from clickhouse_connect.driver.client import Client

from analytics.models import Anomaly
from collector.clickhouse import make_client
from collector.schema import (
    DURATION_QUANTILES,
    MIGRATIONS,
    ROLLUP_TABLES,
    apply_retention,
    migrate,
    retention_days,
)
from proxy.event import EVENT_FIELDS


@pytest.fixture
def client(chdb_dsn: str) -> Iterator[Client]:
    client = make_client(chdb_dsn)
    try:
        yield client
    finally:
        client.close()


def _columns(client: Client, table: str) -> list[tuple[str, str]]:
    result = client.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
        "AND table = {table:String} ORDER BY position", parameters={"table": table})
    return [(str(name), str(kind)) for name, kind in result.result_rows]


def test_migrations_are_idempotent_and_recorded(client: Client) -> None:
    assert migrate(client) == [name for _, name, _ in MIGRATIONS]
    assert migrate(client) == []
    rows = client.query("SELECT version, name FROM schema_migrations FINAL ORDER BY version")
    assert rows.result_rows == [(version, name) for version, name, _ in MIGRATIONS]


def test_a_new_migration_is_applied_once(client: Client) -> None:
    migrate(client)
    extra = [*MIGRATIONS, (99, "probe", ["CREATE TABLE IF NOT EXISTS probe (x UInt8) "
                                         "ENGINE = MergeTree ORDER BY x"])]
    assert migrate(client, extra) == ["probe"]
    assert migrate(client, extra) == []


def test_events_columns_are_the_event_contract(client: Client) -> None:
    migrate(client)
    assert [name for name, _ in _columns(client, "events")] == list(EVENT_FIELDS)
    types = dict(_columns(client, "events"))
    assert types["timestamp"] == "DateTime64(3, 'UTC')"
    assert types["route_id"] == "LowCardinality(String)"
    assert types["http_response_status_code"] == "UInt16"


def test_events_table_layout(client: Client) -> None:
    migrate(client)
    engine = client.query("SELECT engine, partition_key, sorting_key, engine_full "
                          "FROM system.tables WHERE name = 'events' "
                          "AND database = currentDatabase()").result_rows[0]
    assert engine[0] == "MergeTree"
    assert engine[1] == "toDate(timestamp)"
    assert engine[2] == "route_id, http_request_method, http_route, timestamp"
    assert "non_replicated_deduplication_window = 10000" in engine[3]
    indexes = client.query("SELECT name, expr, type FROM system.data_skipping_indices "
                           "WHERE table = 'events' AND database = currentDatabase() "
                           "ORDER BY name").result_rows
    assert indexes == [("idx_request_id", "request_id", "bloom_filter"),
                       ("idx_trace_id", "trace_id", "bloom_filter")]


def test_rollup_tables(client: Client) -> None:
    migrate(client)
    for table in ROLLUP_TABLES:
        setting = client.query("SELECT engine, engine_full FROM system.tables WHERE name = "
                               "{t:String} AND database = currentDatabase()",
                               parameters={"t": table}).result_rows[0]
        assert setting[0] == "AggregatingMergeTree"
        # without it the views double-count an insert repeated with the same token
        assert "non_replicated_deduplication_window" in setting[1]
    minute = dict(_columns(client, "events_1m"))
    assert minute["minute"] == "DateTime('UTC')"
    assert minute["requests"] == "SimpleAggregateFunction(sum, UInt64)"
    assert minute["duration_q"] == "AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64)"
    assert minute["duration_td"] == \
        "AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64)"
    assert minute["clients"] == "AggregateFunction(uniq, String)"
    assert {"errors_5xx", "errors_4xx", "rate_limited", "auth_failures", "unmatched",
            "bytes_out", "duration_sum_ms"} <= set(minute)
    per_client = dict(_columns(client, "events_client_1m"))
    assert per_client["client"] == "String"
    assert per_client["paths"] == "AggregateFunction(uniq, String)"
    per_address = dict(_columns(client, "events_address_1h"))
    assert per_address["hour"] == "DateTime('UTC')"
    assert per_address["requests"] == "SimpleAggregateFunction(sum, UInt64)"


def test_anomalies_mirror_the_model(client: Client) -> None:
    migrate(client)
    names = [name for name, _ in _columns(client, "anomalies")]
    flattened = []
    for field in Anomaly.model_fields:
        flattened += ["route_id", "http_request_method", "http_route"] \
            if field == "endpoint" else [field]
    assert sorted(names) == sorted(flattened)


def test_retention_is_applied_from_settings(client: Client) -> None:
    migrate(client)
    assert retention_days(client, "events") == 30
    assert apply_retention(client, 30) == []
    assert apply_retention(client, 7) == ["events", "events_1m", "events_client_1m",
                                          "events_status_1m", "events_address_1h",
                                          "event_seq_blocks", "event_loss"]
    assert apply_retention(client, 7) == []
    assert retention_days(client, "events_client_1m") == 7


_INSERT_DURATIONS = (
    "INSERT INTO events (timestamp, route_id, http_request_method, http_route, duration_ms) "
    "SELECT toDateTime64({minute:UInt32} + number % 60, 3, 'UTC'), 'r', 'GET', '/r', "
    "arrayElement({durations:Array(Float64)}, number + 1) "
    "FROM numbers(length({durations:Array(Float64)}))")
_MINUTE_QUANTILES = (
    f"SELECT minute, sum(requests), {DURATION_QUANTILES} FROM events_1m "
    "GROUP BY minute ORDER BY minute")


def _insert(client: Client, minute: int, durations: np.ndarray) -> None:
    client.command(_INSERT_DURATIONS, parameters={"minute": minute,
                                                  "durations": durations.tolist()})


def _close(found: list[float], exact: np.ndarray, tolerance: float) -> None:
    for value, want in zip(found, exact, strict=True):
        assert abs(value - want) <= tolerance * want, (found, list(exact))


def test_latency_tdigest_is_accurate_and_old_rows_stay_readable(client: Client) -> None:
    """Migration 4 switches the view to a t-digest: rows written before keep their reservoir
    state and are still read; new rows give quantiles within t-digest accuracy; applying its
    statements again changes nothing."""
    migrate(client, [m for m in MIGRATIONS if m[0] < 4])
    rng = np.random.default_rng(7)
    before = rng.lognormal(3.0, 0.8, 5_000)  # long-tailed, like latency: median ~20 ms
    after = rng.lognormal(4.0, 0.6, 20_000)
    first = int(time.time()) // 60 * 60 - 3600  # recent: the TTL drops older parts
    second = first + 60
    _insert(client, first, before)
    assert migrate(client) == ["rollup_latency_tdigest", "reload_events_1m_mv",
                               "event_loss_accounting", "status_rollup_1m", "address_rollup_1h"]
    [(_, _, statements)] = [m for m in MIGRATIONS if m[0] == 4]
    for statement in statements:  # interrupted and run again: harmless
        client.command(statement)
    assert migrate(client) == []
    _insert(client, second, after)
    _insert(client, second, after[:1000])  # a second insert block: states merged at read
    rows = client.query(_MINUTE_QUANTILES).result_rows
    assert [(int(row[0].timestamp()), row[1]) for row in rows] == [(first, 5_000),
                                                                   (second, 21_000)]
    levels = [0.5, 0.95, 0.99]
    # rows from before: the reservoir keeps every value below 8,192 per minute
    _close(rows[0][2], np.quantile(before, levels, method="lower"), 0.01)
    # t-digest: measured worst error ~1-2% at these sizes; 5% bounds it with margin
    _close(rows[1][2], np.quantile(np.concatenate([after, after[:1000]]), levels), 0.05)
    new_rows = client.query("SELECT count() FROM events_1m WHERE minute = toDateTime({m:UInt32}) "
                            "AND isFinite(finalizeAggregation(duration_q)[1])",
                            parameters={"m": second}).result_rows
    assert new_rows == [(0,)]  # the view no longer fills the reservoir state


_INSERT_STATUSES = (
    "INSERT INTO events (timestamp, route_id, http_request_method, http_route, "
    "http_response_status_code, error_type) "
    "SELECT toDateTime64({minute:UInt32} + number, 3, 'UTC'), 'r', 'GET', '/r', "
    "arrayElement({statuses:Array(UInt16)}, number + 1), "
    "if(arrayElement({statuses:Array(UInt16)}, number + 1) >= 500, 'upstream_status_5xx', '') "
    "FROM numbers(length({statuses:Array(UInt16)}))")
_STATUS_COUNTS = ("SELECT status, error_type, sum(requests) FROM events_status_1m "
                  "GROUP BY status, error_type ORDER BY status")


def test_status_rollup_backfills_events_from_before_it_once(client: Client) -> None:
    """Migration 7 rolls up the events already stored, then its view takes the new ones; its
    steps run again (an interrupted migration) count nothing twice."""
    migrate(client, [m for m in MIGRATIONS if m[0] < 7])
    minute = int(time.time()) // 60 * 60 - 600
    client.command(_INSERT_STATUSES, parameters={"minute": minute,
                                                 "statuses": [200, 200, 200, 503, 503]})
    assert migrate(client, [m for m in MIGRATIONS if m[0] <= 7]) == ["status_rollup_1m"]
    assert client.query(_STATUS_COUNTS).result_rows == [(200, "", 3),
                                                        (503, "upstream_status_5xx", 2)]
    [(_, _, steps)] = [m for m in MIGRATIONS if m[0] == 7]
    for step in steps:
        client.command(step) if isinstance(step, str) else step(client)
    client.command(_INSERT_STATUSES, parameters={"minute": minute + 60, "statuses": [503, 404]})
    assert client.query(_STATUS_COUNTS).result_rows == [(200, "", 3), (404, "", 1),
                                                        (503, "upstream_status_5xx", 3)]


_INSERT_ADDRESSES = (
    "INSERT INTO events (timestamp, route_id, http_request_method, http_route, client_address) "
    "SELECT toDateTime64({second:UInt32} + number, 3, 'UTC'), 'r', 'GET', '/r', "
    "arrayElement({addresses:Array(String)}, number + 1) "
    "FROM numbers(length({addresses:Array(String)}))")
_ADDRESS_COUNTS = ("SELECT toUInt32(hour), client_address, sum(requests) FROM events_address_1h "
                   "GROUP BY hour, client_address ORDER BY hour, client_address")


def test_address_rollup_backfills_events_from_before_it_once(client: Client) -> None:
    """Migration 8 rolls up the events already stored by hour and address, then its view
    takes the new ones; its steps run again count nothing twice."""
    migrate(client, [m for m in MIGRATIONS if m[0] < 8])
    hour = int(time.time()) // 3600 * 3600 - 7200
    client.command(_INSERT_ADDRESSES, parameters={
        "second": hour + 3598, "addresses": ["10.0.0.1", "10.0.0.2", "10.0.0.1"]})
    assert migrate(client) == ["address_rollup_1h"]
    assert client.query(_ADDRESS_COUNTS).result_rows == [
        (hour, "10.0.0.1", 1), (hour, "10.0.0.2", 1), (hour + 3600, "10.0.0.1", 1)]
    [(_, _, steps)] = [m for m in MIGRATIONS if m[0] == 8]
    for step in steps:
        client.command(step) if isinstance(step, str) else step(client)
    client.command(_INSERT_ADDRESSES, parameters={"second": hour + 3600,
                                                  "addresses": ["10.0.0.1", "10.0.0.3"]})
    assert client.query(_ADDRESS_COUNTS).result_rows == [
        (hour, "10.0.0.1", 1), (hour, "10.0.0.2", 1), (hour + 3600, "10.0.0.1", 2),
        (hour + 3600, "10.0.0.3", 1)]
