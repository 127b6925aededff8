"""Charts of the dashboard (Vega-Lite specs): series with anomaly windows shaded, a baseline
band and an earlier window for comparison; all interactive (zoom, pan, tooltips)."""

from __future__ import annotations

from typing import Any

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
                 percent: bool = False) -> dict[str, Any]:
    """A Vega-Lite spec for `st.vega_lite_chart`. `data` has `time` and `column`; `windows` has
    start, end, kind, severity, summary (may be empty); `compare` has `time` and `column`,
    already shifted onto this range. Written as a plain spec, not through Altair, whose
    schema validation took ~60 ms a chart (a quarter of the Investigate page's script run)."""
    axis = {"format": "%"} if percent else {"format": ",.4~r"}
    frame = data[["time", column]].copy()
    days = (frame["time"].max() - frame["time"].min()).days if len(frame) else 0
    x = {"field": "time", "type": "temporal", "title": None,
         "axis": {"format": "%H:%M" if days < 1 else "%b %d %H:%M", "labelOverlap": True}}
    frame = pd.concat([frame, baseline_band(frame[column])], axis=1)
    datasets: dict[str, pd.DataFrame] = {"series": frame}
    layers: list[dict[str, Any]] = []
    if not windows.empty:
        datasets["windows"] = windows[["start", "end", "kind", "severity", "summary"]]
        layers.append({"data": {"name": "windows"},
                       "mark": {"type": "rect", "opacity": 0.18, "color": "#d62728"},
                       "encoding": {"x": {"field": "start", "type": "temporal"},
                                    "x2": {"field": "end"},
                                    "tooltip": [{"field": name, "type": "nominal"}
                                                for name in ("kind", "severity", "summary")]}})
    layers.append({"data": {"name": "series"},
                   "mark": {"type": "area", "opacity": 0.18, "color": "#7f7f7f"},
                   "encoding": {"x": x, "y": {"field": "low", "type": "quantitative",
                                              "title": title, "axis": axis},
                                "y2": {"field": "high"},
                                "tooltip": [{"field": "baseline", "type": "quantitative",
                                             "title": "baseline", "format": ".3~f"}]}})
    if compare is not None and not compare.empty:
        datasets["earlier"] = compare[["time", column]].assign(series=compare_label)
        layers.append({"data": {"name": "earlier"},
                       "mark": {"type": "line", "strokeDash": [4, 3], "color": "#9467bd"},
                       "encoding": {"x": x, "y": {"field": column, "type": "quantitative"},
                                    "tooltip": [{"field": "series", "type": "nominal"},
                                                {"field": "time", "type": "temporal"},
                                                {"field": column, "type": "quantitative"}]}})
    layers.append({"data": {"name": "series"}, "mark": {"type": "line", "color": "#1f77b4"},
                   "encoding": {"x": x, "y": {"field": column, "type": "quantitative",
                                              "title": title, "axis": axis},
                                "tooltip": [{"field": "time", "type": "temporal"},
                                            {"field": column, "type": "quantitative",
                                             "format": ".3~f"}]}})
    layers[0]["name"] = "zoomable"  # zoom and pan with the mouse, shared by every layer
    return {"title": title, "height": 220, "datasets": datasets, "layer": layers,
            "params": [{"name": "zoom", "select": {"type": "interval", "encodings": ["x", "y"]},
                        "bind": "scales", "views": ["zoomable"]}]}
