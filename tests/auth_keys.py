"""Real signing keys and token helpers shared by the auth tests (no mocks: PyJWT signs)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec as _ec
from cryptography.hazmat.primitives.asymmetric import ed25519 as _ed25519
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.test"
AUDIENCE = "apigw-tests"
HMAC_SECRET = "a-test-secret-long-enough-for-hs512-" + "x" * 40


@dataclass
class KeySet:
    rsa: _rsa.RSAPrivateKey
    rsa2: _rsa.RSAPrivateKey
    ec: _ec.EllipticCurvePrivateKey
    ed: _ed25519.Ed25519PrivateKey

    def public_pem(self) -> str:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def jwks(self, *kids: str) -> dict[str, Any]:
        """Public JWKS with the named keys: rsa-1, rsa-2, ec-1, ed-1."""
        keys = []
        for kid in kids:
            if kid == "rsa-1":
                jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key()))
            elif kid == "rsa-2":
                jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa2.public_key()))
            elif kid == "ec-1":
                jwk = json.loads(ECAlgorithm.to_jwk(self.ec.public_key()))
            else:
                jwk = json.loads(OKPAlgorithm.to_jwk(self.ed.public_key()))
            jwk["kid"] = kid
            keys.append(jwk)
        return {"keys": keys}

    def private(self, kid: str) -> Any:
        return {"rsa-1": self.rsa, "rsa-2": self.rsa2, "ec-1": self.ec, "ed-1": self.ed}[kid]


def make_keys() -> KeySet:
    return KeySet(_rsa.generate_private_key(65537, 2048),
                  _rsa.generate_private_key(65537, 2048),
                  _ec.generate_private_key(_ec.SECP256R1()),
                  _ed25519.Ed25519PrivateKey.generate())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "client-a", "iat": now,
                            "nbf": now, "exp": now + 300, "tenant": "acme", "plan": "pro",
                            "scope": "orders:read orders:write"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str, kid: str | None = None, headers: dict[str, Any] | None = None,
         **overrides: Any) -> str:
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=extra or None)
