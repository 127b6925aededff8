"""What every dashboard page shares: the sidebar (range, refresh, time zone, token), the API
client, formatting of times and endpoints, the API-down banner, and running an action.

Every control mirrors itself into the URL's query parameters, so the address bar is always a
deep link to what is on screen (`?endpoint=...&minutes=60&tz=Europe/Paris`).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from dashboard.client import PREFIX, ApiClient, ApiError, ApiUnavailable

# Streamlit runs a full gc.collect(2) after every script run, holding the GIL while the run's
# last messages wait to be sent (~100-200 ms on the heap of pandas, pyarrow and streamlit).
# That heap lives as long as the process: move it out of the collector's reach once, at the
# first run's import of this module (as proxy/app.py's tune_gc does for a worker).
gc.collect()
gc.freeze()

RANGES: Final = {"15 min": 15, "1 hour": 60, "6 hours": 360, "24 hours": 1440,
                 "7 days": 10_080, "31 days": 44_640}
REFRESH: Final = {"off": 0, "10 s": 10, "30 s": 30, "60 s": 60, "5 min": 300}
SEVERITY_ORDER: Final = {"critical": 0, "high": 1, "medium": 2, "low": 3}
HEALTH_ICON: Final = {"critical": "● critical", "degraded": "◐ degraded", "ok": "○ ok",
                      "idle": "· idle"}
SECURITY_KINDS: Final = ("auth_failure_burst", "enumeration", "client_dominance",
                         "undeclared_endpoint")
_ZONES: Final = sorted(available_timezones() | {"UTC"})
# How long an API read is reused: below the shortest auto-refresh interval, long enough that a
# reload, a widget change (a rerun of the whole page) or a second viewer does not query again.
READ_TTL_S: Final = 5.0
_READ_CACHE_ENTRIES: Final = 512
# Up to this many rows a plain table is drawn as static HTML; beyond it, as a data grid.
STATIC_TABLE_ROWS: Final = 25


@st.cache_data(ttl=READ_TTL_S, max_entries=_READ_CACHE_ENTRIES, show_spinner=False)
def _cached_read(base_url: str, token: str | None, timeout_s: float, path: str,
                 query: tuple[tuple[str, str], ...]) -> Any:
    return ApiClient(base_url, token, timeout_s).call("GET", path, dict(query))


@dataclass(frozen=True, slots=True)
class CachedClient(ApiClient):
    """The API client the pages use: reads under /api/v1 come from a process-wide cache for
    READ_TTL_S (keyed by URL, token and parameters; failures are never cached); actions go
    straight to the API, and `run_action` empties the cache after each one."""

    def call(self, method: str, path: str, params: dict[str, Any] | None = None,
             body: dict[str, Any] | None = None) -> Any:
        if method != "GET" or body is not None or not path.startswith(PREFIX):
            return ApiClient.call(self, method, path, params, body)
        query = tuple(sorted((k, str(v)) for k, v in (params or {}).items() if v is not None))
        return _cached_read(self.base_url, self.token, self.timeout_s, path, query)

    def with_token(self, token: str | None) -> CachedClient:
        return CachedClient(self.base_url, token or self.token, self.timeout_s)


def fetch_all(reads: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Make a page's independent API reads at once instead of one after the other (the API
    answers them in parallel); a failure is raised once all are done, as a single read's."""
    run = get_script_run_ctx()

    def attach() -> None:  # lets the threads use the session's cache like the script does
        add_script_run_ctx(threading.current_thread(), run)

    with ThreadPoolExecutor(max_workers=len(reads) or 1, initializer=attach) as pool:
        futures = {name: pool.submit(read) for name, read in reads.items()}
        return {name: future.result() for name, future in futures.items()}


def forget_reads() -> None:
    """Drop every cached read (after a change, so the next run shows its effect)."""
    _cached_read.clear()


@dataclass(frozen=True, slots=True)
class Span:
    """The time range on screen: the last `minutes`, or a fixed [start, end] (deep links)."""

    minutes: float | None = None
    start: float | None = None
    end: float | None = None

    def params(self) -> dict[str, Any]:
        if self.start is not None and self.end is not None:
            return {"from": round(self.start, 3), "to": round(self.end, 3)}
        return {"minutes": self.minutes or 60}

    def label(self, tz: ZoneInfo) -> str:
        if self.start is not None and self.end is not None:
            return f"{when(self.start, tz)} → {when(self.end, tz)}"
        return f"last {self.minutes:g} min"


@dataclass(frozen=True, slots=True)
class Context:
    client: ApiClient
    span: Span
    tz: ZoneInfo
    refresh_s: int


def rows_table(frame: pd.DataFrame) -> None:
    """A table of plain values: static HTML while it is short (the browser draws it far
    faster than a data grid - ~100 ms less on a cold load of the Policies page - and its cells
    select and copy as text), a scrollable, sortable data grid once it is long."""
    if len(frame) <= STATIC_TABLE_ROWS:
        st.table(frame, hide_index=True)
    else:
        st.dataframe(frame, hide_index=True)


def endpoint_key(item: dict[str, Any]) -> str:
    return f"{item['route_id']} {item['method']} {item['http_route']}"


