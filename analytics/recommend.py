"""Recommendations: a per-client limit for a flagged endpoint, with confidence and impact.

Pure functions and estimator-like objects of the per-client minute frame
(features.CLIENT_MINUTE_COLUMNS); no I/O. docs/analytics.md has the formulas.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Sequence
from typing import Final

import numpy as np
import pandas as pd

from analytics.models import Anomaly, Endpoint, ImpactEstimate, Recommendation
from proxy.policy import Mode, Policy, Source

_UNSAFE_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9._:@/-]")


def policy_id_for(endpoint: Endpoint) -> str:
    """The id of the analytics policy for one route + method (one per endpoint, versioned)."""
    route = _UNSAFE_ID_CHARS.sub("_", endpoint.route_id) or "_"
    return f"analytics:{route}:{endpoint.method.upper()}"[:200]


def recommendation_id(endpoint: Endpoint, window_start: float) -> str:
    """Deterministic per endpoint and anomaly window, so a re-run updates instead of adding."""
    digest = hashlib.sha1(f"{endpoint.key}|{int(window_start)}".encode(),
                          usedforsecurity=False).hexdigest()
    return f"rec-{digest[:16]}"


def contributors(client_frame: pd.DataFrame, windows: Collection[pd.Timestamp], *,
                 metric: str = "errors_5xx", min_share: float = 0.2, ratio: float = 3.0,
                 min_count: int = 3, top: int = 10) -> list[str]:
    """Clients whose share of `metric` in the anomalous windows far exceeds their usual share.

    Usual share = the client's share of requests outside those windows (0 for a new client).
    A contributor has share >= min_share, share >= ratio x usual share and at least
    `min_count` of the metric in the windows. Sorted by share, largest first.
    """
    if client_frame.empty or not windows:
        return []
    in_window = client_frame["minute"].isin(list(windows))
    anomalous = client_frame[in_window].groupby("client")[metric].sum()
    total = float(anomalous.sum())
    if total <= 0:
        return []
    usual = client_frame[~in_window].groupby("client")["requests"].sum()
    usual_total = float(usual.sum())
    share = anomalous / total
    usual_share = (usual / usual_total).reindex(share.index).fillna(0.0) if usual_total else (
        pd.Series(0.0, index=share.index))
    chosen = share[(share >= min_share) & (share >= ratio * usual_share)
                   & (anomalous >= min_count)]
    return [str(client) for client in chosen.sort_values(ascending=False).index[:top]]


class LimitRecommender:
    """Per-client limit = max(floor, ceil(p99 of legit per-client rate x headroom)).

    `fit` learns from the per-client per-minute counts of one endpoint, leaving the flagged
    clients out: percentiles `p50_`, `p90_`, `p99_` (requests per minute), `limit_` (per
    `window_s`), `n_clients_`, `n_samples_`, `stability_` and `confidence_` in [0, 1].
    """

    def __init__(self, *, headroom: float = 2.0, floor: int = 10, window_s: float = 60.0,
                 clients_scale: float = 10.0) -> None:
        self.headroom = headroom
        self.floor = floor
        self.window_s = window_s
        self.clients_scale = clients_scale

    def fit(self, client_frame: pd.DataFrame, flagged: Collection[str] = ()) -> LimitRecommender:
        legit = client_frame[~client_frame["client"].isin(list(flagged))]
        legit = legit[legit["requests"] > 0]
        rates = legit["requests"].to_numpy(dtype="float64")
        self.n_samples_ = len(rates)
        self.n_clients_ = int(legit["client"].nunique())
        if len(rates):
            self.p50_, self.p90_, self.p99_ = (float(v) for v in np.percentile(rates,
                                                                               [50, 90, 99]))
        else:
            self.p50_ = self.p90_ = self.p99_ = 0.0
        per_window = self.p99_ * self.window_s / 60.0
        self.limit_ = max(self.floor, math.ceil(per_window * self.headroom - 1e-9))
        self.stability_ = self._stability(legit)
        clients_factor = 1.0 - math.exp(-self.n_clients_ / self.clients_scale)
        self.confidence_ = round(clients_factor * (0.25 + 0.75 * self.stability_), 3)
        return self

    @staticmethod
    def _stability(legit: pd.DataFrame) -> float:
        """How alike the p99 is in the older and the newer half of the history (0..1)."""
        if len(legit) < 4:
            return 0.0
        minutes = legit["minute"]
        middle = minutes.min() + (minutes.max() - minutes.min()) / 2
        older = legit.loc[minutes <= middle, "requests"].to_numpy(dtype="float64")
        newer = legit.loc[minutes > middle, "requests"].to_numpy(dtype="float64")
        if not len(older) or not len(newer):
            return 0.5
        a, b = float(np.percentile(older, 99)), float(np.percentile(newer, 99))
        return min(a, b) / max(a, b) if max(a, b) > 0 else 0.0

    def impact(self, client_frame: pd.DataFrame, flagged: Collection[str] = (),
               span_s: float | None = None) -> ImpactEstimate:
        """Replay the per-client minutes against `limit_`: what would have been limited.

        Requests above the limit within one client-minute count as limited (a fixed-window
        approximation of the proxy's GCRA limiter).
        """
        return simulate_impact(client_frame, self.limit_ * 60.0 / self.window_s, flagged,
                               span_s=span_s)


def simulate_impact(client_frame: pd.DataFrame, limit_per_minute: float,
                    flagged: Collection[str] = (), span_s: float | None = None,
                    ) -> ImpactEstimate:
    """Clients and requests over `limit_per_minute` in the recorded minutes, flagged vs other."""
    if span_s is None:
        span_s = _span_s(client_frame)
    if client_frame.empty:
        return ImpactEstimate(window_s=span_s, clients_limited=0, requests_limited=0,
                              flagged_clients_limited=0, flagged_requests_limited=0,
                              other_clients_limited=0, other_requests_limited=0)
    over = (client_frame["requests"].to_numpy(dtype="float64") - limit_per_minute).clip(min=0)
    per_client = pd.Series(np.floor(over), index=client_frame["client"].to_numpy()).groupby(
        level=0).sum()
    limited = per_client[per_client > 0]
    is_flagged = limited.index.isin(list(flagged))
    return ImpactEstimate(
        window_s=span_s,
        clients_limited=len(limited),
        requests_limited=int(limited.sum()),
        flagged_clients_limited=int(is_flagged.sum()),
        flagged_requests_limited=int(limited[is_flagged].sum()),
        other_clients_limited=int((~is_flagged).sum()),
        other_requests_limited=int(limited[~is_flagged].sum()),
    )


def _span_s(client_frame: pd.DataFrame) -> float:
    if client_frame.empty:
        return 0.0
    minutes = client_frame["minute"]
    return float((minutes.max() - minutes.min()).total_seconds()) + 60.0


def current_limit_per_window(policy: Policy | None, window_s: float) -> float | None:
    """An existing policy's limit expressed per `window_s`, or None when there is none."""
    if policy is None:
        return None
    return policy.limit * window_s / policy.window_s


def current_policy(policies: Sequence[Policy], endpoint: Endpoint) -> Policy | None:
    """The enforced policy that governs every client of the endpoint now, if any."""
    candidates = [p for p in policies
                  if p.mode == Mode.ENFORCE and p.match_key is None and p.tenant is None
                  and p.applies_to(endpoint.route_id, endpoint.method, "")]
    return max(candidates, key=lambda p: p.specificity, default=None)


def build_recommendation(*, endpoint: Endpoint, anomalies: Sequence[Anomaly],
                         client_frame: pd.DataFrame, flagged_clients: Sequence[str],
                         recommender: LimitRecommender, current: Policy | None,
                         span_s: float, now: float) -> Recommendation | None:
    """A pending recommendation for one flagged endpoint, or None if it would not tighten.

    `client_frame` holds that endpoint's per-client minutes; `current` is the policy that
    applies to its clients now (if any); when it is also keyed by client id, a proposal that is
    not lower than it is dropped.
    """
    if not anomalies:
        return None
    recommender.fit(client_frame, flagged_clients)
    comparable = current is not None and current.key_by == "client_id"
    current_limit = current_limit_per_window(current, recommender.window_s) if comparable else None
    if current_limit is not None and recommender.limit_ >= current_limit:
        return None
    impact = recommender.impact(client_frame, flagged_clients, span_s=span_s)
    first = min(anomalies, key=lambda anomaly: anomaly.window_start)
    policy = Policy(
        id=policy_id_for(endpoint), route_id=endpoint.route_id, method=endpoint.method,
        key_by="client_id", limit=recommender.limit_, window_s=recommender.window_s,
        mode=Mode.ENFORCE, source=Source.ANALYTICS, updated_at=now, updated_by="analytics",
        reason=f"recommended for {', '.join(sorted({str(a.kind) for a in anomalies}))} "
               f"on {endpoint.method} {endpoint.http_route}",
    )
    return Recommendation(
        id=recommendation_id(endpoint, first.window_start),
        created_at=now, updated_at=now, endpoint=endpoint,
        anomaly_ids=sorted({anomaly.id for anomaly in anomalies}),
        policy=policy,
        current_policy_id=current.id if current else None,
        rationale=_rationale(endpoint, anomalies, recommender, impact, current_limit),
        client_rate_p50=recommender.p50_, client_rate_p90=recommender.p90_,
        client_rate_p99=recommender.p99_, confidence=recommender.confidence_,
        impact=impact, flagged_clients=list(flagged_clients),
    )


def _rationale(endpoint: Endpoint, anomalies: Sequence[Anomaly], rec: LimitRecommender,
               impact: ImpactEstimate, current_limit: float | None) -> str:
    latest = max(anomalies, key=lambda anomaly: anomaly.window_start)
    window = f"{rec.window_s:g}s"
    parts = [
        f"{latest.kind} on {endpoint.method} {endpoint.http_route} (route {endpoint.route_id}): "
        f"{latest.metric} {latest.observed:.3g} vs baseline {latest.baseline:.3g}.",
        f"Legitimate clients (n={rec.n_clients_}, {rec.n_samples_} client-minutes) per-minute "
        f"rate p50={rec.p50_:.3g} p90={rec.p90_:.3g} p99={rec.p99_:.3g}; limit = max("
        f"{rec.floor}, ceil(p99 x {rec.headroom:g})) = {rec.limit_}/{window} per client_id"
        + (f" (now {current_limit:.0f}/{window})." if current_limit is not None else "."),
        f"Replay of {impact.window_s / 3600:.3g} h: {impact.flagged_clients_limited} flagged "
        f"clients ({impact.flagged_requests_limited} requests) and "
        f"{impact.other_clients_limited} other clients ({impact.other_requests_limited} "
        "requests) would have been limited.",
    ]
    return " ".join(parts)
