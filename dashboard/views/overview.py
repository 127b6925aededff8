"""Overview: the fleet at a glance - open incidents first, endpoints ranked by trouble."""

from __future__ import annotations

from functools import partial
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.common import (
    HEALTH_ICON,
    Context,
    current,
    endpoint_key,
    fetch_all,
    group_incidents,
    guarded,
    link,
    when,
)


def rank(endpoints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most troubled first: open anomalies, then anomaly score, 5xx rate, p95 latency."""
    return sorted(endpoints, key=lambda e: (-(e["open_anomalies"] > 0), -e["max_score"],
                                            -e["error_rate"], -(e["p95_ms"] or 0.0)))


def render(ctx: Context) -> None:
    st.title("Overview")
    span = ctx.span.params()
    reads = fetch_all({"endpoints": partial(ctx.client.endpoints, span, sparkline=True),
                       "open": partial(ctx.client.anomalies, span, status="open")})
    endpoints = rank(reads["endpoints"])  # one call, sparklines too
    incidents = group_incidents(reads["open"])
    total = sum(row["requests"] for row in endpoints)
    errors = sum(row["errors_5xx"] for row in endpoints)
    cols = st.columns(5)
    cols[0].metric("Requests", f"{total:,}")
    cols[1].metric("5xx rate", f"{errors / total:.2%}" if total else "-")
    cols[2].metric("Open incidents", len(incidents))
    cols[3].metric("Endpoints flagged", sum(1 for row in endpoints if row["open_anomalies"]))
    cols[4].metric("429s", f"{sum(row['rate_limited'] for row in endpoints):,}")
    st.caption(f"{ctx.span.label(ctx.tz)} · {len(endpoints)} endpoints")

    st.subheader("Open incidents")
    if incidents:
        st.caption("One row per endpoint and kind, gathering its open anomalies (one per "
                   "analysed window); severity and score are the worst, the link opens the "
                   "first window.")
        rows = [{
            "severity": first["severity"], "kind": first["kind"],
            "endpoint": endpoint_key(first["endpoint"]),
            "investigate": link("investigate", anomaly=group[0]["id"]),
            "since": when(min(a["window_start"] for a in group), ctx.tz),
            "last seen": when(max(a["window_end"] for a in group), ctx.tz),
            "windows": len(group), "score": first["score"], "baseline": first["baseline"],
            "observed": max(a["observed"] for a in group),
            "top clients": ", ".join(dict.fromkeys(c for a in group for c in a["top_clients"])),
            "summary": first["summary"], "id": group[0]["id"],
        } for first, group in incidents]
        st.dataframe(pd.DataFrame(rows), hide_index=True, height=min(36 * len(rows) + 38, 400),
                     column_config={
                         "investigate": st.column_config.LinkColumn(display_text="open ↗"),
                         "score": st.column_config.ProgressColumn(
                             min_value=0.0, max_value=1.0, format="%.2f"),
                         "observed": st.column_config.NumberColumn(format="%.4g"),
                         "baseline": st.column_config.NumberColumn(format="%.4g")})
    else:
        st.success("No open incidents.")

    st.subheader("Endpoints")
    if not endpoints:
        st.info("No traffic in this range yet.")
        return
    st.dataframe(pd.DataFrame([{
        "endpoint": endpoint_key(row), "health": HEALTH_ICON.get(row["health"], row["health"]),
        "score": row["max_score"], "anomalies": row["open_anomalies"],
        "requests": row["requests"], "error rate": row["error_rate"], "p95 ms": row["p95_ms"],
        "429s": row["rate_limited"], "auth failures": row["auth_failures"],
        "clients": row["clients"], "traffic": row.get("sparkline") or [],
        "investigate": link("investigate", endpoint=endpoint_key(row)),
    } for row in endpoints]), hide_index=True, column_config={
        "error rate": st.column_config.NumberColumn(format="percent"),
        "p95 ms": st.column_config.NumberColumn(format="%.1f"),
        "score": st.column_config.NumberColumn(format="%.2f"),
        "traffic": st.column_config.LineChartColumn("traffic (requests)"),
        "investigate": st.column_config.LinkColumn(display_text="investigate ↗")})


guarded(current(), render)
