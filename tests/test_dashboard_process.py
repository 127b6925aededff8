"""`apigw dashboard` as a process: its health, readiness (the control-plane API answers) and
Prometheus metrics, and its page addresses answering Streamlit's page with the server's base
set (dashboard/asgi.py)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apigw.redis_server import free_port
from dashboard.asgi import BASE_SCRIPT
from tests.processes import ManagedProcess, apigw_command, managed
from tests.test_api import served_api


@contextmanager
def dashboard(api_url: str, tmp_path: Path, **env: str) -> Iterator[tuple[str, ManagedProcess]]:
    port = free_port()
    args = apigw_command("dashboard", "--listen", f"127.0.0.1:{port}", "--api-url", api_url)
    with managed("dashboard", args, {"STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
                                     "APIGW_API_TOKEN": "", **env}, tmp_path) as process:
        url = f"http://127.0.0.1:{port}"
        process.wait_http(f"{url}/healthz", timeout=60)
        yield url, process


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def api_calls(metrics: str, outcome: str) -> float:
    line = 'apigw_dashboard_api_calls_total{method="GET",outcome="' + outcome + '"} '
    found = re.search("^" + re.escape(line) + r"(\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_health_readiness_metrics_and_page_addresses(redis_url: str, chdb_dsn: str,
                                                       tmp_path: Path) -> None:
    with served_api(redis_url, chdb_dsn, tmp_path) as api, \
            dashboard(api, tmp_path) as (url, _):
        assert get(f"{url}/healthz")[0] == 200
        status, kind, body = get(f"{url}/readyz")
        assert (status, kind, json.loads(body)) == (
            200, "application/json", {"status": "ok", "checks": {"api": "ok"}})
        status, kind, metrics = get(f"{url}/metrics")
        assert (status, kind.split(";")[0]) == (200, "text/plain")
        assert api_calls(metrics, "ok") >= 1  # the readiness check's call
        assert "apigw_dashboard_api_call_duration_seconds_bucket" in metrics
        for page in ("investigate", "security", "policies", "audit"):
            status, kind, html = get(f"{url}/{page}?minutes=60")
            assert (status, kind.split(";")[0]) == (200, "text/html"), page
            assert BASE_SCRIPT in html, page
        status, _, html = get(f"{url}/?minutes=60")  # the overview: Streamlit's own page
        assert (status, BASE_SCRIPT in html, "<head>" in html) == (200, False, True)


def test_not_ready_while_the_api_is_down(tmp_path: Path) -> None:
    nothing = f"http://127.0.0.1:{free_port()}"
    with dashboard(nothing, tmp_path) as (url, _):
        assert get(f"{url}/healthz")[0] == 200
        status, _, body = get(f"{url}/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "unavailable",
                                    "checks": {"api": f"unreachable: {nothing}"}}
        assert api_calls(get(f"{url}/metrics")[2], "unavailable") >= 1


def test_logs_are_json_lines(tmp_path: Path) -> None:
    """Streamlit's own loggers (their handlers do not propagate) write apigw's JSON lines too:
    at debug level, with requests served, every log line is a JSON object of the dashboard."""
    with dashboard(f"http://127.0.0.1:{free_port()}", tmp_path,
                   STREAMLIT_LOGGER_LEVEL="debug") as (url, process):
        for path in ("/healthz", "/readyz", "/investigate", "/"):
            get(url + path)
        log = process.log()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(entries) >= 5, log[-3000:]
    assert {entry["component"] for entry in entries} == {"dashboard"}
    assert any(entry["logger"].startswith("streamlit") for entry in entries)
    # no line in Streamlit's own text format ("2026-12-06 14:13:40.618 WARNING streamlit...")
    assert not re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ +[A-Z]+ ", log,
                          re.MULTILINE), log[-3000:]
