"""`routes[].auth.hide_credentials`: the upstream (a real echo server) never sees the
credential when it is set, and does when it is not; the request body still flows."""

from __future__ import annotations

from typing import Any

import aiohttp

import tests.test_proxy as proxy_tests
from proxy.auth.apikeys import digest
from proxy.config import GatewayConfig
from tests.auth_keys import HMAC_SECRET, sign
from tests.test_proxy import GatewayFactory, header_map

upstream = proxy_tests.upstream
start_gateway = proxy_tests.start_gateway
client = proxy_tests.client

PEPPER = "pepper-for-hide-tests"
KEY = "hide-key-0123456789abcdef"


def config(upstream: str) -> GatewayConfig:
    methods = ["jwt", "api_key"]
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"app": {"url": upstream}},
        "routes": [
            {"id": "hidden", "match": {"prefix": "/echo/hidden"}, "upstream": "app",
             "auth": {"methods": methods, "hide_credentials": True}},
            {"id": "keys-only", "match": {"prefix": "/echo/keys-only"}, "upstream": "app",
             "auth": {"methods": ["api_key"], "hide_credentials": True}},
            {"id": "shown", "match": {"prefix": "/echo"}, "upstream": "app",
             "auth": {"methods": methods}},
        ],
        "auth": {"jwt": {"internal": {"issuer": "internal", "algorithms": ["HS256"],
                                      "secret": HMAC_SECRET, "audiences": []}},
                 "api_keys": {"pepper": PEPPER, "query_param": "api_key", "redis": False,
                              "keys": [{"id": "k1", "hash": digest(KEY, PEPPER),
                                        "owner": "partner"}]}},
        "events": {"flush_interval_ms": 20},
    })


async def _seen(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> dict[str, Any]:
    async with client.request(kwargs.pop("method", "GET"), url, **kwargs) as response:
        assert response.status == 200, await response.text()
        seen: dict[str, Any] = await response.json()
    return seen


async def test_upstream_sees_credentials_only_without_hide_credentials(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(config(upstream))
    bearer = {"Authorization": f"Bearer {sign(HMAC_SECRET, 'HS256', iss='internal')}",
              "X-Other": "kept"}
    keyed = {"X-API-Key": KEY, "X-Other": "kept"}

    for prefix, hidden in (("/echo/hidden", True), ("/echo/shown", False)):
        seen = await _seen(client, f"{gw.url}{prefix}/a", headers=bearer)
        headers = header_map(seen["headers"])
        assert ("authorization" not in headers) is hidden, (prefix, headers)
        assert headers["x-other"] == "kept"
        seen = await _seen(client, f"{gw.url}{prefix}/b", headers=keyed)
        headers = header_map(seen["headers"])
        assert ("x-api-key" not in headers) is hidden, (prefix, headers)
        seen = await _seen(client, f"{gw.url}{prefix}/c?x=1&api_key={KEY}&y=2")
        if hidden:
            assert seen["path"] == f"{prefix}/c?x=1&y=2"
        else:
            assert seen["path"] == f"{prefix}/c?x=1&api_key={KEY}&y=2"
        assert KEY not in str(seen) if hidden else KEY in str(seen)

    # a body still reaches the upstream after the request was stripped
    seen = await _seen(client, f"{gw.url}/echo/hidden/post", method="POST",
                       headers=keyed, data=b"z" * 200_000)
    assert seen["body_len"] == 200_000
    assert "x-api-key" not in header_map(seen["headers"])

    # an api_key-only route hides only the API key: the Authorization header is not its
    # credential and goes through
    seen = await _seen(client, f"{gw.url}/echo/keys-only/d",
                       headers={**keyed, "Authorization": "Basic dXNlcjpwYXNz"})
    headers = header_map(seen["headers"])
    assert "x-api-key" not in headers
    assert headers["authorization"] == "Basic dXNlcjpwYXNz"
