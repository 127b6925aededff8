"""The dashboard in a real browser: headless Chromium loads every page of a running
`apigw dashboard` (a subprocess) that reads a live API with seeded data, checks that each page
rendered its title and no Streamlit exception, and saves a screenshot of it under
tests/artifacts/screenshots/ (gitignored).

Chromium runs headless with a DevTools port (apigw/devtools.py, shared with
bench/dashboard_pageload.py): the test navigates, waits until the page shows
its title and Streamlit is idle (a screenshot flag with a virtual-time budget fires before the
websocket delivers the page), then captures the screenshot and the DOM. Chromium is Debian's
`chromium` package. When it is missing and the test runs as root, the test
installs it with apt-get; it is skipped (with the reason) only when that is not possible.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from apigw.devtools import (
    WINDOW,
    DevTools,
    DevToolsError,
    browser,
    find_chromium,
    install_chromium,
)
from apigw.redis_server import free_port
from tests.processes import apigw_command, managed
from tests.test_api import ANOMALY_ID, served_api
from tests.test_dashboard import security_anomalies

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "tests" / "artifacts" / "screenshots"
PAGE_TIMEOUT_S = 20.0  # a page must show its title, with Streamlit idle, within this
# (file name, path and query, the title the page must show)
PAGES = [
    ("overview", "/?minutes=60", "Overview"),
    ("investigate-anomaly", f"/investigate?anomaly={ANOMALY_ID}", "Investigate"),
    ("investigate-endpoint", "/investigate?" + urllib.parse.urlencode(
        {"endpoint": "orders GET /orders/{id}", "minutes": "60", "compare": "1d"}),
     "Investigate"),
    ("security", "/security?minutes=60", "Security review"),
    ("policies", "/policies?minutes=60", "Policies"),
    ("audit", "/audit", "Audit"),
]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium() or install_chromium()
    if found is None:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and "
                    "apt-get with access to Debian's archive): apt-get install chromium")
    return found


@pytest.fixture
def dashboard_url(redis_url: str, chdb_dsn: str, tmp_path: Path) -> Iterator[str]:
    with served_api(redis_url, chdb_dsn, tmp_path, anomalies=security_anomalies) as api:
        port = free_port()
        args = apigw_command("dashboard", "--listen", f"127.0.0.1:{port}", "--api-url", api)
        env = {"STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "APIGW_API_TOKEN": ""}
        with managed("dashboard", args, env, tmp_path) as process:
            url = f"http://127.0.0.1:{port}"
            process.wait_http(f"{url}/_stcore/health", timeout=60)
            yield url


# the page's h1 titles, and whether Streamlit still runs the script or shows skeletons
_STATE = """JSON.stringify({
  titles: [...document.querySelectorAll('h1')].map(e => e.innerText.trim()),
  busy: !!document.querySelector('[data-testid="stStatusWidget"], [data-testid="stSkeleton"]')
})"""


# where the front end asked whether the server is up: the app's base only (dashboard/asgi.py
# tells it where that is; unaided it asks `<page>/_stcore/health` first and waits 100 ms)
_HEALTH_PROBES = """JSON.stringify(performance.getEntriesByType('resource')
  .map(e => e.name).filter(name => name.includes('_stcore/health')))"""
_RESOURCES = "JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))"
# a link of the sidebar's page navigation, by its text
_CLICK_NAV = """[...document.querySelectorAll('[data-testid="stSidebarNavLink"]')]
  .find(a => a.innerText.includes(%s)).click()"""

MAX_SHOT_HEIGHT = 8000
_CONTENT_HEIGHT = "Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))"


async def settle(devtools: DevTools, title: str) -> bool:
    """Wait until the page shows `title` with Streamlit idle; whether it did in time."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    settled = 0
    while time.monotonic() < deadline and settled < 3:
        await asyncio.sleep(0.3)
        try:
            state = json.loads(await devtools.evaluate(_STATE) or "{}")
        except DevToolsError:  # asked while the old document was being replaced
            continue
        settled = settled + 1 if title in state.get("titles", []) and not state["busy"] else 0
    return settled >= 3


async def render(devtools: DevTools, url: str, title: str) -> tuple[bytes, str, bool]:
    """Navigate; wait until the page shows `title` with Streamlit idle; return a screenshot,
    the DOM and whether it settled in time."""
    await devtools.call("Page.navigate", url=url)
    settled = await settle(devtools, title)
    # the whole page in the shot: a viewport as tall as the tallest scrolling content
    height = int(await devtools.evaluate(_CONTENT_HEIGHT) or WINDOW[1])
    await devtools.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0],
                        height=min(max(height, WINDOW[1]), MAX_SHOT_HEIGHT),
                        deviceScaleFactor=1, mobile=False)
    await asyncio.sleep(1.0)  # let the charts draw
    shot = await devtools.call("Page.captureScreenshot", format="png")
    await devtools.call("Emulation.clearDeviceMetricsOverride")
    dom = await devtools.evaluate("document.documentElement.outerHTML")
    return base64.b64decode(shot["data"]), str(dom), settled


async def test_every_page_renders_in_chromium(chromium: str, dashboard_url: str,
                                              tmp_path: Path) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with browser(chromium, tmp_path / "profile") as devtools:
        for name, path, title in PAGES:
            shot_path = SCREENSHOTS / f"{name}.png"
            shot_path.unlink(missing_ok=True)
            shot, dom, settled = await render(devtools, dashboard_url + path, title)
            shot_path.write_bytes(shot)
            assert "stException" not in dom, (name, dom[-3000:])
            assert "Traceback" not in dom, name
            assert settled, f"{name}: no {title!r} title with Streamlit idle in time"
            assert shot.startswith(b"\x89PNG"), name
            assert len(shot) > 20_000, (name, len(shot))
            probes = set(json.loads(await devtools.evaluate(_HEALTH_PROBES) or "[]"))
            assert probes == {f"{dashboard_url}/_stcore/health"}, (name, probes)
            # nothing from another host (an offline network, and no third party told who
            # opened which page): the favicon was fetched from fonts.gstatic.com once
            elsewhere = [url for url in json.loads(await devtools.evaluate(_RESOURCES) or "[]")
                         if not url.startswith((f"{dashboard_url}/", "data:"))]
            assert not elsewhere, (name, elsewhere)
        # from a page opened at its own address, the sidebar still leads to the others
        await devtools.evaluate(_CLICK_NAV % json.dumps("Security review"))
        assert await settle(devtools, "Security review"), "no Security review after its link"
        assert await devtools.evaluate("location.pathname") == "/security"
