"""Configuration of authentication (JWT issuers, API keys) and authorization (scopes, IP
lists, CORS): the YAML models, validated before anything runs. See docs/auth.md.

Global settings live under `auth:` and `access:` in the gateway YAML; each route opts in with
`auth:`, `authz:` and `cors:`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
                    "PS512", "ES256", "ES384", "ES512", "EdDSA"]
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_KEY_HASH = re.compile(r"^(sha256|hmac-sha256):[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_cidrs(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IPv4/IPv6 address or CIDR") from exc
    return values


class JwtIssuer(_Strict):
    """One trusted token issuer: where its keys come from and what its tokens must say."""

    issuer: str = Field(description="The exact `iss` its tokens carry.")
    algorithms: list[Algorithm] = Field(
        min_length=1, description="Allow-list; a token whose header names another alg is "
                                  "rejected (disallowed_alg) before any key is tried.")
    secret: SecretStr | None = Field(default=None, description="Shared secret for HS*.")
    public_key_pem: str | None = Field(default=None, description="One PEM public key.")
    keys: list[dict[str, Any]] = Field(default_factory=list,
                                       description="Inline public JWKs (with `kid`).")
    jwks_url: str | None = Field(default=None, description="JWKS endpoint, fetched and cached.")
    audiences: list[str] = Field(default_factory=list,
                                 description="Accepted `aud` values; empty = aud not checked.")
    leeway_s: float = Field(default=30.0, ge=0, le=600,
                            description="Clock skew tolerated on exp, nbf and iat.")
    required_claims: list[str] = Field(default_factory=lambda: ["exp"],
                                       description="Claims that must be present.")
    client_id_claim: str = Field(default="sub", description="Claim naming the client.")
    tenant_claim: str = "tenant"
    plan_claim: str = "plan"
    scope_claims: list[str] = Field(default_factory=lambda: ["scope", "scp"],
                                    description="Space-separated string or list of scopes.")
    jwks_cache_s: float = Field(default=300.0, gt=0, le=86_400,
                                description="Key cache lifetime when the JWKS response has "
                                            "no Cache-Control max-age.")
    jwks_min_refresh_s: float = Field(default=10.0, ge=0, le=3600,
                                      description="Rate bound: at most one refetch per this "
                                                  "many seconds, whatever unknown kids arrive.")

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("keys")
    @classmethod
    def _public_only(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for jwk in value:
            private = sorted(_PRIVATE_JWK_MEMBERS & set(jwk))
            if private:
                raise ValueError(f"inline JWKs must be public keys; remove {private} "
                                 "(put HMAC secrets in `secret`)")
            if "kty" not in jwk:
                raise ValueError("every inline JWK needs `kty`")
        return value

    @model_validator(mode="after")
    def _has_keys(self) -> JwtIssuer:
        hmac = HMAC_ALGORITHMS.intersection(self.algorithms)
        if hmac and self.secret is None:
            raise ValueError(f"algorithms {sorted(hmac)} need `secret`")
        if set(self.algorithms) - HMAC_ALGORITHMS and not (
                self.public_key_pem or self.keys or self.jwks_url):
            raise ValueError("asymmetric algorithms need `public_key_pem`, `keys` or "
                             "`jwks_url`")
        return self


class ApiKey(_Strict):
    """An API key as configured: its digest, never the key."""

    id: str
    hash: str = Field(description="`hmac-sha256:<hex>` (with the pepper) or `sha256:<hex>`; "
                                  "`apigw-hash-key` / proxy.auth.apikeys prints it.")
    owner: str = ""
    plan: str = ""
    tenant: str = ""
    scopes: list[str] = Field(default_factory=list)
    revoked: bool = False

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-128 characters of letters, digits and ._:@/-")
        return value

    @field_validator("hash")
    @classmethod
    def _hash_shape(cls, value: str) -> str:
        if not _KEY_HASH.match(value):
            raise ValueError("must be `sha256:<64 hex>` or `hmac-sha256:<64 hex>`")
        return value


class ApiKeys(_Strict):
    header: str = Field(default="X-API-Key", description="Header carrying the key.")
    query_param: str | None = Field(default=None,
                                    description="Query parameter carrying the key (redacted "
                                                "from events); None = header only.")
    pepper: SecretStr = Field(default=SecretStr(""),
                              description="Server secret: keys are stored as HMAC-SHA256("
                                          "pepper, key). Empty = plain SHA-256.")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys from the config.")
    redis: bool = Field(default=True, description="Also look keys up in Redis (<p>:apikeys).")
    cache_s: float = Field(default=30.0, gt=0, le=3600,
                           description="How long a worker trusts a Redis lookup when no "
                                       "change notification arrives.")
    refresh_s: float = Field(default=1.0, gt=0, le=60,
                             description="Poll of <p>:apikeys:version (revocation bound).")

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("must be a header name of letters, digits and -")
        return value

    @field_validator("keys")
    @classmethod
    def _unique(cls, value: list[ApiKey]) -> list[ApiKey]:
        ids = [key.id for key in value]
        dupes = sorted({key for key in ids if ids.count(key) > 1})
        if dupes:
            raise ValueError(f"duplicate API key id(s) {dupes}")
        return value


class Auth(_Strict):
    """Global authentication settings (`auth:`)."""

    realm: str = Field(default="apigw", pattern=r'^[^"\\]{1,64}$')
    jwt: dict[str, JwtIssuer] = Field(default_factory=dict,
                                      description="Trusted issuers by name.")
    api_keys: ApiKeys = Field(default_factory=ApiKeys)
    max_token_bytes: int = Field(default=8192, ge=256, le=65_536,
                                 description="Longer credentials are rejected unparsed.")
    token_cache_size: int = Field(default=10_000, ge=0, le=1_000_000,
                                  description="Verified tokens remembered (until exp).")


class RouteAuth(_Strict):
    """Per route: which credentials are accepted (any one suffices)."""

    methods: list[Literal["jwt", "api_key"]] = Field(min_length=1)
    issuers: list[str] | None = Field(default=None,
                                      description="Names in auth.jwt; None = all of them.")
    optional: bool = Field(default=False,
                           description="No credential at all is let through anonymous; a "
                                       "bad one is still rejected.")
    hide_credentials: bool = Field(
        default=False, description="Strip the Authorization header and the API-key header "
                                   "and query parameter before forwarding upstream.")


class RouteAuthz(_Strict):
    """Per route: scopes required and IP lists."""

    scopes: list[str] = Field(default_factory=list, description="All required, any method.")
    method_scopes: dict[str, list[str]] = Field(default_factory=dict,
                                                description="Extra scopes per HTTP method.")
    ip_allow: list[str] = Field(default_factory=list, description="Empty = everyone.")
    ip_deny: list[str] = Field(default_factory=list, description="Checked first.")

    _cidrs = field_validator("ip_allow", "ip_deny")(classmethod(
        lambda cls, value: _check_cidrs(value)))

    @field_validator("method_scopes")
    @classmethod
    def _upper(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {method.upper(): scopes for method, scopes in value.items()}


class Access(_Strict):
    """Global IP lists (`access:`), checked for every request before routing's result."""

    ip_allow: list[str] = Field(default_factory=list)
    ip_deny: list[str] = Field(default_factory=list)

    _cidrs = field_validator("ip_allow", "ip_deny")(classmethod(
        lambda cls, value: _check_cidrs(value)))


