"""The apigw dashboard: `streamlit run dashboard/app.py`.

Reads the control-plane API only (APIGW_API_URL, default http://127.0.0.1:8088; bearer token
from APIGW_API_TOKEN). Deep links: `?endpoint=<route_id> <METHOD> <template>&minutes=60&tz=UTC`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if __package__ in (None, ""):  # run as a script by streamlit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, ApiError, ApiUnavailable

RANGES = {"15 min": 15, "1 hour": 60, "6 hours": 360, "24 hours": 1440, "7 days": 10_080,
          "31 days": 44_640}
REFRESH = {"off": 0, "10 s": 10, "30 s": 30, "60 s": 60}
SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}
HEALTH_ICON = {"critical": "🔴 critical", "degraded": "🟠 degraded", "ok": "🟢 ok",
               "idle": "⚪ idle"}


def endpoint_key(item: dict[str, Any]) -> str:
    return f"{item['route_id']} {item['method']} {item['http_route']}"


def split_key(key: str) -> tuple[str, str, str]:
    route_id, method, template = [*key.split(" ", 2), "", ""][:3]
    return route_id, method, template


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def when(epoch: float | None, tz: ZoneInfo) -> str:
    if not epoch:
        return ""
    return datetime.fromtimestamp(epoch, UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def times(values: pd.Series, tz: ZoneInfo) -> pd.Series:
    return pd.to_datetime(values, unit="s", utc=True).dt.tz_convert(tz).dt.tz_localize(None)


def param(name: str, default: str) -> str:
    value = st.query_params.get(name)
    return str(value) if value else default


# -- sidebar: range, endpoint, refresh, time zone (all mirrored into the URL) --------------------


def sidebar() -> tuple[int, int, ZoneInfo]:
    st.sidebar.title("apigw")
    minutes_now = param("minutes", "60")
    labels = list(RANGES)
    current = next((label for label, value in RANGES.items() if str(value) == minutes_now),
                   "1 hour")
    label = st.sidebar.selectbox("Range", labels, index=labels.index(current))
    minutes = RANGES[label]
    refresh_label = st.sidebar.selectbox("Auto-refresh", list(REFRESH),
                                         index=list(REFRESH).index(param("refresh", "off"))
                                         if param("refresh", "off") in REFRESH else 0)
    tz_name = st.sidebar.text_input("Time zone", param("tz", "UTC"))
    st.query_params["minutes"] = str(minutes)
    st.query_params["refresh"] = refresh_label
    st.query_params["tz"] = tz_name
    return minutes, REFRESH[refresh_label], zone(tz_name)


def api_down(client: ApiClient, error: Exception) -> None:
    st.error(f"The control-plane API is unreachable ({error}). The dashboard retries every "
             "5 seconds; check that `apigw controlplane` is running.", icon="🚫")
    if st.button("Retry now"):
        st.rerun()

    @st.fragment(run_every=5)
    def retry() -> None:
        if client.health():
            st.rerun(scope="app")

    retry()


def problem(error: ApiError) -> None:
    st.warning(f"{error.title}: {error.detail}" if error.detail else error.title)


# -- sections -----------------------------------------------------------------------------------


def overview(client: ApiClient, minutes: int, endpoints: list[dict[str, Any]],
             anomalies: list[dict[str, Any]], tz: ZoneInfo) -> None:
    total = sum(row["requests"] for row in endpoints)
    errors = sum(row["errors_5xx"] for row in endpoints)
    cols = st.columns(4)
    cols[0].metric("Requests", f"{total:,}")
    cols[1].metric("5xx rate", f"{errors / total:.2%}" if total else "-")
    cols[2].metric("Anomalies", len(anomalies))
    cols[3].metric("Endpoints flagged", sum(1 for row in endpoints if row["open_anomalies"]))
    if not endpoints:
        st.info("No traffic in this range yet.")
        return
    table = pd.DataFrame([{
        "endpoint": endpoint_key(row), "health": HEALTH_ICON.get(row["health"], row["health"]),
        "requests": row["requests"], "error rate": row["error_rate"],
        "p95 ms": row["p95_ms"], "429s": row["rate_limited"],
        "auth failures": row["auth_failures"], "clients": row["clients"],
        "last min": row["last_minute_requests"], "anomalies": row["open_anomalies"],
        "max score": row["max_score"],
    } for row in endpoints]).sort_values(["anomalies", "max score", "error rate"],
                                         ascending=False)
    st.subheader("Endpoints")
    st.dataframe(table, hide_index=True, column_config={
        "error rate": st.column_config.NumberColumn(format="percent"),
        "p95 ms": st.column_config.NumberColumn(format="%.1f")})
    st.subheader("Traffic per endpoint")
    frames = []
    for row in endpoints[:8]:
        series = client.timeseries(minutes, row["route_id"], row["method"], row["http_route"])
        frame = pd.DataFrame(series["points"])
        if frame.empty:
            continue
        frame["endpoint"] = endpoint_key(row)
        frames.append(frame)
    if frames:
        data = pd.concat(frames)
        data["time"] = times(data["ts"], tz)
        base = alt.Chart(data).encode(x=alt.X("time:T", title=None),
                                      color=alt.Color("endpoint:N", legend=alt.Legend(
                                          orient="bottom", columns=2)))
        left, right = st.columns(2)
        left.altair_chart(base.mark_line().encode(
            y=alt.Y("requests:Q", title="requests / bucket"),
            tooltip=["endpoint", "time:T", "requests", "errors_5xx"]).interactive(),
            width="stretch")
        right.altair_chart(base.mark_line().encode(
            y=alt.Y("error_rate:Q", title="5xx rate", axis=alt.Axis(format="%")),
            tooltip=["endpoint", "time:T", alt.Tooltip("error_rate:Q", format=".1%")]
        ).interactive(), width="stretch")


def investigate(client: ApiClient, minutes: int, endpoints: list[dict[str, Any]],
                anomalies: list[dict[str, Any]], tz: ZoneInfo) -> None:
    keys = [endpoint_key(row) for row in endpoints]
    wanted = param("endpoint", "")
    if wanted and wanted not in keys:
        keys.insert(0, wanted)
    if not keys:
        st.info("No endpoint to investigate in this range.")
        return
    key = st.selectbox("Endpoint", keys, index=keys.index(wanted) if wanted in keys else 0)
    st.query_params["endpoint"] = key
    route_id, method, template = split_key(key)
    series = client.timeseries(minutes, route_id, method, template)
    data = pd.DataFrame(series["points"])
    st.caption(f"{key} · resolution {series['step_s']} s · deep link: "
               f"`?endpoint={key}&minutes={minutes}`")
    if not data.empty:
        data["time"] = times(data["ts"], tz)
        windows = pd.DataFrame([{"start": a["window_start"], "end": a["window_end"],
                                 "kind": a["kind"]} for a in anomalies
                                if endpoint_key(a["endpoint"]) == key])
        layers: list[alt.Chart] = []
        if not windows.empty:
            windows["start"], windows["end"] = times(windows["start"], tz), times(windows["end"],
                                                                                   tz)
            layers.append(alt.Chart(windows).mark_rect(opacity=0.15, color="red").encode(
                x="start:T", x2="end:T", tooltip=["kind"]))
        for column, title in (("requests", "requests"), ("error_rate", "5xx rate"),
                              ("p95_ms", "p95 ms")):
            line = alt.Chart(data).mark_line().encode(
                x=alt.X("time:T", title=None), y=alt.Y(f"{column}:Q", title=title),
                tooltip=["time:T", column])
            st.altair_chart(alt.layer(*layers, line).interactive(), width="stretch")
    left, right = st.columns(2)
    with left:
        st.markdown("**Top clients**")
        clients = client.top_clients(minutes, route_id, method, template)
        st.dataframe(pd.DataFrame(clients), hide_index=True)
    with right:
        st.markdown("**Status codes**")
        st.dataframe(pd.DataFrame(client.breakdown(minutes, route_id, method, template)),
                     hide_index=True)
    st.markdown("**Example requests**")
    status = st.selectbox("Status", ["any", "5xx", "4xx", "429", "2xx"])
    who = st.text_input("Client (id or address)", "")
    rows = client.requests(minutes, route_id=route_id, method=method, route=template,
                           status=None if status == "any" else status, client=who or None,
                           limit=50)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["timestamp"] = times(frame["timestamp"], tz)
        frame = frame[["timestamp", "status", "duration_ms", "client_id", "client_address",
                       "url_path", "error_type", "request_id", "trace_id"]]
    st.dataframe(frame, hide_index=True)


def anomaly_list(anomalies: list[dict[str, Any]], tz: ZoneInfo) -> None:
    if not anomalies:
        st.success("No anomalies in this range.")
        return
    rows = sorted(anomalies, key=lambda a: (SEVERITY_ORDER.get(a["severity"], 9),
                                            -a["detected_at"]))
    st.dataframe(pd.DataFrame([{
        "severity": a["severity"], "kind": a["kind"], "endpoint": endpoint_key(a["endpoint"]),
        "window": f"{when(a['window_start'], tz)} → {when(a['window_end'], tz)}",
        "metric": a["metric"], "baseline": a["baseline"], "observed": a["observed"],
        "score": a["score"], "top clients": ", ".join(a["top_clients"]),
        "example requests": ", ".join(a["example_request_ids"]),
        "example traces": ", ".join(a["example_trace_ids"]), "summary": a["summary"],
        "id": a["id"],
    } for a in rows]), hide_index=True)


ACTIONS = {"pending": ("approve", "apply", "dismiss"), "approved": ("apply", "dismiss"),
           "applied": ("rollback",)}


def recommendation_list(client: ApiClient, tz: ZoneInfo) -> None:
    recommendations = client.recommendations()
    if not recommendations:
        st.info("No recommendations.")
        return
    order = {"pending": 0, "approved": 1, "applied": 2}
    for rec in sorted(recommendations, key=lambda r: (order.get(r["status"], 9),
                                                      -r["created_at"])):
        policy = rec["policy"]
        title = (f"[{rec['status']}] {endpoint_key(rec['endpoint'])} → {policy['limit']} per "
                 f"{policy['window_s']:g} s by {policy['key_by']}")
        with st.expander(title, expanded=rec["status"] == "pending"):
            st.write(rec["rationale"])
            cols = st.columns(4)
            cols[0].metric("Confidence", f"{rec['confidence']:.0%}")
            cols[1].metric("Client p99 / window", f"{rec['client_rate_p99']:.1f}")
            impact = rec.get("impact") or {}
            cols[2].metric("Flagged requests limited", impact.get("flagged_requests_limited", 0))
            cols[3].metric("Other requests limited", impact.get("other_requests_limited", 0))
            st.caption(f"flagged clients: {', '.join(rec['flagged_clients']) or '-'} · "
                       f"anomalies: {', '.join(rec['anomaly_ids'])} · created "
                       f"{when(rec['created_at'], tz)} · {rec['status_by']}: "
                       f"{rec['status_reason'] or '-'}")
            actions = ACTIONS.get(rec["status"], ())
            if not actions:
                continue
            reason = st.text_input("Reason", key=f"reason-{rec['id']}")
            buttons = st.columns(len(actions))
            for column, action in zip(buttons, actions, strict=True):
                if column.button(action.capitalize(), key=f"{action}-{rec['id']}"):
                    run_action(partial(client.act, rec["id"], action, reason), f"{action} done")


def run_action(action: Callable[[], Any], done: str) -> None:
    try:
        action()
    except ApiError as error:
        problem(error)
        return
    st.toast(done)
    st.rerun()


def policy_list(client: ApiClient, tz: ZoneInfo) -> None:
    data = client.policies()
    engaged = client.kill_switch()
    cols = st.columns([3, 1])
    cols[0].markdown(f"**Kill switch:** {'ENGAGED - no automatic changes' if engaged else 'off'}"
                     f" · **auto mode overrides:** {client.auto_modes() or 'none'}")
    if cols[1].button("Release kill switch" if engaged else "Engage kill switch"):
        run_action(lambda: client.set_kill_switch(not engaged, "from the dashboard"),
                   "kill switch changed")
    views = data["policies"]
    if not views:
        st.info("No policies.")
        return
    st.dataframe(pd.DataFrame([{
        "id": v["policy"]["id"], "active": v["active"], "route": v["policy"]["route_id"],
        "method": v["policy"]["method"], "key by": v["policy"]["key_by"],
        "match key": v["policy"]["match_key"] or "",
        "limit": f"{v['policy']['limit']} / {v['policy']['window_s']:g} s",
        "mode": v["policy"]["mode"], "source": v["policy"]["source"],
        "version": v["policy"]["version"],
        "expires": when(v["policy"]["expires_at"], tz) or "never",
        "updated by": v["policy"]["updated_by"], "reason": v["policy"]["reason"],
    } for v in views]), hide_index=True)
    chosen = st.selectbox("History of", [v["policy"]["id"] for v in views])
    history = client.policy_history(chosen)
    st.dataframe(pd.DataFrame([{
        "version": p["version"], "limit": p["limit"], "window s": p["window_s"],
        "mode": p["mode"], "source": p["source"], "updated": when(p["updated_at"], tz),
        "by": p["updated_by"], "reason": p["reason"]} for p in history]), hide_index=True)
    if len(history) > 1 and st.button(f"Roll back {chosen} to version {history[1]['version']}"):
        run_action(lambda: client.rollback_policy(chosen, "rollback from the dashboard"),
                   "policy rolled back")


def audit_log(client: ApiClient, tz: ZoneInfo) -> None:
    records = client.audit(200)
    st.dataframe(pd.DataFrame([{
        "time": when(r["ts"], tz), "actor": r["actor"], "action": r["action"],
        "subject": r["subject"], "reason": r["reason"], "evidence": r["evidence"]}
        for r in records]), hide_index=True)


# -- the page -----------------------------------------------------------------------------------


def page(client: ApiClient, minutes: int, tz: ZoneInfo) -> None:
    try:
        endpoints = client.endpoints(minutes)
        anomalies = client.anomalies(minutes)
    except ApiUnavailable as error:
        api_down(client, error)
        return
    except ApiError as error:
        problem(error)
        return
    st.caption(f"{len(endpoints)} endpoints · last {minutes} min · updated "
               f"{datetime.now(tz).strftime('%H:%M:%S %Z')} · API {client.base_url}")
    sections: list[tuple[str, Callable[[], None]]] = [
        ("Overview", lambda: overview(client, minutes, endpoints, anomalies, tz)),
        ("Investigate", lambda: investigate(client, minutes, endpoints, anomalies, tz)),
        (f"Anomalies ({len(anomalies)})", lambda: anomaly_list(anomalies, tz)),
        ("Recommendations", lambda: recommendation_list(client, tz)),
        ("Policies", lambda: policy_list(client, tz)),
        ("Audit", lambda: audit_log(client, tz)),
    ]
    for tab, (_, render) in zip(st.tabs([name for name, _ in sections]), sections,
                                strict=True):
        with tab:
            try:
                render()
            except ApiUnavailable as error:
                st.error(f"The control-plane API stopped answering: {error}")
            except ApiError as error:
                problem(error)


def main() -> None:
    st.set_page_config(page_title="apigw", page_icon="🛡️", layout="wide")
    client = ApiClient.from_env()
    minutes, refresh_s, tz = sidebar()
    if refresh_s:
        st.fragment(run_every=refresh_s)(page)(client, minutes, tz)
    else:
        page(client, minutes, tz)


main()
