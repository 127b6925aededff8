"""The ClickHouse schema: versioned migrations, applied by the collector at start.

Each migration is (version, name, steps): SQL statements, or functions of the client where one
statement cannot say it (a backfill). Steps are idempotent (`IF NOT EXISTS`), so a migration
interrupted half-way is simply run again; a version is recorded in
`schema_migrations` only after all its steps succeeded. Migrations are frozen once
shipped: change the schema by appending a new one (e.g. `ALTER TABLE events ADD COLUMN ...`
when the event record gains a field; tests/test_schema.py fails until you do).

The DDL is plain ClickHouse SQL, portable to a server; docs/events.md gives the cluster variant
(ReplicatedMergeTree + Distributed). Retention is not a migration (a migration takes no
parameters): `apply_retention` sets the TTLs from the settings at every start.

Deduplication: `events` and both rollup tables carry `non_replicated_deduplication_window`, so
an insert repeated with the same `insert_deduplication_token` (the collector derives it from
the stream entry ids) is dropped by `events` AND by the materialized views' target tables.
Without the setting on the rollup tables, the views double-count a repeated insert.
The views' share of the hash includes the view's id, which must be the same in every
process: see migration 5 (never alter a view with MODIFY QUERY).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Final

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

# A step is a statement, or a function of the client for what one statement cannot say.
MigrationStep = str | Callable[[Client], None]
Migration = tuple[int, str, list[MigrationStep]]

DEDUPLICATION_WINDOW: Final = 10_000  # insert blocks remembered per table
ROLLUP_TABLES: Final = ("events_1m", "events_client_1m", "events_status_1m",
                        "events_address_1h")
RETENTION_TABLES: Final = {"events": "toDateTime(timestamp)", "events_1m": "minute",
                           "events_client_1m": "minute", "events_status_1m": "minute",
                           "events_address_1h": "hour",
                           "event_seq_blocks": "inserted_at",
                           "event_loss": "toDateTime(detected_at)"}

_EVENTS = f"""
CREATE TABLE IF NOT EXISTS events
(
    timestamp DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    request_id String CODEC(ZSTD(1)),
    http_request_method LowCardinality(String),
    url_path String CODEC(ZSTD(1)),
    http_response_status_code UInt16,
    duration_ms Float64 CODEC(ZSTD(1)),
    schema_version UInt8,
    trace_id String CODEC(ZSTD(1)),
    span_id String CODEC(ZSTD(1)),
    gateway_instance LowCardinality(String),
    route_id LowCardinality(String),
    http_route LowCardinality(String),
    url_query String CODEC(ZSTD(1)),
    url_scheme LowCardinality(String),
    server_address LowCardinality(String),
    network_protocol_version LowCardinality(String),
    client_address String CODEC(ZSTD(1)),
    user_agent_original LowCardinality(String),
    http_request_body_size UInt64 CODEC(ZSTD(1)),
    http_response_body_size UInt64 CODEC(ZSTD(1)),
    upstream LowCardinality(String),
    upstream_duration_ms Float64 CODEC(ZSTD(1)),
    error_type LowCardinality(String),
    auth_outcome LowCardinality(String),
    auth_reason LowCardinality(String),
    client_id String CODEC(ZSTD(1)),
    api_key_id String CODEC(ZSTD(1)),
    tenant LowCardinality(String),
    plan LowCardinality(String),
    ratelimit_outcome LowCardinality(String),
    ratelimit_policy_id LowCardinality(String),
    ratelimit_mode LowCardinality(String),
    cache_outcome LowCardinality(String),
    retries UInt16,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_request_id request_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toDate(timestamp)
ORDER BY (route_id, http_request_method, http_route, timestamp)
TTL toDateTime(timestamp) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}, ttl_only_drop_parts = 1
"""

# The client key of the per-client rollup and of distinct-client counts.
_CLIENT = "if(client_id != '', client_id, client_address)"

_EVENTS_1M = f"""
CREATE TABLE IF NOT EXISTS events_1m
(
    minute DateTime('UTC'),
    route_id LowCardinality(String),
    http_request_method LowCardinality(String),
    http_route LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64),
    errors_5xx SimpleAggregateFunction(sum, UInt64),
    errors_4xx SimpleAggregateFunction(sum, UInt64),
    rate_limited SimpleAggregateFunction(sum, UInt64),
    auth_failures SimpleAggregateFunction(sum, UInt64),
    unmatched SimpleAggregateFunction(sum, UInt64),
    bytes_out SimpleAggregateFunction(sum, UInt64),
    duration_sum_ms SimpleAggregateFunction(sum, Float64),
    duration_q AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64),
    clients AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (route_id, http_request_method, http_route, minute)
