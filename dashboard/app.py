"""The apigw dashboard: `apigw dashboard` (or `streamlit run dashboard/app.py`).

A Streamlit multipage app that reads the control-plane API only (APIGW_API_URL, default
http://127.0.0.1:8088; bearer token from APIGW_API_TOKEN or the sidebar's token box).
Pages: Overview (/), Investigate (/investigate), Security review (/security), Policies
(/policies), Audit (/audit). Deep links: `/investigate?anomaly=<id>`,
`/investigate?endpoint=<route_id> <METHOD> <template>&minutes=60&tz=Europe/Paris&compare=1d`.
See docs/dashboard.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by streamlit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st

from dashboard.common import CachedClient, auto_refresh, sidebar
from dashboard.navigation import DEFAULT_PAGE, PAGES, VIEWS


def main() -> None:
    # an emoji favicon is drawn in the page; a :material: one is fetched from fonts.gstatic.com
    st.set_page_config(page_title="apigw", page_icon="🛡️", layout="wide")
    pages = [st.Page(VIEWS / file, title=title, icon=icon, url_path=path,
                     default=path == DEFAULT_PAGE) for file, title, icon, path in PAGES]
    page = st.navigation(pages)
    ctx = sidebar(CachedClient.from_env())
    st.session_state["_context"] = ctx
    auto_refresh(ctx.refresh_s)
    page.run()


main()
