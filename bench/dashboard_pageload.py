"""Dashboard page load in a real browser: navigation -> the page's main content rendered with
Streamlit idle, on a control plane whose embedded ClickHouse holds 10 million events.

    .venv/bin/python bench/dashboard_pageload.py                      # 10 M events, ~9 minutes
    .venv/bin/python bench/dashboard_pageload.py --events 1000000 --rounds 3 --minutes 60

What it does (all on free loopback ports, in a temp dir, every process stopped by its pid):
1. fills a chDB store with `--events` events over the last 24 h and one anomaly
   (bench/dashboard_queries.py's `generate`), starts `apigw controlplane` on it with a
   throwaway redis-server, waits for its first analytics run, then makes a few audited
   changes through the API (kill switch on/off, a per-client policy edited once) so the
   Policies and Audit pages have history to show;
2. starts `apigw dashboard` against that API and headless Chromium (apigw/devtools.py);
3. per time range and round, for each page: clears the browser cache and navigates to the
   page's deep link (**first load**: fresh Streamlit session, cold browser cache), then
   reloads it (**warm reload**: cached JS/CSS, a new Streamlit session again, the page's
   reads served from the dashboard's 5 s read cache); then, once every page had its two
   loads, navigates to each page again once its read cache has expired (**return visit**:
   cached JS/CSS as for anyone who used the dashboard before, every read from the API - the
   data side of a load without the browser's one-off bundle compile); then goes to each page
   again by clicking its link in the sidebar (**switch**: how people move between pages - no
   new document, the websocket already up, only the page's script run and drawing - its
   reads from the API again).

A load is timed in the page itself (`performance.now()`, 0 = navigation start) by a watcher
injected before the page's own scripts: it is over when Streamlit's script run has finished
(`stApp[data-test-script-state=notRunning]` after `running`), the page's title and expected
elements are in the DOM (drawn: a chart's canvas, a dataframe's canvas), nothing is stale or a
skeleton, and two animation frames have passed. Where the time goes, per load: `connected`
(HTML + JS + websocket up), `script` (running -> finished, API calls included), `api` (the
API's own handler time summed over the load's requests, from its Prometheus histogram; reads
made concurrently can sum to more than the script time), `render` (finished -> ready: drawing
what the script sent); each as the median of the first loads, the return visits and the warm
reloads (a switch is timed from the click, with the same watcher re-armed). A first load, a
return visit and a switch read the API (the dashboard's read cache has expired since the
page's last load); a warm reload, a second or two later, is served from that cache and makes
no API call.

A second table charges each load's CPU time to the browser (Chromium's process group), the
dashboard and the API (each process group's utime + stime from /proc, from navigation to
ready): the work a change saves shows there even when the wall time it saves is lost in
the noise of a shared machine, and it says which side a page's time is spent on.

Other processes share the CPUs: compare rows of one run; the header prints the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dashboard_queries import ENDPOINT, generate, wait_first_run  # noqa: E402
from pipeline import process, table, wait_http  # noqa: E402

from apigw.devtools import (  # noqa: E402
    DevTools,
    DevToolsError,
    browser,
    find_chromium,
    install_chromium,
)
from apigw.redis_server import RedisServer, free_port  # noqa: E402
from apigw.signals import interrupt_on_termination  # noqa: E402
from dashboard.client import ApiClient  # noqa: E402
from dashboard.common import READ_TTL_S  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_S = 1.0
SERVER_CPU, BROWSER_CPU = 1, 0  # --split-cpus
LOAD_TIMEOUT_S = 20.0
POLL_S = 0.05
KINDS = ("first", "return", "warm", "switch")
SIDES = ("browser", "dashboard", "api")  # whose CPU time a load is charged
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
DATAFRAME = '[data-testid="stDataFrame"] canvas'
CHART = '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg.marks'
METRIC = '[data-testid="stMetric"]'
TABLE = '[data-testid="stTable"] table'
HTML_TABLE = '[data-testid="stHtml"] table'


@dataclass(frozen=True)
class Page:
    name: str
    path: str  # without the range
    title: str
    expect: list[tuple[str, int]]  # CSS selector, at least this many


def pages(only: frozenset[str] = frozenset()) -> list[Page]:
    """The pages timed: all, or those named in `only`."""
    endpoint = " ".join(ENDPOINT)
    every = [
        Page("overview", "/?", "Overview", [(METRIC, 5), (DATAFRAME, 1)]),
        Page("investigate", "/investigate?" + urllib.parse.urlencode({"endpoint": endpoint})
             + "&", "Investigate", [(CHART, 4), (HTML_TABLE, 5), (DATAFRAME, 1)]),
        Page("security", "/security?", "Security review", [(METRIC, 3)]),
        Page("policies", "/policies?", "Policies", [(TABLE, 5)]),
        Page("audit", "/audit?", "Audit", [(DATAFRAME, 1)]),
    ]
    return [page for page in every if not only or page.name in only]


# Runs before the page's own scripts on every new document; fills window.__apigwMarks with
# performance.now() times: connected, running, finished, ready (or exception).
# window.__apigwArm(want) starts over for another page of the same document (a switch):
# marks cleared, t0 = now.
_WATCHER = """(() => {
  let want = %s;
  const marks = {};
  window.__apigwMarks = marks;
  window.__apigwArm = (next) => {
    want = next;
    for (const key of Object.keys(marks)) delete marks[key];
    marks.t0 = now();
  };
  const now = () => Math.round(performance.now() * 10) / 10;
  const mark = (name) => { if (!(name in marks)) marks[name] = now(); };
  const check = () => {
    if ('settled' in marks || 'exception' in marks) return;
    const app = document.querySelector('[data-testid="stApp"]');
    if (!app) return;
    if (app.getAttribute('data-test-connection-state') === 'CONNECTED') mark('connected');
    const state = app.getAttribute('data-test-script-state');
    if (state === 'running') mark('running');
    const failed = document.querySelector('[data-testid="stException"]');
    if (failed) {
      marks.exception = failed.innerText.slice(0, 2000); marks.ready = now(); return;
    }
    if (!('running' in marks) || state !== 'notRunning') return;
    mark('finished');
    const titles = [...document.querySelectorAll('h1')].map(e => e.innerText.trim());
    if (!titles.includes(want.title)) return;
    if (document.querySelector('[data-testid="stSkeleton"], [data-stale="true"]')) return;
    for (const [css, min] of want.expect) {
      if (document.querySelectorAll(css).length < min) return;
    }
    marks.settled = now();
    requestAnimationFrame(() => requestAnimationFrame(() => { marks.ready = now(); }));
  };
  new MutationObserver(check).observe(document, {
    subtree: true, attributes: true, attributeFilter: ['data-test-script-state']});
  setInterval(check, 10);
})();"""


@dataclass
class Load:
    page: str
    minutes: int
    kind: str  # first | return | warm (or server-first)
    round: int
    ready_ms: float | None
    marks: dict[str, Any] = field(default_factory=dict)  # times in ms; "exception": its text
    api_ms: float = 0.0
    api_calls: int = 0
    error: str = ""
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per side (SIDES)


def load_phases(loads: list[Load]) -> dict[str, float | None]:
    """Medians of where the time went over some loads of one page (ms; API calls a count)."""
    return {
        "connected_ms": _median([ld.marks["connected"] for ld in loads
                                 if "connected" in ld.marks and "t0" not in ld.marks]),
        "script_ms": _median([ld.marks["finished"] - ld.marks["running"] for ld in loads
                              if {"finished", "running"} <= ld.marks.keys()]),
        "api_ms": _median([ld.api_ms for ld in loads]),
        "api_calls": _median([float(ld.api_calls) for ld in loads]),
        "render_ms": _median([ld.marks["ready"] - ld.marks["finished"] for ld in loads
                              if {"ready", "finished"} <= ld.marks.keys()]),
        **{f"cpu_{side}_ms": _median([ld.cpu_ms[side] for ld in loads if side in ld.cpu_ms])
           for side in SIDES},
    }


def api_histogram(api_url: str) -> tuple[float, int]:
    """Total seconds and count of the API's handled requests so far (not /metrics itself)."""
    with urllib.request.urlopen(f"{api_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total, count = 0.0, 0
    for name, route, value in re.findall(
            r'^apigw_api_request_duration_seconds_(sum|count)\{route="([^"]*)"\} (\S+)$', text,
            re.MULTILINE):
        if route == "/metrics":
            continue
        if name == "sum":
            total += float(value)
        else:
            count += int(float(value))
    return total, count


_CLICK_NAV = """(() => {
  window.__apigwArm(%s);
  [...document.querySelectorAll('[data-testid="stSidebarNavLink"]')]
    .find(a => a.innerText.includes(%s)).click();
})()"""


def group_cpu_s(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by the live processes of each process group (name -> pgid):
    every process the load made work, whichever CPU it ran on; not the wall time the noisy
    neighbours of a shared machine put into it."""
    used = dict.fromkeys(groups, 0.0)
    name_of = {pgid: name for name, pgid in groups.items()}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone since the listing
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        name = name_of.get(int(fields[2]))  # field 5, pgrp
        if name is not None:  # fields 14 and 15, utime and stime
            used[name] += (int(fields[11]) + int(fields[12])) / _TICKS_PER_S
    return used


async def load(devtools: DevTools, url: str, api_url: str, reload: bool, clear: bool,
               page: Page, groups: dict[str, int], switch: bool = False
               ) -> tuple[float | None, dict[str, Any], float, int, dict[str, float]]:
    before = await asyncio.to_thread(api_histogram, api_url)
    cpu_before = group_cpu_s(groups)
    if switch:
        want = json.dumps({"title": page.title, "expect": page.expect})
        await devtools.evaluate(_CLICK_NAV % (want, json.dumps(page.title)))
    elif reload:
        await devtools.call("Page.reload", ignoreCache=False)
    else:
        if clear:
            await devtools.call("Network.clearBrowserCache")
        await devtools.call("Page.navigate", url=url)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    marks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        try:
            found = await devtools.evaluate("JSON.stringify(window.__apigwMarks || {})")
        except DevToolsError:  # asked while the old document was being replaced
            continue
        marks = json.loads(found or "{}")
        if "ready" in marks:
            break
    else:
        marks["timeout"] = LOAD_TIMEOUT_S * 1000
        marks["found"] = {css: await devtools.evaluate(
            f"document.querySelectorAll({json.dumps(css)}).length") for css, _ in page.expect}
    cpu_after = group_cpu_s(groups)
    after = await asyncio.to_thread(api_histogram, api_url)
    ready = marks.get("ready")
    if switch and ready is not None:  # from the click, not from the document's start
        marks = {name: value - marks["t0"] if isinstance(value, float | int) else value
                 for name, value in marks.items()}
        ready = marks["ready"]
    cpu_ms = {name: round((cpu_after[name] - cpu_before[name]) * 1000) for name in groups}
    return ready, marks, (after[0] - before[0]) * 1000, after[1] - before[1], cpu_ms


async def drive(chromium: str, dashboard: str, api_url: str, profile: Path,
                ranges: list[int], rounds: int, only: frozenset[str],
                servers: dict[str, int]) -> list[Load]:
    """`servers`: the dashboard's and the API's process groups, by side (SIDES)."""
    loads: list[Load] = []
    loaded_at: dict[str, float] = {}  # page -> when its last load ended (monotonic)
    async with browser(chromium, profile) as devtools:
        groups = {"browser": devtools.pid, **servers}
        await devtools.call("Network.enable")
        script_id = ""

        async def visit(page: Page, minutes: int, number: int, kind: str) -> None:
            nonlocal script_id
            if script_id and kind != "switch":
                await devtools.call("Page.removeScriptToEvaluateOnNewDocument",
                                    identifier=script_id)
            if kind != "switch":
                watcher = _WATCHER % json.dumps({"title": page.title, "expect": page.expect})
                script_id = (await devtools.call("Page.addScriptToEvaluateOnNewDocument",
                                                 source=watcher))["identifier"]
            url = f"{dashboard}{page.path}minutes={minutes}&tz=UTC"
            if kind != "warm":  # its reads must come from the API, not the cache
                wait = loaded_at.get(page.name, 0.0) + READ_TTL_S + 0.5 - time.monotonic()
                await asyncio.sleep(max(0.0, wait))
            ready, marks, api_ms, calls, cpu_ms = await load(
                devtools, url, api_url, reload=kind == "warm", clear=kind == "first",
                page=page, groups=groups, switch=kind == "switch")
            loaded_at[page.name] = time.monotonic()
            error = (f"Streamlit exception: {marks['exception']}" if "exception" in marks else
                     "" if ready is not None else
                     f"not ready in time (found: {marks.get('found')})")
            loads.append(Load(page.name, minutes, kind, number, ready, marks,
                              round(api_ms, 1), calls, error, cpu_ms))
            print(f"  {minutes:>5} min  round {number}  {page.name:<12} {kind:<6} "
                  f"{_ms(ready):>8}  {error}", flush=True)

        # round 0: each page once after the dashboard started (its imports: pandas, altair),
        # reported apart; rounds 1..N are measured
        for minutes in ranges:
            for number in range(0 if minutes == ranges[0] else 1, rounds + 1):
                for page in pages(only):
                    for kind in ("first", "warm") if number else ("server-first",):
                        await visit(page, minutes, number, kind)
                if number:
                    for page in pages(only):
                        await visit(page, minutes, number, "return")
                    if len(pages(only)) > 1:  # a switch needs another page to come from
                        for page in [*pages(only)[1:], pages(only)[0]]:
                            await visit(page, minutes, number, "switch")
        await devtools.call("Page.navigate", url="about:blank")
    return loads


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(loads: list[Load], events: int, rounds: int, only: frozenset[str],
           ) -> list[dict[str, Any]]:
    summary: list[dict[str, Any]] = []
    started = [ld for ld in loads if ld.kind == "server-first"]
    if started:
        print("\nfirst session of each page after the dashboard started (imports included, "
              "not in the tables): " + ", ".join(f"{ld.page} {_ms(ld.ready_ms)}"
                                                 for ld in started))
    for minutes in sorted({load.minutes for load in loads}):
        rows, cpu_rows = [], []
        for page in pages(only):
            row: dict[str, Any] = {"page": page.name, "minutes": minutes}
            cells: list[Any] = [page.name]
            for kind in KINDS:
                mine = [ld for ld in loads if (ld.page, ld.minutes, ld.kind)
                        == (page.name, minutes, kind)]
                ready = [ld.ready_ms for ld in mine if ld.ready_ms is not None and not ld.error]
                best, median = (min(ready), statistics.median(ready)) if ready else (None, None)
                row[kind] = {"best_ms": best, "median_ms": median,
                             "failed": sum(1 for ld in mine if ld.error)}
                row[f"{kind}_phases"] = load_phases([ld for ld in mine if not ld.error])
                cells += [_ms(best), _ms(median)]
            medians = {kind: row[kind]["median_ms"] for kind in KINDS}
            row["under_1s"] = all(medians[kind] is not None and medians[kind] < TARGET_S * 1000
                                  for kind in ("first", "warm"))
            row["return_under_1s"] = (medians["return"] is not None
                                      and medians["return"] < TARGET_S * 1000)
            row["switch_under_1s"] = (medians["switch"] is not None
                                      and medians["switch"] < TARGET_S * 1000)
            phases = [row[f"{kind}_phases"] for kind in KINDS]
            cells += [" / ".join(_ms(phase[name]) for phase in phases)
                      for name in ("connected_ms", "script_ms", "api_ms", "render_ms")]
            cells += [" / ".join(f"{phase['api_calls'] or 0:.0f}" for phase in phases),
                      "yes" if row["under_1s"] else "NO",
                      "yes" if row["return_under_1s"] else "NO",
                      "-" if medians["switch"] is None else
                      "yes" if row["switch_under_1s"] else "NO"]
            rows.append(cells)
            cpu_rows.append([page.name, *(" / ".join(_ms(phase[f"cpu_{side}_ms"])
                                                     for side in SIDES) for phase in phases)])
            summary.append(row)
        table(f"Rendered page load, last {minutes} min, {events:,} events ({rounds} rounds; "
              "first = cold browser cache, return = cached JS and fresh reads, warm = reload, "
              "switch = the sidebar's link, from another page)",
              ["page", "first best", "first median", "return best", "return median",
               "warm best", "warm median", "switch best", "switch median", "connected",
               "script", "api", "render", "api calls", "first & warm < 1 s", "return < 1 s",
               "switch < 1 s"], rows)
        table(f"CPU time per load, last {minutes} min (medians; browser / dashboard / API "
              "processes, from navigation to the page drawn)",
              ["page", *KINDS], cpu_rows)
    print("\nconnected, script, api, render, api calls: medians, first load / return visit / "
          "warm reload / switch (see the docstring); a warm reload within the dashboard's 5 s "
          "read cache makes no API call; a switch keeps its document (no connected time)")
    return summary


def seed_actions(api: ApiClient) -> None:
    """A few audited changes so the Policies and Audit pages have history to render."""
    api.set_kill_switch(True, "bench: page load")
    api.set_kill_switch(False, "bench: page load")
    route_id, method, _ = ENDPOINT
    for limit in (10, 20):
        api.call("PUT", "/api/v1/policies/bench-client-7", body={
            "route_id": route_id, "method": method, "key_by": "client_id",
            "match_key": "client-7", "limit": limit, "window_s": 60,
            "reason": f"bench: page load, limit {limit}"})


def main() -> int:
    interrupt_on_termination()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--minutes", default="60,1440",
                        help="dashboard time ranges to load, in minutes (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-run-timeout", type=float, default=300.0,
                        help="seconds to wait for the scheduler's first run before timing")
    parser.add_argument("--split-cpus", action="store_true",
                        help="the server side (Redis, control plane, dashboard) on CPU 1 and "
                        "Chromium on CPU 0, as if the browser ran on the user's own machine, "
                        "instead of all of them sharing every CPU")
    parser.add_argument("--pages", default="",
                        help="only these pages (comma-separated names; default: all)")
    args = parser.parse_args()
    only = frozenset(name for name in args.pages.split(",") if name)
    if unknown := only - {page.name for page in pages()}:
        parser.error(f"--pages: no page named {', '.join(sorted(unknown))}")
    chromium = find_chromium() or install_chromium()
    if chromium is None:
        print("bench: Chromium is missing and cannot be installed here (apt-get install "
              "chromium, as root)", file=sys.stderr)
        return 2
    ranges = [int(m) for m in args.minutes.split(",")]
    load_before = os.getloadavg()[0]
    split = f"; server side on CPU {SERVER_CPU}, Chromium on CPU {BROWSER_CPU}"
    print(f"# dashboard page load in Chromium ({os.cpu_count()} CPUs, load average "
          f"{load_before:.2f}{split if args.split_cpus else ''})")
    with tempfile.TemporaryDirectory(prefix="apigw-pageload-") as name:
        tmp = Path(name)
        dsn = f"chdb://{tmp / 'store'}"
        end = int(time.time()) // 60 * 60
        generated, _ = generate(dsn, args.events, end)
        print(f"\ngenerated {args.events:,} events over 24 h in {generated:.0f} s")
        everything = os.sched_getaffinity(0)
        if args.split_cpus:  # children inherit the affinity they are started with
            os.sched_setaffinity(0, {SERVER_CPU})
        redis = RedisServer(tmp / "redis").start()
        try:
            api_port, dash_port = free_port(), free_port()
            api_url = f"http://127.0.0.1:{api_port}"
            env = {"APIGW_REDIS_URL": redis.url, "APIGW_CLICKHOUSE_DSN": dsn,
                   "APIGW_LOG_LEVEL": "WARNING", "APIGW_INTERVAL_S": "86400",
                   "APIGW_DATA_DIR": str(tmp / "data"), "APIGW_API_TOKENS": ""}
            api_log = tmp / "controlplane.log"
            control = [sys.executable, "-m", "apigw.cli", "controlplane", "--listen",
                       f"127.0.0.1:{api_port}"]
            with process(control, env, api_log) as api_child:
                wait_http(f"{api_url}/healthz", api_child, api_log, timeout=120)
                api = ApiClient(api_url, timeout_s=60.0)
                print(f"first analytics run over after "
                      f"{wait_first_run(api, args.first_run_timeout):.0f} s")
                seed_actions(api)
                dash_log = tmp / "dashboard.log"
                dashboard = [sys.executable, "-m", "apigw.cli", "dashboard", "--listen",
                             f"127.0.0.1:{dash_port}", "--api-url", api_url]
                dash_env = {"STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
                            "APIGW_API_TOKEN": ""}
                with process(dashboard, dash_env, dash_log) as dash_child:
                    url = f"http://127.0.0.1:{dash_port}"
                    wait_http(f"{url}/_stcore/health", dash_child, dash_log, timeout=60)
                    if args.split_cpus:
                        os.sched_setaffinity(0, {BROWSER_CPU})
                    loads = asyncio.run(drive(
                        chromium, url, api_url, tmp / "profile", ranges, args.rounds, only,
                        {"dashboard": dash_child.pid, "api": api_child.pid}))
        finally:
            os.sched_setaffinity(0, everything)
            redis.stop()
    summary = report(loads, args.events, args.rounds, only)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"dashboard-pageload-{stamp}.json"
    out.write_text(json.dumps({
        "events": args.events, "rounds": args.rounds, "cpus": os.cpu_count(),
        "split_cpus": args.split_cpus,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "summary": summary, "loads": [asdict(ld) for ld in loads]}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    failed = [ld for ld in loads if ld.error]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
