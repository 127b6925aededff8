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

import numpy as np
import pandas as pd

from analytics.models import Endpoint
from collector.clickhouse import SharedClient
from collector.schema import DURATION_QUANTILES

ENDPOINT_COLUMNS: Final = ["route_id", "http_request_method", "http_route"]
ENDPOINT_MINUTE_COLUMNS: Final = [
    "minute", *ENDPOINT_COLUMNS, "requests", "errors_5xx", "errors_4xx", "rate_limited",
    "auth_failures", "p50_ms", "p95_ms", "p99_ms", "clients", "top_client",
    "top_client_requests", "top_client_share", "top_paths_client", "top_client_paths",
]
COUNT_COLUMNS: Final = ["requests", "errors_5xx", "errors_4xx", "rate_limited", "auth_failures"]
CLIENT_MINUTE_COLUMNS: Final = [
    "minute", *ENDPOINT_COLUMNS, "client", "requests", "errors_5xx", "errors_4xx",
    "rate_limited", "auth_failures",
]

_ENDPOINT_MINUTES_SQL: Final = """
SELECT minute, route_id, http_request_method, http_route,
       sum(requests) AS requests, sum(errors_5xx) AS errors_5xx, sum(errors_4xx) AS errors_4xx,
       sum(rate_limited) AS rate_limited, sum(auth_failures) AS auth_failures,
       """ + DURATION_QUANTILES + """ AS latency_q, uniqMerge(clients) AS clients
FROM events_1m
WHERE minute >= toDateTime({start:Int64}, 'UTC') AND minute <= toDateTime({end:Int64}, 'UTC')
GROUP BY minute, route_id, http_request_method, http_route
ORDER BY route_id, http_request_method, http_route, minute
"""

_TOP_CLIENT_SQL: Final = """
SELECT minute, route_id, http_request_method, http_route,
       argMax(client, client_requests) AS top_client,
       max(client_requests) AS top_client_requests,
       argMax(client, client_paths) AS top_paths_client,
       max(client_paths) AS top_client_paths
FROM (
    SELECT minute, route_id, http_request_method, http_route, client,
           sum(requests) AS client_requests, uniqMerge(paths) AS client_paths
    FROM events_client_1m
    WHERE minute >= toDateTime({start:Int64}, 'UTC') AND minute <= toDateTime({end:Int64}, 'UTC')
    GROUP BY minute, route_id, http_request_method, http_route, client
)
GROUP BY minute, route_id, http_request_method, http_route
"""

_SEASON_SQL: Final = """
SELECT minute, route_id, http_request_method, http_route, sum(requests) AS requests
FROM events_1m
WHERE minute >= toDateTime({start:Int64}, 'UTC') AND minute < toDateTime({end:Int64}, 'UTC')
  AND (toUnixTimestamp(minute) + {shift:UInt32}) % 86400 <= {width:UInt32}
GROUP BY minute, route_id, http_request_method, http_route
"""

_UNMATCHED_PATHS_SQL: Final = """
SELECT url_path, count() AS hits
FROM events
WHERE route_id = '' AND http_request_method = {method:String} AND http_route = ''
  AND timestamp >= toDateTime64({start:Float64}, 3, 'UTC')
  AND timestamp < toDateTime64({end:Float64}, 3, 'UTC')
GROUP BY url_path
ORDER BY hits DESC, url_path
LIMIT {limit:UInt32}
"""

# The `events` expression of each key_by part (as proxy/identity.Caller.key_of computes it);
# a part with no column (header:<Name>) falls back to the client id, else the address.
_CLIENT_EXPR: Final = "if(client_id != '', client_id, client_address)"
_KEY_PART_EXPR: Final = {"client_id": _CLIENT_EXPR, "ip": "client_address",
                         "tenant": "toString(tenant)", "api_key": "api_key_id"}
_POLICY_CLIENTS_SQL: Final = """
SELECT {key_expr} AS client, count() AS requests,
       countIf(ratelimit_policy_id = {policy_id:String} AND ratelimit_outcome = 'limited')
           AS limited,
       countIf(ratelimit_policy_id = {policy_id:String}
               AND ratelimit_outcome = 'shadow_limited') AS shadow_limited
FROM events
WHERE route_id = {route_id:String} AND http_request_method = {method:String}
  AND timestamp >= toDateTime64({start:Float64}, 3, 'UTC')
  AND timestamp < toDateTime64({end:Float64}, 3, 'UTC')
GROUP BY client
ORDER BY limited + shadow_limited DESC, requests DESC, client
LIMIT {limit:UInt32}
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

# Per client address of one endpoint and window, from raw events (bounded by the sort key
# prefix, the window and LIMIT): the IP dimension the per-client rollup does not keep.
ADDRESS_COLUMNS: Final = ["client_address", "requests", "auth_failures", "authenticated",
                          "clients"]
_ADDRESSES_SQL: Final = """
SELECT client_address, count() AS requests,
       countIf(auth_outcome = 'failure') AS auth_failures,
       countIf(auth_outcome = 'success') AS authenticated,
       groupUniqArray({max_clients:UInt32})(if(client_id != '', client_id, client_address))
           AS clients
