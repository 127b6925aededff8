"""Security review: flagged endpoints and clients, with evidence, and what to do about them.

The queue holds unreviewed anomalies of the security kinds, one row per incident (endpoint and
kind, however many analysed windows it lasted; the Overview's grouping). For each: approve the
analytics recommendation (its simulated impact shown first), dismiss every window with a
reason, or set a targeted limit for one client with an expiry (its simulated impact on that
client shown first), which marks every window actioned.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient
from dashboard.common import (
    SECURITY_KINDS,
    SEVERITY_ORDER,
    Context,
    current,
    endpoint_key,
    fetch_all,
    group_incidents,
    guarded,
    rows_table,
    run_action,
    when,
)

EXPIRY = {"15 min": 900, "1 hour": 3600, "6 hours": 21_600, "24 hours": 86_400,
          "7 days": 604_800}
WINDOWS = {"1 s": 1, "10 s": 10, "1 min": 60, "1 hour": 3600}


Incident = tuple[dict[str, Any], list[dict[str, Any]]]  # (most severe, windows by start)


def queue(anomalies: list[dict[str, Any]]) -> list[Incident]:
    """Unreviewed security anomalies as incidents (one per endpoint and kind, however many
    windows it lasted, as on the Overview): open ones first, then the worst."""
    flagged = [a for a in anomalies if a["kind"] in SECURITY_KINDS
               and a["status"] in ("open", "resolved")]
    return sorted(group_incidents(flagged),
                  key=lambda incident: all(a["status"] != "open" for a in incident[1]))


def incident_summary(windows: list[dict[str, Any]], ctx: Context) -> None:
    worst = min(windows, key=lambda a: SEVERITY_ORDER.get(a["severity"], 9))
    st.caption(f"**{len(windows)} window{'s' if len(windows) > 1 else ''}** · first seen "
               f"{when(windows[0]['window_start'], ctx.tz)} · last seen "
               f"{when(windows[-1]['window_end'], ctx.tz)} · peak severity "
               f"{worst['severity']} · evidence below: the latest window")


def evidence(anomaly: dict[str, Any], ctx: Context) -> None:
    st.markdown(f"**{anomaly['summary'] or anomaly['kind']}**")
    cols = st.columns(4)
    cols[0].metric(anomaly["metric"] or "metric", f"{anomaly['observed']:.3g}",
                   f"{anomaly['observed'] - anomaly['baseline']:+.3g} vs baseline")
    cols[1].metric("Score", f"{anomaly['score']:.2f}")
    cols[2].metric("Window", when(anomaly["window_start"], ctx.tz)[11:16] + " → "
                   + when(anomaly["window_end"], ctx.tz)[11:16])
    cols[3].metric("Status", anomaly["status"])
    st.caption(f"top clients: {', '.join(anomaly['top_clients']) or '-'} · example requests: "
               f"{', '.join(anomaly['example_request_ids']) or '-'} · traces: "
               f"{', '.join(anomaly['example_trace_ids']) or '-'}")
    st.page_link("views/investigate.py", label="Investigate this anomaly",
                 icon=":material/troubleshoot:", query_params={"anomaly": anomaly["id"]})


def recommendation(rec: dict[str, Any], client: ApiClient) -> None:
    policy, impact = rec["policy"], rec.get("impact") or {}
    st.markdown(f"**Recommended:** {policy['limit']} per {policy['window_s']:g} s by "
                f"{policy['key_by']} ({rec['status']}, confidence {rec['confidence']:.0%})")
    cols = st.columns(4)
    cols[0].metric("Flagged requests limited", impact.get("flagged_requests_limited", 0))
    cols[1].metric("Flagged clients limited", impact.get("flagged_clients_limited", 0))
    cols[2].metric("Other requests limited", impact.get("other_requests_limited", 0))
    cols[3].metric("Other clients limited", impact.get("other_clients_limited", 0))
    reason = st.text_input("Reason to approve", key=f"sec-reason-{rec['id']}")
    if rec["status"] == "pending" and st.button("Approve limit", key=f"sec-approve-{rec['id']}"):
        run_action(partial(client.act, rec["id"], "approve", reason), "recommendation approved")


def related(windows: list[dict[str, Any]], recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recommendations made for one of the incident's windows, or for its endpoint and one
    of its top clients (analytics links a recommendation to the window that triggered it)."""
    ids = {a["id"] for a in windows}
    key = endpoint_key(windows[0]["endpoint"])
    clients = {c for a in windows for c in a["top_clients"]}
    return [rec for rec in recs if ids & set(rec["anomaly_ids"]) or (
        endpoint_key(rec["endpoint"]) == key
        and clients & {*rec["flagged_clients"], rec.get("target_client") or ""})]


