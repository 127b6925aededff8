"""Detectors: estimator-like objects over the endpoint-minute frame (see features.py).

Parameters go to `__init__`, learned state lands in attributes ending with `_`, and nothing
here does I/O, so the live job, the backtest CLI, the evaluation suite and the tests run the
same code on any frame with the right columns. Every window is judged only from its own
endpoint's *preceding* windows (no look-ahead): appending later minutes never changes an
earlier score.

The frame is laid out as a dense grid (endpoints x windows, `Grid`); a window's history is a
slice of the grid strictly before it. Scores come from robust z values:
baseline = median of the history, spread = max(1.4826 x MAD, spread floor),
z = (observed - baseline) / spread, score = logistic((z - z_center) / z_scale) in [0, 1];
a window is flagged when the score reaches `threshold` **and** the kind's magnitude margins
hold. docs/analytics.md has the per-kind details. `detect(frame, since=...)` judges only the
windows from `since` on (the live job needs the last few; history is still read), which is
what keeps a 7-day run fast.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Final

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from scipy.stats import binom, norm

from analytics.models import AnomalyKind, Severity

ENDPOINT_KEY: Final = ["route_id", "http_request_method", "http_route"]
DETECTION_COLUMNS: Final = [
    "minute", *ENDPOINT_KEY, "score", "flagged", "kind", "metric", "baseline", "observed",
    "requests", "history", "client",
]
_MAD_TO_SIGMA: Final = 1.4826
_CHUNK_CELLS: Final = 4_000_000  # history values gathered at once (bounds memory)


def rolling_baseline(values: np.ndarray, max_history: int,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, MAD and count of the up-to-`max_history` values strictly before each position.

    NaN values (windows without a measurable metric) are ignored. (A reference
    implementation for one series; detectors use `robust_stats` on grid slices.)
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


def _nan_median_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of each row ignoring NaN (NaN for an all-NaN row), and the non-NaN count."""
    ordered = np.sort(values, axis=1)  # NaN sorts last
    counts = np.sum(~np.isnan(values), axis=1)
    rows = np.arange(len(values))
    low = ordered[rows, np.maximum(counts - 1, 0) // 2]
    high = ordered[rows, np.minimum(counts // 2, max(values.shape[1] - 1, 0))]
    median = np.where(counts > 0, (low + high) / 2.0, np.nan)
    return median, counts


def robust_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, MAD and non-NaN count of each row of a 2-D array."""
    if values.shape[1] == 0:
        nothing = np.full(len(values), np.nan)
        return nothing, nothing.copy(), np.zeros(len(values), dtype="int64")
    median, counts = _nan_median_rows(values)
    mad, _ = _nan_median_rows(np.abs(values - median[:, None]))
    return median, mad, counts


def logistic(value: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(value, -50.0, 50.0))), dtype="float64")


class Grid:
    """The frame as endpoints x windows arrays; the unit every detector reads history from.

    `e` and `t` give each input row's endpoint and window position. `dense(column, fill)` is
    the column as an (endpoints, windows) array: NaN before an endpoint's first window,
    `fill` (or NaN) where a window has no row. Arrays and derived values are cached, so the
    detectors of one run share them.
    """

    def __init__(self, frame: pd.DataFrame, step_s: float = 60.0) -> None:
        self.frame = frame
        self.step_s = step_s
        minutes = pd.DatetimeIndex(pd.to_datetime(frame["minute"], utc=True))
        seconds = minutes.as_unit("s").asi8
        self.start_s = int(seconds.min()) if len(seconds) else 0
        self.seconds = seconds
        self.e = frame.groupby(ENDPOINT_KEY, sort=False).ngroup().to_numpy().astype("int64")
        self.t = ((seconds - self.start_s) // int(step_s)).astype("int64")
        self.n_endpoints = int(self.e.max()) + 1 if len(self.e) else 0
        self.n_windows = int(self.t.max()) + 1 if len(self.t) else 0
        self.first = np.full(self.n_endpoints, self.n_windows, dtype="int64")
        np.minimum.at(self.first, self.e, self.t)
        self.cache: dict[Any, Any] = {}

    @property
    def rows(self) -> np.ndarray:
        """(endpoints, windows) -> position of the input row, -1 where there is none."""
        if "rows" not in self.cache:
            rows = np.full((self.n_endpoints, self.n_windows), -1, dtype="int64")
            rows[self.e, self.t] = np.arange(len(self.e))
            self.cache["rows"] = rows
        return np.asarray(self.cache["rows"])

    def endpoint_values(self, column: str) -> np.ndarray:
        """A column's value in each endpoint's first row (constant per endpoint ones)."""
        _, first_rows = np.unique(self.e, return_index=True)
        return np.asarray(self.frame[column].iloc[first_rows].to_numpy(dtype=object))

    @property
    def period(self) -> int:
        """Windows per day (0 when the step does not divide a day)."""
        windows = 86_400 / self.step_s
        return int(windows) if windows == int(windows) else 0

    def has(self, column: str) -> bool:
        return column in self.frame.columns

    def dense(self, column: str, fill: float | None = None) -> np.ndarray:
        key = ("dense", column, fill)
        if key not in self.cache:
            values = pd.to_numeric(self.frame[column], errors="coerce").to_numpy(
                dtype="float64", na_value=np.nan)
            grid = np.full((self.n_endpoints, self.n_windows), np.nan)
            if fill is not None:
                started = np.arange(self.n_windows)[None, :] >= self.first[:, None]
                grid[started] = fill
            grid[self.e, self.t] = values
            self.cache[key] = grid
        return np.asarray(self.cache[key])

    def ratio(self, numerator: str, denominator: str = "requests") -> np.ndarray:
        """numerator / denominator per window; NaN where the denominator is 0 or missing."""
        key = ("ratio", numerator, denominator)
        if key not in self.cache:
            top = self.dense(numerator, 0.0)
            bottom = self.dense(denominator, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                self.cache[key] = np.where(bottom > 0, top / bottom, np.nan)
        return np.asarray(self.cache[key])

    def cumulative(self, column: str) -> np.ndarray:
        """Running sums along windows with a leading 0 column (NaN counted as 0)."""
        key = ("cumsum", column)
        if key not in self.cache:
            values = np.nan_to_num(self.dense(column, 0.0))
            self.cache[key] = np.concatenate(
                [np.zeros((self.n_endpoints, 1)), np.cumsum(values, axis=1)], axis=1)
        return np.asarray(self.cache[key])


def history(values: np.ndarray, e: np.ndarray, t: np.ndarray, size: int,
            offset: int = 0) -> np.ndarray:
    """values[e, t - offset - size .. t - offset - 1] per cell, NaN outside the grid."""
    positions = t[:, None] - offset - size + np.arange(size)[None, :]
    inside = positions >= 0
    gathered = values[e[:, None], np.maximum(positions, 0)]
    return np.where(inside, gathered, np.nan)


def _preceding_sum(cumulative: np.ndarray, e: np.ndarray, t: np.ndarray,
                   size: int) -> np.ndarray:
    return np.asarray(cumulative[e, t] - cumulative[e, np.maximum(t - size, 0)])


class _Detector:
    """The estimator API shared by every detector; subclasses implement `_judge`."""

    kind: AnomalyKind
    metric: str
    required: tuple[str, ...] = ("requests",)

    def __init__(self, *, threshold: float, min_requests: int, min_history: int,
                 max_history: int, z_center: float, z_scale: float, step_s: float) -> None:
        self.threshold = threshold
        self.min_requests = min_requests
        self.min_history = min_history
        self.max_history = max_history
        self.z_center = z_center
        self.z_scale = z_scale
        self.step_s = step_s

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """For the cells (e, t): observed, baseline, z, ok (margins and eligibility),
        history; optionally client (who to blame). Uses only windows before t."""
        raise NotImplementedError

    def _chunk_size(self) -> int:
        return max(1, _CHUNK_CELLS // max(self.max_history, 1))

    # --- the estimator API ---------------------------------------------------------------
    def fit(self, frame: pd.DataFrame) -> _Detector:
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

    def detect(self, frame: pd.DataFrame, *, since: pd.Timestamp | None = None,
               grid: Grid | None = None) -> pd.DataFrame:
        """DETECTION_COLUMNS for every input row (same index), or with `since` only for the
        rows at or after it: the history before it is read all the same, so their answers
        are those of a full run. `grid`: a Grid of this same frame, shared between
        detectors."""
        missing = [name for name in ["minute", *ENDPOINT_KEY, *self.required]
                   if name not in frame.columns]
        if missing:
            raise ValueError(f"{type(self).__name__}: frame lacks columns {missing}")
        if frame.empty:
            return pd.DataFrame({name: pd.Series(dtype="object") for name in DETECTION_COLUMNS})
        grid = grid if grid is not None else Grid(frame, self.step_s)
        if since is None:
            rows = np.arange(len(frame))
        else:
            rows = np.flatnonzero(grid.seconds >= int(since.timestamp()))
        size = len(rows)
        score = np.zeros(size)
        flagged = np.zeros(size, dtype=bool)
        baseline = np.full(size, np.nan)
        observed = np.full(size, np.nan)
        counts = np.zeros(size, dtype="int64")
        client = np.full(size, "", dtype=object)
        for start in range(0, size, self._chunk_size()):
            part = slice(start, start + self._chunk_size())
            chunk = rows[part]
            judged = self._judge(grid, grid.e[chunk], grid.t[chunk])
            z = np.nan_to_num(judged["z"], nan=-50.0, posinf=50.0, neginf=-50.0)
            score[part] = logistic((z - self.z_center) / self.z_scale)
            flagged[part] = (score[part] >= self.threshold) & judged["ok"]
            baseline[part] = judged["baseline"]
            observed[part] = judged["observed"]
            counts[part] = judged["history"]
            if "client" in judged:
                client[part] = judged["client"]
        sub = frame.iloc[rows] if since is not None else frame
        requests = pd.to_numeric(sub["requests"], errors="coerce").fillna(0).astype("int64")
        result = pd.DataFrame({"minute": sub["minute"],
                               **{name: sub[name] for name in ENDPOINT_KEY}},
                              index=sub.index)
        result["score"] = score
        result["flagged"] = flagged
        result["kind"] = str(self.kind)
        result["metric"] = self.metric
        result["baseline"] = baseline
        result["observed"] = observed
        result["requests"] = requests
        result["history"] = counts
        result["client"] = client
        return result

    def _z_at_threshold(self) -> float:
        return self.z_center + self.z_scale * math.log(self.threshold / (1 - self.threshold))


class _TrailingDetector(_Detector):
    """A metric against the median/MAD of its `max_history` preceding windows.

    With fewer than `min_history` of them the baseline is 0 and the spread is set so that
    the cold-start threshold scores exactly `threshold` (an absolute threshold).
    """

    def __init__(self, *, abs_margin: float, rel_margin: float, spread_floor: float,
                 cold_threshold: float, **common: Any) -> None:
        super().__init__(**common)
        self.abs_margin = abs_margin
        self.rel_margin = rel_margin
        self.spread_floor = spread_floor
        self.cold_threshold = cold_threshold

    def _values(self, grid: Grid) -> np.ndarray:
        raise NotImplementedError

    def _sampling_z(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                    baseline: np.ndarray) -> np.ndarray:
        """How surprising each window is from counting noise alone (+inf: no limit)."""
        return np.full(len(e), np.inf)

    def _eligible(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                  observed: np.ndarray) -> np.ndarray:
        requests = np.nan_to_num(grid.dense("requests", 0.0)[e, t])
        return np.asarray(requests >= self.min_requests)

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        values = self._values(grid)
        observed = np.nan_to_num(values[e, t])
        median, mad, counts = robust_stats(history(values, e, t, self.max_history))
        cold = counts < self.min_history
        baseline = np.where(cold, 0.0, np.nan_to_num(median))
        spread = np.where(cold, self.cold_threshold / self._z_at_threshold(),
                          np.maximum(_MAD_TO_SIGMA * np.nan_to_num(mad), self.spread_floor))
        z = (observed - baseline) / spread
        z = np.where(cold, z, np.minimum(z, self._sampling_z(grid, e, t, baseline)))
        ok = ((observed - baseline >= self.abs_margin)
              & (observed >= baseline * self.rel_margin)
              & self._eligible(grid, e, t, observed))
        return {"observed": observed, "baseline": baseline, "z": z, "ok": ok,
                "history": counts}


class _RateDetector(_TrailingDetector):
    """A proportion of requests (5xx, auth failures), capped by the exact binomial tail."""

    numerator: str

    def __init__(self, *, min_count: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_count = min_count

    def _values(self, grid: Grid) -> np.ndarray:
        return grid.ratio(self.numerator)

    def _eligible(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                  observed: np.ndarray) -> np.ndarray:
        count = np.nan_to_num(grid.dense(self.numerator, 0.0)[e, t])
        return np.asarray(super()._eligible(grid, e, t, observed) & (count >= self.min_count))

    def _sampling_z(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                    baseline: np.ndarray) -> np.ndarray:
        # Exact binomial tail: P(X >= count) for this window's requests at the larger of the
        # median rate and the pooled rate of the preceding windows, as a z value. When events
        # are rare the median rate is 0, yet 2 errors in 36 requests are not surprising. A
        # history without any counts as half an event.
        requests = np.nan_to_num(grid.dense("requests", 0.0)[e, t])
        count = np.nan_to_num(grid.dense(self.numerator, 0.0)[e, t])
        history_requests = _preceding_sum(grid.cumulative("requests"), e, t, self.max_history)
        history_count = _preceding_sum(grid.cumulative(self.numerator), e, t, self.max_history)
        pooled = (history_count + 0.5) / np.maximum(history_requests + 1.0, 1.0)
        p = np.clip(np.maximum(baseline, pooled), 1e-9, 1.0 - 1e-9)
        tail = binom.sf(count - 1, requests, p)
        return np.asarray(np.clip(norm.isf(np.clip(tail, 1e-300, 1.0)), -50.0, 50.0))


class ErrorSpikeDetector(_RateDetector):
    """5xx rate of a window far above its endpoint's recent normal."""

    kind = AnomalyKind.ERROR_SPIKE
    metric = "error_rate"
    numerator = "errors_5xx"
    required = ("requests", "errors_5xx")

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 2,
                 max_history: int = 60, abs_margin: float = 0.05, rel_margin: float = 2.0,
                 spread_floor: float = 0.01, cold_threshold: float = 0.2,
                 z_center: float = 3.0, z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=abs_margin, rel_margin=rel_margin,
                         spread_floor=spread_floor, cold_threshold=cold_threshold,
                         z_center=z_center, z_scale=z_scale, step_s=step_s)


class AuthFailureBurstDetector(_RateDetector):
    """Auth failure rate far above normal, with at least `min_count` failures (credential
    stuffing, token guessing)."""

    kind = AnomalyKind.AUTH_FAILURE_BURST
    metric = "auth_failure_rate"
    numerator = "auth_failures"
    required = ("requests", "auth_failures")

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 2,
                 max_history: int = 60, abs_margin: float = 0.1, rel_margin: float = 2.0,
                 spread_floor: float = 0.02, cold_threshold: float = 0.3, min_count: int = 10,
                 z_center: float = 3.0, z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=abs_margin, rel_margin=rel_margin,
                         spread_floor=spread_floor, cold_threshold=cold_threshold,
                         min_count=min_count, z_center=z_center, z_scale=z_scale,
                         step_s=step_s)


class ClientDominanceDetector(_TrailingDetector):
    """One client's share of an endpoint's requests far above normal and above `min_share`."""

    kind = AnomalyKind.CLIENT_DOMINANCE
    metric = "top_client_share"
    required = ("requests", "top_client_share", "clients")

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 2,
                 max_history: int = 60, min_share: float = 0.5, abs_margin: float = 0.25,
                 spread_floor: float = 0.05, cold_threshold: float = 0.8,
                 z_center: float = 3.0, z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=abs_margin, rel_margin=1.0, spread_floor=spread_floor,
                         cold_threshold=cold_threshold, z_center=z_center, z_scale=z_scale,
                         step_s=step_s)
        self.min_share = min_share

    def _values(self, grid: Grid) -> np.ndarray:
        return grid.dense("top_client_share")

    def _eligible(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                  observed: np.ndarray) -> np.ndarray:
        clients = np.nan_to_num(grid.dense("clients", 0.0)[e, t])
        return np.asarray(super()._eligible(grid, e, t, observed)
                          & (observed >= self.min_share) & (clients >= 2))

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        judged = super()._judge(grid, e, t)
        if grid.has("top_client"):
            judged["client"] = _column_at(grid, "top_client", e, t)
        return judged


