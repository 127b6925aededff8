"""JWT verification with real keys (RSA, RSA-PSS, EC, Ed25519, HMAC), a real JWKS endpoint with
key rotation, and the attacks from the issue - each a typed AuthFailure, never another error."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web

from apigw.redis_server import free_port
from proxy.auth.config import JwtIssuer
from proxy.auth.jwks import cache_lifetime
from proxy.auth.jwt import AuthFailure, JwtVerifier
from tests.auth_keys import AUDIENCE, HMAC_SECRET, ISSUER, KeySet, make_keys, sign


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return make_keys()


class Jwks:
    """A real JWKS endpoint on loopback whose key set the test rotates."""

    def __init__(self, document: dict[str, Any], cache_control: str = "max-age=300") -> None:
        self.document = document
        self.cache_control = cache_control
        self.hits = 0
        self.url = ""
        self.stray_hits = 0

    async def serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=orjson.dumps(self.document), content_type="application/json",
                            headers={"Cache-Control": self.cache_control})

    async def stray(self, request: web.Request) -> web.Response:
        self.stray_hits += 1
        return web.json_response({"keys": []})


@pytest.fixture
async def jwks_server(keys: KeySet) -> AsyncIterator[Jwks]:
    server = Jwks(keys.jwks("rsa-1", "ec-1", "ed-1"))
    app = web.Application()
    app.router.add_get("/jwks.json", server.serve)
    app.router.add_get("/evil.json", server.stray)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def _issuer(**fields: Any) -> JwtIssuer:
    base: dict[str, Any] = {"issuer": ISSUER, "audiences": [AUDIENCE], "leeway_s": 5}
    base.update(fields)
    return JwtIssuer.model_validate(base)


async def _reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(AuthFailure) as failure:
        await verifier.verify(token)
    return failure.value.reason


async def test_every_algorithm_family_verifies(keys: KeySet, jwks_server: Jwks) -> None:
    verifier = JwtVerifier({
        "idp": _issuer(algorithms=["RS256", "PS256", "ES256", "EdDSA"],
                       jwks_url=f"{jwks_server.url}/jwks.json"),
        "internal": _issuer(issuer="internal", algorithms=["HS256", "HS384", "HS512"],
                            secret=HMAC_SECRET)})
    await verifier.start()
    try:
        for alg, kid in (("RS256", "rsa-1"), ("PS256", "rsa-1"), ("ES256", "ec-1"),
                         ("EdDSA", "ed-1")):
            principal = await verifier.verify(sign(keys.private(kid), alg, kid))
            assert principal.client_id == "client-a"
            assert principal.tenant == "acme"
            assert principal.plan == "pro"
            assert principal.scopes == {"orders:read", "orders:write"}
            assert principal.issuer == "idp"
        for alg in ("HS256", "HS384", "HS512"):
            token = sign(HMAC_SECRET, alg, iss="internal", sub=f"svc-{alg}")
            assert (await verifier.verify(token)).client_id == f"svc-{alg}"
        assert jwks_server.hits == 1  # fetched once at start, then cached
    finally:
        await verifier.stop()


async def test_claims_are_checked_with_leeway(keys: KeySet) -> None:
    verifier = JwtVerifier({"idp": _issuer(algorithms=["RS256"], public_key_pem=keys.public_pem(),
                                           required_claims=["exp", "sub"])})
    now = int(time.time())
    rsa_key = keys.rsa
    assert await _reason(verifier, sign(rsa_key, "RS256", exp=now - 60)) == "expired"
    await verifier.verify(sign(rsa_key, "RS256", exp=now - 2))  # within the 5 s leeway
    assert await _reason(verifier, sign(rsa_key, "RS256", nbf=now + 60)) == "not_yet_valid"
    assert await _reason(verifier, sign(rsa_key, "RS256", iat=now + 60)) == "not_yet_valid"
    assert await _reason(verifier, sign(rsa_key, "RS256", aud="someone-else")) == \
        "wrong_audience"
    assert await _reason(verifier, sign(rsa_key, "RS256", iss="https://evil")) == "wrong_issuer"
    assert await _reason(verifier, sign(rsa_key, "RS256", exp=None)) == "missing_claim"
    assert await _reason(verifier, sign(rsa_key, "RS256", sub=None)) == "missing_claim"
    other = make_keys().rsa
    assert await _reason(verifier, sign(other, "RS256")) == "bad_signature"


async def test_attacks_get_a_reason_class(keys: KeySet, jwks_server: Jwks) -> None:
    verifier = JwtVerifier({"idp": _issuer(algorithms=["RS256"],
                                           jwks_url=f"{jwks_server.url}/jwks.json",
                                           jwks_min_refresh_s=60)},
                           max_token_bytes=4096)
    await verifier.start()
    try:
        good = sign(keys.rsa, "RS256", "rsa-1")
        header, payload, signature = good.split(".")
        unsigned = jwt.encode({"iss": ISSUER, "sub": "x", "exp": int(time.time()) + 60},
                              None, algorithm="none")  # type: ignore[arg-type]
        confusion = _hs256_with(keys.public_pem(), payload)
        bomb_header = base64.urlsafe_b64encode(
            b'{"alg":"RS256","x":' + b"[" * 1500 + b"]" * 1500 + b"}").rstrip(b"=").decode()
        cases = {
            "alg none": (unsigned, "disallowed_alg"),
            "HS256 with the RSA public key": (confusion, "disallowed_alg"),
            "unknown kid": (sign(keys.rsa2, "RS256", "rsa-9"), "unknown_key"),
            "kid with path chars": (sign(keys.rsa, "RS256", "../../etc/passwd"), "unknown_key"),
            "kid with SQL": (sign(keys.rsa, "RS256", "x' OR '1'='1"), "unknown_key"),
            "jku elsewhere": (sign(keys.rsa2, "RS256", "rsa-1", headers={
                "jku": f"{jwks_server.url}/evil.json", "x5u": f"{jwks_server.url}/evil.json"}),
                "bad_signature"),
            "oversized": ("a" * 5000 + "." + "b" * 10 + "." + "c", "malformed"),
            "broken base64": (f"{header}.{payload}!!.{signature}", "malformed"),
            "bad base64 padding": ("e30.e30.%%%", "malformed"),
            "two parts": (f"{header}.{payload}", "malformed"),
            "JSON bomb header": (f"{bomb_header}.{payload}.{signature}", "malformed"),
            "header not JSON": (base64.urlsafe_b64encode(b"not json").decode().rstrip("=")
                                + f".{payload}.{signature}", "malformed"),
            "tampered payload": (f"{header}.{payload[:-2]}AA.{signature}", "bad_signature"),
        }
        for name, (token, expected) in cases.items():
            assert await _reason(verifier, token) == expected, name
        assert jwks_server.stray_hits == 0  # jku / x5u never fetched
        # unknown kids arrived within the refetch bound (60 s) of the fetch at start: no
        # refetch at all, however many made-up kids come
        for n in range(20):
            assert await _reason(verifier, sign(keys.rsa, "RS256", f"made-up-{n}")) == \
                "unknown_key"
        assert jwks_server.hits == 1
        assert (await verifier.verify(good)).client_id == "client-a"
    finally:
        await verifier.stop()


def _hs256_with(secret: str, payload: str) -> str:
    """HS256 over header.payload with `secret` (the public PEM): the key-confusion attack.
    Signed by hand because PyJWT itself refuses to use a PEM as an HMAC secret."""
    import hashlib
    import hmac

    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"rsa-1"}'
                                    ).rstrip(b"=").decode()
    mac = hmac.new(secret.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def test_jwks_rotation_unknown_kid_refetch(keys: KeySet, jwks_server: Jwks) -> None:
    verifier = JwtVerifier({"idp": _issuer(algorithms=["RS256"],
                                           jwks_url=f"{jwks_server.url}/jwks.json",
                                           jwks_min_refresh_s=0.2)})
    await verifier.start()
    try:
        assert (await verifier.verify(sign(keys.rsa, "RS256", "rsa-1"))).client_id
        jwks_server.document = keys.jwks("rsa-2")  # the IdP rotates: rsa-1 gone, rsa-2 new
        rotated = sign(keys.rsa2, "RS256", "rsa-2", sub="after-rotation")
        await _wait_refresh_window()
        assert (await verifier.verify(rotated)).client_id == "after-rotation"
        assert jwks_server.hits == 2
        # a token signed with the retired key (not cached yet) is now unknown
        await _wait_refresh_window()
        retired = sign(keys.rsa, "RS256", "rsa-1", sub="retired")
        assert await _reason(verifier, retired) == "unknown_key"
    finally:
        await verifier.stop()


async def _wait_refresh_window() -> None:
    import asyncio

    await asyncio.sleep(0.25)


async def test_verified_tokens_are_cached_until_exp(keys: KeySet) -> None:
    verifier = JwtVerifier({"idp": _issuer(algorithms=["RS256"], public_key_pem=keys.public_pem(),
                                           leeway_s=0)}, cache_size=2)
    token = sign(keys.rsa, "RS256", exp=int(time.time()) + 2)
    first = await verifier.verify(token)
    started = time.perf_counter()
    for _ in range(1000):
        assert await verifier.verify(token) is first
    per_hit_us = (time.perf_counter() - started) * 1000
    assert per_hit_us < 50, per_hit_us  # about a microsecond; a verification is ~50x more
    bad = sign(make_keys().rsa, "RS256")
    assert await _reason(verifier, bad) == "bad_signature"
    started = time.perf_counter()
    for _ in range(1000):
        assert await _reason(verifier, bad) == "bad_signature"
    assert (time.perf_counter() - started) * 1000 < 100  # a replayed bad token is cheap too
    for n in range(5):  # the cache stays bounded
        await verifier.verify(sign(keys.rsa, "RS256", sub=f"c{n}"))
    assert len(verifier._cache) <= 2
    await _sleep(2.2)
    assert await _reason(verifier, token) == "expired"  # the cache respects exp


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_cache_control_lifetime() -> None:
    assert cache_lifetime("public, max-age=120", 300, 10) == 120
    assert cache_lifetime("max-age=1", 300, 10) == 10  # never below the refresh bound
    assert cache_lifetime("no-store", 300, 10) == 10
    assert cache_lifetime(None, 300, 10) == 300
    assert cache_lifetime("max-age=99999999", 300, 10) == 86_400


def test_config_rejects_unsafe_issuers() -> None:
    with pytest.raises(ValueError, match="need `secret`"):
        JwtIssuer(issuer="x", algorithms=["HS256"])
    with pytest.raises(ValueError, match="public keys"):
        JwtIssuer(issuer="x", algorithms=["RS256"], keys=[{"kty": "oct", "k": "c2VjcmV0"}])
    with pytest.raises(ValueError, match=r"literal_error|Input should be"):
        JwtIssuer(issuer="x", algorithms=["none"])  # type: ignore[list-item]
