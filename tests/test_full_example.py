"""examples/full.yaml validates with `apigw validate` and serves against the demo upstreams."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from apigw.cli import main
from apigw.demo import upstreams as demo
from apigw.redis_server import free_port
from proxy.config import load_config
from tests import test_proxy as _proxy_tests
from tests.test_proxy import GatewayFactory

client = _proxy_tests.client  # fixture
start_gateway = _proxy_tests.start_gateway  # fixture


FULL = Path(__file__).resolve().parent.parent / "examples" / "full.yaml"


def test_full_example_validates() -> None:
    assert main(["validate", str(FULL)]) == 0


async def test_full_example_serves_demo_upstreams(
        start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    ports = [free_port() for _ in range(3)]
    runners = await demo.start("127.0.0.1", ports, seed=1)
    try:
        urls = {f"DEMO_{name.upper()}_URL": f"http://127.0.0.1:{port}"
                for name, port in zip(demo.SERVICES, ports, strict=True)}
        config = load_config(FULL, environ=urls)
        gw = await start_gateway(config)
        key = {"X-API-Key": "demo-partner-key-0123456789"}
        for path in ("/orders/7", "/users/3", "/catalog/items", "/catalog/items/kettle"):
            async with client.get(f"{gw.url}{path}",
                                  headers={"X-Client-Id": "c1", **key}) as response:
                assert response.status in (200, 404), (path, response.status)
                assert response.headers["Content-Type"].startswith("application/")
        async with client.get(f"{gw.url}/users/3") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with client.post(f"{gw.url}/orders", data=b"x" * 70_000) as response:
            assert response.status == 413
        pool = gw.gateway.forwarder.upstreams["catalog"]
        assert len(pool.endpoints) == 2
        assert pool.checker is not None
    finally:
        for runner in runners:
            await runner.cleanup()
