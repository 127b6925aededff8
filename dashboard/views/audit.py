"""Audit: every change with who, what, why, and the before/after."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboard.common import Context, current, guarded, param, when


def render(ctx: Context) -> None:
    st.title("Audit")
    left, right = st.columns([3, 1])
    subject = left.text_input("Subject (policy id, recommendation:<id>, anomaly:<id>)",
                              param("subject", ""))
    count = right.selectbox("Records", [50, 200, 1000], index=1)
    if subject:
        st.query_params["subject"] = subject
    records = ctx.client.audit(count, subject or None)
    if not records:
        st.info("No audit records.")
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
