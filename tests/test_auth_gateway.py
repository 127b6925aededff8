"""Authentication and authorization through the real gateway: real upstream, real Redis,
real tokens and API keys; 401/403 with challenges, and the event fields."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

import tests.test_proxy as proxy_tests
from proxy.auth.apikeys import ApiKeyRecord, ApiKeyStore, digest
from proxy.config import GatewayConfig
from proxy.policy import RedisKeys
from tests.auth_keys import AUDIENCE, HMAC_SECRET, ISSUER, KeySet, make_keys, sign
from tests.test_proxy import GatewayFactory, read_events

upstream = proxy_tests.upstream  # fixtures shared with the proxy tests
start_gateway = proxy_tests.start_gateway
client = proxy_tests.client

PEPPER = "pepper-for-tests"
CONFIG_KEY = "cfg-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return make_keys()


def auth_config(upstream: str, keys: KeySet, **extra: Any) -> GatewayConfig:
    document: dict[str, Any] = {
        "version": 1,
        "upstreams": {"app": {"url": upstream}},
        "routes": [
            {"id": "orders", "match": {"prefix": "/orders"}, "upstream": "app",
             "auth": {"methods": ["jwt", "api_key"]},
             "authz": {"scopes": ["orders:read"], "method_scopes": {"POST": ["orders:write"]}},
             "cors": {"allow_origins": ["https://app.example"],
                      "allow_methods": ["GET", "POST"], "allow_credentials": True}},
            {"id": "internal", "match": {"prefix": "/echo/internal"}, "upstream": "app",
             "auth": {"methods": ["jwt"], "issuers": ["internal"]},
             "authz": {"ip_allow": ["10.0.0.0/8", "::1/128"]}},
            {"id": "blocked", "match": {"prefix": "/echo/blocked"}, "upstream": "app",
             "authz": {"ip_deny": ["127.0.0.0/8"]}},
            {"id": "open", "match": {"prefix": "/echo"}, "upstream": "app",
             "auth": {"methods": ["api_key"], "optional": True}},
        ],
        "auth": {
            "jwt": {"idp": {"issuer": ISSUER, "algorithms": ["RS256"],
                            "public_key_pem": keys.public_pem(), "audiences": [AUDIENCE]},
                    "internal": {"issuer": "internal", "algorithms": ["HS256"],
                                 "secret": HMAC_SECRET}},
            "api_keys": {"pepper": PEPPER, "query_param": "apikey", "refresh_s": 0.5,
                         "keys": [{"id": "cfg-1", "hash": digest(CONFIG_KEY, PEPPER),
                                   "owner": "partner-x", "plan": "free", "tenant": "globex",
                                   "scopes": ["orders:read"]}]},
        },
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2},
    }
    document.update(extra)
    return GatewayConfig.model_validate(document)


def _outcomes(method: str, outcome: str, reason: str = "") -> float:
    return REGISTRY.get_sample_value("apigw_auth_outcomes_total", {
        "method": method, "outcome": outcome, "reason": reason}) or 0.0


async def test_jwt_and_api_key_success_recorded(upstream: str, keys: KeySet,
                                                start_gateway: GatewayFactory,
                                                client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(auth_config(upstream, keys))
    token = sign(keys.rsa, "RS256")
    before = {method: _outcomes(method, "success") for method in ("jwt", "api_key")}
    async with client.get(f"{gw.url}/orders/1", headers={
            "Authorization": f"Bearer {token}", "X-Request-Id": "jwt-ok"}) as response:
        assert response.status == 200
    async with client.get(f"{gw.url}/orders/2", headers={
            "X-API-Key": CONFIG_KEY, "X-Request-Id": "key-ok"}) as response:
        assert response.status == 200
    async with client.get(f"{gw.url}/orders/3?apikey={CONFIG_KEY}",
                          headers={"X-Request-Id": "query-ok"}) as response:
        assert response.status == 200
    async with client.get(f"{gw.url}/echo/anon", headers={"X-Request-Id": "anon"}) as response:
        assert response.status == 200  # optional auth, no credential
    events = {e["request_id"]: e for e in await read_events(gw.redis, 4)}
    jwt_event = events["jwt-ok"]
    assert (jwt_event["auth_outcome"], jwt_event["client_id"], jwt_event["tenant"],
            jwt_event["plan"]) == ("success", "client-a", "acme", "pro")
    key_event = events["key-ok"]
    assert (key_event["auth_outcome"], key_event["client_id"], key_event["api_key_id"],
            key_event["tenant"], key_event["plan"]) == ("success", "partner-x", "cfg-1",
                                                        "globex", "free")
    assert CONFIG_KEY not in events["query-ok"]["url_query"]
    assert events["anon"]["auth_outcome"] == "none"
    assert _outcomes("jwt", "success") - before["jwt"] == 1
    assert _outcomes("api_key", "success") - before["api_key"] == 2


async def test_rejections_are_401_with_challenge_and_reason(
        upstream: str, keys: KeySet, start_gateway: GatewayFactory,
        client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    gw = await start_gateway(auth_config(upstream, keys))
    now = int(time.time())
    cases = {
        "missing": ({}, "missing"),
        "expired": ({"Authorization": f"Bearer {sign(keys.rsa, 'RS256', exp=now - 600)}"},
                    "expired"),
        "alg-none": ({"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."},
                     "disallowed_alg"),
        "garbage": ({"Authorization": "Bearer %%%not-a-token%%%"}, "malformed"),
        "huge": ({"Authorization": "Bearer " + "A" * 7000}, "malformed"),
        "basic": ({"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": "short"}, "malformed"),
        "bad-key": ({"X-API-Key": "x" * 40}, "unknown_key"),
        "evil-key": ({"X-API-Key": "'; DROP TABLE keys; --xxxxxxxxxx"}, "malformed"),
        "wrong-issuer-route": ({"Authorization": f"Bearer {sign(HMAC_SECRET, 'HS256')}"},
                               "disallowed_alg"),
    }
    for name, (headers, _) in cases.items():
        async with client.get(f"{gw.url}/orders/1",
                              headers={**headers, "X-Request-Id": name}) as response:
            assert response.status == 401, name
            challenges = response.headers.getall("WWW-Authenticate")
            assert any(c.startswith('Bearer realm="apigw"') for c in challenges), name
            assert any(c.startswith("ApiKey ") for c in challenges), name
            body = await response.json(content_type=None)
            assert body["status"] == 401
            if name not in ("missing", "bad-key", "evil-key", "basic"):
                assert 'error="invalid_token"' in challenges[0], name
    events = {e["request_id"]: e for e in await read_events(gw.redis, len(cases))}
    for name, (_, reason) in cases.items():
        assert events[name]["auth_outcome"] == "failure", name
        assert events[name]["auth_reason"] == reason, name
        assert events[name]["http_response_status_code"] == 401
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_scopes_ip_lists_and_cors(upstream: str, keys: KeySet,
                                        start_gateway: GatewayFactory,
                                        client: aiohttp.ClientSession) -> None:
    gw = await start_gateway(auth_config(upstream, keys))
    reader = {"Authorization": f"Bearer {sign(keys.rsa, 'RS256', scope='orders:read')}"}
    async with client.get(f"{gw.url}/orders/1", headers=reader) as response:
        assert response.status == 200
    async with client.post(f"{gw.url}/orders/1", headers=reader) as response:
        assert response.status == 403  # POST also needs orders:write
        challenge = response.headers["WWW-Authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert "orders:write" in challenge
    # IP allow list: 127.0.0.1 is not in 10/8 or ::1 -> 403 before any credential is read
    internal = {"Authorization": f"Bearer {sign(HMAC_SECRET, 'HS256', iss='internal')}"}
    async with client.get(f"{gw.url}/echo/internal/x", headers=internal) as response:
        assert response.status == 403
        assert (await response.json(content_type=None))["type"].endswith("ip-denied")
    async with client.get(f"{gw.url}/echo/blocked/x") as response:
        assert response.status == 403
    # CORS preflight answered by the gateway (the route does not list OPTIONS... it does by
    # default; the upstream never sees it either way)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with client.options(f"{gw.url}/orders/1", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert response.headers["Vary"] == "Origin"
    async with client.options(f"{gw.url}/orders/1", headers={
            **preflight, "Origin": "https://evil.example"}) as response:
        assert response.status == 403
    async with client.options(f"{gw.url}/orders/1", headers={
            **preflight, "Access-Control-Request-Method": "DELETE"}) as response:
        assert response.status == 403
    async with client.get(f"{gw.url}/orders/1", headers={
            **reader, "Origin": "https://app.example"}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "RateLimit" in response.headers["Access-Control-Expose-Headers"]
    async with client.get(f"{gw.url}/orders/1", headers={  # CORS headers on a 401 too
            "Origin": "https://app.example"}) as response:
        assert response.status == 401
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_redis_api_key_revoked_within_two_seconds_on_every_worker(
        upstream: str, keys: KeySet, start_gateway: GatewayFactory,
        client: aiohttp.ClientSession, redis_url: str) -> None:
    config = auth_config(upstream, keys)
    workers = [await start_gateway(config), await start_gateway(config)]
    store = ApiKeyStore(workers[0].redis, RedisKeys("apigw"), pepper=PEPPER)
    key = await store.issue(ApiKeyRecord(id="k-42", owner="mobile-app", plan="pro",
                                         tenant="initech", scopes=["orders:read"]),
                            actor="test")
    for gw in workers:  # both workers accept (and cache) it
        async with client.get(f"{gw.url}/orders/1", headers={"X-API-Key": key}) as response:
            assert response.status == 200
    assert await store.revoke("k-42", actor="test", reason="leaked")
    revoked_at = time.monotonic()
    pending = set(range(len(workers)))
    while pending and time.monotonic() - revoked_at < 2.0:
        for index in list(pending):
            async with client.get(f"{workers[index].url}/orders/1",
                                  headers={"X-API-Key": key}) as response:
                if response.status == 401:
                    pending.discard(index)
        await asyncio.sleep(0.05)
    assert not pending, f"workers {pending} still accept the revoked key after 2 s"
    print(f"revocation applied on all workers in {time.monotonic() - revoked_at:.3f}s")
    async with client.get(f"{workers[0].url}/orders/1", headers={
            "X-API-Key": key, "X-Request-Id": "revoked"}) as response:
        assert response.status == 401
    events = {e["request_id"]: e for e in await read_events(workers[0].redis, 1)}
    assert events["revoked"]["auth_reason"] == "revoked"
    audit: Any = await workers[0].redis.xrange("apigw:audit")
    assert any(b"apikey.revoke" in fields[b"r"] for _, fields in audit)
    assert key.encode() not in b"".join(fields[b"r"] for _, fields in audit)
