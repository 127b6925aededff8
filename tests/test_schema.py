"""The ClickHouse schema: migrations, the events contract, rollups, retention (real chDB)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from analytics.models import Anomaly
from collector.clickhouse import make_client
from collector.schema import MIGRATIONS, apply_retention, migrate, retention_days
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
    for table in ("events_1m", "events_client_1m"):
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
    assert minute["clients"] == "AggregateFunction(uniq, String)"
    assert {"errors_5xx", "errors_4xx", "rate_limited", "auth_failures", "unmatched",
            "bytes_out", "duration_sum_ms"} <= set(minute)
    per_client = dict(_columns(client, "events_client_1m"))
    assert per_client["client"] == "String"
    assert per_client["paths"] == "AggregateFunction(uniq, String)"


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
    assert apply_retention(client, 7) == ["events", "events_1m", "events_client_1m"]
    assert apply_retention(client, 7) == []
    assert retention_days(client, "events_client_1m") == 7