FROM events
WHERE route_id = {route_id:String} AND http_request_method = {method:String}
  AND http_route = {http_route:String}
  AND timestamp >= toDateTime64({start:Float64}, 3, 'UTC')
  AND timestamp < toDateTime64({end:Float64}, 3, 'UTC')
GROUP BY client_address
ORDER BY auth_failures DESC, requests DESC, client_address
LIMIT {limit:UInt32}
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
                       for q in frame["latency_q"]]
    frame = frame.drop(columns=["latency_q"])
    for name in ENDPOINT_COLUMNS:
        frame[name] = frame[name].astype(str)
    if top.empty:
        frame["top_client"] = frame["top_paths_client"] = ""
        frame["top_client_requests"] = frame["top_client_paths"] = 0
    else:
        top["minute"] = _utc_minutes(top["minute"])
        for name in [*ENDPOINT_COLUMNS, "top_client", "top_paths_client"]:
            top[name] = top[name].astype(str)
        frame = frame.merge(top, on=["minute", *ENDPOINT_COLUMNS], how="left")
        for name in ("top_client", "top_paths_client"):
            frame[name] = frame[name].fillna("")
        for name in ("top_client_requests", "top_client_paths"):
            frame[name] = frame[name].fillna(0)
    for name in ("requests", "errors_5xx", "errors_4xx", "rate_limited", "auth_failures",
                 "clients", "top_client_requests", "top_client_paths"):
        frame[name] = frame[name].astype("int64")
    frame["top_client_share"] = (frame["top_client_requests"]
                                 / frame["requests"].where(frame["requests"] > 0)).fillna(0.0)
    frame = frame.sort_values([*ENDPOINT_COLUMNS, "minute"], kind="stable")
    return frame[ENDPOINT_MINUTE_COLUMNS].reset_index(drop=True)


async def season_minutes(ch: SharedClient, start: float, end: float, *,
                         time_of_day: tuple[float, float] | None = None) -> pd.DataFrame:
    """Requests per endpoint and minute in [start, end): the history of seasonal baselines.

    `time_of_day` = (from, to) epoch seconds less than a day apart: only minutes whose time
    of day falls in that span (on every day) are read - all that seasonal baselines of the
    windows in it need. Columns: ENDPOINT_MINUTE_COLUMNS with only the counts of requests
    (the others are NaN or empty), so these rows can precede `endpoint_minutes` rows.
    """
    parameters = _minute_bounds(start, end)
    low, high = time_of_day or (0.0, 86_399.0)
    parameters["shift"] = int((86_400 - int(low) % 86_400) % 86_400)
    parameters["width"] = int(min(max(high - low, 0), 86_399))
    frame = await asyncio.to_thread(_query_df, ch, _SEASON_SQL, parameters)
    if frame.empty:
        return _empty(ENDPOINT_MINUTE_COLUMNS)
    frame["minute"] = _utc_minutes(frame["minute"])
    for name in ENDPOINT_COLUMNS:
        frame[name] = frame[name].astype(str)
    frame["requests"] = frame["requests"].astype("int64")
    for name in ENDPOINT_MINUTE_COLUMNS:
        if name not in frame.columns:
            text = name in ("top_client", "top_paths_client")
            frame[name] = "" if text else float("nan")
    return frame[ENDPOINT_MINUTE_COLUMNS].reset_index(drop=True)