class EnumerationDetector(_TrailingDetector):
    """One client requesting far more distinct paths of a templated endpoint than usual
    (`/users/{id}` walked id by id)."""

    kind = AnomalyKind.ENUMERATION
    metric = "top_client_paths"
    required = ("requests", "top_client_paths")

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 2,
                 max_history: int = 60, min_paths: int = 30, cold_paths: int = 100,
                 rel_margin: float = 3.0, spread_floor: float = 3.0,
                 templated_only: bool = True, z_center: float = 3.0, z_scale: float = 1.0,
                 step_s: float = 60.0) -> None:
        # Without history a busy but ordinary client (one request a second spread over
        # random ids) reaches `min_paths` by chance, so a cold start needs far more.
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=float(min_paths) / 2, rel_margin=rel_margin,
                         spread_floor=spread_floor, cold_threshold=float(cold_paths),
                         z_center=z_center, z_scale=z_scale, step_s=step_s)
        self.min_paths = min_paths
        self.templated_only = templated_only

    def _values(self, grid: Grid) -> np.ndarray:
        return grid.dense("top_client_paths")

    def _eligible(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                  observed: np.ndarray) -> np.ndarray:
        templated = grid.cache.get("templated")
        if not self.templated_only:
            templated = np.ones(grid.n_endpoints, dtype=bool)
        elif templated is None:
            templated = np.array(["{" in str(route)
                                  for route in grid.endpoint_values("http_route")])
            grid.cache["templated"] = templated
        return np.asarray(super()._eligible(grid, e, t, observed)
                          & (observed >= self.min_paths) & templated[e])

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        judged = super()._judge(grid, e, t)
        if grid.has("top_paths_client"):
            judged["client"] = _column_at(grid, "top_paths_client", e, t)
        return judged