def handled(rec: dict[str, Any], ctx: Context) -> None:
    """A recommendation already applied (auto mode or a person): what is in force now."""
    policy = rec["policy"]
    scope = f"for {policy['match_key']} only" if policy.get("match_key") else "for every client"
    st.success(f"**Already limited:** {policy['limit']} per {policy['window_s']:g} s by "
               f"{policy['key_by']} {scope} (policy `{policy['id']}`, applied "
               f"{when(rec.get('updated_at'), ctx.tz)} by {rec['status_by']}).",
               icon=":material/verified_user:")
    st.page_link("views/policies.py", label=f"Review or roll back {policy['id']}",
                 icon=":material/tune:", query_params={"policy": policy["id"]})


def rolled_back(rec: dict[str, Any], ctx: Context) -> None:
    policy = rec["policy"]
    st.info(f"**Limit rolled back:** {policy['limit']} per {policy['window_s']:g} s "
            f"(policy `{policy['id']}`) by {rec['status_by']} at "
            f"{when(rec.get('updated_at'), ctx.tz)}: {rec['status_reason'] or '-'}",
            icon=":material/undo:")


def dismiss(windows: list[dict[str, Any]], recs: list[dict[str, Any]], client: ApiClient,
            key: str) -> None:
    """Dismiss every window of the incident (each audited), and its pending recommendations."""
    reason = st.text_input("Reason to dismiss", key=f"dismiss-reason-{key}")
    label = "Dismiss" if len(windows) == 1 else f"Dismiss all {len(windows)} windows"
    if st.button(label, key=f"dismiss-{key}", disabled=not reason.strip()):
        def every() -> None:
            for anomaly in windows:
                client.dismiss_anomaly(anomaly["id"], reason)
            for rec in recs:
                if rec["status"] in ("pending", "approved"):
                    client.act(rec["id"], "dismiss", reason)

        run_action(every, "dismissed")


def targeted(windows: list[dict[str, Any]], ctx: Context, key: str) -> None:
    latest = windows[-1]
    endpoint = latest["endpoint"]
    named = list(dict.fromkeys(c for a in reversed(windows) for c in a["top_clients"]))
    candidates = named or [row["client"] for row in ctx.client.top_clients(
        ctx.span.params(), endpoint["route_id"], endpoint["method"], endpoint["http_route"], 5,
        compare=None)]
    if not candidates:
        st.caption("No client to limit.")
        return
    cols = st.columns(4)
    who = cols[0].selectbox("Client", candidates, key=f"limit-client-{key}")
    limit = int(cols[1].number_input("Limit", min_value=1, max_value=10_000_000, value=10,
                                     key=f"limit-n-{key}"))
    window = cols[2].selectbox("per", list(WINDOWS), index=2, key=f"limit-window-{key}")
    expiry = cols[3].selectbox("expires in", list(EXPIRY), index=1, key=f"limit-exp-{key}")
    impact = ctx.client.targeted_impact(ctx.span.params(), endpoint["route_id"],
                                        endpoint["method"], who, limit, WINDOWS[window])
    st.info(f"Simulated on {who}'s recorded traffic ({ctx.span.label(ctx.tz)}): "
            f"{impact['requests_limited']:,} of {impact['requests']:,} requests "
            f"({impact['share_limited']:.0%}) would have been limited, in "
            f"{impact['windows_over_limit']} of {impact['windows']} windows.",
            icon=":material/calculate:")
    reason = st.text_input("Reason for the limit", key=f"limit-reason-{key}")
    if st.button(f"Limit {who} to {limit} per {window} for {expiry}", key=f"limit-{key}",
                 disabled=not reason.strip()):
        key_by = "ip" if who.replace(".", "").replace(":", "").isalnum() and any(
            ch in who for ch in ".:") and who[0].isdigit() else "client_id"
        run_action(partial(ctx.client.targeted_limit, route_id=endpoint["route_id"],
                           method=endpoint["method"], client=who, key_by=key_by, limit=limit,
                           window_s=WINDOWS[window], expires_in_s=EXPIRY[expiry],
                           reason=reason, anomaly_id=latest["id"],
                           anomaly_ids=[a["id"] for a in windows[:-1]]),
                   f"limit set for {who}")


