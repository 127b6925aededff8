"""Pre-authentication rate limiting through the real gateway: real Redis, real upstream, real
API keys. Policies keyed by `ip` alone are checked before authn, so a client whose every
request fails authentication is limited (429 before its credentials are looked at), other
addresses are unaffected, and no request is counted twice against the same policy."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson

import tests.test_proxy as proxy_tests
from proxy.auth.apikeys import digest
from proxy.config import GatewayConfig
from proxy.policy import Policy
from proxy.policy_store import is_pre_auth
from tests.test_proxy import GatewayFactory, read_events

upstream = proxy_tests.upstream  # fixtures shared with the proxy tests
start_gateway = proxy_tests.start_gateway
client = proxy_tests.client

PEPPER = "pepper-for-preauth-tests"
GOOD_KEY = "good-key-0123456789abcdef"
STUFFER = "203.0.113.66"
NEIGHBOUR = "198.51.100.7"


def preauth_config(upstream: str, policies: list[dict[str, Any]]) -> GatewayConfig:
    return GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"app": {"url": upstream}},
        "routes": [{"id": "users", "match": {"path": "/orders/{id}"}, "methods": ["GET"],
                    "upstream": "app", "auth": {"methods": ["api_key"]}}],
        "identity": {"trusted_proxies": ["127.0.0.1/32"]},  # the test plays the load balancer
        "auth": {"api_keys": {"pepper": PEPPER, "keys": [
            {"id": "k-1", "hash": digest(GOOD_KEY, PEPPER), "owner": "partner-1",
             "tenant": "acme"}]}},
        "events": {"flush_interval_ms": 20},
        "ratelimit": {"policy_refresh_s": 0.2, "policies": policies},
    })


async def _get(client: aiohttp.ClientSession, url: str, address: str, key: str,
               request_id: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Forwarded-For": address, "X-API-Key": key, "X-Request-Id": request_id}
    async with client.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


def test_only_address_policies_without_principal_scopes_run_before_authn() -> None:
    assert is_pre_auth(Policy(id="a", key_by="ip", limit=1, window_s=1))
    assert is_pre_auth(Policy(id="a", key_by="ip", match_key=STUFFER, route_id="r", limit=1,
                              window_s=1))
    for other in ({"key_by": "client_id"}, {"key_by": "ip+client_id"}, {"key_by": "api_key"},
                  {"key_by": "ip", "tenant": "acme"}, {"key_by": "ip", "plan": "free"}):
        assert not is_pre_auth(Policy(id="a", limit=1, window_s=1, **other)), other


async def test_bad_credentials_from_one_address_get_429_before_401(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    policy = {"id": "users-per-ip", "route_id": "users", "key_by": "ip", "limit": 3,
              "window_s": 60}
    gw = await start_gateway(preauth_config(upstream, [policy]))
    url = f"{gw.url}/orders/1"
    stuffer = [await _get(client, url, STUFFER, f"bad-key-{n:04d}-xxxxxxxxxxxxxxxx", f"s-{n}")
               for n in range(6)]
    assert [status for status, _, _ in stuffer] == [401, 401, 401, 429, 429, 429]
    _, headers, body = stuffer[3]
    assert 1 <= int(headers["Retry-After"]) <= 20
    assert headers["RateLimit-Policy"] == '"users-per-ip";q=3;w=60'
    assert re.fullmatch(r'"users-per-ip";r=0;t=\d+', headers["RateLimit"])
    assert headers["Content-Type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert (problem["status"], problem["policy"]) == (429, "users-per-ip")
    assert "WWW-Authenticate" not in headers  # credentials were never checked
    # The 401s before it carry the pre-auth budget too.
    assert re.fullmatch(r'"users-per-ip";r=2;t=\d+', stuffer[0][1]["RateLimit"])

    # Other addresses keep their own budget, with bad and with good credentials.
    assert (await _get(client, url, NEIGHBOUR, "bad-key-neighbour-xxxxxxxxxxxx", "n-bad"))[0] \
        == 401
    status, headers, _ = await _get(client, url, NEIGHBOUR, GOOD_KEY, "n-good")
    assert status == 200
    assert re.fullmatch(r'"users-per-ip";r=1;t=\d+', headers["RateLimit"])
    # The limited address is limited even with a valid key: the address is what is limited.
    assert (await _get(client, url, STUFFER, GOOD_KEY, "s-good"))[0] == 429

    events = {e["request_id"]: e for e in await read_events(gw.redis, 9)}
    limited = events["s-3"]
    assert (limited["http_response_status_code"], limited["ratelimit_outcome"],
            limited["ratelimit_policy_id"], limited["ratelimit_mode"]) == (
        429, "limited", "users-per-ip", "enforce")
    assert limited["auth_outcome"] == "none"  # rejected before authentication
    assert limited["client_address"] == STUFFER
    rejected = events["s-0"]
    assert (rejected["http_response_status_code"], rejected["auth_outcome"],
            rejected["ratelimit_outcome"], rejected["ratelimit_policy_id"]) == (
        401, "failure", "allowed", "users-per-ip")
    assert events["n-good"]["ratelimit_outcome"] == "allowed"


async def test_authenticated_request_counted_once_and_both_phases_in_the_headers(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    policies = [
        {"id": "per-ip", "key_by": "ip", "limit": 4, "window_s": 60},
        {"id": "per-client", "route_id": "users", "key_by": "client_id", "limit": 10,
         "window_s": 60},
    ]
    gw = await start_gateway(preauth_config(upstream, policies))
    url = f"{gw.url}/orders/2"
    seen = [await _get(client, url, NEIGHBOUR, GOOD_KEY, f"g-{n}") for n in range(5)]
    assert [status for status, _, _ in seen] == [200, 200, 200, 200, 429]
    for n, (_, headers, _) in enumerate(seen[:4]):
        # Exactly one unit per request from each policy: counted once, not twice.
        assert headers["RateLimit-Policy"] == '"per-ip";q=4;w=60, "per-client";q=10;w=60'
        assert re.fullmatch(rf'"per-ip";r={3 - n};t=\d+, "per-client";r={9 - n};t=\d+',
                            headers["RateLimit"]), headers["RateLimit"]
    events = {e["request_id"]: e for e in await read_events(gw.redis, 5)}
    assert events["g-0"]["ratelimit_policy_id"] == "per-ip"
    assert events["g-0"]["auth_outcome"] == "success"
    assert events["g-4"]["ratelimit_outcome"] == "limited"
    assert events["g-4"]["auth_outcome"] == "none"


async def test_most_specific_address_policy_is_checked_once(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    """A targeted address policy that is also the most specific policy after authn (the
    post-auth selection picks it again) costs one unit per request, not two."""
    policies = [
        {"id": "default-per-client", "key_by": "client_id", "limit": 100, "window_s": 60},
        {"id": "stuffer", "route_id": "users", "method": "GET", "key_by": "ip",
         "match_key": NEIGHBOUR, "limit": 3, "window_s": 60},
    ]
    gw = await start_gateway(preauth_config(upstream, policies))
    statuses = [(await _get(client, f"{gw.url}/orders/3", NEIGHBOUR, GOOD_KEY, f"t-{n}"))[0]
                for n in range(4)]
    assert statuses == [200, 200, 200, 429]
    # Another address falls through to the client policy after authn.
    status, headers, _ = await _get(client, f"{gw.url}/orders/3", STUFFER, GOOD_KEY, "other")
    assert status == 200
    assert headers["RateLimit-Policy"] == '"default-per-client";q=100;w=60'


async def test_shadow_address_policy_never_rejects_before_authn(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    policy = {"id": "watch-ip", "key_by": "ip", "limit": 1, "window_s": 60, "mode": "shadow"}
    gw = await start_gateway(preauth_config(upstream, [policy]))
    statuses = [(await _get(client, f"{gw.url}/orders/4", STUFFER, "bad-key-shadow-xxxxxxxxxx",
                            f"w-{n}"))[0] for n in range(3)]
    assert statuses == [401, 401, 401]
    events = {e["request_id"]: e for e in await read_events(gw.redis, 3)}
    assert [events[f"w-{n}"]["ratelimit_outcome"] for n in range(3)] == [
        "allowed", "shadow_limited", "shadow_limited"]