class UndeclaredEndpointDetector(_TrailingDetector):
    """Traffic to paths no route declares (route id ''): new, or far above its usual trickle
    of scanner noise. Give it only the unmatched rows."""

    kind = AnomalyKind.UNDECLARED_ENDPOINT
    metric = "requests"

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 30, min_history: int = 2,
                 max_history: int = 60, rel_margin: float = 3.0, spread_floor: float = 5.0,
                 z_center: float = 3.0, z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         abs_margin=float(min_requests), rel_margin=rel_margin,
                         spread_floor=spread_floor, cold_threshold=float(min_requests),
                         z_center=z_center, z_scale=z_scale, step_s=step_s)

    def _values(self, grid: Grid) -> np.ndarray:
        return grid.dense("requests", 0.0)

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        judged = super()._judge(grid, e, t)
        if grid.has("top_client"):
            judged["client"] = _column_at(grid, "top_client", e, t)
        return judged


class MetricShiftDetector(_TrailingDetector):
    """Any numeric metric far from its robust baseline, either way (backtests of metrics the
    gateway has no specific detector for). Flagged when |z| is high and the value moved by at
    least `rel_change` of the baseline."""

    metric = "value"
    kind = AnomalyKind.TRAFFIC_SURGE  # replaced per instance by "metric:<column>"

    def __init__(self, column: str, *, threshold: float = 0.9, min_history: int = 5,
                 max_history: int = 60, rel_change: float = 0.5, spread_floor: float = 1e-9,
                 z_center: float = 3.0, z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=0, min_history=min_history,
                         max_history=max_history, abs_margin=0.0, rel_margin=0.0,
                         spread_floor=spread_floor, cold_threshold=1.0, z_center=z_center,
                         z_scale=z_scale, step_s=step_s)
        self.column = column
        self.metric = column
        self.kind = f"metric:{column}"  # type: ignore[assignment]
        self.required = ("requests", column)
        self.rel_change = rel_change

    def _values(self, grid: Grid) -> np.ndarray:
        return grid.dense(self.column)

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        values = self._values(grid)
        raw = values[e, t]
        median, mad, counts = robust_stats(history(values, e, t, self.max_history))
        spread = np.maximum(_MAD_TO_SIGMA * np.nan_to_num(mad),
                            np.maximum(self.spread_floor, 0.01 * np.abs(np.nan_to_num(median))))
        z = np.abs(raw - median) / spread
        cold = (counts < self.min_history) | np.isnan(raw)
        ok = ~cold & (np.abs(raw - median) >= self.rel_change * np.abs(median))
        return {"observed": np.nan_to_num(raw), "baseline": np.nan_to_num(median),
                "z": np.where(cold, -50.0, z), "ok": ok, "history": counts}


