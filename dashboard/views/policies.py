"""Policies: what is enforced vs what analytics recommends, history with diffs, rollback,
auto-tightening mode per route group and the kill switch."""

from __future__ import annotations

from functools import partial
from typing import Any, Final

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient
from dashboard.common import (
    Context,
    current,
    endpoint_key,
    fetch_all,
    guarded,
    param,
    rows_table,
    run_action,
    when,
)

ACTIONS: Final = {"pending": ("approve", "apply", "dismiss"), "approved": ("apply", "dismiss"),
                  "applied": ("rollback",)}
MODES: Final = ["default", "off", "recommend", "auto"]


def applies(policy: dict[str, Any], endpoint: dict[str, Any]) -> bool:
    return (policy["route_id"] in ("*", endpoint["route_id"])
            and policy["method"] in ("*", endpoint["method"]) and policy["match_key"] is None
            and policy["tenant"] is None)


def specificity(policy: dict[str, Any]) -> int:
    return int(policy["route_id"] != "*") * 4 + int(policy["method"] != "*") * 2


def limit_text(policy: dict[str, Any]) -> str:
    return f"{policy['limit']} / {policy['window_s']:g} s by {policy['key_by']}"


def controls(ctx: Context, engaged: bool, modes: dict[str, str]) -> None:
    left, right = st.columns(2)
    with left:
        st.markdown("**Kill switch** - stops every automatic change")
        if engaged:
            st.error("ENGAGED: analytics only recommends", icon=":material/block:")
        else:
            st.success("off: analytics may apply within its guardrails",
                       icon=":material/check_circle:")
        reason = st.text_input("Reason", key="kill-reason")
        label = "Release kill switch" if engaged else "Engage kill switch"
        if st.button(label, key="kill", disabled=not reason.strip()):
            run_action(partial(ctx.client.set_kill_switch, not engaged, reason),
                       "kill switch changed")
    with right:
        st.markdown("**Auto mode per route group** (`*` = the default)")
        st.table(pd.DataFrame([{"group": g, "mode": m} for g, m in modes.items()]
                              or [{"group": "*", "mode": "(from settings)"}]
                              ).style.hide(axis="index"))
        cols = st.columns(2)
        group = cols[0].text_input("Route group", "*", key="mode-group")
        mode = cols[1].selectbox("Mode", MODES, key="mode-value")
        mode_reason = st.text_input("Reason", key="mode-reason")
        if st.button("Set auto mode", key="mode-set", disabled=not mode_reason.strip()):
            run_action(partial(ctx.client.set_auto_mode, group.strip() or "*",
                               None if mode == "default" else mode, mode_reason),
                       "auto mode changed")


def active_vs_recommended(views: list[dict[str, Any]], recs: list[dict[str, Any]],
                          endpoints: list[dict[str, Any]]) -> None:
    effective = [v["policy"] for v in views if v["active"]]
    rows = []
    for endpoint in endpoints:
        matching = sorted((p for p in effective if applies(p, endpoint)), key=specificity,
                          reverse=True)
        targeted = [p for p in effective if p["match_key"] is not None
                    and p["route_id"] in ("*", endpoint["route_id"])]
        proposed = [r for r in recs if r["status"] in ("pending", "approved")
                    and endpoint_key(r["endpoint"]) == endpoint_key(endpoint)]
        rows.append({
            "endpoint": endpoint_key(endpoint),
            "active": limit_text(matching[0]) if matching else "none",
            "policy": matching[0]["id"] if matching else "",
            "targeted limits": len(targeted),
            "recommended": limit_text(proposed[0]["policy"]) if proposed else "",
            "recommendation": proposed[0]["status"] if proposed else "",
        })
    if rows:
        rows_table(pd.DataFrame(rows))
    else:
        st.info("No traffic in this range.")