TTL minute + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}, ttl_only_drop_parts = 1
"""

_EVENTS_1M_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS events_1m_mv TO events_1m AS
SELECT
    toStartOfMinute(timestamp) AS minute,
    route_id,
    http_request_method,
    http_route,
    count() AS requests,
    countIf(http_response_status_code >= 500) AS errors_5xx,
    countIf(http_response_status_code >= 400 AND http_response_status_code < 500) AS errors_4xx,
    countIf(http_response_status_code = 429) AS rate_limited,
    countIf(auth_outcome = 'failure') AS auth_failures,
    countIf(route_id = '') AS unmatched,
    sum(http_response_body_size) AS bytes_out,
    sum(duration_ms) AS duration_sum_ms,
    quantilesState(0.5, 0.95, 0.99)(duration_ms) AS duration_q,
    uniqState({_CLIENT}) AS clients
FROM events
GROUP BY minute, route_id, http_request_method, http_route
"""

_EVENTS_CLIENT_1M = f"""
CREATE TABLE IF NOT EXISTS events_client_1m
(
    minute DateTime('UTC'),
    route_id LowCardinality(String),
    http_request_method LowCardinality(String),
    http_route LowCardinality(String),
    client String,
    requests SimpleAggregateFunction(sum, UInt64),
    errors_5xx SimpleAggregateFunction(sum, UInt64),
    errors_4xx SimpleAggregateFunction(sum, UInt64),
    rate_limited SimpleAggregateFunction(sum, UInt64),
    auth_failures SimpleAggregateFunction(sum, UInt64),
    paths AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (route_id, http_request_method, http_route, minute, client)
TTL minute + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}, ttl_only_drop_parts = 1
"""

_EVENTS_CLIENT_1M_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS events_client_1m_mv TO events_client_1m AS
SELECT
    toStartOfMinute(timestamp) AS minute,
    route_id,
    http_request_method,
    http_route,
    {_CLIENT} AS client,
    count() AS requests,
    countIf(http_response_status_code >= 500) AS errors_5xx,
    countIf(http_response_status_code >= 400 AND http_response_status_code < 500) AS errors_4xx,
    countIf(http_response_status_code = 429) AS rate_limited,
    countIf(auth_outcome = 'failure') AS auth_failures,
    uniqState(url_path) AS paths
FROM events
GROUP BY minute, route_id, http_request_method, http_route, client
"""

# Migration 4: the latency state becomes a t-digest. A `quantiles` state is a reservoir of up
# to 8,192 durations per endpoint-minute, so merging it dominated every rollup read; a t-digest
# state is a few hundred bytes of centroids. The column is added next to `duration_q` (rows
# written before keep their exact-reservoir state and stay readable) and the view is switched
# in place with MODIFY QUERY (no window in which inserts skip the rollup, nothing doubled);
# from then on the view leaves `duration_q` empty. Both statements can run again harmlessly.
_DURATION_TD = "AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64)"
_EVENTS_1M_ADD_TD = (f"ALTER TABLE events_1m ADD COLUMN IF NOT EXISTS duration_td {_DURATION_TD} "
                     "AFTER duration_q")
_EVENTS_1M_MV_TD = f"""
ALTER TABLE events_1m_mv MODIFY QUERY
SELECT
    toStartOfMinute(timestamp) AS minute,
    route_id,
    http_request_method,
    http_route,
    count() AS requests,
    countIf(http_response_status_code >= 500) AS errors_5xx,
    countIf(http_response_status_code >= 400 AND http_response_status_code < 500) AS errors_4xx,
    countIf(http_response_status_code = 429) AS rate_limited,
    countIf(auth_outcome = 'failure') AS auth_failures,
    countIf(route_id = '') AS unmatched,
    sum(http_response_body_size) AS bytes_out,
    sum(duration_ms) AS duration_sum_ms,
    quantilesTDigestState(0.5, 0.95, 0.99)(duration_ms) AS duration_td,
    uniqState({_CLIENT}) AS clients
