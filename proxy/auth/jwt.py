"""JWT bearer tokens verified with PyJWT, per configured issuer, with a verified-token cache.

Never trusting the token: the header's `alg` must be in the issuer's allow-list before any key
is tried (so `none` and HS256-signed-with-the-RSA-public-key are refused as disallowed_alg),
HMAC algorithms only ever use the issuer's `secret` and asymmetric ones only keys of the
matching type (RSA for RS/PS, EC for ES, OKP for EdDSA), `kid` is only a dictionary lookup,
and `jku` / `x5u` / `jwk` / `x5c` headers are ignored. Every failure raises AuthFailure with a
reason class (see REASONS); nothing a token contains can raise anything else.

A verified token is remembered by its SHA-256 until its `exp` (at most CACHE_MAX_S), so a
client reusing its token is verified once; a token rejected for a reason that cannot change
(bad signature, malformed, expired, ...) is remembered for NEGATIVE_TTL_S, so replaying a bad
token is as cheap as replaying a good one.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from prometheus_client import Counter

from proxy.auth.config import HMAC_ALGORITHMS, JwtIssuer
from proxy.auth.jwks import JwksSource, PublicKey, public_key
from proxy.deferred_metrics import DeferredCounter
from proxy.identity import MAX_CLIENT_ID, Principal, client_id

CACHE_MAX_S: Final = 300.0  # a cached verification is re-done at least this often
NEGATIVE_TTL_S: Final = 10.0
MAX_SCOPES: Final = 100
MAX_KID: Final = 256
_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_KTY: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_PERMANENT: Final = frozenset({"malformed", "bad_signature", "disallowed_alg", "wrong_issuer",
                               "wrong_audience", "expired", "missing_claim"})

REASONS: Final = ("missing", "malformed", "bad_signature", "expired", "not_yet_valid",
                  "wrong_audience", "wrong_issuer", "unknown_key", "revoked", "disallowed_alg",
                  "missing_claim", "unavailable")

TOKEN_CACHE = Counter("apigw_auth_token_cache_total", "Verified-token cache lookups",
                      ["outcome"])
_HIT, _MISS, _NEG = (DeferredCounter(TOKEN_CACHE.labels(o))
                     for o in ("hit", "miss", "negative_hit"))


class AuthFailure(Exception):
    """A credential that does not authenticate; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail or reason.replace("_", " ")


def _family(alg: str) -> str:
    return _KTY.get(alg[:2], "")


def _static_keys(config: JwtIssuer) -> dict[str, PublicKey]:
    found: dict[str, PublicKey] = {}
    if config.public_key_pem:
        key: Any = load_pem_public_key(config.public_key_pem.encode())
        kty = ("RSA" if isinstance(key, rsa.RSAPublicKey)
               else "EC" if isinstance(key, ec.EllipticCurvePublicKey) else "OKP")
        found["#pem"] = PublicKey(kty, None, key)
    for index, jwk in enumerate(config.keys):
        kid = jwk.get("kid")
        found[kid if isinstance(kid, str) and kid else f"#{index}"] = public_key(jwk)
    return found


class _Issuer:
    def __init__(self, name: str, config: JwtIssuer) -> None:
        self.name = name
        self.config = config
        self.algorithms = frozenset(config.algorithms)
        self.secret = config.secret.get_secret_value() if config.secret is not None else None
        self.static = _static_keys(config)
        self.jwks = (JwksSource(config.jwks_url, default_ttl_s=config.jwks_cache_s,
                                min_refresh_s=config.jwks_min_refresh_s)
                     if config.jwks_url else None)
        self.audience = list(config.audiences) or None
        self.options: Any = {"require": list(config.required_claims),
                             "verify_aud": bool(config.audiences)}

    async def keys_for(self, alg: str, kid: str | None) -> list[Any]:
        if alg in HMAC_ALGORITHMS:
            return [self.secret] if self.secret is not None else []
        family = _family(alg)
        if kid is not None:
            found = [self.static[kid]] if kid in self.static else []
            if not found and self.jwks is not None:
                found = self.jwks.lookup(kid)
                if not found:
                    found = await self.jwks.lookup_fresh(kid)
        else:
            found = list(self.static.values())
            if self.jwks is not None:
                found += self.jwks.lookup(None)
        return [k.key for k in found if k.kty == family and k.alg in (None, alg)]


def _claim_text(claims: Mapping[str, Any], name: str, limit: int = MAX_CLIENT_ID) -> str:
    value = claims.get(name)
    return value if isinstance(value, str) and len(value) <= limit else ""


def _scopes(claims: Mapping[str, Any], names: Iterable[str]) -> frozenset[str]:
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            return frozenset(value.split()[:MAX_SCOPES])
        if isinstance(value, list):
            return frozenset(s for s in value[:MAX_SCOPES] if isinstance(s, str))
    return frozenset()


def _map_error(exc: Exception) -> AuthFailure:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return AuthFailure("expired", "token expired")
    if isinstance(exc, jwt.ImmatureSignatureError | jwt.InvalidIssuedAtError):
        return AuthFailure("not_yet_valid", "token not valid yet")
    if isinstance(exc, jwt.InvalidAudienceError):
        return AuthFailure("wrong_audience", "token not meant for this audience")
    if isinstance(exc, jwt.InvalidIssuerError):
        return AuthFailure("wrong_issuer", "token from an untrusted issuer")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthFailure("missing_claim", f"token lacks the {exc.claim!r} claim")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return AuthFailure("disallowed_alg", "algorithm not allowed")
    if isinstance(exc, jwt.InvalidSignatureError | jwt.InvalidKeyError):
        return AuthFailure("bad_signature", "signature does not verify")
    return AuthFailure("malformed", "token is not a well-formed JWT")