def split_key(key: str) -> tuple[str, str, str]:
    route_id, method, template = [*key.split(" ", 2), "", ""][:3]
    return route_id, method, template


def group_incidents(anomalies: list[dict[str, Any]]
                    ) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Anomalies grouped into incidents by endpoint and kind (the analytics job flags each
    analysed window on its own), worst first: (its most severe anomaly, its anomalies by
    window start). The Overview's open incidents and the Security review's queue."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for anomaly in anomalies:
        groups.setdefault((endpoint_key(anomaly["endpoint"]), anomaly["kind"]), []).append(
            anomaly)

    def worst(anomaly: dict[str, Any]) -> tuple[int, float, float]:
        return SEVERITY_ORDER.get(anomaly["severity"], 9), -anomaly["score"], anomaly[
            "window_start"]

    ranked = [(min(group, key=worst), sorted(group, key=lambda a: a["window_start"]))
              for group in groups.values()]
    return sorted(ranked, key=lambda pair: worst(pair[0])[:2])


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def when(epoch: float | None, tz: ZoneInfo) -> str:
    if not epoch:
        return ""
    return datetime.fromtimestamp(epoch, UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def times(values: pd.Series, tz: ZoneInfo) -> pd.Series:
    return pd.to_datetime(values, unit="s", utc=True).dt.tz_convert(tz).dt.tz_localize(None)


def param(name: str, default: str) -> str:
    value = st.query_params.get(name)
    return str(value) if value else default


def link(page: str, **query: Any) -> str:
    """A relative deep link to `page` (its url_path) with the current tz and range."""
    from urllib.parse import urlencode

    keep = {name: st.query_params[name] for name in ("tz", "minutes")
            if name in st.query_params}
    return f"/{page}?" + urlencode({**keep, **{k: v for k, v in query.items() if v}})


# -- sidebar ------------------------------------------------------------------------------------


def sidebar(base: ApiClient) -> Context:
    st.sidebar.title(":material/shield: apigw")
    labels = list(RANGES)
    minutes_now = param("minutes", "60")
    current = next((label for label, value in RANGES.items() if str(value) == minutes_now),
                   "1 hour")
    label = st.sidebar.selectbox("Range", labels, index=labels.index(current))
    minutes = RANGES[label]
    refresh_now = param("refresh", "off")
    refresh_label = st.sidebar.selectbox("Auto-refresh", list(REFRESH),
                                         index=list(REFRESH).index(refresh_now)
                                         if refresh_now in REFRESH else 0)
    browser_tz = getattr(st.context, "timezone", None) or "UTC"
    tz_now = param("tz", browser_tz)
    tz_name = st.sidebar.selectbox("Time zone", _ZONES,
                                   index=_ZONES.index(tz_now) if tz_now in _ZONES
                                   else _ZONES.index("UTC"))
    st.query_params["minutes"] = str(minutes)
    st.query_params["refresh"] = refresh_label
    st.query_params["tz"] = tz_name
    client = base
    if not base.token:
        token = st.sidebar.text_input("API token", type="password", key="token",
                                      help="Needed for actions when the API has tokens.")
        client = base.with_token(token or None)
    st.sidebar.caption(f"API {base.base_url}")
    return Context(client, Span(minutes=minutes), zone(tz_name), REFRESH[refresh_label])


def auto_refresh(refresh_s: int) -> None:
    """Rerun the whole page every `refresh_s` seconds (a timer fragment, no extra thread)."""
    if not refresh_s:
        return
    st.session_state["_loaded_at"] = time.time()

    @st.fragment(run_every=refresh_s)
    def tick() -> None:
        if time.time() - st.session_state.get("_loaded_at", 0.0) >= refresh_s - 0.5:
            st.rerun(scope="app")

    tick()


# -- errors and actions -------------------------------------------------------------------------


def api_down(client: ApiClient, error: Exception) -> None:
    st.error(f"The control-plane API is unreachable ({error}). The dashboard retries every "
             "5 seconds; check that `apigw controlplane` is running.", icon=":material/cloud_off:")
    if st.button("Retry now"):
        st.rerun()

    @st.fragment(run_every=5)
    def retry() -> None:
        if client.health():
            st.rerun(scope="app")

    retry()


def problem(error: ApiError) -> None:
    hint = {401: " Enter a token in the sidebar.",
            403: " Your token's role may not do this."}.get(error.status, "")
    st.warning(f"{error.title}: {error.detail}{hint}" if error.detail
               else f"{error.title}.{hint}")


def guarded(ctx: Context, render: Callable[[Context], None]) -> None:
    """Run a page; the API being down or refusing shows a banner, never a traceback."""
    try:
        render(ctx)
    except ApiUnavailable as error:
        api_down(ctx.client, error)
    except ApiError as error:
        problem(error)


def run_action(action: Callable[[], Any], done: str) -> None:
    try:
        action()
    except ApiError as error:
        problem(error)
        return
    except ApiUnavailable as error:
        st.error(f"The control-plane API stopped answering: {error}")
        return
    finally:
        forget_reads()  # even a refused action may have changed something before failing
    st.toast(done)
    st.rerun()


def current() -> Context:
    """The context `app.py` built for this run."""
    ctx: Context = st.session_state["_context"]
    return ctx
