"""Detectors: estimator-like objects over the endpoint-minute frame (see features.py).

Parameters go to `__init__`, learned state lands in attributes ending with `_`, and nothing
here does I/O, so the live job, backtests and tests run the same code on any frame with the
right columns. Every window is judged only from its own endpoint's *preceding* windows (no
look-ahead): appending later minutes never changes an earlier score.

Both detectors share one robust scheme (docs/analytics.md has the math):
baseline = median of the metric over up to `max_history` preceding windows, spread =
max(1.4826 x MAD, spread floor), z = (observed - baseline) / spread, capped for counted
proportions by the z of the exact binomial tail (counting noise alone),
score = logistic((z - z_center) / z_scale) in [0, 1]. With fewer than `min_history`
preceding windows the baseline is 0 and the spread is set so that the cold-start threshold
scores exactly `threshold`.
"""

from __future__ import annotations

import math
import warnings
from typing import Final

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from scipy.stats import binom, norm

from analytics.models import AnomalyKind, Severity

ENDPOINT_KEY: Final = ["route_id", "http_request_method", "http_route"]
DETECTION_COLUMNS: Final = [
    "minute", *ENDPOINT_KEY, "score", "flagged", "kind", "metric", "baseline", "observed",
    "requests", "history",
]
_MAD_TO_SIGMA: Final = 1.4826