FROM events
GROUP BY minute, route_id, http_request_method, http_route
"""

# Migration 5: reload the view altered by migration 4 from its stored definition. ClickHouse
# keys a view's deduplication hash by the view's id (token + ":" + view id + block number); in
# the process that ran MODIFY QUERY that id is a random in-memory UUID, everywhere else (any
# process or server that loads the view from disk) it is "default.events_1m_mv". So an insert
# repeated across a restart (collector SIGKILLed between insert and XACK) was deduplicated by
# `events` and `events_client_1m` but counted twice in `events_1m`. DETACH + ATTACH reloads
# the view as a restart would. Don't use MODIFY QUERY again: recreate a view by DETACH/ATTACH
# or DROP/CREATE. A rerun after an interruption re-attaches the view. (On a shared server,
# an insert by another collector in the instant between the two statements skips the view.)
_EVENTS_1M_MV_RELOAD: list[MigrationStep] = ["DETACH TABLE IF EXISTS events_1m_mv",
                                             "ATTACH TABLE IF NOT EXISTS events_1m_mv"]

# How readers get [p50, p95, p99] ms from `events_1m` rows (inside a GROUP BY): the t-digest
# when the group has one, else the reservoir of rows written before migration 4. A group that
# spans the switch reads the t-digest of its newer rows only.
DURATION_QUANTILES: Final = (
    "if(isFinite(quantilesTDigestMerge(0.5, 0.95, 0.99)(duration_td)[1]), "
    "quantilesTDigestMerge(0.5, 0.95, 0.99)(duration_td), "
    "quantilesMerge(0.5, 0.95, 0.99)(duration_q))")

# Migration 6: loss accounting (docs/reliability.md). Every event carries its emitter and that
# emitter's gap-free sequence number. `event_seq_blocks` keeps, per insert block and emitter,
# min/max/count of the numbers (a materialized view: no per-event work in Python), so finding
# which numbers never arrived reads this small table, not `events`. `event_loss` holds the
# counted loss: ranges the emitters reported dropped (`dropped_<reason>`), events
# dead-lettered for bad fields, and gaps the accountant found (`trimmed`, `worker_killed`).
# It is a ReplacingMergeTree keyed by (emitter, seq_from, reason): recording a range again
# (a marker re-read after a crash, two accountants) changes nothing once merged; read FINAL.
_EVENTS_ADD_EMITTER = ("ALTER TABLE events ADD COLUMN IF NOT EXISTS gateway_emitter "
                       "LowCardinality(String) AFTER retries")
_EVENTS_ADD_SEQ = ("ALTER TABLE events ADD COLUMN IF NOT EXISTS gateway_event_seq UInt64 "
                   "CODEC(Delta, ZSTD(1)) AFTER gateway_emitter")

_EVENT_SEQ_BLOCKS = f"""
CREATE TABLE IF NOT EXISTS event_seq_blocks
(
    emitter String,
    seq_min UInt64,
    seq_max UInt64,
    events UInt64,
    inserted_at DateTime('UTC') DEFAULT now()
)
ENGINE = MergeTree
ORDER BY (emitter, seq_min)
TTL inserted_at + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}
"""

_EVENT_SEQ_BLOCKS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS event_seq_blocks_mv TO event_seq_blocks AS
SELECT
    gateway_emitter AS emitter,
    min(gateway_event_seq) AS seq_min,
    max(gateway_event_seq) AS seq_max,
    count() AS events
FROM events
WHERE gateway_emitter != '' AND gateway_event_seq > 0
GROUP BY gateway_emitter
"""

_EVENT_LOSS = """
CREATE TABLE IF NOT EXISTS event_loss
(
    emitter String,
    seq_from UInt64,
    seq_to UInt64,
    events UInt64,
    reason LowCardinality(String),
    detected_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (emitter, seq_from, reason)
TTL toDateTime(detected_at) + INTERVAL 30 DAY
"""

_ANOMALIES = """
CREATE TABLE IF NOT EXISTS anomalies
(
    id String,
    detected_at DateTime64(3, 'UTC'),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    route_id LowCardinality(String),
    http_request_method LowCardinality(String),
    http_route LowCardinality(String),
    kind LowCardinality(String),
    severity LowCardinality(String),
    score Float64,
    metric String,
    baseline Float64,
    observed Float64,
    top_clients Array(String),
    example_request_ids Array(String),
    example_trace_ids Array(String),
    summary String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(detected_at)
ORDER BY (detected_at, id)
"""

# Migration 7: requests per minute, endpoint, status code and error class, for the status and
# error-class breakdowns (they read raw events before: ~40-50 ms each over 24 h of 10 M events).
# Existing events are rolled up before the view exists; the target is emptied first, so a
# rerun after an interruption starts the backfill over instead of adding to it. (On a shared
# server, an insert by another collector between the backfill and the view's creation is not
# in this rollup; a rerun with the view already there could count one twice.)
_EVENTS_STATUS_1M = f"""
CREATE TABLE IF NOT EXISTS events_status_1m
(
    minute DateTime('UTC'),
    route_id LowCardinality(String),
    http_request_method LowCardinality(String),
    http_route LowCardinality(String),
    status UInt16,
    error_type LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (route_id, http_request_method, http_route, minute, status, error_type)
TTL minute + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}, ttl_only_drop_parts = 1
"""

_STATUS_ROLLUP_SELECT = """
SELECT
    toStartOfMinute(timestamp) AS minute,
    route_id,
    http_request_method,
    http_route,
    http_response_status_code AS status,
    error_type,
    count() AS requests
FROM events
GROUP BY minute, route_id, http_request_method, http_route, status, error_type
"""


