"""The demo's credentials: who authenticates how, the demo API keys and JWTs.

Clients client-01..client-20 send HS256 JWTs (issuer `apigw-demo`, sub = the client id,
2 minute lifetime, renewed 30 s before expiry); client-21..client-30 and `scraper-7` send API
keys from examples/demo.yaml (stored there as HMAC digests only). The plaintext demo keys are
derived from the client id here - they are demo secrets, public on purpose.

    python -m apigw.demo.credentials     # the auth.api_keys.keys block of examples/demo.yaml
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from typing import Final

import jwt

from apigw.demo import ABUSER

ISSUER: Final = "apigw-demo"
AUDIENCE: Final = "apigw"
# PyJWT warns about HMAC secrets under 32 bytes, so the default is longer than a password.
DEFAULT_JWT_SECRET: Final = "demo-secret-change-me-0123456789abcdef"  # noqa: S105 - demo
DEFAULT_PEPPER: Final = "demo-pepper-change-me"
TOKEN_LIFETIME_S: Final = 120
RENEW_BEFORE_S: Final = 30
JWT_CLIENTS: Final = tuple(f"client-{n:02d}" for n in range(1, 21))
KEY_CLIENTS: Final = (*(f"client-{n:02d}" for n in range(21, 31)), ABUSER)
_KEY_SCOPES: Final = "[orders:read, orders:write, users:read]"
_PLANS: Final = ("free", "pro")
_TENANTS: Final = ("acme", "globex", "initech")


def jwt_secret() -> str:
    return os.environ.get("DEMO_JWT_SECRET") or DEFAULT_JWT_SECRET


def api_key(client: str) -> str:
    """The demo key of a key client (16-256 safe characters)."""
    return f"demo-{client}-k7Qm2pX9"


def key_id(client: str) -> str:
    return f"key-{client}"


def plan_of(client: str) -> str:
    return _PLANS[sum(map(ord, client)) % 2]


def tenant_of(client: str) -> str:
    return _TENANTS[sum(map(ord, client)) % 3]


class Tokens:
    """JWTs per client, minted when missing or within RENEW_BEFORE_S of expiry."""

    def __init__(self, secret: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._secret = secret or jwt_secret()
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}
        self.minted = 0

    def token(self, client: str) -> str:
        now = self._clock()
        held = self._tokens.get(client)
        if held is not None and held[1] - now > RENEW_BEFORE_S:
            return held[0]
        expires = int(now) + TOKEN_LIFETIME_S
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": client, "iat": int(now),
                  "exp": expires, "plan": plan_of(client), "tenant": tenant_of(client),
                  "scope": "orders:read orders:write users:read"}
        token = jwt.encode(claims, self._secret, algorithm="HS256")
        self._tokens[client] = (token, expires)
        self.minted += 1
        return token


def credential_headers(client: str, tokens: Tokens) -> dict[str, str]:
    if client in KEY_CLIENTS:
        return {"X-API-Key": api_key(client)}
    return {"Authorization": f"Bearer {tokens.token(client)}"}


def bad_credential(rng_bits: Callable[[int], int] = secrets.randbits) -> dict[str, str]:
    """What a credential-stuffing client sends: made-up keys, forged or garbled tokens."""
    choice = rng_bits(2)
    if choice == 0:
        return {"X-API-Key": f"ak_{rng_bits(128):032x}"}
    if choice == 1:  # a well-formed token signed with a guessed secret
        forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "admin",
                             "exp": int(time.time()) + 600},
                            f"guess-{rng_bits(64):016x}-{'x' * 24}", algorithm="HS256")
        return {"Authorization": f"Bearer {forged}"}
    if choice == 2:
        return {"Authorization": f"Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.{rng_bits(8)}"}
    return {"X-API-Key": f"demo-client-{rng_bits(16):05d}-k7Qm2pX9"}


def keys_yaml(pepper: str = DEFAULT_PEPPER) -> str:
    """The auth.api_keys.keys entries of examples/demo.yaml (digests, never the keys)."""
    from proxy.auth.apikeys import digest

    lines = []
    for client in KEY_CLIENTS:
        lines.append(f"      - {{id: {key_id(client)}, owner: {client}, plan: {plan_of(client)}, "
                     f"tenant: {tenant_of(client)}, scopes: {_KEY_SCOPES},\n"
                     f"         hash: \"{digest(api_key(client), pepper)}\"}}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(keys_yaml(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PEPPER))
