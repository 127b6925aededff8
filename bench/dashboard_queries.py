"""Dashboard page load: the API calls each page makes, timed against a control plane whose
embedded ClickHouse holds 10 million events.

    .venv/bin/python bench/dashboard_queries.py                      # 10 M events, ~3 minutes
    .venv/bin/python bench/dashboard_queries.py --events 1000000 --minutes 60,1440

What it does (all on free loopback ports, in a temp dir, stopped at the end):
1. generates `--events` events over the last 24 h straight into `events` (ClickHouse
   `INSERT ... SELECT FROM numbers()`, bench/pipeline.py's generator), so the materialized
   views fill the rollups as the collector's inserts would; adds one anomaly on orders-get;
2. starts `apigw controlplane` (collector + scheduler + API) on that store with a throwaway
   redis-server, and waits until its first analytics run is over (it runs at start);
3. per page and time range, makes the API calls that page makes on a first load
   (dashboard/views/*.py, through dashboard.client.ApiClient) `--rounds` times one after the
   other, and as many times all at once as the dashboard sends them (its `fetch_all`), and
   prints the best and median serial total per page, the median time until the last of the
   concurrent calls answered, and the slowest call. "overview (before)" is the overview as
   it was: one time-series call per endpoint for up to 20 sparklines instead of
   `sparkline=true`.

The time is the API's answer as the dashboard sees it (HTTP + JSON), not Streamlit's
rendering. Other processes share the CPUs: compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import _GENERATE, process, table, wait_http  # noqa: E402

from apigw.redis_server import RedisServer, free_port  # noqa: E402
from apigw.signals import interrupt_on_termination  # noqa: E402
from dashboard.client import ApiClient  # noqa: E402

SPAN_S = 24 * 3600
ENDPOINT = ("orders-get", "GET", "/orders/{id}")
Call = tuple[str, Callable[[], Any]]


def generate(dsn: str, n: int, end: int) -> tuple[float, str]:
    """Fill the store: n events over the 24 h before `end`, one anomaly; return (seconds,
    anomaly id)."""
    from collector.clickhouse import SharedClient
    from collector.schema import migrate

    anomaly_id = uuid.uuid4().hex
    ch = SharedClient(dsn)
    try:
        migrate(ch.client)
        started = time.perf_counter()
        ch.client.command(_GENERATE, parameters={
            "start_ms": (end - SPAN_S) * 1000, "span_ms": SPAN_S * 1000, "n": n})
        took = time.perf_counter() - started
        window = datetime.fromtimestamp(end - 600, UTC)
        ch.client.insert("anomalies", [[
            anomaly_id, datetime.fromtimestamp(end - 60, UTC), window,
            datetime.fromtimestamp(end - 300, UTC), *ENDPOINT, "error_spike", "high", 0.97,
            "error_rate", 0.01, 0.2, ["client-7"], ["r1"], ["t1"],
            "5xx rate 20% vs 1% baseline (bench)"]],
            column_names=["id", "detected_at", "window_start", "window_end", "route_id",
                          "http_request_method", "http_route", "kind", "severity", "score",
                          "metric", "baseline", "observed", "top_clients",
                          "example_request_ids", "example_trace_ids", "summary"])
    finally:
        ch.close()
    return took, anomaly_id


def pages(api: ApiClient, minutes: int, anomaly_id: str) -> dict[str, list[Call]]:
    """The calls of each page's first load, in the order the page makes them."""
    span = {"minutes": minutes}
    route_id, method, route = ENDPOINT
    where = {"route_id": route_id, "method": method, "route": route}

    def old_sparklines() -> None:
        for row in api.endpoints(span)[:20]:
            api.timeseries(span, row["route_id"], row["method"], row["http_route"])

    return {
        "overview": [
            ("endpoints?sparkline=true", lambda: api.endpoints(span, sparkline=True)),
            ("anomalies status=open", lambda: api.anomalies(span, status="open"))],
        "overview (before)": [
            ("endpoints", lambda: api.endpoints(span)),
            ("anomalies status=open", lambda: api.anomalies(span, status="open")),
            ("timeseries x endpoints (<= 20)", old_sparklines)],
        "investigate": [
            ("endpoints/names", lambda: api.endpoint_names(span)),
            ("anomalies", lambda: api.anomalies(span, **where)),
            ("timeseries compare=1d", lambda: api.timeseries(span, *ENDPOINT, compare="1d")),
            ("timeseries compare=1w", lambda: api.timeseries(span, *ENDPOINT, compare="1w")),
            ("breakdown status", lambda: api.breakdown(span, *ENDPOINT, "status")),
            ("top-clients", lambda: api.top_clients(span, *ENDPOINT)),
            ("breakdown error_type", lambda: api.breakdown(span, *ENDPOINT, "error_type")),
            ("breakdown client_address",
             lambda: api.breakdown(span, *ENDPOINT, "client_address")),
            ("requests", lambda: api.requests(span, **where, limit=50, offset=0))],
        "investigate (from anomaly)": [
            ("anomaly", lambda: api.anomaly(anomaly_id))],
        "security": [
            ("anomalies limit=1000", lambda: api.anomalies(span, limit=1000)),
            ("recommendations", api.recommendations),
            ("targeted impact", lambda: api.targeted_impact(span, route_id, method,
                                                            "client-7", 10, 60.0))],
        "policies": [
            ("kill-switch", api.kill_switch), ("auto-mode", api.auto_modes),
            ("endpoints/names", lambda: api.endpoint_names(span)), ("policies", api.policies),
            ("recommendations", api.recommendations)],
        "audit": [("audit", lambda: api.audit(100))],
    }


