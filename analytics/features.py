"""Features in SQL: per-endpoint and per-client minute figures from the rollups, as pandas frames.

Time series come from the `events_1m` / `events_client_1m` rollups only (their cost follows
endpoints x minutes, not the raw event count). Raw `events` are read only for evidence: a
few example request and trace ids of one flagged window, bounded by the sort key and LIMIT.
Every query runs in a worker thread under the shared client's lock; values are bound
parameters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import pandas as pd

from analytics.models import Endpoint
from collector.clickhouse import SharedClient

ENDPOINT_COLUMNS: Final = ["route_id", "http_request_method", "http_route"]
ENDPOINT_MINUTE_COLUMNS: Final = [
    "minute", *ENDPOINT_COLUMNS, "requests", "errors_5xx", "errors_4xx", "rate_limited",
    "auth_failures", "p50_ms", "p95_ms", "p99_ms", "clients", "top_client",
    "top_client_requests", "top_client_share",
]
CLIENT_MINUTE_COLUMNS: Final = [
    "minute", *ENDPOINT_COLUMNS, "client", "requests", "errors_5xx", "errors_4xx",
    "rate_limited", "auth_failures",
]

_ENDPOINT_MINUTES_SQL: Final = """
SELECT minute, route_id, http_request_method, http_route,
       sum(requests) AS requests, sum(errors_5xx) AS errors_5xx, sum(errors_4xx) AS errors_4xx,
       sum(rate_limited) AS rate_limited, sum(auth_failures) AS auth_failures,
       quantilesMerge(0.5, 0.95, 0.99)(duration_q) AS duration_q, uniqMerge(clients) AS clients
FROM events_1m
WHERE minute >= toDateTime({start:Int64}, 'UTC') AND minute <= toDateTime({end:Int64}, 'UTC')
GROUP BY minute, route_id, http_request_method, http_route
ORDER BY route_id, http_request_method, http_route, minute
"""

_TOP_CLIENT_SQL: Final = """
SELECT minute, route_id, http_request_method, http_route,
       argMax(client, client_requests) AS top_client,
       max(client_requests) AS top_client_requests
FROM (
    SELECT minute, route_id, http_request_method, http_route, client,
           sum(requests) AS client_requests
    FROM events_client_1m
    WHERE minute >= toDateTime({start:Int64}, 'UTC') AND minute <= toDateTime({end:Int64}, 'UTC')
    GROUP BY minute, route_id, http_request_method, http_route, client
)
GROUP BY minute, route_id, http_request_method, http_route
"""

_CLIENT_MINUTES_SQL: Final = """
SELECT minute, route_id, http_request_method, http_route, client,
       sum(requests) AS requests, sum(errors_5xx) AS errors_5xx, sum(errors_4xx) AS errors_4xx,
       sum(rate_limited) AS rate_limited, sum(auth_failures) AS auth_failures
FROM events_client_1m
WHERE (route_id, http_request_method, http_route)
      IN {endpoints:Array(Tuple(String, String, String))}
  AND minute >= toDateTime({start:Int64}, 'UTC') AND minute <= toDateTime({end:Int64}, 'UTC')
GROUP BY minute, route_id, http_request_method, http_route, client
ORDER BY route_id, http_request_method, http_route, minute, client
"""

_EXAMPLES_SQL: Final = """
SELECT request_id, trace_id
FROM events
WHERE route_id = {route_id:String} AND http_request_method = {method:String}
  AND http_route = {http_route:String}
  AND timestamp >= toDateTime64({start:Float64}, 3, 'UTC')
  AND timestamp < toDateTime64({end:Float64}, 3, 'UTC')
  AND http_response_status_code >= {min_status:UInt16}
  AND ({client:String} = '' OR client_id = {client:String}
       OR (client_id = '' AND client_address = {client:String}))
