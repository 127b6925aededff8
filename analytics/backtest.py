"""Backtests: replay a CSV of per-window metrics through the live detectors.

Input: a `timestamp` column (ISO 8601 or epoch seconds), an optional `endpoint` column, and
metric columns; every other numeric column is a metric. Columns the gateway's detectors know
(`requests`, `errors_5xx` or `error_rate`, `p95_ms`, `auth_failures` or
`auth_failure_rate`, `top_client_share` + `clients`, `top_client_paths`) go to those detectors
(the same objects, settings and code as the live job: `analytics.scoring`); any other numeric
column is judged by `MetricShiftDetector` (kind `metric:<column>`). Every window is judged
from the windows before it only, so one vectorised pass is a replay in time order.

Output, one row per input row in input order: `timestamp, endpoint, score, flagged, kind`
(score = the highest score of any detector; kind = the flagged kind with the highest score,
or empty).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import pandas as pd

from analytics.detectors import Grid, MetricShiftDetector
from analytics.scoring import build_detectors
from analytics.settings import AnalyticsSettings

OUTPUT_COLUMNS: Final = ["timestamp", "endpoint", "score", "flagged", "kind"]
_KNOWN: Final = {"requests", "errors_5xx", "error_rate", "p95_ms", "auth_failures",
                 "auth_failure_rate", "top_client_share", "clients", "top_client_paths"}
_ASSUMED_REQUESTS: Final = 1000.0  # volume when the CSV has none: counting noise ignored


class BacktestError(ValueError):
    """A CSV the backtest cannot use; the message says what, where and what to do."""


def read_csv(source: str | Path | TextIO) -> pd.DataFrame:
    """Parse and validate the input; metric columns as float, `timestamp` as UTC."""
    name = str(source) if isinstance(source, str | Path) else "input"
    try:
        raw = pd.read_csv(source, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise BacktestError(f"{name}: no such file") from None
    except pd.errors.EmptyDataError:
        raise BacktestError(f"{name}: the file is empty; expected a header with a "
                            "'timestamp' column") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise BacktestError(f"{name}: not a readable CSV ({exc})") from None
    raw.columns = [str(column).strip() for column in raw.columns]
    if "timestamp" not in raw.columns:
        raise BacktestError(f"{name}: no 'timestamp' column (columns: {list(raw.columns)}); "
                            "add one with ISO 8601 times or epoch seconds")
    if raw.empty:
        raise BacktestError(f"{name}: no data rows")
    frame = pd.DataFrame(index=raw.index)
    frame["timestamp"] = _timestamps(raw["timestamp"], name)
    if "endpoint" in raw.columns:
        frame["endpoint"] = raw["endpoint"].str.strip().replace("", "default")
    else:
        frame["endpoint"] = "default"
    metrics = [column for column in raw.columns if column not in ("timestamp", "endpoint")]
    for column in metrics:
        text = raw[column].str.strip()
        values = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = values.isna() & (text != "")
        if bad.all() and column not in _KNOWN:
            continue  # a text column (a label, a comment): not a metric
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise BacktestError(f"{name}: line {row + 2}, column {column!r}: "
                                f"{raw[column].iloc[row]!r} is not a number")
        frame[column] = values.astype("float64")
    if len(frame.columns) == 2:
        raise BacktestError(f"{name}: no numeric metric column besides timestamp/endpoint")
    duplicated = frame.duplicated(subset=["endpoint", "timestamp"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise BacktestError(f"{name}: line {row + 2}: a second row for endpoint "
                            f"{frame['endpoint'].iloc[row]!r} at {raw['timestamp'].iloc[row]}")
    frame.attrs["timestamp_text"] = raw["timestamp"].tolist()
    return frame


def _timestamps(column: pd.Series, name: str) -> pd.Series:
    text = column.str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().all():
        return pd.Series(pd.to_datetime(numeric, unit="s", utc=True), index=column.index)
    parsed = pd.to_datetime(text, utc=True, errors="coerce", format="mixed")
    bad = parsed.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise BacktestError(f"{name}: line {row + 2}, column 'timestamp': "
                            f"{column.iloc[row]!r} is not a time (use ISO 8601, e.g. "
                            "2026-01-05T10:00:00Z, or epoch seconds)")
    return pd.Series(parsed, index=column.index)


def infer_step(frame: pd.DataFrame) -> float:
    """The window length: the most common gap between an endpoint's consecutive rows."""
    ordered = frame.sort_values(["endpoint", "timestamp"])
    gaps = ordered.groupby("endpoint")["timestamp"].diff().dt.total_seconds()
    gaps = gaps[gaps > 0]
    if gaps.empty:
        return 60.0
    return float(gaps.round().mode().iloc[0])


