"""The IsolationForest detector on constructed series with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analytics.models import Severity
from analytics.multivariate import MultivariateDetector, corroborated

START = pd.Timestamp("2026-01-05 00:00", tz="UTC")


def frame(minutes: int = 300, incident: tuple[int, int] | None = None,
          seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    requests = rng.poisson(200, minutes).astype("float64")
    errors = rng.binomial(requests.astype("int64"), 0.005).astype("float64")
    p95 = 80 * np.exp(rng.normal(0, 0.08, minutes))
    clients = np.round(60 + rng.normal(0, 2, minutes))
    share = np.clip(0.1 + rng.normal(0, 0.01, minutes), 0, 1)
    if incident is not None:
        window = slice(*incident)
        requests[window] *= 2.5
        errors[window] = np.round(requests[window] * 0.1)
        p95[window] *= 2.0
        share[window] = 0.5
    return pd.DataFrame({
        "minute": START + pd.to_timedelta(np.arange(minutes), unit="min"),
        "route_id": "orders", "http_request_method": "GET", "http_route": "/orders/{id}",
        "requests": requests, "errors_5xx": errors,
        "errors_4xx": np.round(requests * 0.02), "auth_failures": np.zeros(minutes),
        "p95_ms": p95, "clients": clients, "top_client_share": share})


def test_an_all_round_change_scores_high_and_ordinary_windows_low() -> None:
    detector = MultivariateDetector().fit(frame(incident=(250, 255)))
    scores = detector.scores_["mv_score"].to_numpy()
    assert np.isnan(scores[:30]).all()  # too little history to fit a forest
    assert detector.corroborates(scores[250:255]).all()
    ordinary = scores[60:240]
    assert np.mean(detector.corroborates(ordinary)) < 0.02
    assert float(np.nanmedian(ordinary)) < 0.5


def test_no_look_ahead_appending_windows_changes_no_earlier_score() -> None:
    full = frame(minutes=360, incident=(330, 335))
    early = MultivariateDetector().fit(full.iloc[:300]).scores_["mv_score"].to_numpy()
    late = MultivariateDetector().fit(full).scores_["mv_score"].to_numpy()[:300]
    np.testing.assert_array_equal(np.isnan(early), np.isnan(late))
    np.testing.assert_allclose(early[~np.isnan(early)], late[~np.isnan(late)])


def test_live_mode_fits_on_the_windows_before_since_only() -> None:
    data = frame(incident=(295, 300))
    since = START + pd.Timedelta(minutes=290)
    scored = MultivariateDetector().score(data, since=since)
    assert len(scored) == 10
    values = scored["mv_score"].to_numpy()
    assert (values[5:] >= 0.65).all()
    assert (values[:5] < 0.65).all()
    # a flagged window's future cannot change it: the same answer without the later rows
    cut = MultivariateDetector().score(data.iloc[:296], since=since)["mv_score"].to_numpy()
    np.testing.assert_allclose(cut, values[:6])


def test_only_the_asked_endpoints_are_fitted() -> None:
    other = frame(seed=2).assign(route_id="users", http_route="/users/{id}")
    data = pd.concat([frame(), other], ignore_index=True)
    detector = MultivariateDetector()
    scored = detector.score(data, since=START + pd.Timedelta(minutes=290),
                            endpoints=[("users", "GET", "/users/{id}")])
    assert set(scored["route_id"]) == {"users"}
    assert detector.n_models_ == 1


def test_corroboration_raises_severity_one_step_at_most_to_high() -> None:
    assert corroborated(Severity.LOW, 0.7, 0.65) == Severity.MEDIUM
    assert corroborated(Severity.MEDIUM, 0.7, 0.65) == Severity.HIGH
    assert corroborated(Severity.HIGH, 0.9, 0.65) == Severity.HIGH
    assert corroborated(Severity.CRITICAL, 0.9, 0.65) == Severity.CRITICAL
    assert corroborated(Severity.LOW, 0.6, 0.65) == Severity.LOW
    assert corroborated(Severity.LOW, float("nan"), 0.65) == Severity.LOW
