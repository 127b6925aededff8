"""The Streamlit dashboard (AppTest) against a live API on a real port, with seeded data."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import redis
import redis.asyncio as aioredis
from streamlit.testing.v1 import AppTest

from analytics.api import ApiSettings
from analytics.models import Recommendation, RecommendationStatus
from apigw.redis_server import free_port
from collector.clickhouse import SharedClient
from proxy.policy import RedisKeys
from tests.test_api import ANOMALY_ID, REC_ID, seed_redis, seed_store, start_api

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


@pytest.fixture
def api_url(redis_url: str, chdb_dsn: str, tmp_path: Path) -> Iterator[str]:
    """A live API served from its own thread and event loop (AppTest blocks this one)."""
    now = time.time()
    ch = SharedClient(chdb_dsn)
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        client = aioredis.Redis.from_url(redis_url)
        settings = ApiSettings(redis_url=redis_url, clickhouse_dsn=chdb_dsn, data_dir=tmp_path)
        runner = None
        try:
            stop.append(asyncio.Event())
            runner, _, store = await start_api(settings, client, ch, port)
            await seed_redis(client, store, now)
            ready.set()
            await stop[0].wait()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            raise
        finally:
            if runner is not None:
                await runner.cleanup()
            await client.aclose()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    try:
        seed_store(ch, now)
        thread.start()
        assert ready.wait(60), "API did not start"
        assert not failure, failure
        yield f"http://127.0.0.1:{port}"
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)
        loop.close()
        ch.close()


def run_app(url: str, monkeypatch: pytest.MonkeyPatch, **query: str) -> AppTest:
    monkeypatch.setenv("APIGW_API_URL", url)
    monkeypatch.delenv("APIGW_API_TOKEN", raising=False)
    app = AppTest.from_file(str(APP), default_timeout=60)
    for name, value in query.items():
        app.query_params[name] = value
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def frame_with(app: AppTest, column: str) -> pd.DataFrame:
    frames = [element.value for element in app.dataframe if column in element.value.columns]
    assert frames, f"no table with a {column!r} column"
    return frames[0]


def test_dashboard_shows_endpoints_anomalies_and_policies(
        api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = run_app(api_url, monkeypatch, minutes="60")

    endpoints = frame_with(app, "health").set_index("endpoint")
    assert endpoints.loc["orders GET /orders/{id}", "requests"] == 150
    assert endpoints.loc["users GET /users/{id}", "requests"] == 40
    assert endpoints.loc["orders GET /orders/{id}", "anomalies"] == 1
    assert "critical" in endpoints.loc["orders GET /orders/{id}", "health"]
    assert {m.label: m.value for m in app.metric}["Requests"] == "190"

    anomalies = frame_with(app, "kind")
    [row] = anomalies.to_dict("records")
    assert (row["id"], row["kind"], row["severity"]) == (ANOMALY_ID, "error_spike", "high")
    assert row["endpoint"] == "orders GET /orders/{id}"
    assert row["top clients"] == "client-b"
    assert "req-b-9-0" in row["example requests"]
    assert (row["baseline"], row["observed"]) == (0.0, 0.333)

    policies = frame_with(app, "source").set_index("id")
    assert policies.loc["default-per-client", "limit"] == "100 / 60 s"
    assert bool(policies.loc["default-per-client", "active"])

    titles = [expander.label for expander in app.expander]
    assert any("[pending] orders GET /orders/{id} → 12 per 60 s" in t for t in titles), titles
    assert any(ANOMALY_ID in caption.value for caption in app.caption)


def test_dashboard_approves_a_recommendation(api_url: str, redis_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    app = run_app(api_url, monkeypatch)
    app.text_input(key=f"reason-{REC_ID}").input("checked the traces")
    app.button(key=f"approve-{REC_ID}").click().run()
    assert not app.exception
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hget(RedisKeys().recommendations, REC_ID)
    finally:
        client.close()
    assert raw is not None
    record = Recommendation.model_validate_json(raw)
    assert record.status is RecommendationStatus.APPROVED
    assert record.status_reason == "checked the traces"
    assert any("[approved]" in expander.label for expander in app.expander)


def test_deep_link_opens_the_endpoint(api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = run_app(api_url, monkeypatch, endpoint="users GET /users/{id}", minutes="60")
    endpoint_box = next(box for box in app.selectbox if box.label == "Endpoint")
    assert endpoint_box.value == "users GET /users/{id}"
    clients = frame_with(app, "distinct_paths")
    assert clients.to_dict("records")[0]["client"] == "client-a"
    assert clients.to_dict("records")[0]["requests"] == 40
    assert app.query_params["endpoint"] == "users GET /users/{id}"


def test_api_down_shows_a_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    app = run_app(f"http://127.0.0.1:{free_port()}", monkeypatch)
    assert len(app.error) == 1
    assert "unreachable" in app.error[0].value
    assert [button.label for button in app.button] == ["Retry now"]
    assert not app.dataframe