class Cors(_Strict):
    """Per route CORS; the gateway answers preflights itself."""

    allow_origins: list[str] = Field(min_length=1,
                                     description="Exact origins, or * for any.")
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST"])
    allow_headers: list[str] = Field(default_factory=lambda: ["Authorization",
                                                              "Content-Type"])
    expose_headers: list[str] = Field(default_factory=lambda: ["RateLimit", "RateLimit-Policy",
                                                               "Retry-After", "X-Request-Id"])
    allow_credentials: bool = False
    max_age_s: int = Field(default=600, ge=0, le=86_400)

    @model_validator(mode="after")
    def _no_wildcard_credentials(self) -> Cors:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials cannot be combined with origin *")
        return self


def check_references(routes: Sequence[Any], auth: Auth) -> None:
    """Cross-checks of routes against `auth:`; raises ValueError naming the route."""
    for index, route in enumerate(routes):
        spec: RouteAuth | None = route.auth
        if spec is None:
            continue
        if "jwt" in spec.methods and not auth.jwt:
            raise ValueError(f"routes[{index}].auth accepts jwt but auth.jwt names no issuer")
        unknown = sorted(set(spec.issuers or ()) - set(auth.jwt))
        if unknown:
            raise ValueError(f"routes[{index}].auth.issuers {unknown} are not in auth.jwt "
                             f"{sorted(auth.jwt)}")
