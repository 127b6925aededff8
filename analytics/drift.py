"""Slow drifts and level shifts: what a trailing median cannot see.

The detectors in `detectors.py` compare a window with the median of the hour before it, so a
p95 that creeps up over hours, or a sustained moderate step in traffic, moves the baseline
along with it and is never flagged. Two estimator-like detectors (same API, same `Grid`, same
no-look-ahead rule, same kinds - `AnomalyKind` is a contract) close that gap:

- `LatencyDriftDetector` (kind `latency_regression`): an **EWMA** of log p95 (span
  `span`, a truncated kernel of `4 x span` windows) against an **older reference** - the
  median/MAD of log p95 `reference_lag` to `reference_lag + reference_windows` windows back,
  before a slow drift began. Flagged when the smoothed p95 is `rel_margin` x the reference
  and `abs_margin_ms` above it, and the window's own p95 is still sqrt(`rel_margin`) x it.
- `TrafficShiftDetector` (kind `traffic_surge` or `traffic_drop`): a windowed two-sided
  **CUSUM** of the traffic detector's seasonal robust z (log requests against the same time
  of day on previous days plus a level correction): S_t = max over the last `cusum_windows`
  windows m of sum_{j=t-m+1..t} (z_j - slack). Flagged when S_t reaches `cusum_threshold`
  and the mean log ratio of the last `confirm_windows` windows to the level-corrected
  expectation, to the seasonal profile alone and to the median of the `max_history` windows
  before them is at least log(1 + `min_change`) each (surges must also not be benign, as in
  `TrafficDetector`). Only with a seasonal profile: without one a
  trailing baseline carries the daily cycle, and a CUSUM would add it up.

Both read a bounded history (latency: `reference_lag + reference_windows` windows; traffic:
the `cusum_windows` - 1 windows before t, each with the traffic detector's own history), so
the live job, which reads a bounded lookback and only the seasonal slices around the time of
day it judges, gets exactly the answers of a run over all history.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analytics.detectors import (
    _MAD_TO_SIGMA,
    Grid,
    TrafficDetector,
    _Detector,
    history,
    log_p95,
    robust_stats,
)
from analytics.models import AnomalyKind


def _block(t: np.ndarray, reach: int) -> tuple[int, int]:
    """Columns [lo, hi] a computation for windows `t` reading `reach` windows back needs."""
    return max(int(t.min()) - reach, 0), int(t.max())


def ewma(values: np.ndarray, span: float, length: int) -> np.ndarray:
    """Causal EWMA along axis 1 with a kernel truncated to `length` windows (NaN ignored:
    weights renormalised over the values present; NaN when none is)."""
    alpha = 2.0 / (span + 1.0)
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    total = np.zeros_like(filled)
    weight = np.zeros_like(filled)
    for lag in range(length):
        w = alpha * (1.0 - alpha) ** lag
        if lag:
            total[:, lag:] += w * filled[:, :-lag]
            weight[:, lag:] += w * present[:, :-lag]
        else:
            total += w * filled
            weight += w * present
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def cusum_of_last(increments: np.ndarray) -> np.ndarray:
    """Per row, max(0, the largest sum of the last m increments, m = 1..columns): a CUSUM
    restarted at the best point of a bounded window (columns oldest first)."""
    suffix_sums = np.cumsum(np.nan_to_num(increments)[:, ::-1], axis=1)
    return np.asarray(np.maximum(suffix_sums.max(axis=1, initial=0.0), 0.0))


class LatencyDriftDetector(_Detector):
    """p95 drifting up slowly: EWMA of log p95 against an older reference (module doc)."""

    kind = AnomalyKind.LATENCY_REGRESSION
    metric = "p95_ms"
    required = ("requests", "p95_ms")

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20,
                 min_history: int = 30, max_history: int = 60, span: float = 5.0,
                 reference_lag: int = 120, rel_margin: float = 1.5,
                 abs_margin_ms: float = 25.0, spread_floor: float = 0.1,
                 z_center: float = 3.0, z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         z_center=z_center, z_scale=z_scale, step_s=step_s)
        self.span = span
        self.reference_lag = reference_lag
        self.rel_margin = rel_margin
        self.abs_margin_ms = abs_margin_ms
        self.spread_floor = spread_floor

    def _smoothed(self, grid: Grid, t: np.ndarray) -> tuple[np.ndarray, int]:
        length = max(int(4 * self.span), 1)
        lo, hi = _block(t, length - 1)
        if 2 * (hi - lo + 1) >= grid.n_windows:  # most of the grid: compute it all once
            lo, hi = 0, grid.n_windows - 1
        key = ("latency_ewma", self.span, lo, hi)
        if key not in grid.cache:
            grid.cache[key] = ewma(log_p95(grid)[:, lo:hi + 1], self.span, length)
        return np.asarray(grid.cache[key]), lo

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        values = log_p95(grid)
        smoothed, lo = self._smoothed(grid, t)
        level = smoothed[e, t - lo]
        reference = history(values, e, t, self.max_history, offset=self.reference_lag)
        median, mad, counts = robust_stats(reference)
        alpha = 2.0 / (self.span + 1.0)
        spread = (np.maximum(_MAD_TO_SIGMA * np.nan_to_num(mad), self.spread_floor)
                  * math.sqrt(alpha / (2.0 - alpha)))
        z = (level - median) / spread
        observed = np.nan_to_num(np.exp(level))
        baseline = np.nan_to_num(np.exp(median))
        requests = np.nan_to_num(grid.dense("requests", 0.0)[e, t])
        # The window itself must still be slow (half the margin, in log): the EWMA lags a
        # recovery by a few windows, and those are not a regression any more.
        raw = np.nan_to_num(values[e, t], nan=-np.inf)
        ok = ((counts >= self.min_history) & ~np.isnan(level)
              & (raw >= median + 0.5 * math.log(self.rel_margin))
              & (requests >= self.min_requests)
              & (observed >= baseline * self.rel_margin)
              & (observed - baseline >= self.abs_margin_ms))
        return {"observed": observed, "baseline": baseline,
                "z": np.where(counts >= self.min_history, z, -50.0), "ok": ok,
                "history": counts}


class TrafficShiftDetector(TrafficDetector):
    """A sustained step in requests: windowed CUSUM of the seasonal robust z (module doc)."""

    def __init__(self, direction: str = "surge", *, cusum_windows: int = 6,
                 slack: float = 1.0, cusum_threshold: float = 6.0, min_change: float = 0.3,
                 confirm_windows: int = 3, **traffic: Any) -> None:
        super().__init__(direction, **traffic)
        self.cusum_windows = cusum_windows
        self.slack = slack
        self.cusum_threshold = cusum_threshold
        self.min_change = min_change
        self.confirm_windows = confirm_windows

    def _shift_grid(self, grid: Grid, t: np.ndarray) -> dict[str, np.ndarray]:
        """Expected level, spread and seasonal profile of every endpoint (endpoints x windows,
        filled in lazily: only the columns some judged cell reads are computed)."""
        key = ("shift", self.max_history, self.season_days, self.min_days, self.smooth,
               self.spread_floor, self.min_history)
        arrays = grid.cache.get(key)
        if arrays is None:
            shape = (grid.n_endpoints, grid.n_windows)
            arrays = {"expected": np.full(shape, np.nan), "spread": np.full(shape, np.nan),
                      "profile": np.full(shape, np.nan), "counts": np.zeros(shape),
                      "done": np.zeros(grid.n_windows, dtype=bool)}
            grid.cache[key] = arrays
        reach = max(self.cusum_windows, self.confirm_windows) - 1
        needed = np.zeros(grid.n_windows, dtype=bool)
        for back in range(reach + 1):
            needed[np.maximum(np.unique(t) - back, 0)] = True
        columns = np.flatnonzero(needed & ~arrays["done"])
        if len(columns):
            e_all = np.repeat(np.arange(grid.n_endpoints), len(columns))
            t_all = np.tile(columns, grid.n_endpoints)
            size = super()._chunk_size()
            for start in range(0, len(e_all), size):
                part = slice(start, start + size)
                expected, spread, counts, profile = self._expected(grid, e_all[part],
                                                                   t_all[part])
                cells = (e_all[part], t_all[part])
                arrays["expected"][cells] = expected
                arrays["spread"][cells] = spread
                arrays["counts"][cells] = counts
                arrays["profile"][cells] = profile
            arrays["done"][columns] = True
        return arrays

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        arrays = self._shift_grid(grid, t)
        level, _ = self._level(grid)
        sign = 1.0 if self.direction == "surge" else -1.0
        valid = ((arrays["counts"] >= self.min_history) & ~np.isnan(arrays["profile"])
                 & ~np.isnan(level))
        z = sign * (level - arrays["expected"]) / arrays["spread"]
        # history(..., t + 1, n): the n windows up to and including t, oldest first.
        increments = history(np.where(valid, z - self.slack, -self.slack), e, t + 1,
                             self.cusum_windows)
        statistic = cusum_of_last(np.where(np.isnan(increments), -self.slack, increments))
        # How far the recent windows are beyond both the level-corrected expectation and the
        # seasonal profile alone (log ratio, positive in the direction of the shift).
        bound = (np.maximum(arrays["expected"], arrays["profile"]) if sign > 0
                 else np.minimum(arrays["expected"], arrays["profile"]))
        beyond = np.where(valid, sign * (level - bound), -50.0)
        confirm = np.nan_to_num(history(beyond, e, t + 1, self.confirm_windows),
                                nan=-50.0).mean(axis=1)
        # A step is also a change against the recent past (the windows before those): this
        # keeps a profile spoiled by incidents on earlier days from passing for a shift.
        recent, _, _ = robust_stats(history(level, e, t - self.confirm_windows + 1,
                                            self.max_history))
        latest = np.nanmean(history(level, e, t + 1, self.confirm_windows), axis=1)
        stepped = sign * (latest - recent) >= math.log1p(self.min_change)
        here = valid[e, t]
        observed = np.nan_to_num(np.expm1(level[e, t]))
        baseline = np.nan_to_num(np.expm1(arrays["expected"][e, t]))
        ok = here & (confirm >= math.log1p(self.min_change)) & np.nan_to_num(stepped)
        if self.direction == "surge":
            ok &= ((observed - baseline >= self.min_requests)
                   & ~self._benign(grid, e, t, observed, baseline))
        else:
            ok &= baseline >= self.min_requests
        equivalent_z = self._z_at_threshold() + statistic - self.cusum_threshold
        return {"observed": observed, "baseline": baseline,
                "z": np.where(here, equivalent_z, -50.0), "ok": ok,
                "history": arrays["counts"][e, t].astype("int64")}
