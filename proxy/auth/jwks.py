"""A JWKS endpoint's keys, fetched with aiohttp and cached.

Keys are kept by `kid` until the response's Cache-Control max-age (or the issuer's
`jwks_cache_s`) runs out; then the next lookup triggers a background refresh while the old
keys keep serving. A token naming an unknown `kid` may trigger an immediate refetch, but at
most one per `min_refresh_s` (and one at a time), so a flood of made-up kids costs at most
one request to the identity provider per interval. A failed fetch keeps the last good keys.
Only the configured URL is ever fetched: a token's `jku` / `x5u` headers are never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWKError
from prometheus_client import Counter

log = logging.getLogger(__name__)

MAX_JWKS_BYTES: Final = 256 * 1024
MAX_KEYS: Final = 100
_MAX_AGE = re.compile(r"(?:^|,)\s*(?:s-)?max-age\s*=\s*(\d+)", re.IGNORECASE)
_NO_STORE = re.compile(r"(?:^|,)\s*no-(?:store|cache)\b", re.IGNORECASE)



@dataclass(frozen=True, slots=True)
class PublicKey:
    """One usable verification key: its JWK type, its declared alg (if any), the key."""

    kty: str  # RSA | EC | OKP
    alg: str | None
    key: Any  # a cryptography public key object


def public_key(jwk: dict[str, Any]) -> PublicKey:
    """A JWK as a PublicKey; raises ValueError for private, secret or unusable keys."""
    if jwk.get("kty") == "oct" or "d" in jwk:
        raise ValueError("not a public key")
    try:
        parsed = PyJWK(jwk)
    except (PyJWKError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"unusable JWK: {exc}") from None
    alg = jwk.get("alg")
    return PublicKey(str(jwk["kty"]), alg if isinstance(alg, str) else None, parsed.key)


FETCHES = Counter("apigw_auth_jwks_fetches_total", "JWKS fetches by outcome", ["outcome"])


def cache_lifetime(cache_control: str | None, default_s: float, min_s: float) -> float:
    """Seconds to keep a JWKS response: its max-age, clamped to [min_s, 1 day]."""
    if not cache_control:
        return default_s
    if _NO_STORE.search(cache_control):
        return min_s
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return default_s
    return min(max(float(match.group(1)), min_s), 86_400.0)


def parse_jwks(body: bytes) -> dict[str, PublicKey]:
    """kid -> key of a JWKS document (keys without kid are kept under "#<index>").
    Keys PyJWT cannot use, private keys and oversized sets raise ValueError."""
    document = orjson.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no `keys` list)")
    found: dict[str, PublicKey] = {}
    for index, jwk in enumerate(document["keys"][:MAX_KEYS]):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = public_key(jwk)  # a JWKS endpoint publishes public keys only
        except ValueError:
            continue
        kid = jwk.get("kid")
        found[kid if isinstance(kid, str) and kid else f"#{index}"] = key
    return found


class JwksSource:
    """The keys of one JWKS URL (see the module docstring)."""

    def __init__(self, url: str, *, default_ttl_s: float = 300.0, min_refresh_s: float = 10.0,
                 timeout_s: float = 3.0) -> None:
        self.url = url
        self.default_ttl_s = default_ttl_s
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self.keys: dict[str, PublicKey] = {}
        self.fetched_at = 0.0  # monotonic, of the last attempt
        self.expires_at = 0.0  # monotonic
        self.fetches = 0
        self._session: aiohttp.ClientSession | None = None
        self._inflight: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), auto_decompress=True)
        await self.refresh()

    async def stop(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._inflight
        if self._session is not None:
            await self._session.close()
            self._session = None

    def lookup(self, kid: str | None) -> list[PublicKey]:
        """The cached keys for `kid` (all of them when the token names none), without I/O.
        A stale cache schedules a background refresh."""
        if time.monotonic() >= self.expires_at:
            self._schedule()
        if kid is None:
            return list(self.keys.values())
        key = self.keys.get(kid)
        return [key] if key is not None else []

    async def lookup_fresh(self, kid: str) -> list[PublicKey]:
        """For an unknown kid: refetch now if the rate bound allows, then look again."""
        if time.monotonic() - self.fetched_at >= self.min_refresh_s:
            await asyncio.shield(self._schedule())
        key = self.keys.get(kid)
        return [key] if key is not None else []

    def _schedule(self) -> asyncio.Task[None]:
        if self._inflight is None or self._inflight.done():
            if time.monotonic() - self.fetched_at < self.min_refresh_s:
                return self._done()
            self._inflight = asyncio.ensure_future(self.refresh())
        return self._inflight

    @staticmethod
    def _done() -> asyncio.Task[None]:
        async def nothing() -> None:
            return None
        return asyncio.ensure_future(nothing())

    async def refresh(self) -> None:
        """Fetch the set once; keep the last good keys on any failure."""
        self.fetched_at = time.monotonic()
        self.fetches += 1
        session = self._session
        if session is None:
            return
        try:
            async with session.get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
                ttl = cache_lifetime(response.headers.get("Cache-Control"),
                                     self.default_ttl_s, self.min_refresh_s)
            keys = parse_jwks(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, orjson.JSONDecodeError) as exc:
            FETCHES.labels("error").inc()
            self.expires_at = time.monotonic() + max(self.min_refresh_s, 1.0)
            log.warning("JWKS fetch failed; keeping the last good keys",
                        extra={"url": self.url, "error": repr(exc)[:200],
                               "keys": len(self.keys)})
            return
        FETCHES.labels("ok").inc()
        self.keys = keys
        self.expires_at = time.monotonic() + ttl
        log.info("JWKS loaded", extra={"url": self.url, "keys": len(keys), "ttl_s": ttl})

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "keys": len(self.keys), "fetches": self.fetches}