def render(ctx: Context) -> None:
    st.title("Security review")
    reads = fetch_all({"anomalies": partial(ctx.client.anomalies, ctx.span.params(), limit=1000),
                       "recs": ctx.client.recommendations})
    anomalies, all_recs = reads["anomalies"], reads["recs"]
    todo = queue(anomalies)
    cols = st.columns(3)
    cols[0].metric("To review", len(todo))
    cols[1].metric("Open", sum(1 for _, windows in todo
                               if any(a["status"] == "open" for a in windows)))
    cols[2].metric("Reviewed", sum(1 for a in anomalies if a["kind"] in SECURITY_KINDS
                                   and a["status"] in ("dismissed", "actioned")))
    st.caption(f"Kinds: {', '.join(SECURITY_KINDS)} · {ctx.span.label(ctx.tz)} · one row per "
               "incident (endpoint and kind), however many windows it lasted")
    if not todo:
        st.success("Nothing to review.")
    for i, (worst, windows) in enumerate(todo):
        latest, key = windows[-1], windows[0]["id"]  # widgets keep their key as it grows
        recs = related(windows, all_recs)
        clients = list(dict.fromkeys(c for a in reversed(windows) for c in a["top_clients"]))
        span = (f"{when(windows[0]['window_start'], ctx.tz)[11:16]} → "
                f"{when(latest['window_end'], ctx.tz)[11:16]}")
        title = (f"[{worst['severity']}] {worst['kind']} · {endpoint_key(worst['endpoint'])}"
                 f" · {', '.join(clients[:3]) or 'no client'} · {span}"
                 + (f" · {len(windows)} windows" if len(windows) > 1 else ""))
        with st.expander(title, expanded=i == 0):
            incident_summary(windows, ctx)
            evidence(latest, ctx)
            for rec in recs:
                if rec["status"] in ("pending", "approved"):
                    recommendation(rec, ctx.client)
                elif rec["status"] == "applied":
                    handled(rec, ctx)
                elif rec["status"] == "rolled_back":
                    rolled_back(rec, ctx)
            st.markdown("**Targeted limit for one client**")
            targeted(windows, ctx, key)
            st.markdown("**Dismiss**")
            ids = {a["id"] for a in windows}
            dismiss(windows, [r for r in recs if ids & set(r["anomaly_ids"])], ctx.client, key)
    reviewed = [a for a in anomalies if a["kind"] in SECURITY_KINDS
                and a["status"] in ("dismissed", "actioned")]
    if reviewed:
        st.subheader("Reviewed")
        rows_table(pd.DataFrame([{
            "status": a["status"], "kind": a["kind"], "endpoint": endpoint_key(a["endpoint"]),
            "by": a["reviewed_by"], "reason": a["review_reason"],
            "at": when(a["reviewed_at"], ctx.tz), "id": a["id"]} for a in reviewed]))


guarded(current(), render)
