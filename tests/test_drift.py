"""Slow-drift (EWMA) and level-shift (CUSUM) detectors on constructed series."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analytics.detectors import LatencyRegressionDetector
from analytics.drift import LatencyDriftDetector, TrafficShiftDetector, cusum_of_last, ewma
from analytics.features import ENDPOINT_MINUTE_COLUMNS
from analytics.scoring import detect_all
from analytics.settings import AnalyticsSettings

START = pd.Timestamp("2026-01-05 00:00", tz="UTC")


def endpoint(requests: np.ndarray, p95: np.ndarray, clients: np.ndarray | None = None,
             route: str = "orders") -> pd.DataFrame:
    size = len(requests)
    frame = pd.DataFrame({
        "minute": START + pd.to_timedelta(np.arange(size), unit="min"), "route_id": route,
        "http_request_method": "GET", "http_route": f"/{route}/{{id}}",
        "requests": requests.astype("int64"), "errors_5xx": 0, "errors_4xx": 0,
        "rate_limited": 0, "auth_failures": 0, "p50_ms": p95 * 0.4, "p95_ms": p95,
        "p99_ms": p95 * 1.6,
        "clients": (clients if clients is not None else np.full(size, 50)).astype("int64"),
        "top_client": "c1", "top_client_requests": (requests * 0.1).astype("int64"),
        "top_client_share": 0.1, "top_client_paths": 3, "top_paths_client": "c1"})
    return frame[ENDPOINT_MINUTE_COLUMNS]


def flat_p95(size: int, seed: int = 1, level: float = 100.0) -> np.ndarray:
    return level * np.exp(np.random.default_rng(seed).normal(0, 0.08, size))


def test_ewma_is_causal_and_ignores_nan() -> None:
    values = np.array([[1.0, 1.0, np.nan, 1.0, 5.0]])
    smoothed = ewma(values, span=3.0, length=4)
    assert smoothed[0, :4].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert 1.0 < smoothed[0, 4] < 5.0
    assert np.isnan(ewma(np.array([[np.nan, 2.0]]), 3.0, 4)[0, 0])


def test_cusum_of_last_takes_the_best_restart() -> None:
    increments = np.array([[5.0, -10.0, 2.0, 3.0], [-1.0, -1.0, -1.0, -1.0]])
    assert cusum_of_last(increments).tolist() == [5.0, 0.0]


def test_slow_latency_drift_is_flagged_where_the_trailing_median_is_not() -> None:
    size = 400
    p95 = flat_p95(size)
    ramp = np.clip((np.arange(size) - 200) / 200, 0, None)  # x1 -> x2 over 200 windows
    frame = endpoint(np.full(size, 200), p95 * (1 + ramp))
    onset = 200 + 100  # x1.5
    drift = LatencyDriftDetector().detect(frame)
    trailing = LatencyRegressionDetector().detect(frame)
    assert not trailing["flagged"].any()
    flagged = np.flatnonzero(drift["flagged"].to_numpy())
    assert len(flagged)
    assert onset - 10 <= flagged[0] <= onset + 5
    assert not drift["flagged"].iloc[:onset - 10].any()
    assert drift["baseline"].iloc[flagged[0]] < 110  # the level before the drift


def test_flat_or_briefly_slower_latency_is_not_a_drift() -> None:
    size = 600
    p95 = flat_p95(size, seed=2)
    p95[300:330] *= 1.3  # a benign wobble
    assert not LatencyDriftDetector().detect(endpoint(np.full(size, 200), p95))["flagged"].any()
    # and below the absolute margin: 10 ms -> 20 ms is x2 but only +10 ms
    small = flat_p95(size, seed=3, level=10.0) * np.where(np.arange(size) > 300, 2.0, 1.0)
    assert not LatencyDriftDetector().detect(endpoint(np.full(size, 200), small))[
        "flagged"].any()


def test_drift_answers_do_not_depend_on_later_windows() -> None:
    size = 400
    ramp = np.clip((np.arange(size) - 200) / 150, 0, None)
    frame = endpoint(np.full(size, 200), flat_p95(size) * (1 + ramp))
    full = LatencyDriftDetector().detect(frame)
    cut = LatencyDriftDetector().detect(frame.iloc[:330])
    pd.testing.assert_series_equal(full["score"].iloc[:330], cut["score"])
    # only the last 200 windows are needed (the reference lag + history + the EWMA)
    tail = LatencyDriftDetector().detect(frame.iloc[130:330])
    assert tail["score"].iloc[-1] == cut["score"].iloc[-1]


def seasonal_requests(days: int, seed: int = 1, base: float = 200.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(days * 1440)
    rate = base * (1 + 0.5 * np.sin(2 * np.pi * t / 1440)) * np.exp(rng.normal(0, 0.05, len(t)))
    return rng.poisson(rate).astype("float64")


def test_sustained_moderate_drop_is_flagged_as_a_level_shift() -> None:
    requests = seasonal_requests(4)
    start, end = 3 * 1440 + 300, 3 * 1440 + 500
    requests[start:end] = np.round(requests[start:end] * 0.6)  # 40 %: under the 2x margin
    frame = endpoint(requests, flat_p95(len(requests)))
    drop = TrafficShiftDetector("drop").detect(frame)
    flagged = np.flatnonzero(drop["flagged"].to_numpy())
    assert len(flagged)
    assert start <= flagged[0] <= start + 4
    assert flagged[-1] <= end + 2
    # the return to normal is not a surge, and the whole series holds no other shift
    surge = TrafficShiftDetector("surge").detect(frame)
    assert not surge["flagged"].any()
    assert not drop["flagged"].iloc[:start].any()
    assert drop["kind"].iloc[0] == "traffic_drop"


def test_level_shift_needs_a_seasonal_profile_and_benign_surges_pass() -> None:
    requests = seasonal_requests(4, seed=2)
    clients = np.full(len(requests), 50.0)
    start = 3 * 1440 + 600
    busier = requests.copy()
    busier[start:start + 200] *= 1.7  # the same clients sending more: a shift
    more = requests.copy()
    more[start:start + 200] *= 1.7  # more clients: a campaign, benign
    more_clients = clients.copy()
    more_clients[start:start + 200] *= 1.7
    shift = TrafficShiftDetector("surge")
    flagged = np.flatnonzero(shift.detect(endpoint(busier, flat_p95(len(busier)), clients))[
        "flagged"].to_numpy())
    assert len(flagged)
    assert start <= flagged[0] <= start + 4
    assert not shift.detect(endpoint(more, flat_p95(len(more)), more_clients))["flagged"].any()
    # two days: no profile, no level-shift flags at all
    early = busier.copy()[:2 * 1440]
    early[1000:1200] *= 1.7
    assert not shift.detect(endpoint(early, flat_p95(len(early)), clients[:2 * 1440]))[
        "flagged"].any()


def test_detect_all_merges_drift_rows_into_the_kinds_rows() -> None:
    size = 400
    ramp = np.clip((np.arange(size) - 200) / 200, 0, None)
    frame = endpoint(np.full(size, 200), flat_p95(size) * (1 + ramp))
    settings = AnalyticsSettings()
    both = detect_all(frame, settings)
    assert not both.duplicated(["minute", "kind"]).any()
    latency = both[both["kind"] == "latency_regression"]
    assert latency["flagged"].any()
    off = detect_all(frame, AnalyticsSettings(drift_detection=False))
    assert len(off) == len(both)
    assert not off[off["kind"] == "latency_regression"]["flagged"].any()


def test_a_recovered_p95_is_not_flagged_while_the_ewma_decays() -> None:
    size = 400
    p95 = flat_p95(size, seed=5)
    p95[300:310] *= 5.0  # a regression the trailing detector catches, then recovery
    drift = LatencyDriftDetector().detect(endpoint(np.full(size, 200), p95))
    flagged = set(np.flatnonzero(drift["flagged"].to_numpy()).tolist())
    assert flagged
    assert flagged <= set(range(300, 310))