def log_p95(grid: Grid) -> np.ndarray:
    """log p95 per window; NaN where a window has no requests or no p95 (cached)."""
    key = ("log", "p95_ms")
    if key not in grid.cache:
        requests = grid.dense("requests", 0.0)
        p95 = grid.dense("p95_ms")
        with np.errstate(divide="ignore", invalid="ignore"):
            grid.cache[key] = np.where((requests > 0) & (p95 > 0), np.log(p95), np.nan)
    return np.asarray(grid.cache[key])


class LatencyRegressionDetector(_Detector):
    """p95 latency far above its robust baseline (median/MAD of log p95 of the preceding
    windows), by at least `rel_margin` x and `abs_margin_ms`. Without history, a p95 above
    `cold_ms` is flagged."""

    kind = AnomalyKind.LATENCY_REGRESSION
    metric = "p95_ms"
    required = ("requests", "p95_ms")

    def __init__(self, *, threshold: float = 0.9, min_requests: int = 20, min_history: int = 5,
                 max_history: int = 60, rel_margin: float = 1.5, abs_margin_ms: float = 25.0,
                 spread_floor: float = 0.1, cold_ms: float = 5000.0, z_center: float = 3.0,
                 z_scale: float = 1.0, step_s: float = 60.0) -> None:
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         z_center=z_center, z_scale=z_scale, step_s=step_s)
        self.rel_margin = rel_margin
        self.abs_margin_ms = abs_margin_ms
        self.spread_floor = spread_floor
        self.cold_ms = cold_ms

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        values = log_p95(grid)
        observed_log = values[e, t]
        median, mad, counts = robust_stats(history(values, e, t, self.max_history))
        cold = counts < self.min_history
        spread = np.maximum(_MAD_TO_SIGMA * np.nan_to_num(mad), self.spread_floor)
        z = np.where(cold,
                     self._z_at_threshold() + (observed_log - math.log(self.cold_ms))
                     / self.spread_floor,
                     (observed_log - median) / spread)
        observed = np.nan_to_num(np.exp(observed_log))
        baseline = np.where(cold, self.cold_ms, np.nan_to_num(np.exp(median)))
        requests = np.nan_to_num(grid.dense("requests", 0.0)[e, t])
        ok = ((requests >= self.min_requests)
              & (cold | ((observed >= baseline * self.rel_margin)
                         & (observed - baseline >= self.abs_margin_ms))))
        return {"observed": observed, "baseline": baseline, "z": z, "ok": ok,
                "history": counts}


