"""Altair charts of the dashboard: series with anomaly windows shaded, a baseline band and an
earlier window for comparison; all interactive (zoom, pan, tooltips)."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

BASELINE_POINTS = 15  # buckets the rolling baseline looks back over
BAND_WIDTH = 3.0  # band = median +- this many scaled MADs


def baseline_band(values: pd.Series, window: int = BASELINE_POINTS) -> pd.DataFrame:
    """Rolling median and band from the points BEFORE each one (so a spike does not hide in
    its own baseline). Columns: baseline, low, high; NaN until 3 earlier points exist."""
    earlier = values.astype(float).shift(1)
    median = earlier.rolling(window, min_periods=3).median()
    mad = (earlier - median).abs().rolling(window, min_periods=3).median() * 1.4826
    spread = mad.clip(lower=(median.abs() * 0.05).fillna(0.0))
    return pd.DataFrame({"baseline": median, "low": (median - BAND_WIDTH * spread).clip(lower=0),
                         "high": median + BAND_WIDTH * spread})


def series_chart(data: pd.DataFrame, column: str, title: str, windows: pd.DataFrame,
                 compare: pd.DataFrame | None = None, compare_label: str = "",
                 percent: bool = False) -> alt.LayerChart | alt.FacetChart:
    """`data` has `time` and `column`; `windows` has start, end, kind (may be empty);
    `compare` has `time` and `column`, already shifted onto this range."""
    axis = alt.Axis(format="%") if percent else alt.Axis(format=",.4~r")
    frame = data[["time", column]].copy()
    days = (frame["time"].max() - frame["time"].min()).days if len(frame) else 0
    x = alt.X("time:T", title=None,
              axis=alt.Axis(format="%H:%M" if days < 1 else "%b %d %H:%M", labelOverlap=True))
    band = baseline_band(frame[column])
    frame = pd.concat([frame, band], axis=1)
    layers: list[Any] = []
    if not windows.empty:
        layers.append(alt.Chart(windows).mark_rect(opacity=0.18, color="#d62728").encode(
            x="start:T", x2="end:T", tooltip=["kind:N", "severity:N", "summary:N"]))
    layers.append(alt.Chart(frame).mark_area(opacity=0.18, color="#7f7f7f").encode(
        x=x, y=alt.Y("low:Q", title=title, axis=axis), y2="high:Q",
        tooltip=[alt.Tooltip("baseline:Q", title="baseline", format=".3~f")]))
    if compare is not None and not compare.empty:
        earlier = compare[["time", column]].assign(series=compare_label)
        layers.append(alt.Chart(earlier).mark_line(strokeDash=[4, 3], color="#9467bd").encode(
            x=x, y=alt.Y(f"{column}:Q"), tooltip=["series:N", "time:T", f"{column}:Q"]))
    layers.append(alt.Chart(frame).mark_line(color="#1f77b4").encode(
        x=x, y=alt.Y(f"{column}:Q", title=title, axis=axis),
        tooltip=["time:T", alt.Tooltip(f"{column}:Q", format=".3~f")]))
    return alt.layer(*layers).properties(height=220, title=title).interactive()
