"""dashboard/asgi.py: the page addresses answer Streamlit's page with the server's base set
first in its head (the browser test checks the effect: no probe of `<page>/_stcore/health`)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from dashboard.asgi import BASE_SCRIPT, STREAMLIT_PAGE, page_html, page_routes
from dashboard.navigation import DEFAULT_PAGE, PAGES


def test_base_script_comes_first_in_streamlits_own_page() -> None:
    streamlit_page = STREAMLIT_PAGE.read_text(encoding="utf-8")
    html = page_html(streamlit_page)
    assert html is not None
    head = html.index("<head>") + len("<head>")
    assert html[head:head + len(BASE_SCRIPT)] == BASE_SCRIPT
    assert html.replace(BASE_SCRIPT, "", 1) == streamlit_page
    assert html.index(BASE_SCRIPT) < html.index("<script type=\"module\"")


def test_a_page_without_a_head_is_left_to_streamlit() -> None:
    assert page_html("<html><body></body></html>") is None
    assert page_routes("", None) == []


def test_a_route_per_page_but_the_default_one_under_the_base_path() -> None:
    others = [path for _, _, _, path in PAGES if path != DEFAULT_PAGE]
    assert [route.path for route in page_routes("", "<head></head>")] == [
        f"/{path}" for path in others]
    assert [route.path for route in page_routes("/tools/apigw/", "<head></head>")] == [
        f"/tools/apigw/{path}" for path in others]


def test_the_page_route_answers_the_page_uncached() -> None:
    route = page_routes("", "<head>x</head>")[0]
    request = Request({"type": "http", "method": "GET", "path": route.path, "headers": [],
                       "query_string": b""})
    response = asyncio.run(route.endpoint(request))
    assert response.status_code == 200
    assert response.body == b"<head>x</head>"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["content-type"].startswith("text/html")