def to_detector_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The input in the live frame's shape; and whether request volume was given."""
    out = pd.DataFrame({"minute": frame["timestamp"], "route_id": frame["endpoint"],
                        "http_request_method": "", "http_route": frame["endpoint"]},
                       index=frame.index)
    has_volume = "requests" in frame.columns
    out["requests"] = frame["requests"] if has_volume else _ASSUMED_REQUESTS
    for column in frame.columns:
        if column not in ("timestamp", "endpoint", "requests"):
            out[column] = frame[column]
    for rate, count in (("error_rate", "errors_5xx"), ("auth_failure_rate", "auth_failures")):
        if rate in frame.columns and count not in frame.columns:
            out[count] = frame[rate] * out["requests"]
    return out, has_volume


def backtest(frame: pd.DataFrame, settings: AnalyticsSettings | None = None) -> pd.DataFrame:
    """Score every input row; OUTPUT_COLUMNS in input order."""
    settings = settings or AnalyticsSettings()
    step = infer_step(frame)
    detector_frame, has_volume = to_detector_frame(frame)
    grid = Grid(detector_frame, step)
    detectors: list[Any] = [
        d for d in build_detectors(settings, step, templated_only=False)
        if all(name in detector_frame.columns for name in d.required)
        and (has_volume or d.metric != "requests")]
    extra = [column for column in frame.columns
             if column not in ("timestamp", "endpoint") and column not in _KNOWN]
    detectors += [MetricShiftDetector(column, threshold=settings.score_threshold,
                                      max_history=settings.history_minutes, step_s=step)
                  for column in extra]
    score = np.zeros(len(frame))
    best_flag = np.zeros(len(frame))
    kind = np.full(len(frame), "", dtype=object)
    for detector in detectors:
        result = detector.detect(detector_frame, grid=grid)
        scores = result["score"].to_numpy(dtype="float64")
        flagged = result["flagged"].to_numpy(dtype=bool)
        score = np.maximum(score, scores)
        better = flagged & (scores > best_flag)
        kind[better] = str(detector.kind)
        best_flag = np.where(better, scores, best_flag)
    timestamps = frame.attrs.get("timestamp_text")
    return pd.DataFrame({
        "timestamp": timestamps if timestamps is not None else frame["timestamp"].astype(str),
        "endpoint": frame["endpoint"].to_numpy(),
        "score": np.round(score, 4),
        "flagged": best_flag > 0,
        "kind": kind,
    }, columns=OUTPUT_COLUMNS)


def run(input_path: str | Path, output: str | Path | None,
        settings: AnalyticsSettings | None = None, stdout: TextIO | None = None) -> int:
    """Read, score, write (to `output`, or stdout); return the number of flagged rows."""
    result = backtest(read_csv(input_path), settings)
    buffer = io.StringIO()
    result.to_csv(buffer, index=False, quoting=csv.QUOTE_MINIMAL,
                  columns=OUTPUT_COLUMNS)
    text = buffer.getvalue().replace(",True,", ",true,").replace(",False,", ",false,")
    if output is None:
        if stdout is None:
            import sys

            stdout = sys.stdout
        stdout.write(text)
    else:
        try:
            Path(output).write_text(text)
        except OSError as exc:
            raise BacktestError(f"{output}: cannot write ({exc.strerror})") from None
    return int(result["flagged"].sum())