def rolling_baseline(values: np.ndarray, max_history: int,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, MAD and count of the up-to-`max_history` values strictly before each position.

    NaN values (windows without a measurable metric) are ignored.
    """
    size = len(values)
    padded = np.concatenate([np.full(max_history, np.nan), values.astype("float64")])
    windows = sliding_window_view(padded, max_history)[:size]
    counts = np.sum(~np.isnan(windows), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: no history yet
        medians = np.nanmedian(windows, axis=1)
        mads = np.nanmedian(np.abs(windows - medians[:, None]), axis=1)
    return medians, mads, counts


def _preceding_sum(values: np.ndarray, window: int) -> np.ndarray:
    """Sum of the up-to-`window` values strictly before each position."""
    totals = np.concatenate([[0.0], np.cumsum(values)])
    positions = np.arange(len(values))
    return np.asarray(totals[positions] - totals[np.maximum(positions - window, 0)])


def logistic(value: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(value, -50.0, 50.0))), dtype="float64")


class _RobustDetector:
    """Shared machinery: per-endpoint robust baselines and the logistic score."""

    kind: AnomalyKind
    metric: str

    def __init__(self, *, threshold: float, min_requests: int, min_history: int,
                 max_history: int, abs_margin: float, rel_margin: float, spread_floor: float,
                 cold_threshold: float, z_center: float, z_scale: float) -> None:
        self.threshold = threshold
        self.min_requests = min_requests
        self.min_history = min_history
        self.max_history = max_history
        self.abs_margin = abs_margin
        self.rel_margin = rel_margin
        self.spread_floor = spread_floor
        self.cold_threshold = cold_threshold
        self.z_center = z_center
        self.z_scale = z_scale

    # --- what a subclass decides -------------------------------------------------------
    def _observed(self, frame: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def _sampling_z(self, block: pd.DataFrame, baseline: np.ndarray) -> np.ndarray:
        """How surprising each window is from counting noise alone, as a z value.

        For one endpoint's windows in time order, using only preceding windows' data.
        +inf (no limit) unless the metric is a proportion of a count.
        """
        return np.full(len(block), np.inf)

    def _eligible(self, frame: pd.DataFrame, observed: np.ndarray) -> np.ndarray:
        return np.asarray(frame["requests"].to_numpy(dtype="float64") >= self.min_requests)

    # --- the estimator API ---------------------------------------------------------------
    def fit(self, frame: pd.DataFrame) -> _RobustDetector:
        """Score every window of `frame`; the result is in `detections_`."""
        self.detections_ = self.detect(frame)
        self.n_windows_ = len(frame)
        self.n_endpoints_ = (int(frame.groupby(ENDPOINT_KEY, sort=False).ngroups)
                             if len(frame) else 0)
        self.n_flagged_ = int(self.detections_["flagged"].sum()) if len(frame) else 0
        return self

    def score_samples(self, frame: pd.DataFrame) -> np.ndarray:
        """Anomaly score in [0, 1] for each row of `frame`, in the frame's row order."""
        return np.asarray(self.detect(frame)["score"].to_numpy(dtype="float64"))

    def detect(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One row per input row (same index): DETECTION_COLUMNS."""
        missing = [name for name in ["minute", *ENDPOINT_KEY, "requests"]
                   if name not in frame.columns]
        if missing:
            raise ValueError(f"{type(self).__name__}: frame lacks columns {missing}")
        if frame.empty:
            return pd.DataFrame({name: pd.Series(dtype="object") for name in DETECTION_COLUMNS})
        ordered = frame.sort_values([*ENDPOINT_KEY, "minute"], kind="stable")
        observed = self._observed(ordered)
        baseline = np.empty(len(ordered))
        mad = np.empty(len(ordered))
        sampling_z = np.empty(len(ordered))
        history = np.empty(len(ordered), dtype="int64")
        start = 0
        for size in ordered.groupby(ENDPOINT_KEY, sort=False).size().to_numpy():
            # groupby(sort=False) on a sorted frame: groups are consecutive blocks in order
            block = slice(start, start + int(size))
            baseline[block], mad[block], history[block] = rolling_baseline(
                observed[block], self.max_history)
            sampling_z[block] = self._sampling_z(ordered.iloc[block],
                                                 np.nan_to_num(baseline[block]))
            start += int(size)
        cold = history < self.min_history
        baseline = np.where(cold, 0.0, baseline)
        spread = np.maximum(_MAD_TO_SIGMA * np.nan_to_num(mad), self.spread_floor)
        spread = np.where(cold, self.cold_threshold / self._z_at_threshold(), spread)
        z = (np.nan_to_num(observed) - baseline) / spread
        z = np.where(cold, z, np.minimum(z, sampling_z))
        score = logistic((z - self.z_center) / self.z_scale)
        observed_filled = np.nan_to_num(observed)
        flagged = ((score >= self.threshold)
                   & (observed_filled - baseline >= self.abs_margin)
                   & (observed_filled >= baseline * self.rel_margin)
                   & self._eligible(ordered, observed_filled))
        result = pd.DataFrame({
            "minute": ordered["minute"].to_numpy(),
            **{name: ordered[name].to_numpy() for name in ENDPOINT_KEY},
            "score": score,
            "flagged": flagged,
            "kind": str(self.kind),
            "metric": self.metric,
            "baseline": baseline,
            "observed": observed_filled,
            "requests": ordered["requests"].to_numpy(dtype="int64"),
            "history": history,
        }, index=ordered.index)
        if isinstance(frame["minute"].dtype, pd.DatetimeTZDtype):
            result["minute"] = pd.to_datetime(result["minute"], utc=True)
        return result.loc[frame.index]

    def _z_at_threshold(self) -> float:
        return self.z_center + self.z_scale * math.log(self.threshold / (1 - self.threshold))


class ErrorSpikeDetector(_RobustDetector):
    """5xx rate of a window far above its endpoint's recent normal."""

    kind = AnomalyKind.ERROR_SPIKE
    metric = "error_rate"

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 2,
                 max_history: int = 180, abs_margin: float = 0.05, rel_margin: float = 2.0,
                 spread_floor: float = 0.01, cold_threshold: float = 0.2,
                 z_center: float = 3.0, z_scale: float = 1.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=abs_margin, rel_margin=rel_margin,
                         spread_floor=spread_floor, cold_threshold=cold_threshold,
                         z_center=z_center, z_scale=z_scale)

    def _observed(self, frame: pd.DataFrame) -> np.ndarray:
        requests = frame["requests"].to_numpy(dtype="float64")
        errors = frame["errors_5xx"].to_numpy(dtype="float64")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(requests > 0, errors / requests, np.nan)

    def _sampling_z(self, block: pd.DataFrame, baseline: np.ndarray) -> np.ndarray:
        # Exact binomial tail: P(X >= errors) for this window's request count at the larger of
        # the median rate and the pooled rate (errors / requests) of the preceding windows,
        # as a z value. When errors are rare the median rate is 0, yet 2 errors in 36
        # requests are not surprising. A history without any error counts as half an error.
        requests = block["requests"].to_numpy(dtype="float64")
        errors = block["errors_5xx"].to_numpy(dtype="float64")
        history_requests = _preceding_sum(requests, self.max_history)
        pooled = (_preceding_sum(errors, self.max_history) + 0.5) / np.maximum(
            history_requests + 1.0, 1.0)
        p = np.clip(np.maximum(baseline, pooled), 1e-9, 1.0 - 1e-9)
        tail = binom.sf(errors - 1, requests, p)
        return np.asarray(np.clip(norm.isf(np.clip(tail, 1e-300, 1.0)), -50.0, 50.0))


class ClientDominanceDetector(_RobustDetector):
    """One client's share of an endpoint's requests far above normal and above `min_share`."""

    kind = AnomalyKind.CLIENT_DOMINANCE
    metric = "top_client_share"

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 2,
                 max_history: int = 180, min_share: float = 0.5, abs_margin: float = 0.25,
                 spread_floor: float = 0.05, cold_threshold: float = 0.8,
                 z_center: float = 3.0, z_scale: float = 1.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=abs_margin, rel_margin=1.0, spread_floor=spread_floor,
                         cold_threshold=cold_threshold, z_center=z_center, z_scale=z_scale)
        self.min_share = min_share

    def _observed(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(frame["top_client_share"].to_numpy(dtype="float64"))

    def _eligible(self, frame: pd.DataFrame, observed: np.ndarray) -> np.ndarray:
        clients = frame["clients"].to_numpy(dtype="float64")
        return np.asarray(super()._eligible(frame, observed)
                          & (observed >= self.min_share) & (clients >= 2))


def severity(kind: str, baseline: float, observed: float) -> Severity:
    """A coarse severity from how bad the observed value is."""
    steps: tuple[tuple[float, Severity], ...]
    if kind == AnomalyKind.ERROR_SPIKE:
        steps = ((0.5, Severity.CRITICAL), (0.2, Severity.HIGH), (0.1, Severity.MEDIUM))
    elif kind == AnomalyKind.CLIENT_DOMINANCE:
        steps = ((0.9, Severity.HIGH), (0.7, Severity.MEDIUM))
    else:
        steps = ()
    for bound, level in steps:
        if observed >= bound:
            return level
    return Severity.LOW