def _rollup_added_later(table: str, create: str, select: str) -> list[MigrationStep]:
    """The steps of a rollup added once events exist: its table, the events already stored
    rolled up into it (emptied first, so a rerun starts the backfill over), then its view
    `<table>_mv` for the events inserted from then on."""

    def backfill(client: Client) -> None:
        client.command(f"TRUNCATE TABLE IF EXISTS {table}")
        client.command(f"INSERT INTO {table} {select}")

    return [create, backfill,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO {table} AS {select}"]


# Migration 8: requests per hour, endpoint and client address, for the top-IPs breakdown over
# long ranges (whole hours from here, the partial hours at either end from raw events). A
# minute rollup would not shrink it (a busy endpoint-minute has about as many addresses as
# requests); an hour does, ~25x on the dashboard bench's traffic (83k requests from ~3,300
# addresses per endpoint-hour): top IPs over 24 h of 10 M events ~57 -> ~21 ms (the partial
# hours at the ends still read raw events). Backfilled like migration 7.
_EVENTS_ADDRESS_1H = f"""
CREATE TABLE IF NOT EXISTS events_address_1h
(
    hour DateTime('UTC'),
    route_id LowCardinality(String),
    http_request_method LowCardinality(String),
    http_route LowCardinality(String),
    client_address String,
    requests SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(hour)
ORDER BY (route_id, http_request_method, http_route, hour, client_address)
TTL hour + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}, ttl_only_drop_parts = 1
"""

_ADDRESS_ROLLUP_SELECT = """
SELECT
    toStartOfHour(timestamp) AS hour,
    route_id,
    http_request_method,
    http_route,
    client_address,
    count() AS requests
FROM events
GROUP BY hour, route_id, http_request_method, http_route, client_address
"""


_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    applied_at DateTime('UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""

MIGRATIONS: Final[list[Migration]] = [
    (1, "events", [_EVENTS]),
    # Tables before their views: a view must never see an insert its target can't take.
    (2, "rollups_1m", [_EVENTS_1M, _EVENTS_1M_MV, _EVENTS_CLIENT_1M, _EVENTS_CLIENT_1M_MV]),
    (3, "anomalies", [_ANOMALIES]),
    (4, "rollup_latency_tdigest", [_EVENTS_1M_ADD_TD, _EVENTS_1M_MV_TD]),
    (5, "reload_events_1m_mv", _EVENTS_1M_MV_RELOAD),
    (6, "event_loss_accounting", [_EVENTS_ADD_EMITTER, _EVENTS_ADD_SEQ, _EVENT_SEQ_BLOCKS,
                                  _EVENT_SEQ_BLOCKS_MV, _EVENT_LOSS]),
    (7, "status_rollup_1m", _rollup_added_later("events_status_1m", _EVENTS_STATUS_1M,
                                                _STATUS_ROLLUP_SELECT)),
    (8, "address_rollup_1h", _rollup_added_later("events_address_1h", _EVENTS_ADDRESS_1H,
                                                 _ADDRESS_ROLLUP_SELECT)),
]


def applied_versions(client: Client) -> set[int]:
    client.command(_SCHEMA_MIGRATIONS)
    result = client.query("SELECT DISTINCT version FROM schema_migrations")
    return {int(row[0]) for row in result.result_rows}


def migrate(client: Client, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not yet recorded, in version order; return the names applied."""
    done = applied_versions(client)
    applied: list[str] = []
    for version, name, steps in sorted(migrations or MIGRATIONS):
        if version in done:
            continue
        for step in steps:
            if isinstance(step, str):
                client.command(step)
            else:
                step(client)
        client.command(
            "INSERT INTO schema_migrations (version, name, applied_at) "
            "VALUES ({version:UInt32}, {name:String}, now())",
            parameters={"version": version, "name": name},
        )
        log.info("applied schema migration", extra={"version": version, "migration": name})
        applied.append(name)
    return applied


_TTL_DAYS = re.compile(r"TTL .*?toIntervalDay\((?:_CAST\()?(\d+)")


def retention_days(client: Client, table: str) -> int | None:
    """The TTL in days the table has now, or None if it has none."""
    result = client.query(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
        "AND name = {table:String}", parameters={"table": table})
    if not result.result_rows:
        return None
    match = _TTL_DAYS.search(str(result.result_rows[0][0]))
    return int(match.group(1)) if match else None


def apply_retention(client: Client, days: int) -> list[str]:
    """Set the TTL of raw events and rollups to `days`; return the tables changed."""
    changed: list[str] = []
    for table, column in RETENTION_TABLES.items():
        if retention_days(client, table) == days:
            continue
        # Table and column names come from the constant above, never from input.
        client.command(f"ALTER TABLE {table} MODIFY TTL {column} + INTERVAL {{days:UInt32}} DAY",
                       parameters={"days": days})
        log.info("retention changed", extra={"table": table, "retention_days": days})
        changed.append(table)
    return changed
