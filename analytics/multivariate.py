"""A multivariate detector: scikit-learn IsolationForest over each endpoint's feature vector.

Features per endpoint-minute (`FEATURES`): log(1 + requests), 5xx rate, 4xx rate,
log(1 + p95 ms), auth failure rate, log(1 + distinct clients), top client share. One forest
per endpoint is fitted on that endpoint's windows *before* the block being scored (no
look-ahead): the block is the windows from `since` on (the live job's report window), or,
without `since`, consecutive blocks of `refit_every` windows, each scored by a forest fitted
on up to `train_windows` windows before it. The score of a window is the isolation forest's
anomaly score s(x, n) in (0, 1] (Liu et al.: ~0.5 ordinary, towards 1 isolated quickly);
`corroborates` when it reaches `threshold`.

It is a corroborating score, not a detector of its own kind: the job raises the severity of
an anomaly the univariate detectors flagged when the whole feature vector is unusual too
(docs/analytics.md). Estimator-like: parameters in `__init__`, `fit(frame)` leaves
`scores_`, `n_models_`, `n_endpoints_`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import Final

import numpy as np
import pandas as pd
from sklearn.ensemble import IsolationForest

from analytics.detectors import ENDPOINT_KEY, Grid
from analytics.models import Severity

FEATURES: Final = ["requests", "error_rate", "client_error_rate", "p95_ms",
                   "auth_failure_rate", "clients", "top_client_share"]
SCORE_COLUMNS: Final = ["minute", *ENDPOINT_KEY, "mv_score"]


class MultivariateDetector:
    def __init__(self, *, n_estimators: int = 30, max_samples: int = 128,
                 train_windows: int = 720, min_train: int = 30, refit_every: int = 60,
                 threshold: float = 0.65, max_models: int = 20, random_state: int = 0,
                 step_s: float = 60.0) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.train_windows = train_windows
        self.min_train = min_train
        self.refit_every = refit_every
        self.threshold = threshold
        self.max_models = max_models
        self.random_state = random_state
        self.step_s = step_s

    @staticmethod
    def vectors(grid: Grid) -> np.ndarray:
        """(endpoints, windows, FEATURES) array; NaN where a window has no row."""
        def dense(column: str) -> np.ndarray:
            return grid.dense(column) if grid.has(column) else np.full(
                (grid.n_endpoints, grid.n_windows), np.nan)

        def ratio(column: str) -> np.ndarray:
            return grid.ratio(column) if grid.has(column) else np.full(
                (grid.n_endpoints, grid.n_windows), np.nan)

        return np.stack([np.log1p(dense("requests")), ratio("errors_5xx"),
                         ratio("errors_4xx"), np.log1p(dense("p95_ms")),
                         ratio("auth_failures"), np.log1p(dense("clients")),
                         dense("top_client_share")], axis=2)

    def _forest(self, train: np.ndarray) -> IsolationForest:
        return IsolationForest(n_estimators=self.n_estimators,
                               max_samples=min(self.max_samples, len(train)),
                               random_state=self.random_state).fit(train)

    def score(self, frame: pd.DataFrame, *, since: pd.Timestamp | None = None,
              endpoints: Collection[tuple[str, str, str]] | None = None,
              grid: Grid | None = None) -> pd.DataFrame:
        """SCORE_COLUMNS for the rows of `frame` (from `since` on) of the given endpoints
        (all by default); mv_score NaN where there was too little history to fit."""
        if frame.empty:
            return pd.DataFrame(columns=SCORE_COLUMNS)
        grid = grid if grid is not None else Grid(frame, self.step_s)
        vectors = self.vectors(grid)
        scores = np.full((grid.n_endpoints, grid.n_windows), np.nan)
        first_window = (0 if since is None
                        else max(0, int((int(since.timestamp()) - grid.start_s)
                                        // int(self.step_s))))
        if endpoints is None:
            chosen = np.ones(grid.n_endpoints, dtype=bool)
        else:
            wanted = {tuple(str(part) for part in key) for key in endpoints}
            names = zip(*(grid.endpoint_values(name) for name in ENDPOINT_KEY), strict=True)
            chosen = np.array([tuple(str(part) for part in key) in wanted for key in names],
                              dtype=bool)
        self.n_models_ = 0
        codes = np.flatnonzero(chosen)
        for e in codes:
            starts = ([first_window] if since is not None
                      else range(0, grid.n_windows, self.refit_every))
            for start in starts:
                end = grid.n_windows if since is not None else min(
                    grid.n_windows, start + self.refit_every)
                if self.n_models_ >= self.max_models and since is not None:
                    break
                train = vectors[e, max(0, start - self.train_windows):start]
                train = train[~np.isnan(train).any(axis=1)]
                block = vectors[e, start:end]
                ok = ~np.isnan(block).any(axis=1)
                if len(train) < self.min_train or not ok.any():
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    forest = self._forest(train)
                    self.n_models_ += 1
                    scores[e, start:end][ok] = -forest.score_samples(block[ok])
        rows = (np.arange(len(frame)) if since is None
                else np.flatnonzero(grid.t >= first_window))
        rows = rows[chosen[grid.e[rows]]]
        sub = frame.iloc[rows]
        result = pd.DataFrame({"minute": sub["minute"],
                               **{name: sub[name] for name in ENDPOINT_KEY}}, index=sub.index)
        result["mv_score"] = scores[grid.e[rows], grid.t[rows]]
        return result

    def fit(self, frame: pd.DataFrame) -> MultivariateDetector:
        """Score every window of `frame` (blocks, each from the windows before it)."""
        self.scores_ = self.score(frame)
        self.n_endpoints_ = (int(frame.groupby(ENDPOINT_KEY, sort=False).ngroups)
                             if len(frame) else 0)
        return self

    def score_samples(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.score(frame)["mv_score"].to_numpy(dtype="float64"))

    def corroborates(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(np.nan_to_num(scores, nan=0.0) >= self.threshold)


_ORDER: Final = [Severity.LOW, Severity.MEDIUM, Severity.HIGH]


def corroborated(level: Severity, mv_score: float, threshold: float) -> Severity:
    """One severity step up (at most to high) when the multivariate score corroborates."""
    if not mv_score >= threshold or level not in _ORDER[:-1]:
        return level
    return _ORDER[_ORDER.index(level) + 1]
