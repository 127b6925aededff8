"""The Streamlit dashboard (AppTest), page by page, against a live API with seeded data.

Seeded (see tests/test_api.py): orders 150 requests (15 x 500 from client-b in the last 3
minutes, an error_spike anomaly, a pending recommendation 12/60 s), users 40 requests from
client-a; plus two security anomalies below; one policy `default-per-client` 100/60 s.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from streamlit.testing.v1 import AppTest

from analytics.models import Anomaly, Recommendation, RecommendationStatus
from apigw.redis_server import free_port
from proxy.policy import RedisKeys
from tests.test_api import ANOMALY_ID, ORDERS, REC_ID, USERS, served_api

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
ENUM_ID = "anom-users-enum"
AUTH_ID = "anom-orders-auth"


def security_anomalies(now: float) -> list[Anomaly]:
    end = int(now // 60) * 60 - 60
    return [
        Anomaly(id=ENUM_ID, detected_at=now - 20, window_start=end - 300, window_end=end,
                endpoint=USERS, kind="enumeration", severity="high", score=0.95,
                metric="distinct_paths", baseline=2.0, observed=4.0, top_clients=["client-a"],
                example_request_ids=["req-u-9-3"], example_trace_ids=["trace-req-u-9-3"],
                summary="client-a walks /users/{id}"),
        Anomaly(id=AUTH_ID, detected_at=now - 10, window_start=end - 120, window_end=end,
                endpoint=ORDERS, kind="auth_failure_burst", severity="medium", score=0.9,
                metric="auth_failures", baseline=0.0, observed=12.0, top_clients=["client-b"],
                summary="auth failures from client-b"),
    ]


@pytest.fixture
def api_url(redis_url: str, chdb_dsn: str, tmp_path: Path) -> Iterator[str]:
    with served_api(redis_url, chdb_dsn, tmp_path, anomalies=security_anomalies) as url:
        yield url


def api(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(url + path, method=method,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def open_page(url: str, monkeypatch: pytest.MonkeyPatch, page: str | None = None,
              **query: str) -> AppTest:
    monkeypatch.setenv("APIGW_API_URL", url)
    monkeypatch.delenv("APIGW_API_TOKEN", raising=False)
    app = AppTest.from_file(str(APP), default_timeout=60)
    for name, value in query.items():
        app.query_params[name] = value
    app.run()
    if page is not None:
        app.switch_page(f"views/{page}.py")
        app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


class _Tables(HTMLParser):
    """The tables in an `st.html` element: header cells, and each row's header and data cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, str]]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("th", "td"):
            self._cell = [tag]

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None and self.tables:
            self.tables[-1][-1].append((self._cell[0], "".join(self._cell[1:]).strip()))
            self._cell = None


def html_frames(app: AppTest) -> list[pd.DataFrame]:
    """Tables drawn inside `st.html` as frames: the first row names the columns; a row's
    leading header cell (when the header row has one more cell than its data) is its index."""
    frames = []
    for element in app.get("html"):
        parser = _Tables()
        parser.feed(element.proto.body)
        for head, *body in (table for table in parser.tables if table):
            columns = [text for _, text in head]
            indexed = bool(body) and len(columns) == len(body[0]) and body[0][0][0] == "th"
            frame = pd.DataFrame([[text for _, text in row[1:]] if indexed
                                  else [text for _, text in row] for row in body],
                                 columns=columns[1:] if indexed else columns,
                                 index=[row[0][1] for row in body] if indexed else None)
            for name in frame.columns:
                with contextlib.suppress(ValueError):  # text columns stay text
                    frame[name] = pd.to_numeric(frame[name].str.replace(",", ""))
            frames.append(frame)
    return frames


def frame_with(app: AppTest, column: str) -> pd.DataFrame:
    shown = [*(t.value for t in app.table), *html_frames(app), *(d.value for d in app.dataframe)]
    frames = [frame for frame in shown if column in frame.columns]
    assert frames, f"no table with a {column!r} column"
    return frames[0]


def metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def test_overview_ranks_endpoints_and_puts_open_incidents_first(
        api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = open_page(api_url, monkeypatch, minutes="60")
    assert [t.value for t in app.main.title] == ["Overview"]
    assert metrics(app)["Requests"] == "190"
    assert metrics(app)["Open incidents"] == "3"

    incidents = frame_with(app, "kind")
    assert list(incidents["id"]) == [ANOMALY_ID, ENUM_ID, AUTH_ID]  # high 0.97, high, medium
    first = incidents.iloc[0]
    assert (first["kind"], first["endpoint"]) == ("error_spike", "orders GET /orders/{id}")
    assert first["top clients"] == "client-b"
    assert f"anomaly={ANOMALY_ID}" in first["investigate"]

    endpoints = frame_with(app, "health")
    assert list(endpoints["endpoint"]) == ["orders GET /orders/{id}", "users GET /users/{id}"]
    orders = endpoints.iloc[0]
    assert (orders["requests"], orders["anomalies"]) == (150, 2)
    assert "critical" in orders["health"]
    assert sum(orders["traffic"]) == 150
    assert orders["error rate"] == pytest.approx(0.1)


def test_investigate_deep_link_to_an_endpoint(api_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    app = open_page(api_url, monkeypatch, "investigate", endpoint="users GET /users/{id}",
                    minutes="60", compare="1d", tz="Asia/Kolkata", refresh="30 s")
    boxes = {box.label: box.value for box in app.sidebar.selectbox}
    assert (boxes["Time zone"], boxes["Auto-refresh"]) == ("Asia/Kolkata", "30 s")
    endpoint_box = next(box for box in app.selectbox if box.label == "Endpoint")
    assert endpoint_box.value == "users GET /users/{id}"
    assert app.radio[0].value == "a day earlier"
    charts = app.get("vega_lite_chart")
    assert {chart.proto.alt.split(" of ")[0] for chart in charts} == {
        "requests / bucket", "5xx rate", "p95 latency ms", "429s / bucket"}
    assert all("users GET /users/{id}" in chart.proto.alt for chart in charts)
    clients = frame_with(app, "client")
    assert clients.to_dict("records")[0]["client"] == "client-a"
    assert clients.to_dict("records")[0]["requests"] == 40
    status = frame_with(app, "status")
    assert status.set_index("status").loc[200, "requests"] == 40  # read back as a number
    compared = frame_with(app, "worst p95 ms")
    assert compared.loc["this window", "requests"] == 40
    assert compared.loc["a day earlier", "requests"] == 0
    requests = frame_with(app, "trace_id")
    assert len(requests) == 40
    assert set(requests["client_id"]) == {"client-a"}
    newest = api(api_url, "GET", "/api/v1/requests?route_id=users&limit=1")["requests"][0]
    shown = requests.iloc[0]["timestamp"]  # in the chosen zone: UTC + 5:30
    assert shown == pd.Timestamp(newest["timestamp"], unit="s", tz="Asia/Kolkata").tz_localize(None)
    assert app.query_params["endpoint"] == "users GET /users/{id}"


def test_investigate_picks_another_endpoint_and_filters_requests(
        api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = open_page(api_url, monkeypatch, "investigate", endpoint="orders GET /orders/{id}",
                    minutes="60")
    assert len(frame_with(app, "trace_id")) == 50  # 150 requests, one page
    assert frame_with(app, "worst p95 ms").loc["this window", "requests"] == 150
    endpoint_box = next(box for box in app.selectbox if box.label == "Endpoint")
    endpoint_box.set_value("users GET /users/{id}").run()
    assert app.query_params["endpoint"] == "users GET /users/{id}"
    assert frame_with(app, "worst p95 ms").loc["this window", "requests"] == 40
    clients = frame_with(app, "client")
    assert clients.to_dict("records")[0] == {**clients.to_dict("records")[0],
                                             "client": "client-a", "requests": 40}
    assert len(frame_with(app, "trace_id")) == 40
    app.text_input(key="search-trace").set_value("trace-req-u-9-3").run()
    requests = frame_with(app, "trace_id")
    assert list(requests["trace_id"]) == ["trace-req-u-9-3"]
    assert list(requests["client_id"]) == ["client-a"]


def test_investigate_from_an_anomaly(api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = open_page(api_url, monkeypatch, "investigate", anomaly=ANOMALY_ID)
    [banner] = app.error
    assert "error_spike" in banner.value
    assert "client-b" in banner.value
    requests = frame_with(app, "trace_id")
    assert len(requests) == 15
    assert set(requests["status"]) == {500}
    assert "trace-req-b-9-0" in set(requests["trace_id"])
    ips = frame_with(app, "ip")
    assert ips.iloc[0]["ip"] == "127.0.0.9"
    errors = frame_with(app, "error class").set_index("error class")
    assert errors.loc["upstream_status_5xx", "requests"] == 15


def test_security_review_limits_one_client_and_dismisses_another(
        api_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = open_page(api_url, monkeypatch, "security", minutes="60")
    assert metrics(app)["To review"] == "2"
    labels = [e.label for e in app.expander]
    assert labels[0].startswith("[high] enumeration · users GET /users/{id}")
    assert "auth_failure_burst" in labels[1]

    app.number_input(key=f"limit-n-{ENUM_ID}").set_value(3).run()
    impact = next(i.value for i in app.info if "Simulated on client-a" in i.value)
    assert "10 of 40 requests (25%)" in impact, impact  # 4 a minute, 1 over a limit of 3
    app.text_input(key=f"limit-reason-{ENUM_ID}").input("walks user ids").run()
    app.button(key=f"limit-{ENUM_ID}").click().run()
    assert not app.exception
    policy = api(api_url, "GET", "/api/v1/policies/targeted:users:GET:client-a")
    assert (policy["limit"], policy["match_key"], policy["reason"]) == (3, "client-a",
                                                                        "walks user ids")
    assert policy["expires_at"] is not None

    app.text_input(key=f"dismiss-reason-{AUTH_ID}").input("pen test").run()
    app.button(key=f"dismiss-{AUTH_ID}").click().run()
    assert metrics(app)["To review"] == "0"
    reviewed = frame_with(app, "by").set_index("id")
    assert reviewed.loc[ENUM_ID, "status"] == "actioned"
    assert (reviewed.loc[AUTH_ID, "status"], reviewed.loc[AUTH_ID, "reason"]) == ("dismissed",
                                                                                  "pen test")


def ongoing_enumeration(now: float) -> list[Anomaly]:
    """security_anomalies plus two earlier windows of the same enumeration incident."""
    first, *others = security_anomalies(now)
    earlier = [Anomaly.model_validate({
        **first.model_dump(), "id": f"{ENUM_ID}-{n}", "window_start": first.window_start - 60 * n,
        "window_end": first.window_end - 60 * n, "detected_at": first.detected_at - 60 * n,
        "severity": "medium", "observed": 3.0, "top_clients": ["client-c"]}) for n in (1, 2)]
    return [first, *earlier, *others]


def test_security_review_groups_an_incident_and_acts_on_every_window(
        redis_url: str, chdb_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with served_api(redis_url, chdb_dsn, tmp_path, anomalies=ongoing_enumeration) as url:
        app = open_page(url, monkeypatch, "security", minutes="60")
        assert metrics(app)["To review"] == "2"  # 3 enumeration windows + 1 auth burst
        labels = [e.label for e in app.expander]
        assert labels[0].startswith("[high] enumeration · users GET /users/{id} · client-a, "
                                    "client-c · "), labels
        assert labels[0].endswith(" · 3 windows")
        summary = next(c.value for c in app.caption if "3 windows" in c.value)
        assert "peak severity high" in summary
        # the evidence is the latest window's: observed 4 (the earlier ones saw 3)
        assert metrics(app)["distinct_paths"] == "4"
        key = f"{ENUM_ID}-2"  # the incident's first window keys its widgets
        assert [b.label for b in app.button if b.key == f"dismiss-{key}"] == [
            "Dismiss all 3 windows"]

        app.text_input(key=f"limit-reason-{key}").input("walks user ids").run()
        app.button(key=f"limit-{key}").click().run()
        assert not app.exception
        for anomaly_id in (ENUM_ID, f"{ENUM_ID}-1", f"{ENUM_ID}-2"):
            view = api(url, "GET", f"/api/v1/anomalies/{anomaly_id}")
            assert (view["status"], view["review_reason"]) == ("actioned", "walks user ids")
        assert metrics(app)["To review"] == "1"
        assert metrics(app)["Reviewed"] == "3"


def test_policies_page_approves_diffs_and_rolls_back(
        api_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    api(api_url, "PUT", "/api/v1/policies/default-per-client",
        {"limit": 60, "window_s": 60, "reason": "tighter for the sale"})
    app = open_page(api_url, monkeypatch, "policies", minutes="60")
    table = frame_with(app, "recommended").set_index("endpoint")
    assert table.loc["orders GET /orders/{id}", "active"] == "60 / 60 s by client_id"
    assert table.loc["orders GET /orders/{id}", "recommended"] == "12 / 60 s by client_id"
    assert table.loc["users GET /users/{id}", "recommended"] == ""
    history = frame_with(app, "why")
    assert list(history["version"]) == [2, 1]
    assert list(history["why"]) == ["tighter for the sale", "baseline"]
    diff = frame_with(app, "field").set_index("field")
    assert (diff.loc["limit", "v1"], diff.loc["limit", "v2"]) == ("100", "60")

    app.text_input(key=f"reason-{REC_ID}").input("checked the traces").run()
    app.button(key=f"approve-{REC_ID}").click().run()
    assert not app.exception
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hget(RedisKeys().recommendations, REC_ID)
        assert raw is not None
        record = Recommendation.model_validate_json(raw)
        assert record.status is RecommendationStatus.APPROVED
        assert record.status_reason == "checked the traces"

        app.button(key="rollback").click().run()
        assert api(api_url, "GET", "/api/v1/policies/default-per-client")["limit"] == 100
        app.text_input(key="kill-reason").input("bad deploy").run()
        app.button(key="kill").click().run()
        assert client.get(RedisKeys().kill_switch) == b"1"
    finally:
        client.close()
    assert any("[approved]" in expander.label for expander in app.expander)


def test_a_policy_rollback_shows_its_recommendation_rolled_back(
        api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    policy_id = "analytics:orders:GET"  # the seeded recommendation's policy
    api(api_url, "PUT", f"/api/v1/policies/{policy_id}",
        {"route_id": "orders", "method": "GET", "limit": 30, "window_s": 60, "reason": "v1"})
    api(api_url, "POST", f"/api/v1/recommendations/{REC_ID}/apply", {"reason": "go"})
    app = open_page(api_url, monkeypatch, "policies", minutes="60", policy=policy_id)
    assert any(e.label.startswith("[applied]") for e in app.expander)
    app.text_input(key="rollback-reason").input("hurt checkout").run()
    app.button(key="rollback").click().run()
    assert not app.exception
    assert api(api_url, "GET", f"/api/v1/policies/{policy_id}")["limit"] == 30
    [expander] = [e for e in app.expander if e.label.startswith("[rolled_back]")]
    assert any("rolled_back " in c.value and "hurt checkout" in c.value
               for c in expander.caption), [c.value for c in expander.caption]

    app.switch_page("views/security.py").run()
    [note] = [i.value for i in app.info if "Limit rolled back" in i.value]
    assert "hurt checkout" in note
    assert policy_id in note


def test_audit_page_lists_changes(api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    api(api_url, "POST", f"/api/v1/anomalies/{ENUM_ID}/dismiss", {"reason": "crawler"})
    app = open_page(api_url, monkeypatch, "audit")
    records = frame_with(app, "actor")
    assert records.iloc[0]["action"] == "anomaly.dismissed"
    assert records.iloc[0]["reason"] == "crawler"
    assert "default-per-client" in set(records["subject"])


def test_audit_page_filters_from_a_deep_link_and_its_widgets(
        api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    api(api_url, "POST", f"/api/v1/anomalies/{ENUM_ID}/dismiss", {"reason": "crawler"})
    api(api_url, "PUT", "/api/v1/analytics/kill-switch", {"engaged": True, "reason": "drill"})
    app = open_page(api_url, monkeypatch, "audit", actor="anonymous", action="anomaly.*",
                    within="60")
    records = frame_with(app, "actor")
    assert list(zip(records["action"], records["reason"], strict=True)) == [
        ("anomaly.dismissed", "crawler")]
    assert next(box for box in app.selectbox if box.label == "Period").value == "last hour"

    app.text_input(key="audit-action").set_value("").run()
    app.text_input(key="audit-actor").set_value("config").run()
    records = frame_with(app, "actor")
    assert list(records["action"]) == ["policy.create"]
    assert set(records["subject"]) == {"default-per-client"}
    assert app.query_params["actor"] == "config"
    assert "action" not in app.query_params

    app.text_input(key="audit-subject").set_value("nothing-like-this").run()
    assert [i.value for i in app.info] == ["No audit records match."]


def test_api_down_shows_a_banner_on_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for page in (None, "investigate", "security", "policies", "audit"):
        app = open_page(url, monkeypatch, page)
        assert len(app.error) == 1, page
        assert "unreachable" in app.error[0].value
        assert [button.label for button in app.button] == ["Retry now"]
        assert not app.dataframe


def test_actions_need_the_token_from_the_login_box(redis_url: str, chdb_dsn: str,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    token = "security-token-0123456789"
    with served_api(redis_url, chdb_dsn, tmp_path, anomalies=security_anomalies,
                    api_tokens=f"sec:security:{token}") as url:
        app = open_page(url, monkeypatch, "security", minutes="60")
        app.text_input(key=f"dismiss-reason-{AUTH_ID}").input("pen test").run()
        app.button(key=f"dismiss-{AUTH_ID}").click().run()
        assert any("Enter a token in the sidebar" in w.value for w in app.warning)
        assert api(url, "GET", f"/api/v1/anomalies/{AUTH_ID}")["status"] == "open"

        app.sidebar.text_input(key="token").input(token).run()
        app.button(key=f"dismiss-{AUTH_ID}").click().run()
        view = api(url, "GET", f"/api/v1/anomalies/{AUTH_ID}")
        assert (view["status"], view["reviewed_by"]) == ("dismissed", "sec")