class JwtVerifier:
    """All configured issuers; `verify(token, issuers)` returns the Principal or raises."""

    def __init__(self, issuers: Mapping[str, JwtIssuer], *, max_token_bytes: int = 8192,
                 cache_size: int = 10_000) -> None:
        self.issuers = {name: _Issuer(name, config) for name, config in issuers.items()}
        self._by_iss = {issuer.config.issuer: issuer for issuer in self.issuers.values()}
        self.max_token_bytes = max_token_bytes
        self.cache_size = cache_size
        self._cache: dict[bytes, tuple[Principal, str, float]] = {}
        self._rejected: dict[bytes, tuple[str, str, float]] = {}

    async def start(self) -> None:
        sources = [i.jwks for i in self.issuers.values() if i.jwks is not None]
        await asyncio.gather(*(source.start() for source in sources))

    async def stop(self) -> None:
        for issuer in self.issuers.values():
            if issuer.jwks is not None:
                await issuer.jwks.stop()

    async def verify(self, token: str, allowed: frozenset[str] | None = None) -> Principal:
        """The principal of a valid token from one of the `allowed` issuer names (None = any)."""
        if len(token) > self.max_token_bytes:
            raise AuthFailure("malformed", "token too large")
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        now = time.time()
        cached = self._cache.get(digest)
        if cached is not None:
            principal, name, valid_until = cached
            if now < valid_until:
                if allowed is not None and name not in allowed:
                    raise AuthFailure("wrong_issuer", "token from an issuer this route "
                                                      "does not accept")
                _HIT.inc()
                return principal
            del self._cache[digest]
        rejected = self._rejected.get(digest)
        if rejected is not None and now < rejected[2]:
            _NEG.inc()
            raise AuthFailure(rejected[0], rejected[1])
        _MISS.inc()
        try:
            principal, name, valid_until = await self._verify(token, allowed, now)
        except AuthFailure as failure:
            if failure.reason in _PERMANENT and self.cache_size:
                self._bounded(self._rejected, max(64, self.cache_size // 10))
                self._rejected[digest] = (failure.reason, failure.detail, now + NEGATIVE_TTL_S)
            raise
        if self.cache_size:
            self._bounded(self._cache, self.cache_size)
            self._cache[digest] = (principal, name, valid_until)
        return principal

    @staticmethod
    def _bounded(table: dict[bytes, Any], size: int) -> None:
        while len(table) >= size:
            del table[next(iter(table))]  # oldest first (insertion order)

    async def _verify(self, token: str, allowed: frozenset[str] | None,
                      now: float) -> tuple[Principal, str, float]:
        if not _TOKEN_SHAPE.match(token):
            raise AuthFailure("malformed", "token is not three base64url parts")
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # any parse failure (base64, JSON, nesting) is "malformed"
            raise AuthFailure("malformed", "token header is not valid JSON") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str):
            raise AuthFailure("malformed", "token header has no alg")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID):
            raise AuthFailure("malformed", "token header kid is not a short string")
        if not any(alg in self.issuers[name].algorithms
                   for name in (allowed if allowed is not None else self.issuers)
                   if name in self.issuers):
            raise AuthFailure("disallowed_alg", f"algorithm {alg[:20]!r} not allowed")
        issuer = self._issuer_of(token, allowed)
        if alg not in issuer.algorithms:
            raise AuthFailure("disallowed_alg", f"algorithm {alg[:20]!r} not allowed")
        keys = await issuer.keys_for(alg, kid)
        if not keys:
            raise AuthFailure("unknown_key", "no key known for this token")
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(token, key=key, algorithms=[alg], options=issuer.options,
                                    audience=issuer.audience, issuer=issuer.config.issuer,
                                    leeway=issuer.config.leeway_s)
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except Exception as exc:  # a claim problem, or anything odd in the payload
                raise _map_error(exc) from None
        if claims is None:
            raise AuthFailure("bad_signature", "signature does not verify")
        return self._principal(issuer, claims, now)

    def _issuer_of(self, token: str, allowed: frozenset[str] | None) -> _Issuer:
        names = list(self.issuers) if allowed is None else [n for n in self.issuers
                                                             if n in allowed]
        if len(names) == 1:
            return self.issuers[names[0]]
        if not names:
            raise AuthFailure("wrong_issuer", "no issuer configured for this route")
        try:
            payload = jwt.decode(token, options={"verify_signature": False})
        except Exception:
            raise AuthFailure("malformed", "token payload is not valid JSON") from None
        iss = payload.get("iss")
        issuer = self._by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None or issuer.name not in names:
            raise AuthFailure("wrong_issuer", "token from an untrusted issuer")
        return issuer

    @staticmethod
    def _principal(issuer: _Issuer, claims: Mapping[str, Any],
                   now: float) -> tuple[Principal, str, float]:
        config = issuer.config
        client = client_id(_claim_text(claims, config.client_id_claim))
        if not client:
            raise AuthFailure("missing_claim",
                              f"token lacks a usable {config.client_id_claim!r} claim")
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else None
        valid_until = now + CACHE_MAX_S
        if expires_at is not None:
            valid_until = min(valid_until, expires_at + config.leeway_s)
        principal = Principal(client_id=client, method="jwt",
                              tenant=client_id(_claim_text(claims, config.tenant_claim)),
                              plan=client_id(_claim_text(claims, config.plan_claim)),
                              scopes=_scopes(claims, config.scope_claims),
                              issuer=issuer.name, expires_at=expires_at)
        return principal, issuer.name, valid_until
