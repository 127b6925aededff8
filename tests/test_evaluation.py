"""The evaluation suite on a small seed: the detectors must meet the issue's targets."""

from __future__ import annotations

import math

import pandas as pd

from analytics.evaluation import alerts, evaluate, format_report
from analytics.scenarios import START, generate
from analytics.settings import AnalyticsSettings


def test_small_scenario_meets_the_targets() -> None:
    result = evaluate(seed=11, days=4, endpoints=4, settings=AnalyticsSettings())
    report = format_report(result)
    assert result.overall.f1 >= 0.9, report
    for kind, score in result.per_kind.items():
        assert score.incidents > 0, f"no {kind} incident generated"
        assert score.f1 >= 0.8, report
    assert result.false_alerts_per_endpoint_week <= 1.0, report
    assert result.overall.median_delay <= 2, report


def test_scenario_is_labelled_and_reproducible() -> None:
    first = generate(seed=5, days=2, endpoints=3)
    again = generate(seed=5, days=2, endpoints=3)
    pd.testing.assert_frame_equal(first.frame, again.frame)
    assert first.incidents == again.incidents
    kinds = {incident.kind for incident in first.incidents}
    assert {"error_spike", "traffic_drop", "undeclared_endpoint", "benign"} <= kinds
    assert len(first.endpoints) == 4  # three routed + the undeclared pseudo-endpoint
    assert first.frame["minute"].min() == START
    hours = first.frame.groupby(first.frame["minute"].dt.hour)["requests"].mean()
    assert hours.max() > 2 * hours.min()  # daily seasonality


def test_alerts_merge_runs_of_flagged_windows() -> None:
    minutes = [START + pd.Timedelta(minutes=m) for m in (10, 11, 12, 40, 41)]
    detections = pd.DataFrame({
        "minute": minutes, "route_id": "a", "http_request_method": "GET", "http_route": "/a",
        "kind": "error_spike", "flagged": [True, True, True, True, False]})
    found = alerts(detections)
    assert found[["start", "end"]].values.tolist() == [[10, 12], [40, 40]]


def test_scores_are_sane_on_a_scenario_without_detections() -> None:
    result = evaluate(seed=3, days=2, endpoints=2,
                      settings=AnalyticsSettings(score_threshold=0.999999))
    assert 0.0 <= result.overall.recall <= 1.0
    assert math.isnan(result.overall.median_delay) or result.overall.median_delay >= 0
