"""The backtest: CSV in, one scored row per input row out, through the live detectors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analytics.backtest import BacktestError, backtest, infer_step, read_csv, run

START = pd.Timestamp("2026-01-05T00:00Z")


def _history(path: Path, minutes: int = 240, *, shuffle: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = []
    for endpoint in ("checkout", "search"):
        for i in range(minutes):
            requests = int(rng.poisson(200))
            rows.append({"timestamp": (START + pd.Timedelta(minutes=i)).isoformat(),
                         "endpoint": endpoint, "requests": requests,
                         "error_rate": rng.binomial(requests, 0.01) / requests,
                         "p95_ms": rng.normal(120, 6), "queue_depth": rng.normal(10, 1),
                         "comment": "ok"})
    frame = pd.DataFrame(rows)
    frame.loc[(frame.endpoint == "checkout") & (frame.index % minutes == 150), "error_rate"] = 0.4
    search = frame.index[frame.endpoint == "search"]
    frame.loc[search[200:210], "p95_ms"] = 600.0
    frame.loc[search[100], "queue_depth"] = 40.0
    if shuffle:
        frame = frame.sample(frac=1.0, random_state=1)
    frame.to_csv(path, index=False)
    return frame


def test_flags_the_injected_windows_and_nothing_else(tmp_path: Path) -> None:
    source = _history(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    flagged = run(tmp_path / "in.csv", out)
    result = pd.read_csv(out)
    assert list(result.columns) == ["timestamp", "endpoint", "score", "flagged", "kind"]
    assert len(result) == len(source)
    assert result["timestamp"].tolist() == source["timestamp"].tolist()
    hits = result[result["flagged"]]
    assert flagged == len(hits)
    found = {(row.endpoint, row.timestamp, row.kind) for row in hits.itertuples()}
    expected = {("checkout", (START + pd.Timedelta(minutes=150)).isoformat(), "error_spike"),
                ("search", (START + pd.Timedelta(minutes=100)).isoformat(),
                 "metric:queue_depth")}
    expected |= {("search", (START + pd.Timedelta(minutes=m)).isoformat(),
                  "latency_regression") for m in range(200, 210)}
    assert found == expected
    assert result["score"].between(0, 1).all()
    assert (result.loc[~result["flagged"], "kind"].isna()).all()


def test_order_of_rows_does_not_matter_and_output_follows_input(tmp_path: Path) -> None:
    _history(tmp_path / "a.csv")
    ordered = backtest(read_csv(tmp_path / "a.csv"))
    _history(tmp_path / "b.csv", shuffle=True)
    shuffled = backtest(read_csv(tmp_path / "b.csv"))
    merged = ordered.merge(shuffled, on=["timestamp", "endpoint"], suffixes=("", "_s"))
    assert len(merged) == len(ordered)
    assert (merged["score"] == merged["score_s"]).all()
    assert (merged["flagged"] == merged["flagged_s"]).all()


def test_replay_has_no_look_ahead(tmp_path: Path) -> None:
    _history(tmp_path / "full.csv")
    full = backtest(read_csv(tmp_path / "full.csv"))
    prefix = pd.read_csv(tmp_path / "full.csv")
    cutoff = (START + pd.Timedelta(minutes=180)).isoformat()
    prefix[prefix["timestamp"] < cutoff].to_csv(tmp_path / "prefix.csv", index=False)
    early = backtest(read_csv(tmp_path / "prefix.csv"))
    pd.testing.assert_frame_equal(early.reset_index(drop=True),
                                  full[full["timestamp"] < cutoff].reset_index(drop=True))


def test_epoch_timestamps_without_endpoint_and_step_inference(tmp_path: Path) -> None:
    seconds = [1_767_571_200 + 300 * i for i in range(50)]
    values = [10.0] * 49 + [100.0]
    (tmp_path / "x.csv").write_text("timestamp,latency\n" + "".join(
        f"{s},{v + (i % 3) * 0.1}\n" for i, (s, v) in enumerate(zip(seconds, values,
                                                                    strict=True))))
    frame = read_csv(tmp_path / "x.csv")
    assert infer_step(frame) == 300.0
    result = backtest(frame)
    assert result["endpoint"].unique().tolist() == ["default"]
    assert result["flagged"].tolist() == [False] * 49 + [True]
    assert result["kind"].iloc[-1] == "metric:latency"


@pytest.mark.parametrize(("text", "message"), [
    ("time,x\n1,2\n", "no 'timestamp' column"),
    ("", "empty"),
    ("timestamp,x\n", "no data rows"),
    ("timestamp,x\n2026-01-01T00:00Z,1\nyesterday,2\n", "line 3, column 'timestamp'"),
    ("timestamp,x\n2026-01-01T00:00Z,1\n2026-01-01T00:01Z,abc\n", "line 3, column 'x'"),
    ("timestamp,comment\n2026-01-01T00:00Z,hello\n", "no numeric metric column"),
    ("timestamp,x\n2026-01-01T00:00Z,1\n2026-01-01T00:00Z,2\n", "a second row"),
])
def test_bad_csv_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(BacktestError, match=message):
        read_csv(path)


def test_cli_writes_output_and_exits_2_without_traceback_on_bad_input(tmp_path: Path) -> None:
    _history(tmp_path / "in.csv")
    ok = subprocess.run([sys.executable, "-m", "apigw.cli", "analytics", "backtest", "--input",
                         str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(pd.read_csv(tmp_path / "out.csv")) == 480
    (tmp_path / "bad.csv").write_text("when,x\n1,2\n")
    bad = subprocess.run([sys.executable, "-m", "apigw.cli", "analytics", "backtest",
                          "--input", str(tmp_path / "bad.csv")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "no 'timestamp' column" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "apigw.cli", "analytics", "backtest",
                              "--input", str(tmp_path / "nope.csv")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_stdout_output() -> None:
    buffer = io.StringIO()
    frame = pd.DataFrame({"timestamp": [(START + pd.Timedelta(minutes=i)).isoformat()
                                        for i in range(5)], "x": [1.0, 1.1, 0.9, 1.0, 1.0]})
    path = Path("/tmp") / f"apigw-backtest-{id(buffer)}.csv"
    frame.to_csv(path, index=False)
    try:
        assert run(path, None, stdout=buffer) == 0
    finally:
        path.unlink()
    assert buffer.getvalue().splitlines()[0] == "timestamp,endpoint,score,flagged,kind"
    assert buffer.getvalue().splitlines()[1].endswith(",false,")
