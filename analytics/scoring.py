"""The detector set of a run, from the settings: one place, used by the live job, the
backtest CLI and the evaluation suite, so all three run exactly the same code."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analytics.detectors import (
    AuthFailureBurstDetector,
    ClientDominanceDetector,
    EnumerationDetector,
    ErrorSpikeDetector,
    Grid,
    LatencyRegressionDetector,
    TrafficDetector,
    UndeclaredEndpointDetector,
)
from analytics.drift import LatencyDriftDetector, TrafficShiftDetector
from analytics.models import AnomalyKind
from analytics.settings import AnalyticsSettings


def build_detectors(s: AnalyticsSettings, step_s: float = 60.0,
                    templated_only: bool = True) -> list[Any]:
    """The detectors of routed endpoints, configured from the settings."""
    common: dict[str, Any] = {"threshold": s.score_threshold, "min_requests": s.min_requests,
                              "max_history": s.history_minutes, "step_s": step_s}
    return [
        ErrorSpikeDetector(**common, min_history=s.min_history,
                           abs_margin=s.error_rate_abs_margin,
                           rel_margin=s.error_rate_rel_margin,
                           spread_floor=s.error_rate_spread_floor,
                           cold_threshold=s.error_rate_cold),
        ClientDominanceDetector(**common, min_history=s.min_history,
                                min_share=s.dominance_share,
                                abs_margin=s.dominance_abs_margin,
                                cold_threshold=s.dominance_cold_share),
        AuthFailureBurstDetector(**common, min_history=s.min_history,
                                 abs_margin=s.auth_failure_abs_margin,
                                 min_count=s.auth_failure_min),
        EnumerationDetector(**common, min_history=s.min_history,
                            min_paths=s.enumeration_min_paths,
                            cold_paths=s.enumeration_cold_paths, templated_only=templated_only),
        LatencyRegressionDetector(**common, rel_margin=s.latency_rel_margin,
                                  abs_margin_ms=s.latency_abs_margin_ms),
        TrafficDetector("surge", **common, season_days=s.season_days,
                        rel_margin=s.traffic_rel_margin),
        TrafficDetector("drop", **common, season_days=s.season_days,
                        rel_margin=s.traffic_rel_margin),
        *(drift_detectors(s, step_s) if s.drift_detection else []),
    ]


def drift_detectors(s: AnalyticsSettings, step_s: float = 60.0) -> list[Any]:
    """Slow-drift and level-shift detectors (analytics/drift.py): kinds of the detectors
    above; `detect_all` merges their rows into those kinds' rows."""
    common: dict[str, Any] = {"threshold": s.score_threshold, "min_requests": s.min_requests,
                              "max_history": s.history_minutes, "step_s": step_s}
    shift: dict[str, Any] = {"cusum_windows": s.shift_cusum_windows, "slack": s.shift_slack,
                             "cusum_threshold": s.shift_threshold,
                             "min_change": s.shift_min_change, "season_days": s.season_days}
    return [
        LatencyDriftDetector(**common, span=s.latency_drift_span,
                             reference_lag=s.drift_reference_lag,
                             rel_margin=s.latency_rel_margin,
                             abs_margin_ms=s.latency_abs_margin_ms),
        TrafficShiftDetector("surge", **common, **shift),
        TrafficShiftDetector("drop", **common, **shift),
    ]


def merge_kinds(results: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """One result per kind: results of the same kind (same rows, same order) are merged row
    by row - flagged if any flags it; score, metric, baseline, observed, history and client
    from the flagging result with the highest score, else from the highest score."""
    by_kind: dict[str, pd.DataFrame] = {}
    for result in results:
        kind = str(result["kind"].iloc[0]) if len(result) else ""
        first = by_kind.get(kind)
        if first is None:
            by_kind[kind] = result
            continue
        rank_new = result["score"] + 2.0 * result["flagged"].astype(bool)
        rank_old = first["score"] + 2.0 * first["flagged"].astype(bool)
        take = (rank_new > rank_old).to_numpy()
        merged = first.copy()
        for column in ("score", "flagged", "metric", "baseline", "observed", "history",
                       "client"):
            merged[column] = np.where(take, result[column].to_numpy(),
                                      first[column].to_numpy())
        merged["flagged"] = merged["flagged"].astype(bool)
        merged["score"] = merged["score"].astype("float64")
        merged["history"] = merged["history"].astype("int64")
        by_kind[kind] = merged
    return list(by_kind.values())


def undeclared_detector(s: AnalyticsSettings, step_s: float = 60.0,
                        ) -> UndeclaredEndpointDetector:
    return UndeclaredEndpointDetector(threshold=s.score_threshold,
                                      min_requests=s.undeclared_min_requests,
                                      min_history=s.min_history, max_history=s.history_minutes,
                                      step_s=step_s)


def detect_all(frame: pd.DataFrame, settings: AnalyticsSettings, *,
               since: pd.Timestamp | None = None,
               complete_before: pd.Timestamp | None = None, step_s: float = 60.0,
               templated_only: bool = True) -> pd.DataFrame:
    """Windows of every endpoint (from `since` on) scored by every detector, concatenated.

    Unmatched traffic (route id '') goes to the undeclared-endpoint detector only; a detector
    whose columns the frame lacks is skipped. `complete_before`: windows from then on are
    still filling, so a drop there is not flagged.
    """
    if frame.empty:
        return pd.DataFrame()
    matched = frame[frame["route_id"] != ""]
    unmatched = frame[frame["route_id"] == ""]
    results: list[pd.DataFrame] = []
    if not matched.empty:
        grid = Grid(matched, step_s)
        results += merge_kinds([
            detector.detect(matched, since=since, grid=grid)
            for detector in build_detectors(settings, step_s, templated_only)
            if all(name in matched.columns for name in detector.required)])
    if not unmatched.empty:
        results.append(undeclared_detector(settings, step_s).detect(unmatched, since=since))
    if not results:
        return pd.DataFrame()
    detections = pd.concat(results, ignore_index=True)
    if complete_before is not None:
        minutes = pd.to_datetime(detections["minute"], utc=True)
        partial = ((detections["kind"] == str(AnomalyKind.TRAFFIC_DROP))
                   & (minutes >= complete_before))
        detections.loc[partial, "flagged"] = False
    return detections
