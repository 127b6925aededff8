"""Prometheus metrics of the collector (module level, registered once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("apigw_collector_events_in_total",
                    "Events decoded from the stream (valid ones, before insert).")
ENTRIES_READ = Counter("apigw_collector_entries_read_total",
                       "Stream entries (event batches) read, including re-reads and reclaims.")
ROWS_WRITTEN = Counter("apigw_collector_rows_written_total",
                       "Rows inserted into the ClickHouse events table.")
DEAD_LETTERED = Counter("apigw_collector_dead_lettered_total",
                        "Stream entries moved to the dead-letter stream.")
INSERT_ERRORS = Counter("apigw_collector_insert_errors_total",
                        "Failed inserts (each one is retried with back-off).")
RECLAIMED = Counter("apigw_collector_reclaimed_entries_total",
                    "Pending entries claimed from consumers presumed dead.")
INSERT_DURATION = Histogram("apigw_collector_insert_duration_seconds",
                            "Duration of one successful batch insert.",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_ROWS = Histogram("apigw_collector_batch_rows", "Rows per insert.",
                       buckets=(1, 10, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000))
LAG_ENTRIES = Gauge("apigw_collector_lag_entries",
                    "Stream entries not yet acknowledged by the group (undelivered + pending).")
LAG_SECONDS = Gauge("apigw_collector_lag_seconds",
                    "Age of the oldest stream entry the group has not acknowledged.")
DECODE_CPU = Counter("apigw_collector_decode_cpu_seconds_total",
                     "CPU time spent decoding stream entries into Arrow batches.")
INSERT_CPU = Counter("apigw_collector_insert_cpu_seconds_total",
                     "CPU time of the inserting thread (with the embedded store it includes the "
                     "engine's work in that thread).")
EVENTS_LOST = Counter("apigw_events_lost_total",
                      "Events that will never be rows, by reason: dropped_<reason> (reported by "
                      "the emitter), dead_lettered, trimmed, worker_killed (docs/reliability.md).",
                      ["reason"])
