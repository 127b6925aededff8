"""Investigate one endpoint: what changed, since when, for which clients, with which requests.

Arrive by picking an endpoint, by a deep link `?endpoint=<key>`, or from an anomaly
`?anomaly=<id>` (which also sets the range around the anomaly's window).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.charts import series_chart
from dashboard.common import (
    Context,
    Span,
    current,
    endpoint_key,
    fetch_all,
    guarded,
    param,
    split_key,
    times,
    when,
)
from dashboard.tables import comparison, share_block, tables_html

COMPARE = {"nothing": None, "a day earlier": "1d", "a week earlier": "1w"}
PAGE_SIZE = 50
STATUS_KEY, CLIENT_KEY, TRACE_KEY, PAGE_KEY = ("search-status", "search-client",
                                               "search-trace", "search-page")


def anomaly_span(anomaly: dict[str, Any], now: float) -> Span:
    """A range around an anomaly: enough before it for a baseline, a little after."""
    length = max(60.0, anomaly["window_end"] - anomaly["window_start"])
    return Span(start=anomaly["window_start"] - max(3600.0, 6 * length),
                end=min(now, anomaly["window_end"] + max(1800.0, length)))


def during_of(span: Span, anomaly: dict[str, Any] | None, tz: Any) -> tuple[dict[str, Any],
                                                                            str]:
    """The range the shares are taken over, and how to say so: the range on screen, or since
    the anomaly began (before = as long before that)."""
    params = span.params()
    if anomaly is None:
        return params, "this range vs the same length before it"
    return ({"from": round(anomaly["window_start"], 3), "to": params["to"]},
            f"since {when(anomaly['window_start'], tz)[11:19]} (the anomaly) vs the same length "
            "before it")


def search_filters(anomaly: dict[str, Any] | None) -> dict[str, Any]:
    """The request search's filters, from its widgets' state (read before they are drawn, so
    the search goes out with the page's other reads)."""
    status = st.session_state.get(STATUS_KEY, "5xx" if anomaly is not None else "any")
    page = int(st.session_state.get(PAGE_KEY, 1))
    return {"status": None if status == "any" else status,
            "client": st.session_state.get(CLIENT_KEY) or None,
            "trace_id": st.session_state.get(TRACE_KEY) or None,
            "limit": PAGE_SIZE, "offset": (page - 1) * PAGE_SIZE}


def endpoint_reads(ctx: Context, key: str, span: Span, anomaly: dict[str, Any] | None
                   ) -> dict[str, Callable[[], Any]]:
    """Every read the page makes for one endpoint. The series comes with each comparison
    (`compare=1d`, `compare=1w`: this range's points plus the earlier window's), so the page
    does not read this range a third time on its own."""
    route_id, method, template = split_key(key)
    endpoint = (route_id, method, template)
    params, client = span.params(), ctx.client
    during, _ = during_of(span, anomaly, ctx.tz)
    return {
        "flagged": partial(client.anomalies, params, route_id=route_id, method=method,
                           route=template),
        **{code: partial(client.timeseries, params, *endpoint, compare=code)
           for code in ("1d", "1w")},
        "status": partial(client.breakdown, during, *endpoint, "status"),
        "clients": partial(client.top_clients, during, *endpoint),
        "error_type": partial(client.breakdown, during, *endpoint, "error_type"),
        "ips": partial(client.breakdown, during, *endpoint, "client_address"),
        "requests": partial(client.requests, params, route_id=route_id, method=method,
                            route=template, **search_filters(anomaly)),
    }


def choose(ctx: Context) -> tuple[str | None, Span, dict[str, Any] | None, dict[str, Any]]:
    """The endpoint, range, anomaly (when arriving from one) and the endpoint's reads. With the
    endpoint known from the address (a deep link, a reload), the endpoint list for the picker
    is read together with the endpoint's reads, not before them."""
    anomaly_id = param("anomaly", "")
    if anomaly_id:
        anomaly = ctx.client.anomaly(anomaly_id)
        key, span = endpoint_key(anomaly["endpoint"]), anomaly_span(anomaly, time.time())
        return key, span, anomaly, fetch_all(endpoint_reads(ctx, key, span, anomaly))
    picker = st.empty()
    wanted = param("endpoint", "")
    reads = fetch_all({"endpoints": partial(ctx.client.endpoint_names, ctx.span.params()),
                       **(endpoint_reads(ctx, wanted, ctx.span, None) if wanted else {})})
    keys = [endpoint_key(row) for row in reads["endpoints"]]
    if wanted and wanted not in keys:
        keys.insert(0, wanted)
    if not keys:
        return None, ctx.span, None, {}
    key = picker.selectbox("Endpoint", keys, index=keys.index(wanted) if wanted in keys else 0)
    st.query_params["endpoint"] = key
    if key != wanted:  # picked another one, or arrived without one
        reads = fetch_all(endpoint_reads(ctx, key, ctx.span, None))
    return key, ctx.span, None, reads


def trim_leading_idle(data: pd.DataFrame, keep: int = 3) -> pd.DataFrame:
    """Drop the empty buckets before the endpoint's first traffic (all but `keep`), so a young
    endpoint's story is not squeezed into the right edge of an hour-long axis."""
    if data.empty or "requests" not in data:
        return data
    busy = (data["requests"] > 0).to_numpy()
    if not busy.any():
        return data
    return data.iloc[max(0, int(busy.argmax()) - keep):].reset_index(drop=True)


def totals(points: list[dict[str, Any]]) -> dict[str, float]:
    requests = sum(p["requests"] for p in points)
    errors = sum(p["errors_5xx"] for p in points)
    p95 = [p["p95_ms"] for p in points if p["p95_ms"] is not None]
    return {"requests": requests, "5xx": errors, "5xx rate": errors / requests if requests
            else 0.0, "429s": sum(p["rate_limited"] for p in points),
            "auth failures": sum(p["auth_failures"] for p in points),
            "worst p95 ms": max(p95) if p95 else 0.0}


def render(ctx: Context) -> None:
    st.title("Investigate")
    key, span, anomaly, reads = choose(ctx)
    if key is None:
        st.info("No endpoint to investigate in this range.")
        return
    if anomaly is not None:
        st.error(f"**{anomaly['severity']} {anomaly['kind']}** on `{key}` from "
                 f"{when(anomaly['window_start'], ctx.tz)} to "
                 f"{when(anomaly['window_end'], ctx.tz)}: {anomaly['summary']} "
                 f"({anomaly['metric']} {anomaly['baseline']:.3g} → {anomaly['observed']:.3g}; "
                 f"top clients {', '.join(anomaly['top_clients']) or '-'})",
                 icon=":material/warning:")
    labels = list(COMPARE)
    chosen = param("compare", "")
    label = st.radio("Compare with", labels, horizontal=True,
                     index=next((i for i, lb in enumerate(labels) if COMPARE[lb] == chosen), 0))
    compare = COMPARE[label]
    if compare:
        st.query_params["compare"] = compare
    elif "compare" in st.query_params:
        del st.query_params["compare"]
    _, during_label = during_of(span, anomaly, ctx.tz)
    series = reads[compare or "1d"]
    st.caption(f"`{key}` · {span.label(ctx.tz)} · resolution {series['step_s']} s · "
               "shaded: anomaly windows · grey band: rolling baseline")
    data = pd.DataFrame(series["points"])
    flagged = reads["flagged"]
    windows = pd.DataFrame([{"start": a["window_start"], "end": a["window_end"],
                             "kind": a["kind"], "severity": a["severity"],
                             "summary": a["summary"]} for a in flagged])
    if not windows.empty:
        windows["start"], windows["end"] = times(windows["start"], ctx.tz), times(windows["end"],
                                                                                   ctx.tz)
    data = trim_leading_idle(data)
    if not data.empty:
        data["time"] = times(data["ts"], ctx.tz)
        earlier = pd.DataFrame(series["compare_points"])
        if not earlier.empty:
            earlier["time"] = times(earlier["ts"], ctx.tz)
        charts = (("requests", "requests / bucket", False), ("error_rate", "5xx rate", True),
                  ("p95_ms", "p95 latency ms", False), ("rate_limited", "429s / bucket", False))
        grid = st.columns(2)
        for i, (column, title, percent) in enumerate(charts):
            grid[i % 2].vega_lite_chart(spec=series_chart(
                data, column, title, windows, earlier if compare else None, label, percent),
                width="stretch", alt=f"{title} of {key}, {span.label(ctx.tz)}")

    rows = {"this window": totals(series["points"])}
    for name, code in (("a day earlier", "1d"), ("a week earlier", "1w")):
        rows[name] = totals(reads[code]["compare_points"])
    st.html(tables_html(comparison(rows), during_label, [
        share_block("Status codes", reads["status"], "status"),
        share_block("Error classes", reads["error_type"], "error class"),
        share_block("Top clients", reads["clients"], "client"),
        share_block("Top IPs", reads["ips"], "ip")]))

    st.subheader("Example requests")
    cols = st.columns([1, 2, 2, 1])
    statuses = ["any", "5xx", "4xx", "429", "2xx"]
    cols[0].selectbox("Status", statuses, index=1 if anomaly is not None else 0, key=STATUS_KEY)
    cols[1].text_input("Client (id or address)", "", key=CLIENT_KEY)
    cols[2].text_input("Trace id", "", key=TRACE_KEY)
    page = int(cols[3].number_input("Page", min_value=1, max_value=2000, value=1,
                                    key=PAGE_KEY))
    found = reads["requests"]
    frame = pd.DataFrame(found["requests"])
    if frame.empty:
        st.info("No request matches.")
        return
    frame["timestamp"] = times(frame["timestamp"], ctx.tz)
    st.dataframe(frame[["timestamp", "status", "duration_ms", "client_id", "client_address",
                        "url_path", "error_type", "request_id", "trace_id"]], hide_index=True,
                 column_config={"duration_ms": st.column_config.NumberColumn(format="%.1f"),
                                "request_id": st.column_config.TextColumn(width="medium"),
                                "trace_id": st.column_config.TextColumn(width="medium")})
    more = " · more on the next page" if found["next_offset"] is not None else ""
    st.caption(f"{len(frame)} requests on page {page}{more} · cells are copyable "
               "(select, then Ctrl+C)")


guarded(current(), render)
