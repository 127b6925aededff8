"""Security review: flagged endpoints and clients, with evidence, and what to do about them.

The queue holds unreviewed anomalies of the security kinds. For each: approve the analytics
recommendation (its simulated impact shown first), dismiss with a reason, or set a targeted
limit for one client with an expiry (its simulated impact on that client shown first).
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
    guarded,
    run_action,
    when,
)

EXPIRY = {"15 min": 900, "1 hour": 3600, "6 hours": 21_600, "24 hours": 86_400,
          "7 days": 604_800}
WINDOWS = {"1 s": 1, "10 s": 10, "1 min": 60, "1 hour": 3600}


def queue(anomalies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    flagged = [a for a in anomalies if a["kind"] in SECURITY_KINDS
               and a["status"] in ("open", "resolved")]
    return sorted(flagged, key=lambda a: (a["status"] != "open",
                                          SEVERITY_ORDER.get(a["severity"], 9), -a["score"]))


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


def related(anomaly: dict[str, Any], recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recommendations made for this anomaly, or for the same endpoint and one of its top
    clients (analytics links a recommendation to the window that triggered it, while the
    queue holds every later window of the same incident too)."""
    key, clients = endpoint_key(anomaly["endpoint"]), set(anomaly["top_clients"])
    return [rec for rec in recs if anomaly["id"] in rec["anomaly_ids"] or (
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


def dismiss(anomaly: dict[str, Any], recs: list[dict[str, Any]], client: ApiClient) -> None:
    reason = st.text_input("Reason to dismiss", key=f"dismiss-reason-{anomaly['id']}")
    if st.button("Dismiss", key=f"dismiss-{anomaly['id']}", disabled=not reason.strip()):
        def both() -> None:
            client.dismiss_anomaly(anomaly["id"], reason)
            for rec in recs:
                if rec["status"] in ("pending", "approved"):
                    client.act(rec["id"], "dismiss", reason)

        run_action(both, "dismissed")


def targeted(anomaly: dict[str, Any], ctx: Context) -> None:
    endpoint = anomaly["endpoint"]
    candidates = anomaly["top_clients"] or [row["client"] for row in ctx.client.top_clients(
        ctx.span.params(), endpoint["route_id"], endpoint["method"], endpoint["http_route"], 5,
        compare=None)]
    if not candidates:
        st.caption("No client to limit.")
        return
    aid = anomaly["id"]
    cols = st.columns(4)
    who = cols[0].selectbox("Client", candidates, key=f"limit-client-{aid}")
    limit = int(cols[1].number_input("Limit", min_value=1, max_value=10_000_000, value=10,
                                     key=f"limit-n-{aid}"))
    window = cols[2].selectbox("per", list(WINDOWS), index=2, key=f"limit-window-{aid}")
    expiry = cols[3].selectbox("expires in", list(EXPIRY), index=1, key=f"limit-exp-{aid}")
    impact = ctx.client.targeted_impact(ctx.span.params(), endpoint["route_id"],
                                        endpoint["method"], who, limit, WINDOWS[window])
    st.info(f"Simulated on {who}'s recorded traffic ({ctx.span.label(ctx.tz)}): "
            f"{impact['requests_limited']:,} of {impact['requests']:,} requests "
            f"({impact['share_limited']:.0%}) would have been limited, in "
            f"{impact['windows_over_limit']} of {impact['windows']} windows.",
            icon=":material/calculate:")
    reason = st.text_input("Reason for the limit", key=f"limit-reason-{aid}")
    if st.button(f"Limit {who} to {limit} per {window} for {expiry}", key=f"limit-{aid}",
                 disabled=not reason.strip()):
        key_by = "ip" if who.replace(".", "").replace(":", "").isalnum() and any(
            ch in who for ch in ".:") and who[0].isdigit() else "client_id"
        run_action(partial(ctx.client.targeted_limit, route_id=endpoint["route_id"],
                           method=endpoint["method"], client=who, key_by=key_by, limit=limit,
                           window_s=WINDOWS[window], expires_in_s=EXPIRY[expiry],
                           reason=reason, anomaly_id=aid), f"limit set for {who}")


def render(ctx: Context) -> None:
    st.title("Security review")
    anomalies = ctx.client.anomalies(ctx.span.params(), limit=1000)
    todo = queue(anomalies)
    all_recs = ctx.client.recommendations()
    cols = st.columns(3)
    cols[0].metric("To review", len(todo))
    cols[1].metric("Open", sum(1 for a in todo if a["status"] == "open"))
    cols[2].metric("Reviewed", sum(1 for a in anomalies if a["kind"] in SECURITY_KINDS
                                   and a["status"] in ("dismissed", "actioned")))
    st.caption(f"Kinds: {', '.join(SECURITY_KINDS)} · {ctx.span.label(ctx.tz)}")
    if not todo:
        st.success("Nothing to review.")
    for i, anomaly in enumerate(todo):
        recs = related(anomaly, all_recs)
        title = (f"[{anomaly['severity']}] {anomaly['kind']} · {endpoint_key(anomaly['endpoint'])}"
                 f" · {', '.join(anomaly['top_clients'][:3]) or 'no client'}"
                 f" · {when(anomaly['window_start'], ctx.tz)[11:16]}")
        with st.expander(title, expanded=i == 0):
            evidence(anomaly, ctx)
            for rec in recs:
                if rec["status"] in ("pending", "approved"):
                    recommendation(rec, ctx.client)
                elif rec["status"] == "applied":
                    handled(rec, ctx)
            st.markdown("**Targeted limit for one client**")
            targeted(anomaly, ctx)
            st.markdown("**Dismiss**")
            dismiss(anomaly, [r for r in recs if anomaly["id"] in r["anomaly_ids"]], ctx.client)
    reviewed = [a for a in anomalies if a["kind"] in SECURITY_KINDS
                and a["status"] in ("dismissed", "actioned")]
    if reviewed:
        st.subheader("Reviewed")
        st.dataframe(pd.DataFrame([{
            "status": a["status"], "kind": a["kind"], "endpoint": endpoint_key(a["endpoint"]),
            "by": a["reviewed_by"], "reason": a["review_reason"],
            "at": when(a["reviewed_at"], ctx.tz), "id": a["id"]} for a in reviewed]),
            hide_index=True)


guarded(current(), render)