ORDER BY timestamp
LIMIT {limit:UInt32}
"""


def _query_df(ch: SharedClient, sql: str, parameters: dict[str, Any]) -> pd.DataFrame:
    with ch.lock:
        return ch.client.query_df(sql, parameters=parameters)


def _query_rows(ch: SharedClient, sql: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    with ch.lock:
        return [tuple(row) for row in ch.client.query(sql, parameters=parameters).result_rows]


def _utc_minutes(column: pd.Series) -> pd.Series:
    """Minute column as tz-aware UTC timestamps, whichever transport returned it."""
    values = pd.to_datetime(column)
    if values.dt.tz is None:
        return values.dt.tz_localize("UTC")
    return values.dt.tz_convert("UTC")


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype="object") for name in columns})


def _minute_bounds(start: float, end: float) -> dict[str, Any]:
    return {"start": int(start // 60 * 60), "end": int(end)}


async def endpoint_minutes(ch: SharedClient, start: float, end: float) -> pd.DataFrame:
    """Per endpoint and minute in [start, end] (epoch seconds): counts, latency, clients.

    Columns: ENDPOINT_MINUTE_COLUMNS, sorted by endpoint then minute; `minute` is UTC.
    """
    parameters = _minute_bounds(start, end)
    frame = await asyncio.to_thread(_query_df, ch, _ENDPOINT_MINUTES_SQL, parameters)
    if frame.empty:
        return _empty(ENDPOINT_MINUTE_COLUMNS)
    top = await asyncio.to_thread(_query_df, ch, _TOP_CLIENT_SQL, parameters)
    frame["minute"] = _utc_minutes(frame["minute"])
    for position, name in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        frame[name] = [float(q[position]) if len(q) > position else float("nan")
                       for q in frame["duration_q"]]
    frame = frame.drop(columns=["duration_q"])
    for name in ENDPOINT_COLUMNS:
        frame[name] = frame[name].astype(str)
    if top.empty:
        frame["top_client"] = ""
        frame["top_client_requests"] = 0
    else:
        top["minute"] = _utc_minutes(top["minute"])
        for name in [*ENDPOINT_COLUMNS, "top_client"]:
            top[name] = top[name].astype(str)
        frame = frame.merge(top, on=["minute", *ENDPOINT_COLUMNS], how="left")
        frame["top_client"] = frame["top_client"].fillna("")
        frame["top_client_requests"] = frame["top_client_requests"].fillna(0)
    for name in ("requests", "errors_5xx", "errors_4xx", "rate_limited", "auth_failures",
                 "clients", "top_client_requests"):
        frame[name] = frame[name].astype("int64")
    frame["top_client_share"] = (frame["top_client_requests"]
                                 / frame["requests"].where(frame["requests"] > 0)).fillna(0.0)
    frame = frame.sort_values([*ENDPOINT_COLUMNS, "minute"], kind="stable")
    return frame[ENDPOINT_MINUTE_COLUMNS].reset_index(drop=True)


async def client_minutes(ch: SharedClient, endpoints: Sequence[Endpoint], start: float,
                         end: float) -> pd.DataFrame:
    """Per endpoint, client and minute in [start, end] for the given endpoints.

    `client` is the client id, or the client address when the request had no client id.
    Columns: CLIENT_MINUTE_COLUMNS; `minute` is UTC.
    """
    if not endpoints:
        return _empty(CLIENT_MINUTE_COLUMNS)
    parameters = {**_minute_bounds(start, end),
                  "endpoints": [(e.route_id, e.method, e.http_route) for e in endpoints]}
    frame = await asyncio.to_thread(_query_df, ch, _CLIENT_MINUTES_SQL, parameters)
    if frame.empty:
        return _empty(CLIENT_MINUTE_COLUMNS)
    frame["minute"] = _utc_minutes(frame["minute"])
    for name in [*ENDPOINT_COLUMNS, "client"]:
        frame[name] = frame[name].astype(str)
    for name in ("requests", "errors_5xx", "errors_4xx", "rate_limited", "auth_failures"):
        frame[name] = frame[name].astype("int64")
    return frame[CLIENT_MINUTE_COLUMNS].reset_index(drop=True)


async def examples(ch: SharedClient, endpoint: Endpoint, start: float, end: float, *,
                   min_status: int = 0, client: str = "", limit: int = 5,
                   ) -> tuple[list[str], list[str]]:
    """Example (request ids, trace ids) of one window of one endpoint, for evidence.

    Only requests with status >= min_status, and only from `client` when it is given.
    """
    if limit <= 0:
        return [], []
    parameters = {"route_id": endpoint.route_id, "method": endpoint.method,
                  "http_route": endpoint.http_route, "start": float(start), "end": float(end),
                  "min_status": int(min_status), "client": client, "limit": int(limit)}
    rows = await asyncio.to_thread(_query_rows, ch, _EXAMPLES_SQL, parameters)
    request_ids = [str(row[0]) for row in rows if row[0]]
    trace_ids = [str(row[1]) for row in rows if row[1]]
    return request_ids, trace_ids