def measure(calls: list[Call], rounds: int) -> tuple[list[float], list[float],
                                                  dict[str, float]]:
    """Per round: the calls one after the other (their total), then all at once (the time
    until the last answered); and each call's best time alone."""
    totals: list[float] = []
    together: list[float] = []
    slowest: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        for _ in range(rounds):
            total = 0.0
            for name, call in calls:
                started = time.perf_counter()
                call()
                took = time.perf_counter() - started
                total += took
                slowest[name] = min(slowest.get(name, float("inf")), took)
            totals.append(total)
            started = time.perf_counter()
            for future in [pool.submit(call) for _, call in calls]:
                future.result()
            together.append(time.perf_counter() - started)
    return totals, together, slowest


def wait_first_run(api: ApiClient, timeout_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        try:
            api.call("GET", "/api/v1/analytics/last-run")
            return time.perf_counter() - started
        except Exception:  # 404 until the first run is over
            time.sleep(0.5)
    return float("nan")


def main() -> int:
    interrupt_on_termination()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--minutes", default="60,1440",
                        help="dashboard time ranges to time, in minutes (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-run-timeout", type=float, default=300.0,
                        help="seconds to wait for the scheduler's first run before timing")
    parser.add_argument("--per-call", action="store_true",
                        help="also print every call's best time, per page")
    args = parser.parse_args()
    print(f"# dashboard page load ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f})")
    with tempfile.TemporaryDirectory(prefix="apigw-dash-bench-") as name:
        tmp = Path(name)
        dsn = f"chdb://{tmp / 'store'}"
        end = int(time.time()) // 60 * 60
        generated, anomaly_id = generate(dsn, args.events, end)
        print(f"\ngenerated {args.events:,} events over 24 h in {generated:.0f} s")
        redis = RedisServer(tmp / "redis").start()
        try:
            port = free_port()
            env = {"APIGW_REDIS_URL": redis.url, "APIGW_CLICKHOUSE_DSN": dsn,
                   "APIGW_LOG_LEVEL": "WARNING", "APIGW_INTERVAL_S": "86400",
                   "APIGW_DATA_DIR": str(tmp / "data")}
            log = tmp / "controlplane.log"
            command = [sys.executable, "-m", "apigw.cli", "controlplane", "--listen",
                       f"127.0.0.1:{port}"]
            with process(command, env, log) as child:
                wait_http(f"http://127.0.0.1:{port}/healthz", child, log, timeout=120)
                api = ApiClient(f"http://127.0.0.1:{port}", timeout_s=60.0)
                waited = wait_first_run(api, args.first_run_timeout)
                print(f"first analytics run over after {waited:.0f} s")
                for minutes in [int(m) for m in args.minutes.split(",")]:
                    rows, per_call = [], []
                    for page, calls in pages(api, minutes, anomaly_id).items():
                        totals, together, best = measure(calls, args.rounds)
                        per_call += [[page, call, f"{took * 1000:.0f} ms"]
                                     for call, took in best.items()]
                        name, slow = max(best.items(), key=lambda item: item[1])
                        rows.append([page, len(calls), f"{min(totals) * 1000:.0f} ms",
                                     f"{statistics.median(totals) * 1000:.0f} ms",
                                     f"{statistics.median(together) * 1000:.0f} ms",
                                     f"{name} {slow * 1000:.0f} ms",
                                     "yes" if statistics.median(totals) < 1.0 else "NO"])
                    table(f"API time per page load, last {minutes} min, {args.events:,} events "
                          f"({args.rounds} rounds)",
                          ["page", "calls", "best", "median", "at once (median)",
                           "slowest call (best)", "median < 1 s"], rows)
                    if args.per_call:
                        table(f"best time per call, last {minutes} min", ["page", "call", "best"],
                              per_call)
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
