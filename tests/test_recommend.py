"""Recommendations on constructed per-client minute frames with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analytics.features import ADDRESS_COLUMNS, CLIENT_MINUTE_COLUMNS
from analytics.models import Anomaly, AnomalyKind, Endpoint, Recommendation, Severity
from analytics.recommend import (
    LimitRecommender,
    LoosenRule,
    build_recommendation,
    build_targeted,
    contributors,
    policy_id_for,
    recommendation_id,
    simulate_impact,
    targeted_policy_id,
    unauthenticated_addresses,
)
from analytics.settings import AnalyticsSettings
from proxy.policy import Mode, Policy, Source

START = pd.Timestamp("2026-01-05 00:00", tz="UTC")
ENDPOINT = Endpoint(route_id="orders", method="GET", http_route="/orders/{id}")


def client_frame(counts: dict[str, list[int]], errors: dict[str, list[int]] | None = None,
                 ) -> pd.DataFrame:
    """Per-client per-minute rows; a 0 count means no row for that minute."""
    rows = []
    for client, per_minute in counts.items():
        for i, requests in enumerate(per_minute):
            if requests <= 0:
                continue
            rows.append({
                "minute": START + pd.Timedelta(minutes=i), "route_id": ENDPOINT.route_id,
                "http_request_method": ENDPOINT.method, "http_route": ENDPOINT.http_route,
                "client": client, "requests": requests,
                "errors_5xx": (errors or {}).get(client, [0] * len(per_minute))[i],
                "errors_4xx": 0, "rate_limited": 0, "auth_failures": 0,
            })
    return pd.DataFrame(rows, columns=CLIENT_MINUTE_COLUMNS)


def test_percentiles_and_limit_exclude_flagged_clients() -> None:
    legit = {f"c{i}": [i + 1] * 10 for i in range(10)}  # rates 1..10 per minute
    data = client_frame({**legit, "abuser": [500] * 10})
    rec = LimitRecommender(headroom=2.0, floor=10).fit(data, flagged=["abuser"])
    rates = np.repeat(np.arange(1, 11), 10).astype(float)
    assert rec.p50_ == pytest.approx(np.percentile(rates, 50))
    assert rec.p90_ == pytest.approx(np.percentile(rates, 90))
    assert rec.p99_ == pytest.approx(10.0)
    assert rec.limit_ == 20  # ceil(10 x 2.0)
    assert rec.n_clients_ == 10
    assert rec.n_samples_ == 100
    assert rec.stability_ == pytest.approx(1.0)
    assert rec.confidence_ == pytest.approx(round(1 - math.exp(-1), 3))


def test_limit_never_below_floor() -> None:
    data = client_frame({f"c{i}": [1] * 30 for i in range(5)})
    rec = LimitRecommender(headroom=2.0, floor=10).fit(data)
    assert rec.p99_ == 1.0
    assert rec.limit_ == 10


def test_limit_scales_with_the_window() -> None:
    data = client_frame({f"c{i}": [6] * 10 for i in range(5)})
    rec = LimitRecommender(headroom=2.0, floor=1, window_s=10.0).fit(data)
    assert rec.limit_ == 2  # 6/min = 1 per 10 s, x 2


def test_no_legit_clients_gives_floor_and_no_confidence() -> None:
    data = client_frame({"abuser": [900] * 5})
    rec = LimitRecommender(floor=10).fit(data, flagged=["abuser"])
    assert rec.limit_ == 10
    assert rec.confidence_ == 0.0
    assert rec.p99_ == 0.0


def test_confidence_grows_with_clients_and_stability() -> None:
    few = LimitRecommender().fit(client_frame({f"c{i}": [5] * 20 for i in range(3)}))
    many = LimitRecommender().fit(client_frame({f"c{i}": [5] * 20 for i in range(40)}))
    unstable = LimitRecommender().fit(client_frame(
        {f"c{i}": [5] * 10 + [50] * 10 for i in range(40)}))
    assert few.confidence_ < many.confidence_
    assert unstable.confidence_ < many.confidence_
    assert 0.0 <= unstable.confidence_ <= 1.0


def test_impact_split_flagged_vs_other() -> None:
    data = client_frame({
        "abuser": [100, 100, 5],  # 80 + 80 over a limit of 20
        "heavy": [25, 0, 0],  # 5 over
        "light": [3, 3, 3],  # never over
    })
    impact = simulate_impact(data, 20, flagged=["abuser"], span_s=86_400)
    assert impact.window_s == 86_400
    assert impact.clients_limited == 2
    assert impact.requests_limited == 165
    assert impact.flagged_clients_limited == 1
    assert impact.flagged_requests_limited == 160
    assert impact.other_clients_limited == 1
    assert impact.other_requests_limited == 5


def test_impact_of_empty_frame() -> None:
    impact = simulate_impact(client_frame({}), 20)
    assert impact.clients_limited == 0
    assert impact.window_s == 0.0


def test_contributors_are_clients_far_above_their_usual_share() -> None:
    spike = [0] * 10 + [1]  # minute 10 is the anomaly
    counts = {f"c{i}": [10] * 11 for i in range(8)}
    counts["bad"] = [2] * 10 + [200]
    errors = {f"c{i}": [0] * 10 + [1] for i in range(8)}  # 1 error each in the spike
    errors["bad"] = [0] * 10 + [150]
    data = client_frame(counts, errors)
    window = [START + pd.Timedelta(minutes=spike.index(1))]
    assert contributors(data, window, metric="errors_5xx") == ["bad"]
    assert contributors(data, window, metric="requests") == ["bad"]


def test_no_contributors_when_errors_are_spread_like_traffic() -> None:
    counts = {f"c{i}": [10] * 6 for i in range(5)}
    errors = {f"c{i}": [0] * 5 + [5] for i in range(5)}  # backend failure hits everyone
    data = client_frame(counts, errors)
    assert contributors(data, [START + pd.Timedelta(minutes=5)]) == []


def _anomaly(window_start: float) -> Anomaly:
    return Anomaly(id=f"an-{int(window_start)}", detected_at=window_start + 60,
                   window_start=window_start, window_end=window_start + 60, endpoint=ENDPOINT,
                   kind=AnomalyKind.ERROR_SPIKE, severity=Severity.HIGH, score=0.99,
                   metric="error_rate", baseline=0.01, observed=0.6)


def test_build_recommendation_proposes_a_policy_with_impact() -> None:
    data = client_frame({**{f"c{i}": [5] * 30 for i in range(20)}, "bad": [300] * 30})
    window = START.timestamp() + 29 * 60
    rec = build_recommendation(
        endpoint=ENDPOINT, anomalies=[_anomaly(window)], client_frame=data,
        flagged_clients=["bad"], recommender=LimitRecommender(headroom=2.0, floor=10),
        current=None, span_s=86_400, now=window + 90)
    assert rec is not None
    assert rec.id == recommendation_id(ENDPOINT, window)
    assert rec.policy.id == policy_id_for(ENDPOINT) == "analytics:orders:GET"
    assert (rec.policy.route_id, rec.policy.method, rec.policy.key_by) == (
        "orders", "GET", "client_id")
    assert rec.policy.limit == 10
    assert rec.policy.window_s == 60
    assert rec.policy.source == Source.ANALYTICS
    assert rec.policy.mode == Mode.ENFORCE
    assert rec.client_rate_p99 == 5.0
    assert rec.impact is not None
    assert rec.impact.flagged_clients_limited == 1
    assert rec.impact.other_clients_limited == 0
    assert rec.impact.flagged_requests_limited == 30 * 290
    assert rec.flagged_clients == ["bad"]
    assert rec.anomaly_ids == [f"an-{int(window)}"]
    assert "p99=5" in rec.rationale
    assert "ceil(p99 x 2)" in rec.rationale


def test_build_recommendation_skips_when_not_tighter_than_current() -> None:
    data = client_frame({f"c{i}": [50] * 10 for i in range(20)})  # limit would be 100/min
    current = Policy(id="default", limit=60, window_s=60)
    rec = build_recommendation(
        endpoint=ENDPOINT, anomalies=[_anomaly(START.timestamp())], client_frame=data,
        flagged_clients=[], recommender=LimitRecommender(), current=current, span_s=3600,
        now=START.timestamp())
    assert rec is None
    looser = Policy(id="default", limit=1000, window_s=60)
    rec = build_recommendation(
        endpoint=ENDPOINT, anomalies=[_anomaly(START.timestamp())], client_frame=data,
        flagged_clients=[], recommender=LimitRecommender(), current=looser, span_s=3600,
        now=START.timestamp())
    assert rec is not None
    assert rec.current_policy_id == "default"
    assert rec.policy.limit == 100


def test_policy_id_is_safe_for_odd_route_ids() -> None:
    odd = Endpoint(route_id="my route#1", method="post", http_route="/x")
    assert policy_id_for(odd) == "analytics:my_route_1:POST"
    Policy(id=policy_id_for(odd), limit=1, window_s=1)  # validates


def _named(kind: AnomalyKind, top: list[str]) -> Anomaly:
    return Anomaly(id=f"an-{kind}", detected_at=0, window_start=START.timestamp(),
                   window_end=START.timestamp() + 60, endpoint=ENDPOINT, kind=kind,
                   severity=Severity.HIGH, score=0.99, metric="m", baseline=0, observed=1,
                   top_clients=top)


def test_targeted_limit_is_at_the_legit_median_and_always_expires() -> None:
    frame = client_frame({"a": [2, 4, 6, 4], "b": [4, 4, 4, 4], "bad": [0, 0, 0, 90]})
    recommender = LimitRecommender().fit(frame, ["bad"])
    rec = build_targeted(endpoint=ENDPOINT, anomalies=[_named(AnomalyKind.ERROR_SPIKE,
                                                                ["bad"])],
                         client="bad", client_frame=frame, recommender=recommender,
                         expiry_s=600, span_s=86_400, now=1000.0)
    assert rec is not None
    assert rec.policy.match_key == "bad"
    assert rec.policy.limit == 4  # p50 of the legit client-minutes
    assert rec.policy.expires_at == 1600.0
    assert rec.impact is not None
    assert (rec.impact.flagged_requests_limited, rec.impact.other_clients_limited) == (86, 0)
    # a client no anomaly names gets nothing
    assert build_targeted(endpoint=ENDPOINT, anomalies=[_named(AnomalyKind.ERROR_SPIKE,
                                                                 ["bad"])],
                          client="a", client_frame=frame, recommender=recommender,
                          span_s=86_400, now=1000.0) is None


def test_unauthenticated_addresses_need_share_count_and_no_success() -> None:
    frame = pd.DataFrame([("203.0.113.66", 150, 150, 0, [""]),
                          ("192.0.2.10", 65, 60, 5, ["nat-user"]),  # someone authenticated
                          ("198.51.100.1", 2, 2, 0, ["x"]),  # too few
                          ("198.51.100.2", 40, 40, 0, ["y"])], columns=ADDRESS_COLUMNS)
    assert unauthenticated_addresses(frame, min_share=0.1, min_count=3) == [
        "203.0.113.66", "198.51.100.2"]
    assert unauthenticated_addresses(frame, min_share=0.5, min_count=3) == ["203.0.113.66"]
    assert unauthenticated_addresses(frame, min_share=0.6, min_count=3) == []
    assert unauthenticated_addresses(frame.iloc[:0], min_share=0.1) == []


def test_ip_keyed_targeted_limit_has_its_own_id_and_evidence() -> None:
    frame = client_frame({"a": [2, 4, 6, 4], "b": [4, 4, 4, 4]})
    recommender = LimitRecommender().fit(frame)
    burst = _named(AnomalyKind.AUTH_FAILURE_BURST, [])  # the address is not a named client
    rows = pd.DataFrame({"minute": [START], "client": ["203.0.113.66"], "requests": [150]})
    rec = build_targeted(endpoint=ENDPOINT, anomalies=[burst], client="203.0.113.66",
                         client_frame=rows, recommender=recommender, key_by="ip",
                         span_s=3600, now=1000.0, named=False)
    assert rec is not None
    assert (rec.policy.key_by, rec.policy.match_key) == ("ip", "203.0.113.66")
    assert rec.policy.id == targeted_policy_id(ENDPOINT, "203.0.113.66", "ip")
    assert rec.policy.id != targeted_policy_id(ENDPOINT, "203.0.113.66")
    assert ":ip:203.0.113.66:" in rec.policy.id
    assert rec.impact is not None
    assert rec.impact.flagged_requests_limited == 150 - rec.policy.limit
    # named=True (the default) wants the anomaly to name the client
    assert build_targeted(endpoint=ENDPOINT, anomalies=[burst], client="203.0.113.66",
                          client_frame=rows, recommender=recommender, key_by="ip",
                          span_s=3600, now=1000.0) is None


def test_loosening_steps_up_within_the_config_ceiling() -> None:
    frame = client_frame({f"c{i}": [14] * 10 for i in range(5)})
    frame["rate_limited"] = 4
    rule = LoosenRule()
    until = START + pd.Timedelta(minutes=10)
    current = Policy(id="analytics:orders:GET", route_id="orders", method="GET", limit=10,
                     window_s=60, source=Source.ANALYTICS)
    ceiling = Policy(id="base", route_id="orders", method="GET", limit=12, window_s=60)
    rec = rule.build(endpoint=ENDPOINT, client_frame=frame, current=current, ceiling=ceiling,
                     excluded=(), until=until, span_s=600, now=0.0)
    assert rec is not None
    assert rec.policy.limit == 12  # wanted 15 (step x1.5), capped at the config ceiling
    assert "ABOVE" not in rec.rationale
    at_ceiling = rule.build(endpoint=ENDPOINT, client_frame=frame, current=ceiling,
                            ceiling=ceiling, excluded=(), until=until, span_s=600, now=0.0)
    assert at_ceiling is not None
    assert at_ceiling.policy.limit == 18  # ceil(12 x 1.5): needs the operator
    assert "ABOVE the config baseline ceiling" in at_ceiling.rationale
    # the 429s of one client only: the limit is working, nothing to loosen
    one = frame.assign(rate_limited=np.where(frame["client"] == "c0", 4, 0))
    assert rule.build(endpoint=ENDPOINT, client_frame=one, current=current, ceiling=ceiling,
                      excluded=(), until=until, span_s=600, now=0.0) is None


def test_loosening_parameters_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIGW_LOOSEN_429_SHARE", "0.2")
    monkeypatch.setenv("APIGW_LOOSEN_STEP", "1.2")
    monkeypatch.setenv("APIGW_LOOSEN_MIN_CLIENTS", "6")
    monkeypatch.setenv("APIGW_LOOSEN_MAX_CLIENT_SHARE", "0.4")
    monkeypatch.setenv("APIGW_CONFIDENCE_CLIENTS_SCALE", "5")
    settings = AnalyticsSettings(report_minutes=12)
    rule = LoosenRule.from_settings(settings)
    assert (rule.min_share, rule.step, rule.min_clients, rule.max_client_share) == (
        0.2, 1.2, 6, 0.4)
    assert (rule.recent, rule.min_windows, rule.clients_scale) == (12, 6, 5.0)
    assert LimitRecommender.from_settings(settings).clients_scale == 5.0
    # five clients with 429s: not enough for this rule (6), enough for the default one (3)
    frame = client_frame({f"c{i}": [14] * 10 for i in range(5)})
    frame["rate_limited"] = 4
    current = Policy(id="analytics:orders:GET", route_id="orders", method="GET", limit=10,
                     window_s=60, source=Source.ANALYTICS)
    until = START + pd.Timedelta(minutes=10)

    def build(with_rule: LoosenRule) -> Recommendation | None:
        return with_rule.build(endpoint=ENDPOINT, client_frame=frame, current=current,
                               ceiling=None, excluded=(), until=until, span_s=600, now=0.0)

    assert build(rule) is None
    loosened = build(LoosenRule.from_settings(AnalyticsSettings(loosen_min_clients=3)))
    assert loosened is not None
    assert loosened.policy.limit == 12  # ceil(10 x 1.2): APIGW_LOOSEN_STEP