class TrafficDetector(_Detector):
    """Requests far above (`direction` "surge") or below ("drop") the expected level.

    Works on log(1 + requests). Expected level: with at least `min_days` previous days of
    the same time of day (`season_days` at most, each smoothed over +-`smooth` windows), the
    median over those days plus the median residual of the last `max_history` windows (a
    level correction); otherwise the median of the last `max_history` windows. Spread:
    1.4826 x MAD of those residuals (or values), floored, combined with Poisson counting
    noise. A surge is *benign* - not flagged - when it is spread over more clients (requests
    per client at most `benign_per_client` x usual), with a normal 5xx rate and p95.
    """

    metric = "requests"

    def __init__(self, direction: str = "surge", *, threshold: float = 0.9,
                 min_requests: int = 20, min_history: int = 5, max_history: int = 60,
                 season_days: int = 7, min_days: int = 3, smooth: int = 3,
                 rel_margin: float = 2.0, spread_floor: float = 0.1,
                 benign_per_client: float = 1.5, benign_error_margin: float = 0.05,
                 benign_latency_ratio: float = 1.5, z_center: float = 3.0,
                 z_scale: float = 1.0, step_s: float = 60.0) -> None:
        if direction not in ("surge", "drop"):
            raise ValueError(f"direction must be 'surge' or 'drop', not {direction!r}")
        super().__init__(threshold=threshold, min_requests=min_requests,
                         min_history=min_history, max_history=max_history,
                         z_center=z_center, z_scale=z_scale, step_s=step_s)
        self.direction = direction
        self.kind = AnomalyKind.TRAFFIC_SURGE if direction == "surge" else AnomalyKind.TRAFFIC_DROP
        self.season_days = season_days
        self.min_days = min_days
        self.smooth = smooth
        self.rel_margin = rel_margin
        self.spread_floor = spread_floor
        self.benign_per_client = benign_per_client
        self.benign_error_margin = benign_error_margin
        self.benign_latency_ratio = benign_latency_ratio

    def _chunk_size(self) -> int:
        return max(1, _CHUNK_CELLS // max(self.max_history * max(self.season_days, 3), 1))

    def _level(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """log1p(requests) and its centred +-smooth moving mean (NaN-aware)."""
        key = ("traffic_level", self.smooth)
        if key not in grid.cache:
            level = np.log1p(grid.dense("requests", 0.0))
            valid = ~np.isnan(level)
            width = 2 * self.smooth + 1
            padded = np.pad(np.where(valid, level, 0.0), ((0, 0), (self.smooth, self.smooth)))
            counted = np.pad(valid.astype("float64"), ((0, 0), (self.smooth, self.smooth)))
            sums = sliding_window_view(padded, width, axis=1).sum(axis=2)
            numbers = sliding_window_view(counted, width, axis=1).sum(axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                smoothed = np.where(numbers > 0, sums / numbers, np.nan)
            grid.cache[key] = (level, smoothed)
        level_smoothed: tuple[np.ndarray, np.ndarray] = grid.cache[key]
        return level_smoothed

    def _seasonal(self, smoothed: np.ndarray, e: np.ndarray, t: np.ndarray,
                  period: int) -> tuple[np.ndarray, np.ndarray]:
        """Median over the previous days of the smoothed level at the same time of day.

        `t` may be 2-D (cells x history). The smoothing window of a day d >= 1 ends at
        t - d x period + smooth < t, so nothing at or after t is read."""
        days = np.arange(1, self.season_days + 1)
        positions = t[..., None] - days * period
        inside = positions >= 0
        values = smoothed[e.reshape(e.shape + (1,) * (t.ndim - e.ndim + 1)),
                          np.maximum(positions, 0)]
        values = np.where(inside, values, np.nan)
        flat = values.reshape(-1, len(days))
        median, counts = _nan_median_rows(flat)
        return median.reshape(t.shape), counts.reshape(t.shape)

    def _expected(self, grid: Grid, e: np.ndarray, t: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Expected log level, its robust spread, the number of history windows, and the
        expected log level from the seasonal profile alone (NaN without one)."""
        level, smoothed = self._level(grid)
        recent = history(level, e, t, self.max_history)
        # Without a profile: the median of a 3x longer trailing window, so that a long
        # incident (or a benign campaign) of up to 1.5 x max_history windows cannot become
        # the baseline, and its end is not a new incident.
        median, mad, counts = robust_stats(history(level, e, t, 3 * self.max_history))
        expected, spread = median, _MAD_TO_SIGMA * np.nan_to_num(mad)
        profile = np.full(len(e), np.nan)
        period = grid.period
        if self.season_days and period and period > self.smooth:
            season_now, days_now = self._seasonal(smoothed, e, t, period)
            positions = t[:, None] - self.max_history + np.arange(self.max_history)[None, :]
            season_before, _ = self._seasonal(smoothed, e, np.maximum(positions, 0), period)
            residuals = recent - np.where(positions >= 0, season_before, np.nan)
            res_median, res_mad, res_counts = robust_stats(residuals)
            seasonal = (days_now >= self.min_days) & (res_counts >= self.min_history)
            expected = np.where(seasonal, season_now + np.nan_to_num(res_median), expected)
            spread = np.where(seasonal, _MAD_TO_SIGMA * np.nan_to_num(res_mad), spread)
            profile = np.where(seasonal, season_now, np.nan)
        counting = 1.0 / np.sqrt(np.expm1(np.nan_to_num(expected)) + 1.0)
        spread = np.sqrt(np.maximum(spread, self.spread_floor) ** 2 + counting ** 2)
        return expected, spread, counts, profile

    def _judge(self, grid: Grid, e: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        key = ("traffic", self.max_history, self.season_days, self.min_days, self.smooth,
               self.spread_floor, self.min_history)
        cells = (e.tobytes(), t.tobytes())
        cached = grid.cache.get(key)
        if cached is not None and cached[0] == cells:
            expected, spread, counts, profile = cached[1]
        else:
            expected, spread, counts, profile = self._expected(grid, e, t)
            grid.cache[key] = (cells, (expected, spread, counts, profile))
        level, _ = self._level(grid)
        observed_level = np.nan_to_num(level[e, t])
        observed = np.expm1(observed_level)
        baseline = np.expm1(np.nan_to_num(expected))
        # With a seasonal profile the margin must hold against it too: the level correction
        # lags a long incident, and the return to normal after it is not a new one.
        usual = np.where(np.isnan(profile), baseline, np.expm1(np.nan_to_num(profile)))
        cold = counts < self.min_history
        if self.direction == "surge":
            z = (observed_level - expected) / spread
            ok = ((observed >= np.maximum(baseline, usual) * self.rel_margin)
                  & (observed - baseline >= self.min_requests)
                  & ~self._benign(grid, e, t, observed, baseline))
        else:
            z = (expected - observed_level) / spread
            ok = ((observed * self.rel_margin <= np.minimum(baseline, usual))
                  & (baseline >= self.min_requests))
        return {"observed": observed, "baseline": baseline, "z": np.where(cold, -50.0, z),
                "ok": ok & ~cold, "history": counts}

    def _benign(self, grid: Grid, e: np.ndarray, t: np.ndarray, observed: np.ndarray,
                baseline: np.ndarray) -> np.ndarray:
        if not grid.has("clients"):
            return np.zeros(len(e), dtype=bool)
        clients = grid.dense("clients")
        with np.errstate(divide="ignore", invalid="ignore"):
            per_client = np.where(clients > 0, grid.dense("requests", 0.0) / clients, np.nan)
        usual, _, _ = robust_stats(history(per_client, e, t, self.max_history))
        benign = per_client[e, t] <= np.nan_to_num(usual, nan=np.inf) * self.benign_per_client
        if grid.has("errors_5xx"):
            rates = grid.ratio("errors_5xx")
            usual_rate, _, _ = robust_stats(history(rates, e, t, self.max_history))
            benign &= ~(np.nan_to_num(rates[e, t])
                        > np.nan_to_num(usual_rate) + self.benign_error_margin)
        if grid.has("p95_ms"):
            p95 = grid.dense("p95_ms")
            usual_p95, _, _ = robust_stats(history(p95, e, t, self.max_history))
            benign &= ~(np.nan_to_num(p95[e, t])
                        > np.nan_to_num(usual_p95, nan=np.inf) * self.benign_latency_ratio)
        return np.asarray(benign)


def _column_at(grid: Grid, column: str, e: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A text column's value at cells (e, t) ('' where there is no row)."""
    positions = grid.rows[e, t]
    values = grid.frame[column].iloc[np.maximum(positions, 0)].astype(str).to_numpy(dtype=object)
    return np.where(positions >= 0, values, "")


def severity(kind: str, baseline: float, observed: float, score: float = 1.0) -> Severity:
    """Severity from the magnitude of the change (and, for surges, the score)."""
    ratio = observed / baseline if baseline > 0 else math.inf
    steps: tuple[tuple[float, Severity], ...]
    value = observed
    if kind in (AnomalyKind.ERROR_SPIKE, AnomalyKind.AUTH_FAILURE_BURST):
        steps = ((0.5, Severity.CRITICAL), (0.2, Severity.HIGH), (0.1, Severity.MEDIUM))
    elif kind == AnomalyKind.CLIENT_DOMINANCE:
        steps = ((0.9, Severity.HIGH), (0.7, Severity.MEDIUM))
    elif kind == AnomalyKind.LATENCY_REGRESSION:
        steps, value = ((5.0, Severity.HIGH), (2.0, Severity.MEDIUM)), ratio
    elif kind == AnomalyKind.TRAFFIC_SURGE:
        steps, value = ((10.0, Severity.HIGH), (4.0, Severity.MEDIUM)), ratio
    elif kind == AnomalyKind.TRAFFIC_DROP:
        drop = 1.0 - (observed / baseline if baseline > 0 else 1.0)
        steps, value = ((0.95, Severity.CRITICAL), (0.8, Severity.HIGH),
                        (0.6, Severity.MEDIUM)), drop
    elif kind == AnomalyKind.ENUMERATION:
        steps = ((300.0, Severity.HIGH), (100.0, Severity.MEDIUM))
    elif kind == AnomalyKind.UNDECLARED_ENDPOINT:
        steps = ((1000.0, Severity.HIGH), (200.0, Severity.MEDIUM))
    else:
        steps = ()
    for bound, level in steps:
        if value >= bound:
            if score < 0.95 and level in (Severity.CRITICAL, Severity.HIGH):
                return Severity.MEDIUM  # a big change that is barely significant
            return level
    return Severity.LOW