def recommendations(client: ApiClient, recs: list[dict[str, Any]], ctx: Context) -> None:
    order = {"pending": 0, "approved": 1, "applied": 2}
    if not recs:
        st.info("No recommendations.")
    ranked = sorted(recs, key=lambda r: (order.get(r["status"], 9), -r["created_at"]))
    for i, rec in enumerate(ranked):
        policy = rec["policy"]
        scope = f" for {policy['match_key']}" if policy.get("match_key") else ""
        title = (f"[{rec['status']}] {endpoint_key(rec['endpoint'])} → {policy['limit']} per "
                 f"{policy['window_s']:g} s by {policy['key_by']}{scope}")
        with st.expander(title, expanded=rec["status"] == "pending" or i == 0):
            st.write(rec["rationale"])
            impact = rec.get("impact") or {}
            cols = st.columns(4)
            cols[0].metric("Confidence", f"{rec['confidence']:.0%}")
            cols[1].metric("Client p99 / window", f"{rec['client_rate_p99']:.1f}")
            cols[2].metric("Flagged requests limited", impact.get("flagged_requests_limited", 0))
            cols[3].metric("Other requests limited", impact.get("other_requests_limited", 0))
            st.caption(f"flagged clients: {', '.join(rec['flagged_clients']) or '-'} · "
                       f"anomalies: {', '.join(rec['anomaly_ids'])} · created "
                       f"{when(rec['created_at'], ctx.tz)} · {rec['status']} "
                       f"{when(rec['updated_at'], ctx.tz)} by {rec['status_by']}: "
                       f"{rec['status_reason'] or '-'}")
            actions = ACTIONS.get(rec["status"], ())
            if not actions:
                continue
            reason = st.text_input("Reason", key=f"reason-{rec['id']}")
            buttons = st.columns(len(actions))
            for column, action in zip(buttons, actions, strict=True):
                if column.button(action.capitalize(), key=f"{action}-{rec['id']}"):
                    run_action(partial(client.act, rec["id"], action, reason), f"{action} done")


def shown(field: str, value: Any, ctx: Context) -> str:
    """A diff cell: times (`*_at` fields) in the chosen zone, the rest as text."""
    if field.endswith("_at") and isinstance(value, int | float):
        return when(value, ctx.tz)
    return str(value)


def history(ctx: Context, views: list[dict[str, Any]]) -> None:
    ids = [v["policy"]["id"] for v in views]
    latest = max(views, key=lambda v: v["policy"]["updated_at"] or 0.0)["policy"]["id"]
    wanted = param("policy", latest)  # by default the policy changed last
    chosen = st.selectbox("History of", ids, index=ids.index(wanted) if wanted in ids else 0)
    st.query_params["policy"] = chosen
    versions = ctx.client.policy_history(chosen)
    rows_table(pd.DataFrame([{
        "version": p["version"], "limit": limit_text(p), "mode": p["mode"],
        "source": p["source"], "expires": when(p["expires_at"], ctx.tz) or "never",
        "updated": when(p["updated_at"], ctx.tz), "by": p["updated_by"], "why": p["reason"],
    } for p in versions]))
    if len(versions) < 2:
        st.caption("A single version: nothing to compare or roll back to.")
        return
    numbers = [p["version"] for p in versions]
    cols = st.columns(2)
    newer = cols[0].selectbox("Compare version", numbers, index=0, key="diff-to")
    older = cols[1].selectbox("with version", numbers, index=1, key="diff-from")
    diff = ctx.client.policy_diff(chosen, older, newer)
    if diff["changes"]:
        st.table(pd.DataFrame([{
            "field": c["field"], f"v{older}": shown(c["field"], c["before"], ctx),
            f"v{newer}": shown(c["field"], c["after"], ctx)} for c in diff["changes"]]
            ).style.hide(axis="index"))
    else:
        st.caption("No difference.")
    target = versions[1]["version"]
    why = st.text_input("Reason for the rollback (audited)", key="rollback-reason",
                        placeholder="rollback from the dashboard")
    if st.button(f"Roll back {chosen} to version {target}", key="rollback"):
        run_action(partial(ctx.client.rollback_policy, chosen,
                           why.strip() or "rollback from the dashboard", target),
                   "policy rolled back")


def render(ctx: Context) -> None:
    st.title("Policies")
    client = ctx.client
    reads = fetch_all({"engaged": client.kill_switch, "modes": client.auto_modes,
                       "policies": client.policies, "recs": client.recommendations,
                       "endpoints": partial(client.endpoint_names, ctx.span.params())})
    controls(ctx, reads["engaged"], reads["modes"])
    data, recs = reads["policies"], reads["recs"]
    views = data["policies"]
    st.subheader("Active vs recommended per endpoint")
    active_vs_recommended(views, recs, reads["endpoints"])
    st.subheader("Recommendations")
    recommendations(ctx.client, recs, ctx)
    st.subheader(f"Policies (store version {data['version']})")
    if not views:
        st.info("No policies.")
        return
    rows_table(pd.DataFrame([{
        "id": v["policy"]["id"], "active": v["active"], "expired": v["expired"],
        "route": v["policy"]["route_id"], "method": v["policy"]["method"],
        "key by": v["policy"]["key_by"], "match key": v["policy"]["match_key"] or "",
        "limit": f"{v['policy']['limit']} / {v['policy']['window_s']:g} s",
        "mode": v["policy"]["mode"], "source": v["policy"]["source"],
        "version": v["policy"]["version"],
        "expires": when(v["policy"]["expires_at"], ctx.tz) or "never",
        "updated by": v["policy"]["updated_by"], "reason": v["policy"]["reason"],
    } for v in views]))
    history(ctx, views)


guarded(current(), render)
