"""Detectors on constructed endpoint-minute series with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analytics.detectors import (
    ClientDominanceDetector,
    ErrorSpikeDetector,
    rolling_baseline,
    severity,
)
from analytics.features import ENDPOINT_MINUTE_COLUMNS
from analytics.models import Severity

START = pd.Timestamp("2026-01-05 10:00", tz="UTC")


def series(route: str, counts: list[tuple[int, int]], *, method: str = "GET",
           top_shares: list[float] | None = None, clients: int = 20,
           start: pd.Timestamp = START) -> pd.DataFrame:
    """One endpoint's minutes from (requests, errors_5xx) pairs."""
    shares = top_shares or [0.1] * len(counts)
    rows = []
    for i, ((requests, errors), share) in enumerate(zip(counts, shares, strict=True)):
        rows.append({
            "minute": start + pd.Timedelta(minutes=i), "route_id": route,
            "http_request_method": method, "http_route": f"/{route}/{{id}}",
            "requests": requests, "errors_5xx": errors, "errors_4xx": 0, "rate_limited": 0,
            "auth_failures": 0, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 30.0,
            "clients": clients, "top_client": "c1",
            "top_client_requests": int(requests * share), "top_client_share": share,
        })
    return pd.DataFrame(rows, columns=ENDPOINT_MINUTE_COLUMNS)


def frame(*parts: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True)


def noisy_baseline(n: int, seed: int, requests: int = 200, rate: float = 0.01,
                   ) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(requests, int(rng.binomial(requests, rate))) for _ in range(n)]


def test_rolling_baseline_uses_only_preceding_values() -> None:
    medians, mads, counts = rolling_baseline(np.array([1.0, 3.0, 5.0, 100.0]), 3)
    assert np.isnan(medians[0])
    assert counts[0] == 0
    assert medians[1] == 1.0
    assert counts[1] == 1
    assert medians[2] == 2.0
    assert mads[2] == 1.0
    assert medians[3] == 3.0
    assert mads[3] == 2.0
    assert counts[3] == 3


def test_spike_flagged_on_the_right_endpoint_and_minute() -> None:
    spiky = [*noisy_baseline(30, seed=1), (200, 90), *noisy_baseline(5, seed=2)]
    data = frame(series("orders", spiky), series("users", noisy_baseline(36, seed=3)),
                 series("items", noisy_baseline(36, seed=4, rate=0.05), method="POST"))
    result = ErrorSpikeDetector().detect(data)
    flagged = result[result["flagged"]]
    assert len(flagged) == 1
    row = flagged.iloc[0]
    assert row["route_id"] == "orders"
    assert row["minute"] == START + pd.Timedelta(minutes=30)
    assert row["observed"] == pytest.approx(0.45)
    assert row["baseline"] < 0.03
    assert row["score"] > 0.99
    assert row["kind"] == "error_spike"
    assert row["metric"] == "error_rate"
    assert list(result.index) == list(data.index)  # aligned with the input rows


def test_quiet_endpoints_never_flagged() -> None:
    data = frame(*(series(f"r{i}", noisy_baseline(120, seed=10 + i, rate=0.02))
                   for i in range(5)))
    result = ErrorSpikeDetector().detect(data)
    assert not result["flagged"].any()
    assert ((result["score"] >= 0) & (result["score"] <= 1)).all()


def test_flat_zero_baseline_with_one_error_blip_not_flagged() -> None:
    counts = [(30, 0)] * 20 + [(30, 1)] + [(30, 0)] * 3
    result = ErrorSpikeDetector().detect(series("calm", counts))
    assert not result["flagged"].any()


def test_small_windows_are_not_flagged() -> None:
    counts = [(10, 0)] * 10 + [(10, 8)]  # 80% errors, but only 10 requests
    result = ErrorSpikeDetector(min_requests=20).detect(series("tiny", counts))
    assert not result["flagged"].any()
    assert result["score"].iloc[-1] > 0.9  # it scores high, it just isn't acted on


def test_short_history_works() -> None:
    counts = [(50, 1), (50, 0), (50, 1), (50, 30)]  # three minutes of baseline, then a spike
    result = ErrorSpikeDetector().detect(series("demo", counts))
    assert result["flagged"].tolist() == [False, False, False, True]


def test_no_history_uses_the_absolute_threshold() -> None:
    detector = ErrorSpikeDetector(cold_threshold=0.2)
    hot = detector.detect(series("new", [(100, 25)]))
    mild = detector.detect(series("new", [(100, 15)]))
    assert hot["flagged"].tolist() == [True]
    assert hot["score"].iloc[0] > 0.9
    assert mild["flagged"].tolist() == [False]
    exact = detector.detect(series("new", [(100, 20)]))
    assert exact["score"].iloc[0] == pytest.approx(0.9)


def test_appending_future_data_does_not_change_past_scores() -> None:
    past = frame(series("a", [*noisy_baseline(40, seed=5), (200, 50)]),
                 series("b", noisy_baseline(41, seed=6)))
    future = frame(
        series("a", [(200, 180)] * 10, start=START + pd.Timedelta(minutes=41)),
        series("b", [(500, 400)] * 10, start=START + pd.Timedelta(minutes=41)),
    )
    detector = ErrorSpikeDetector()
    before = detector.detect(past)
    after = detector.detect(frame(past, future)).iloc[:len(past)]
    pd.testing.assert_series_equal(before["score"], after["score"])
    pd.testing.assert_series_equal(before["flagged"], after["flagged"])


