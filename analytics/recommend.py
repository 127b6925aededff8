"""Recommendations: a per-client limit for a flagged endpoint, with confidence and impact.

Pure functions and estimator-like objects of the per-client minute frame
(features.CLIENT_MINUTE_COLUMNS); no I/O. docs/analytics.md has the formulas.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Sequence
from typing import Any, Final, cast

import numpy as np
import pandas as pd

from analytics.models import (
    Anomaly,
    Endpoint,
    ImpactEstimate,
    Recommendation,
    RecommendationAction,
)
from analytics.settings import AnalyticsSettings
from proxy.policy import Mode, Policy, Source

_UNSAFE_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9._:@/-]")


def policy_id_for(endpoint: Endpoint) -> str:
    """The id of the analytics policy for one route + method (one per endpoint, versioned)."""
    route = _UNSAFE_ID_CHARS.sub("_", endpoint.route_id) or "_"
    return f"analytics:{route}:{endpoint.method.upper()}"[:200]


def recommendation_id(endpoint: Endpoint, window_start: float, scope: str = "") -> str:
    """Deterministic per endpoint and anomaly window (and scope: a targeted client, a
    loosening), so a re-run updates instead of adding."""
    text = f"{endpoint.key}|{int(window_start)}" + (f"|{scope}" if scope else "")
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    return f"rec-{digest[:16]}"


def targeted_policy_id(endpoint: Endpoint, client: str, key_by: str = "client_id") -> str:
    """The id of the analytics policy for one client (or, key_by ip, one client address) on
    one route + method."""
    digest = hashlib.sha1(client.encode(), usedforsecurity=False).hexdigest()[:8]
    safe = _UNSAFE_ID_CHARS.sub("_", client)[:60] or "_"
    kind = "client" if key_by == "client_id" else _UNSAFE_ID_CHARS.sub("_", key_by)
    return f"{policy_id_for(endpoint)[:120]}:{kind}:{safe}:{digest}"


def unauthenticated_addresses(address_frame: pd.DataFrame, *, min_share: float = 0.2,
                              min_count: int = 3, top: int = 10) -> list[str]:
    """Client addresses behind an auth-failure burst whose traffic is unauthenticated.

    `address_frame`: per client address of one endpoint and window (features.ADDRESS_COLUMNS).
    An address qualifies when it has at least `min_count` auth failures, at least `min_share`
    of the window's auth failures, and not one successfully authenticated request (then only
    a limit keyed by `ip` can reach its traffic: the proxy checks those before authn). Sorted
    by auth failures, most first.
    """
    if address_frame.empty:
        return []
    failures = address_frame["auth_failures"].astype("float64")
    total = float(failures.sum())
    if total <= 0:
        return []
    chosen = address_frame[(failures >= min_count) & (failures / total >= min_share)
                           & (address_frame["authenticated"] == 0)
                           & (address_frame["client_address"] != "")]
    chosen = chosen.sort_values(["auth_failures", "client_address"], ascending=[False, True])
    return [str(address) for address in chosen["client_address"].head(top)]


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

    @classmethod
    def from_settings(cls, s: AnalyticsSettings) -> LimitRecommender:
        return cls(headroom=s.headroom, floor=s.limit_floor, window_s=s.limit_window_s,
                   clients_scale=s.confidence_clients_scale)

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


# --- targeted limits for flagged clients -------------------------------------------------

def build_targeted(*, endpoint: Endpoint, anomalies: Sequence[Anomaly], client: str,
                   client_frame: pd.DataFrame, recommender: LimitRecommender,
                   key_by: str = "client_id", expiry_s: float = 3600.0, span_s: float,
                   now: float, current: Policy | None = None,
                   named: bool = True) -> Recommendation | None:
    """A pending targeted limit for one flagged client of an endpoint, or None.

    `recommender` is fitted on the endpoint's legitimate clients (flagged ones left out):
    the limit is at most their per-client median per window (at least 1), `match_key` is the
    client (with key_by ip: the client address), `expires_at` is always set (now +
    `expiry_s`), and the impact is the replay of that client's own recorded minutes.
    `current`: the client's existing targeted policy; None is returned when it is enforced
    and already at or below the proposal. With `named` the evidence is the anomalies whose
    top clients name `client`; without, every anomaly given (the caller found the client
    address behind them).
    """
    of_client = [anomaly for anomaly in anomalies
                 if not named or client in anomaly.top_clients]
    if not of_client:
        return None
    limit = max(1, math.floor(recommender.p50_ * recommender.window_s / 60.0 + 1e-9))
    if (current is not None and current.mode == Mode.ENFORCE and not current.is_expired(now)
            and current.limit * recommender.window_s / current.window_s <= limit):
        return None
    rows = client_frame[client_frame["client"] == client]
    impact = simulate_impact(rows, limit * 60.0 / recommender.window_s, [client],
                             span_s=span_s)
    kinds = ", ".join(sorted({str(a.kind) for a in of_client}))
    policy = Policy(
        id=targeted_policy_id(endpoint, client, key_by), route_id=endpoint.route_id,
        method=endpoint.method, key_by=key_by, match_key=client, limit=limit,
        window_s=recommender.window_s, mode=Mode.ENFORCE, source=Source.ANALYTICS,
        expires_at=now + expiry_s, updated_at=now, updated_by="analytics",
        reason=f"targeted at {client} for {kinds} on {endpoint.method} {endpoint.http_route}")
    first = min(of_client, key=lambda anomaly: anomaly.window_start)
    sent = int(rows["requests"].sum()) if len(rows) else 0
    rationale = (
        f"{client} is {'the address behind' if key_by == 'ip' else 'a top contributor of'} "
        f"{kinds} on {endpoint.method} {endpoint.http_route} "
        f"(route {endpoint.route_id}). Legitimate clients (n={recommender.n_clients_}) send "
        f"p50={recommender.p50_:.3g}/min; targeted limit = max(1, floor(p50)) = {limit}/"
        f"{recommender.window_s:g}s for {key_by}={client} only, expiring in {expiry_s:g}s. "
        f"Replay of {span_s / 3600:.3g} h of {client}'s traffic ({sent} requests): "
        f"{impact.flagged_requests_limited} requests would have been limited; no other "
        "client is affected."
        + (" Its traffic never authenticated, so the limit is keyed by its address and the "
           "proxy checks it before authentication." if key_by == "ip" else ""))
    return Recommendation(
        id=recommendation_id(endpoint, first.window_start,
                             scope=f"client:{client}" if key_by == "client_id"
                             else f"{key_by}:{client}"),
        created_at=now, updated_at=now, endpoint=endpoint,
        anomaly_ids=sorted({anomaly.id for anomaly in of_client}), policy=policy,
        current_policy_id=current.id if current else None, rationale=rationale,
        client_rate_p50=recommender.p50_, client_rate_p90=recommender.p90_,
        client_rate_p99=recommender.p99_, confidence=recommender.confidence_, impact=impact,
        flagged_clients=[client], action=RecommendationAction.TARGETED, target_client=client)


# --- loosening where well-behaved clients hit 429s ---------------------------------------

class LoosenRule:
    """When and how much to loosen an endpoint's limit (recommendation only).

    An endpoint qualifies when, in at least `min_windows` of its recent windows (with at
    least `min_requests` requests each), the 429 share reached `min_share`, none of those
    windows was flagged, and the 429s are spread: at least `min_clients` unflagged clients
    got them, none more than `max_client_share` of them (one heavy client being limited is
    the limit working). New limit = clamp(ceil(p99 of per-client rate x headroom),
    current + 1, ceil(current x `step`)), and no higher than the config baseline
    `ceiling` unless the operator approves (then the proposal says so).
    """

    def __init__(self, *, min_share: float = 0.05, min_windows: int = 5, recent: int = 15,
                 min_requests: int = 20, min_clients: int = 3, max_client_share: float = 0.5,
                 step: float = 1.5, headroom: float = 2.0,
                 clients_scale: float = 10.0) -> None:
        self.min_share = min_share
        self.min_windows = min_windows
        self.recent = recent
        self.min_requests = min_requests
        self.min_clients = min_clients
        self.max_client_share = max_client_share
        self.step = step
        self.headroom = headroom
        self.clients_scale = clients_scale

    @classmethod
    def from_settings(cls, s: AnalyticsSettings) -> LoosenRule:
        """The rule with the `APIGW_LOOSEN_*` settings, judged over `report_minutes`."""
        return cls(min_share=s.loosen_429_share,
                   min_windows=s.loosen_min_windows or max(3, s.report_minutes // 2),
                   recent=s.report_minutes, min_requests=s.min_requests,
                   min_clients=s.loosen_min_clients,
                   max_client_share=s.loosen_max_client_share, step=s.loosen_step,
                   headroom=s.headroom, clients_scale=s.confidence_clients_scale)

    def candidates(self, frame: pd.DataFrame, flagged: pd.DataFrame,
                   until: pd.Timestamp) -> list[Endpoint]:
        """Endpoints whose recent complete windows before `until` often had 429s and no
        flagged window. `flagged`: detections (flagged rows) over the same span."""
        if frame.empty or "rate_limited" not in frame.columns:
            return []
        minutes = pd.to_datetime(frame["minute"], utc=True)
        start = until - pd.Timedelta(minutes=self.recent)
        recent = frame[(minutes >= start) & (minutes < until) & (frame["route_id"] != "")]
        requests = pd.to_numeric(recent["requests"], errors="coerce").fillna(0)
        limited = pd.to_numeric(recent["rate_limited"], errors="coerce").fillna(0)
        hot = recent[(requests >= self.min_requests)
                     & (limited >= self.min_share * requests.clip(lower=1))]
        if hot.empty:
            return []
        counts = hot.groupby(["route_id", "http_request_method", "http_route"]).size()
        noisy: set[tuple[str, str, str]] = set()
        if not flagged.empty:
            at = pd.to_datetime(flagged["minute"], utc=True)
            window = flagged[(at >= start) & (at < until)]
            noisy = {(str(r), str(m), str(h)) for r, m, h in zip(
                window["route_id"], window["http_request_method"], window["http_route"],
                strict=True)}
        found: list[Endpoint] = []
        for key, number in counts.items():
            route, method, template = (str(part) for part in cast(tuple[Any, ...], key))
            if int(number) >= self.min_windows and (route, method, template) not in noisy:
                found.append(Endpoint(route_id=route, method=method, http_route=template))
        return found

    def build(self, *, endpoint: Endpoint, client_frame: pd.DataFrame, current: Policy | None,
              ceiling: Policy | None, excluded: Collection[str], until: pd.Timestamp,
              span_s: float, now: float) -> Recommendation | None:
        """A pending looser limit for the endpoint, or None when the 429s are not spread
        over well-behaved clients or no comparable client-keyed limit governs them."""
        if current is None or current.key_by != "client_id" or current.is_quota:
            return None
        legit = client_frame[~client_frame["client"].isin(list(excluded))]
        minutes = pd.to_datetime(legit["minute"], utc=True)
        recent = legit[(minutes >= until - pd.Timedelta(minutes=self.recent))
                       & (minutes < until)]
        per_client = recent.groupby("client")["rate_limited"].sum()
        per_client = per_client[per_client > 0]
        total = float(per_client.sum())
        if (len(per_client) < self.min_clients or total <= 0
                or float(per_client.max()) / total > self.max_client_share):
            return None
        window_s = current.window_s
        now_limit = current.limit
        rates = legit.loc[legit["requests"] > 0, "requests"].to_numpy(dtype="float64")
        p50, p90, p99 = ((float(v) for v in np.percentile(rates, [50, 90, 99]))
                         if len(rates) else (0.0, 0.0, 0.0))
        wanted = math.ceil(p99 * window_s / 60.0 * self.headroom - 1e-9)
        limit = min(max(wanted, now_limit + 1), max(now_limit + 1,
                                                   math.ceil(now_limit * self.step - 1e-9)))
        ceiling_limit = (None if ceiling is None
                         else math.floor(ceiling.limit * window_s / ceiling.window_s + 1e-9))
        above = ceiling_limit is not None and limit > ceiling_limit
        if above and ceiling_limit is not None and now_limit < ceiling_limit:
            limit, above = ceiling_limit, False
        before = simulate_impact(legit, now_limit * 60.0 / window_s, (), span_s=span_s)
        after = simulate_impact(legit, limit * 60.0 / window_s, (), span_s=span_s)
        policy = Policy(
            id=policy_id_for(endpoint), route_id=endpoint.route_id, method=endpoint.method,
            key_by="client_id", limit=limit, window_s=window_s, mode=Mode.ENFORCE,
            source=Source.ANALYTICS, updated_at=now, updated_by="analytics",
            reason=f"loosened: well-behaved clients hit 429s on {endpoint.method} "
                   f"{endpoint.http_route}")
        share = float(recent["rate_limited"].sum()) / max(float(recent["requests"].sum()), 1.0)
        rationale = (
            f"{len(per_client)} unflagged clients got {int(total)} 429s in the last "
            f"{self.recent} min on {endpoint.method} {endpoint.http_route} (route "
            f"{endpoint.route_id}; 429 share {share:.1%}, no anomaly; largest client "
            f"{float(per_client.max()) / total:.0%} of them). Per-client rate p50={p50:.3g} "
            f"p90={p90:.3g} p99={p99:.3g}/min; limit {now_limit} -> {limit}/{window_s:g}s "
            f"(step at most x{self.step:g}"
            + (f", config baseline ceiling {ceiling_limit}" if ceiling_limit is not None
               else "") + "). "
            + ("ABOVE the config baseline ceiling: needs an operator's approval. "
               if above else "")
            + f"Replay of {span_s / 3600:.3g} h: {before.requests_limited} requests of "
            f"{before.clients_limited} clients limited now, {after.requests_limited} of "
            f"{after.clients_limited} with the new limit. Never applied automatically.")
        return Recommendation(
            id=recommendation_id(endpoint, current.version,
                                 scope=f"loosen:{current.id}:{current.limit}"),
            created_at=now, updated_at=now, endpoint=endpoint, policy=policy,
            current_policy_id=current.id, rationale=rationale, client_rate_p50=p50,
            client_rate_p90=p90, client_rate_p99=p99,
            confidence=round((1.0 - math.exp(-len(per_client) / self.clients_scale)), 3),
            impact=after,
            action=RecommendationAction.LOOSEN)


def config_ceiling(policies: Sequence[Policy], endpoint: Endpoint) -> Policy | None:
    """The config baseline (source config, enforced, untargeted) governing the endpoint."""
    return current_policy([p for p in policies if p.source == Source.CONFIG], endpoint)
