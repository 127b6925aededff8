"""Bearer tokens and roles of the control-plane API.

Tokens are configured as `name:role:token` or, better, `name:role:sha256:<64 hex>` so only the
digest is ever stored. A presented token is hashed and compared with every configured digest
(`hmac.compare_digest`, no early exit). Roles are ordered: viewer < security < operator.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from analytics.problems import ProblemError

_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


class Role(StrEnum):
    VIEWER = "viewer"  # read everything
    SECURITY = "security"  # + review: approve / dismiss, targeted per-client limits
    OPERATOR = "operator"  # + apply / roll back, policies, auto mode, kill switch, runs


RANK: Final = {Role.VIEWER: 1, Role.SECURITY: 2, Role.OPERATOR: 3}


def allows(role: Role, needed: Role) -> bool:
    return RANK[role] >= RANK[needed]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


ANONYMOUS_OPERATOR: Final = Principal("anonymous", Role.OPERATOR)  # no tokens configured
ANONYMOUS_READER: Final = Principal("anonymous", Role.VIEWER)


@dataclass(frozen=True, slots=True)
class Token:
    principal: Principal
    digest: bytes  # sha256 of the token


def token_digest(token: str) -> str:
    """`sha256:<hex>`: the form to put in APIGW_API_TOKENS instead of the token itself."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(spec: str) -> list[Token]:
    """`name:role:token,...`; a token written `sha256:<64 hex>` is given by its hash."""
    tokens = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3:
            raise ValueError("each entry must be name:role:token (token may be sha256:<hex>)")
        name, role, secret = parts
        if not _NAME.match(name):
            raise ValueError(f"token name {name!r} must be 1-64 letters, digits or ._@-")
        if role not in Role.__members__.values():
            raise ValueError(f"token {name!r}: role must be one of {[r.value for r in Role]}")
        if secret.startswith("sha256:"):
            try:
                digest = bytes.fromhex(secret[len("sha256:"):])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"token {name!r}: sha256: needs 64 hex digits")
        elif len(secret) < 16:
            raise ValueError(f"token {name!r} must be at least 16 characters")
        else:
            digest = hashlib.sha256(secret.encode()).digest()
        tokens.append(Token(Principal(name, Role(role)), digest))
    return tokens


def authenticate(tokens: list[Token], presented: str) -> Principal | None:
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for token in tokens:  # no early exit: time does not depend on which entry matched
        if hmac.compare_digest(digest, token.digest):
            found = token.principal
    return found


class Authenticator:
    """Decides who is calling and whether their role may take a route's action."""

    def __init__(self, spec: str, public_reads: bool) -> None:
        self.tokens = parse_tokens(spec)
        self.public_reads = public_reads

    def principal(self, authorization: str, needed: Role | None, public: bool) -> Principal:
        """`needed` None = a read. Raises 401 (who?) or 403 (not allowed) problems."""
        if not self.tokens:
            return ANONYMOUS_OPERATOR
        needed = needed or (None if self.public_reads else Role.VIEWER)
        if public or needed is None:
            return ANONYMOUS_READER
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ProblemError(401, "Authentication required",
                               "send Authorization: Bearer <token>",
                               headers={"WWW-Authenticate": 'Bearer realm="apigw"'})
        principal = authenticate(self.tokens, presented.strip())
        if principal is None:
            raise ProblemError(401, "Invalid token", "the bearer token is not recognised",
                               headers={"WWW-Authenticate":
                                        'Bearer realm="apigw", error="invalid_token"'})
        if not allows(principal.role, needed):
            raise ProblemError(403, "Forbidden",
                               f"role {principal.role.value} may not do this; "
                               f"needs {needed.value}")
        return principal
