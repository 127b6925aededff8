"""The dashboard as an ASGI app (`st.App`), what `apigw dashboard` runs: Streamlit's server,
with each page's address answering Streamlit's own page plus where the server is, and the
process's `/healthz`, `/readyz` (the control-plane API answers) and `/metrics`.

Opened at a page's address (`/investigate?...`: every deep link, bookmark and reload of a page
other than the overview), Streamlit's front end cannot tell whether `/investigate` is the
app's base path or a page under `/`: it asks `/investigate/_stcore/health`, gets a 404, waits
100 ms and asks `/_stcore/health`. That probe cost every such load 100-150 ms before the
websocket opened (bench/dashboard_pageload.py, `connected`: ~225 ms against ~115 ms for the
overview at `/`). Setting the front end's `window.__streamlit.BACKEND_BASE_URL` to the page's
parent address - the base the probe finds second, under a proxy's path prefix too - before
its scripts run makes it ask the right place first. Any other address is Streamlit's own.

    streamlit run dashboard/asgi.py --server.port 8501 ...   # as apigw dashboard does
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Final

if __package__ in (None, ""):  # imported by streamlit as a top-level module
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from streamlit import config

from dashboard.client import ApiClient
from dashboard.navigation import DEFAULT_PAGE, PAGES

APP: Final = Path(__file__).resolve().parent / "app.py"
STREAMLIT_PAGE: Final = Path(st.__file__).resolve().parent / "static" / "index.html"
# Runs before the front end's own scripts (module scripts run after the document is parsed).
BASE_SCRIPT: Final = ("<script>window.__streamlit = Object.assign({}, window.__streamlit, "
                      '{BACKEND_BASE_URL: new URL(".", window.location.href).href});</script>')
_HEAD: Final = "<head>"
READY_TIMEOUT_S: Final = 2.0  # how long /readyz waits for the API's /healthz


def page_html(streamlit_page: str) -> str | None:
    """Streamlit's page with BASE_SCRIPT first in its head; None when it has no head (then the
    page routes are not added and Streamlit serves its page unchanged)."""
    at = streamlit_page.find(_HEAD)
    if at < 0:
        return None
    at += len(_HEAD)
    return streamlit_page[:at] + BASE_SCRIPT + streamlit_page[at:]


def _prefix(base_url_path: str) -> str:
    """Streamlit's `server.baseUrlPath` as a path prefix ("" at the root)."""
    return "/" + base_url_path.strip("/") if base_url_path.strip("/") else ""


def page_routes(base_url_path: str, html: str | None) -> list[Route]:
    """A route per page other than the default one (served at the base path itself, where the
    front end probes nothing)."""
    if html is None:
        return []
    prefix = _prefix(base_url_path)

    async def page(request: Request) -> Response:
        # as Streamlit serves its page: never cached, the assets it names are
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    return [Route(f"{prefix}/{path}", page, methods=["GET", "HEAD"])
            for _, _, _, path in PAGES if path != DEFAULT_PAGE]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the control-plane API (APIGW_API_URL) answers its /healthz: every page reads
    it and nothing else."""
    api = replace(ApiClient.from_env(), timeout_s=READY_TIMEOUT_S)
    ready = await asyncio.to_thread(api.health)
    return JSONResponse({"status": "ok" if ready else "unavailable",
                         "checks": {"api": "ok" if ready else f"unreachable: {api.base_url}"}},
                        status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def process_routes(base_url_path: str) -> list[Route]:
    prefix = _prefix(base_url_path)
    return [Route(f"{prefix}/healthz", healthz, methods=["GET"]),
            Route(f"{prefix}/readyz", readyz, methods=["GET"]),
            Route(f"{prefix}/metrics", metrics, methods=["GET"])]


def _streamlit_page() -> str | None:
    try:
        return STREAMLIT_PAGE.read_text(encoding="utf-8")
    except OSError:  # a Streamlit without its static page (development builds)
        return None


page_source = _streamlit_page()
base_url_path = str(config.get_option("server.baseUrlPath"))
app = st.App(APP, routes=[
    *process_routes(base_url_path),
    *page_routes(base_url_path, None if page_source is None else page_html(page_source))])
