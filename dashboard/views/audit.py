"""Audit: every change with who, what, why, and the before/after; filterable by actor, action,
subject and period, each filter in the URL (`/audit?actor=analytics&action=policy.*`)."""

from __future__ import annotations

import json
import time
from typing import Final

import pandas as pd
import streamlit as st

from dashboard.common import Context, current, guarded, param, when

PERIODS: Final = {"any time": 0, "last hour": 60, "last 24 hours": 1440, "last 7 days": 10_080,
                  "last 31 days": 44_640}
COUNTS: Final = [50, 200, 1000]


def text_filter(column: st.delta_generator.DeltaGenerator, label: str, name: str,
                placeholder: str) -> str | None:
    """A text box mirrored into the URL's `name` parameter; None when empty."""
    value = column.text_input(label, param(name, ""), placeholder=placeholder,
                              key=f"audit-{name}").strip()
    if value:
        st.query_params[name] = value
    elif name in st.query_params:
        del st.query_params[name]
    return value or None


def render(ctx: Context) -> None:
    st.title("Audit")
    cols = st.columns([2, 2, 3, 2, 1])
    actor = text_filter(cols[0], "Actor", "actor", "analytics, or ops*")
    action = text_filter(cols[1], "Action", "action", "policy.rollback, or policy.*")
    subject = text_filter(cols[2], "Subject", "subject",
                          "a policy id, recommendation:<id>, anomaly:*")
    labels = list(PERIODS)
    within = param("within", "0")
    period = cols[3].selectbox("Period", labels, key="audit-within", index=next(
        (i for i, label in enumerate(labels) if str(PERIODS[label]) == within), 0))
    if PERIODS[period]:
        st.query_params["within"] = str(PERIODS[period])
    elif "within" in st.query_params:
        del st.query_params["within"]
    count = cols[4].selectbox("Records", COUNTS, index=1, key="audit-count")
    since = time.time() - PERIODS[period] * 60 if PERIODS[period] else None
    records = ctx.client.audit(count, subject, actor, action, since)
    st.caption("Exact matches; end a filter with * for a prefix. Newest first.")
    if not records:
        st.info("No audit records match." if any((actor, action, subject, since))
                else "No audit records.")
        return
    st.dataframe(pd.DataFrame([{
        "time": when(r["ts"], ctx.tz), "actor": r["actor"], "action": r["action"],
        "reason": r["reason"], "subject": r["subject"], "evidence": r["evidence"],
        "before": json.dumps(r["before"]) if r["before"] is not None else "",
        "after": json.dumps(r["after"]) if r["after"] is not None else ""}
        for r in records]), hide_index=True, height=min(36 * len(records) + 38, 720),
        column_config={"reason": st.column_config.TextColumn(width="large"),
                       "subject": st.column_config.TextColumn(width="medium")})


guarded(current(), render)