def test_shuffled_input_gives_same_answers() -> None:
    data = frame(series("a", [*noisy_baseline(20, seed=7), (200, 60)]),
                 series("b", noisy_baseline(21, seed=8)))
    shuffled = data.sample(frac=1.0, random_state=3)
    detector = ErrorSpikeDetector()
    pd.testing.assert_frame_equal(detector.detect(data),
                                  detector.detect(shuffled).loc[data.index])


def test_fit_and_score_samples_shape() -> None:
    data = series("a", [*noisy_baseline(10, seed=9), (200, 100)])
    detector = ErrorSpikeDetector().fit(data)
    assert detector.n_windows_ == 11
    assert detector.n_endpoints_ == 1
    assert detector.n_flagged_ == 1
    scores = detector.score_samples(data)
    assert scores.shape == (11,)
    assert scores[-1] > 0.99


def test_missing_columns_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        ErrorSpikeDetector().detect(pd.DataFrame({"minute": [START]}))


def test_empty_frame() -> None:
    result = ErrorSpikeDetector().detect(series("a", []))
    assert result.empty
    assert "flagged" in result.columns


def test_client_dominance_flags_one_client_taking_over() -> None:
    shares = [0.1, 0.12, 0.08, 0.11, 0.09, 0.1, 0.85]
    data = frame(series("search", [(100, 0)] * 7, top_shares=shares),
                 series("home", [(100, 0)] * 7, top_shares=[0.3] * 7))
    result = ClientDominanceDetector().detect(data)
    flagged = result[result["flagged"]]
    assert flagged["route_id"].tolist() == ["search"]
    assert flagged["minute"].tolist() == [START + pd.Timedelta(minutes=6)]
    assert flagged["kind"].iloc[0] == "client_dominance"


def test_client_dominance_ignores_usual_dominance_and_single_clients() -> None:
    usual = series("internal", [(100, 0)] * 8, top_shares=[0.9] * 8)
    single = series("solo", [(100, 0)] * 8, top_shares=[0.1] * 7 + [1.0], clients=1)
    result = ClientDominanceDetector().detect(frame(usual, single))
    with_history = result[result["history"] >= 2]
    assert not with_history["flagged"].any()
    # without history a 90% share is judged against the absolute cold-start share (80%)
    assert result[result["history"] < 2]["flagged"].tolist() == [True, True, False, False]


def test_severity_levels() -> None:
    assert severity("error_spike", 0.0, 0.6) == Severity.CRITICAL
    assert severity("error_spike", 0.0, 0.25) == Severity.HIGH
    assert severity("error_spike", 0.0, 0.06) == Severity.LOW
    assert severity("client_dominance", 0.1, 0.95) == Severity.HIGH


def test_rare_errors_in_small_windows_are_not_flagged() -> None:
    # errors are rare (1%), so most windows have none and the median rate is 0; two errors
    # in a window of 36 requests (5.6%) are still ordinary, judged by the pooled rate
    counts = [(36, 0), (36, 1), (36, 0), (36, 0), (36, 0), (36, 1), (36, 0), (36, 0),
              (36, 0), (36, 1), (36, 0), (36, 0), (36, 2)]
    result = ErrorSpikeDetector().detect(series("rare", counts))
    assert not result["flagged"].any()
    assert result["baseline"].iloc[-1] == 0.0


def test_random_quiet_traffic_rarely_flags() -> None:
    rng = np.random.default_rng(42)
    parts = []
    for i in range(50):
        requests = rng.integers(24, 60, size=30)
        errors = rng.binomial(requests, 0.01)
        parts.append(series(f"r{i}", list(zip(requests.tolist(), errors.tolist(), strict=True))))
    result = ErrorSpikeDetector().detect(frame(*parts))
    assert result["flagged"].sum() <= 1  # 1500 windows


def test_seasonal_slices_give_the_answers_of_the_whole_history() -> None:
    """The live job reads earlier days only around the time of day being judged
    (AnalyticsJob.frame); the recent windows must be judged as with every minute."""
    from analytics.scenarios import generate
    from analytics.scoring import detect_all
    from analytics.settings import AnalyticsSettings

    settings = AnalyticsSettings()
    scenario = generate(seed=4, days=5, endpoints=3)
    full = scenario.frame
    for end_minute in (scenario.minutes - 1, scenario.minutes - 700):
        now = (pd.Timestamp("2026-01-05", tz="UTC")
               + pd.Timedelta(minutes=end_minute)).timestamp() + 30
        recent_start = (now // 60) * 60 - (settings.report_minutes - 1) * 60
        detail_start = (now // 60) * 60 - 3 * settings.history_minutes * 60 - 20 * 60
        low = recent_start - settings.history_minutes * 60 - 600
        high = now + 600
        seconds = pd.DatetimeIndex(full["minute"]).as_unit("s").asi8
        in_slice = ((seconds - int(low)) % 86_400) <= (high - low)
        upto = seconds < now
        sliced = full[upto & ((seconds >= detail_start) | in_slice)]
        since = pd.Timestamp(recent_start, unit="s", tz="UTC")
        expected = detect_all(full[upto], settings, since=since)
        got = detect_all(sliced, settings, since=since)
        key = ["kind", "route_id", "minute"]
        expected = expected.sort_values(key).reset_index(drop=True)
        got = got.sort_values(key).reset_index(drop=True)
        pd.testing.assert_series_equal(expected["score"], got["score"])
        pd.testing.assert_series_equal(expected["flagged"], got["flagged"])
        assert len(got) > 0
