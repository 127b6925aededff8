"""What every dashboard page shares: the sidebar (range, refresh, time zone, token), the API
client, formatting of times and endpoints, the API-down banner, and running an action.

Every control mirrors itself into the URL's query parameters, so the address bar is always a
deep link to what is on screen (`?endpoint=...&minutes=60&tz=Europe/Paris`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, ApiError, ApiUnavailable

RANGES: Final = {"15 min": 15, "1 hour": 60, "6 hours": 360, "24 hours": 1440,
                 "7 days": 10_080, "31 days": 44_640}
REFRESH: Final = {"off": 0, "10 s": 10, "30 s": 30, "60 s": 60, "5 min": 300}
SEVERITY_ORDER: Final = {"critical": 0, "high": 1, "medium": 2, "low": 3}
HEALTH_ICON: Final = {"critical": "● critical", "degraded": "◐ degraded", "ok": "○ ok",
                      "idle": "· idle"}
SECURITY_KINDS: Final = ("auth_failure_burst", "enumeration", "client_dominance",
                         "undeclared_endpoint")
_ZONES: Final = sorted(available_timezones() | {"UTC"})


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


def endpoint_key(item: dict[str, Any]) -> str:
    return f"{item['route_id']} {item['method']} {item['http_route']}"


def split_key(key: str) -> tuple[str, str, str]:
    route_id, method, template = [*key.split(" ", 2), "", ""][:3]
    return route_id, method, template


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
    st.toast(done)
    st.rerun()


def current() -> Context:
    """The context `app.py` built for this run."""
    ctx: Context = st.session_state["_context"]
    return ctx