def complete_minutes(frame: pd.DataFrame, until: pd.Timestamp, step_s: float = 60.0,
                     ) -> pd.DataFrame:
    """Add the missing minutes of each endpoint, from its first minute to `until`, as windows
    with no requests (0 counts, NaN latency), so that an outage is a window and not a gap."""
    if frame.empty:
        return frame
    minutes = pd.DatetimeIndex(pd.to_datetime(frame["minute"], utc=True))
    seconds = minutes.as_unit("s").asi8
    step = int(step_s)
    codes = frame.groupby(ENDPOINT_COLUMNS, sort=False).ngroup().to_numpy()
    slot = (seconds - seconds.min()) // step
    last = max(int(slot.max()), int((int(until.timestamp()) - seconds.min()) // step))
    first = np.full(int(codes.max()) + 1, last + 1)
    np.minimum.at(first, codes, slot)
    present = np.zeros((len(first), last + 1), dtype=bool)
    present[codes, slot] = True
    present |= np.arange(last + 1)[None, :] < first[:, None]
    missing_code, missing_slot = np.nonzero(~present)
    if not len(missing_code):
        return frame
    keys = frame[ENDPOINT_COLUMNS].assign(_code=codes).drop_duplicates("_code").set_index(
        "_code")
    added = keys.loc[missing_code].reset_index(drop=True)
    added.insert(0, "minute", pd.to_datetime(seconds.min() + missing_slot * step, unit="s",
                                             utc=True))
    for name in frame.columns:
        if name in added.columns:
            continue
        if name in COUNT_COLUMNS or name in ("clients", "top_client_requests",
                                              "top_client_share", "top_client_paths"):
            added[name] = 0
        elif frame[name].dtype == object or str(frame[name].dtype) in ("str", "string"):
            added[name] = ""
        else:
            added[name] = np.nan
    return pd.concat([frame, added[frame.columns]], ignore_index=True)


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


async def address_auth(ch: SharedClient, endpoint: Endpoint, start: float, end: float, *,
                       limit: int = 100, max_clients: int = 20) -> pd.DataFrame:
    """Per client address of one endpoint in [start, end): requests, auth failures, requests
    that authenticated, and up to `max_clients` of the client values (client id, else the
    address) seen from it. Columns ADDRESS_COLUMNS, most auth failures first."""
    parameters = {"route_id": endpoint.route_id, "method": endpoint.method,
                  "http_route": endpoint.http_route, "start": float(start), "end": float(end),
                  "limit": int(limit), "max_clients": int(max_clients)}
    rows = await asyncio.to_thread(_query_rows, ch, _ADDRESSES_SQL, parameters)
    return pd.DataFrame(
        [(str(row[0]), int(row[1]), int(row[2]), int(row[3]), [str(c) for c in row[4]])
         for row in rows], columns=ADDRESS_COLUMNS)


async def unmatched_paths(ch: SharedClient, method: str, start: float, end: float, *,
                          limit: int = 10) -> list[tuple[str, int]]:
    """The most requested undeclared url paths (route id '') of one method in [start, end)."""
    parameters = {"method": method, "start": float(start), "end": float(end),
                  "limit": int(limit)}
    rows = await asyncio.to_thread(_query_rows, ch, _UNMATCHED_PATHS_SQL, parameters)
    return [(str(row[0]), int(row[1])) for row in rows]


def key_expression(key_by: str) -> str:
    """The SQL expression over `events` of a policy's budget key (parts joined by '|', as the
    proxy joins them), from a fixed table of columns: never text of the policy itself. A
    key_by with a part that has no column (header:<Name>) is grouped by client."""
    parts = key_by.split("+")
    if not all(part in _KEY_PART_EXPR for part in parts):
        return _CLIENT_EXPR
    if len(parts) == 1:
        return _KEY_PART_EXPR[parts[0]]
    return "concat(" + ", '|', ".join(_KEY_PART_EXPR[part] for part in parts) + ")"


async def policy_clients(ch: SharedClient, route_id: str, method: str, policy_id: str,
                         start: float, end: float, *, key_by: str = "client_id",
                         limit: int = 1000) -> pd.DataFrame:
    """Per budget key of a policy keyed by `key_by` on one route + method in [start, end):
    requests, and how many of them `policy_id` limited (enforce) or would have limited
    (shadow). `client` is the key - the client id (else the address) by default, the client
    address for key_by ip (a bot rotating a claimed client id is still one address), and so
    on (`key_expression`). Raw events, bounded by the sort key prefix, the time range and
    LIMIT; columns client, requests, limited, shadow_limited."""
    parameters = {"route_id": route_id, "method": method, "policy_id": policy_id,
                  "start": float(start), "end": float(end), "limit": int(limit)}
    sql = _POLICY_CLIENTS_SQL.replace("{key_expr}", key_expression(key_by))
    frame = await asyncio.to_thread(_query_df, ch, sql, parameters)
    columns = ["client", "requests", "limited", "shadow_limited"]
    if frame.empty:
        return pd.DataFrame({"client": pd.Series(dtype="object"),
                             **{name: pd.Series(dtype="int64") for name in columns[1:]}})
    frame["client"] = frame["client"].astype(str)
    for name in columns[1:]:
        frame[name] = frame[name].astype("int64")
    return frame[columns]
