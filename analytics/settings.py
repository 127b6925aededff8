"""Settings of the analytics job: one object per process, extending CommonSettings.

Every field reads from the environment with the common `APIGW_` prefix, e.g.
`APIGW_INTERVAL_S=30`, `APIGW_AUTO_MODE=auto`, `APIGW_HEADROOM=3`.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from apigw.settings import CommonSettings


class AutoMode(StrEnum):
    OFF = "off"  # detect and record anomalies, recommend nothing
    RECOMMEND = "recommend"  # write pending recommendations for a person to approve
    AUTO = "auto"  # apply recommendations as expiring policies, within the guardrails


class AnalyticsSettings(CommonSettings):
    interval_s: float = Field(default=60.0, gt=0, description="Seconds between scheduled runs.")
    lookback_minutes: int = Field(default=180, ge=2, le=60 * 24 * 31,
                                  description="Per-minute history read for baselines.")
    report_minutes: int = Field(default=10, ge=1,
                                description="Flagged windows this recent become anomalies.")
    client_lookback_hours: float = Field(default=24.0, gt=0,
                                         description="History of per-client rates for limits.")
    min_requests: int = Field(default=20, ge=1,
                              description="A window needs this many requests to be flagged.")
    min_history: int = Field(default=2, ge=1,
                             description="Preceding windows needed for a robust baseline; with "
                                         "fewer, absolute thresholds apply.")
    score_threshold: float = Field(default=0.9, gt=0, lt=1,
                                   description="Anomaly score at or above which a window is "
                                               "flagged (when the margins also hold).")
    error_rate_abs_margin: float = Field(default=0.05, ge=0, le=1,
                                         description="5xx rate must exceed baseline by this much.")
    error_rate_rel_margin: float = Field(default=2.0, ge=1,
                                         description="...and be this many times the baseline.")
    error_rate_spread_floor: float = Field(default=0.01, gt=0,
                                           description="Smallest robust spread of a 5xx rate.")
    error_rate_cold: float = Field(default=0.2, gt=0, le=1,
                                   description="5xx rate flagged when there is no history.")
    dominance_share: float = Field(default=0.5, gt=0, le=1,
                                   description="Top client's share of requests to flag.")
    dominance_abs_margin: float = Field(default=0.25, ge=0, le=1,
                                        description="Top share must exceed baseline by this.")
    dominance_cold_share: float = Field(default=0.8, gt=0, le=1,
                                        description="Top share flagged when there is no history.")
    contributor_min_share: float = Field(default=0.2, gt=0, le=1,
                                         description="Least share of an anomaly for a client "
                                                     "to count as a contributor.")
    contributor_ratio: float = Field(default=3.0, ge=1,
                                     description="...and this many times its baseline share.")
    headroom: float = Field(default=2.0, ge=1,
                            description="Recommended limit = p99 of legit per-client rate x this.")
    limit_floor: int = Field(default=10, ge=1, description="Never recommend below this.")
    limit_window_s: float = Field(default=60.0, gt=0, description="Window of recommended limits.")
    auto_mode: AutoMode = Field(default=AutoMode.RECOMMEND,
                                description="Default mode; per-route overrides in Redis hash "
                                            "<prefix>:analytics:auto_mode.")
    auto_expiry_s: float = Field(default=3600.0, gt=0,
                                 description="Lifetime of an automatically applied policy.")
    leader_lease_s: float = Field(default=0.0, ge=0,
                                  description="Leader lease; 0 means 2 x interval_s + 10 s.")
    history_minutes: int = Field(default=60, ge=2, le=1440,
                                 description="Trailing windows of a robust baseline.")
    season_days: int = Field(default=7, ge=0, le=28,
                             description="Previous days of the same time of day in a seasonal "
                                         "traffic baseline (needs lookback_minutes to cover "
                                         "them; 0 = trailing baseline only).")
    latency_rel_margin: float = Field(default=1.5, ge=1,
                                      description="p95 must be this many times its baseline...")
    latency_abs_margin_ms: float = Field(default=25.0, ge=0,
                                         description="...and this many ms above it.")
    traffic_rel_margin: float = Field(default=2.0, gt=1,
                                      description="Surge: requests >= baseline x this; drop: "
                                                  "requests <= baseline / this.")
    drift_detection: bool = Field(default=True,
                                  description="Also run the slow-drift (EWMA) and level-shift "
                                              "(CUSUM) detectors (analytics/drift.py).")
    latency_drift_span: float = Field(default=5.0, ge=1,
                                      description="EWMA span (windows) of the smoothed p95 a "
                                                  "slow drift is judged on.")
    drift_reference_lag: int = Field(default=120, ge=1,
                                     description="A slow drift is judged against the p95 of "
                                                 "history_minutes windows ending this many "
                                                 "windows back (lookback_minutes must cover "
                                                 "lag + history_minutes + report_minutes).")
    shift_cusum_windows: int = Field(default=6, ge=1, le=8,
                                     description="Windows a level-shift CUSUM adds up (at most "
                                                 "8: the live job's seasonal slices reach 10 "
                                                 "min beyond the history).")
    shift_slack: float = Field(default=1.0, ge=0,
                               description="CUSUM slack: z up to this adds nothing.")
    shift_threshold: float = Field(default=6.0, gt=0,
                                   description="CUSUM value that flags a level shift.")
    shift_min_change: float = Field(default=0.3, gt=0,
                                    description="A level shift must move requests by at least "
                                                "this fraction (log ratio to both baselines).")
    auth_failure_abs_margin: float = Field(default=0.1, ge=0, le=1,
                                           description="Auth failure rate above baseline.")
    auth_failure_min: int = Field(default=10, ge=1,
                                  description="Least auth failures in a flagged window.")
    enumeration_min_paths: int = Field(default=30, ge=2,
                                       description="Least distinct paths one client requested "
                                                   "in a window on a templated endpoint.")
    enumeration_cold_paths: int = Field(default=100, ge=2,
                                        description="The same, while the endpoint has no "
                                                    "history to compare with.")
    undeclared_min_requests: int = Field(default=30, ge=1,
                                         description="Least requests to undeclared paths in a "
                                                     "flagged window.")
    shadow_s: float = Field(default=600.0, ge=0,
                            description="An automatic limit runs in shadow mode this long "
                                        "before it may be enforced; 0 = enforce at once.")
    shadow_max_other_share: float = Field(default=0.1, ge=0, le=1,
                                          description="Promote from shadow only if at most this "
                                                      "share of would-be-limited requests came "
                                                      "from unflagged clients.")
    max_step: float = Field(default=0.5, gt=0, le=1,
                            description="An automatic change may cut a limit to no less than "
                                        "this fraction of the current one.")
    floor_headroom: float = Field(default=1.0, ge=1,
                                  description="Automatic limits never go below legitimate "
                                              "clients' p99 x this.")
    rollback_429_rate: float = Field(default=0.05, gt=0, le=1,
                                     description="Roll back an enforced automatic limit when "
                                                 "unflagged clients' 429 rate from it exceeds "
                                                 "this.")
    rollback_min_requests: int = Field(default=20, ge=1,
                                       description="Unflagged requests needed to judge a "
                                                   "rollback.")
    contributor_min_count: int = Field(default=3, ge=1,
                                       description="Least count of the anomaly's metric a "
                                                   "contributor sent in the anomalous windows.")
    contributor_top: int = Field(default=10, ge=1,
                                 description="Contributors named per anomaly, at most.")
    confidence_clients_scale: float = Field(default=10.0, gt=0,
                                            description="Confidence = 1 - exp(-clients / this) "
                                                        "x stability term.")
    loosen_429_share: float = Field(default=0.05, gt=0, le=1,
                                    description="Loosen: a window's 429 share must reach this.")
    loosen_min_windows: int = Field(default=0, ge=0,
                                    description="Loosen: windows of report_minutes with that "
                                                "share; 0 = max(3, report_minutes // 2).")
    loosen_min_clients: int = Field(default=3, ge=1,
                                    description="Loosen: unflagged clients that got 429s.")
    loosen_max_client_share: float = Field(default=0.5, gt=0, le=1,
                                           description="Loosen: no one client may have more "
                                                       "than this share of the 429s.")
    loosen_step: float = Field(default=1.5, gt=1,
                               description="Loosen: new limit at most current x this.")
    examples: int = Field(default=5, ge=0, le=100,
                          description="Example request/trace ids kept per anomaly.")
    listen: str = Field(default="127.0.0.1:9092",
                        description="HOST:PORT of the standalone analytics service.")

    def lease_s(self) -> float:
        return self.leader_lease_s or 2 * self.interval_s + 10
