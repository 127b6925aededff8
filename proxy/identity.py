"""Who is calling: the client address, the client id, the principal and rate-limit keys.

The client address is the TCP peer, unless the peer is a trusted proxy
(`identity.trusted_proxies`): then X-Forwarded-For is walked from the right and the first
address that is not a trusted proxy is the client. Before authentication the client id is
the value of `identity.client_id_header` when it is 1-128 characters of
[A-Za-z0-9._:@/+=-], else "" (an unverified claim). Once the authn step verified a
credential, `Caller.authenticate(principal)` replaces it, and the tenant, with the
principal's - so every later step (authz, rate limit, cache) keys on verified facts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDictProxy

from proxy.config import Identity as IdentityConfig

if TYPE_CHECKING:
    from proxy.app import Exchange

MAX_CLIENT_ID: Final = 128
MAX_KEY_PART: Final = 256
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of CIDRs, with a memo of the peer addresses already classified."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def contains(self, address: str) -> bool:
        known = self._memo.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            trusted = False
        else:
            trusted = any(ip in network for network in self._networks)
        if len(self._memo) < 10_000:
            self._memo[address] = trusted
        return trusted


def client_address(peer: str, forwarded_for: str | None, trusted: TrustedProxies) -> str:
    """The originating client: the peer, or the right-most untrusted X-Forwarded-For hop."""
    if not forwarded_for or not trusted or not trusted.contains(peer):
        return peer
    for hop in reversed(forwarded_for.split(",")):
        address = hop.strip()
        if not address:
            continue
        if not trusted.contains(address):
            return address[:64] if _looks_like_ip(address) else peer
    return peer


def _looks_like_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def client_id(value: str | None) -> str:
    """The claimed client id, or "" when absent or not well-formed."""
    if not value or len(value) > MAX_CLIENT_ID or not _CLIENT_ID.match(value):
        return ""
    return value


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: what an authentication method proved about the request."""

    client_id: str
    method: str  # "jwt" | "api_key"
    tenant: str = ""
    plan: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)
    api_key_id: str = ""
    issuer: str = ""
    expires_at: float | None = None  # epoch seconds (JWT exp)


class Caller:
    """The identity facts of one request, and the rate-limit key for any key_by spec."""

    __slots__ = ("address", "client_id", "headers", "principal", "tenant")

    def __init__(self, address: str, client_id: str, tenant: str,
                 headers: Mapping[str, str]) -> None:
        self.address = address
        self.client_id = client_id
        self.tenant = tenant
        self.headers = headers
        self.principal: Principal | None = None

    def authenticate(self, principal: Principal) -> None:
        """From now on the verified principal is who is calling."""
        self.principal = principal
        self.client_id = principal.client_id
        self.tenant = principal.tenant

    @property
    def plan(self) -> str:
        return self.principal.plan if self.principal is not None else ""

    @property
    def scopes(self) -> frozenset[str]:
        return self.principal.scopes if self.principal is not None else frozenset()

    def key_of(self, key_by: str) -> str:
        """The budget key: "client_id", "ip", "tenant", "api_key", "header:X", '+'-joined."""
        parts = _parse_key_by(key_by)
        if len(parts) == 1:
            return self._part(parts[0])
        return "|".join(self._part(part) for part in parts)

    def _part(self, part: str) -> str:
        if part == "client_id":
            return self.client_id or self.address
        if part == "ip":
            return self.address
        if part == "tenant":
            return self.tenant
        if part.startswith("header:"):
            return (self.headers.get(part[7:]) or "")[:MAX_KEY_PART]
        principal = self.principal  # api_key: the verified key's id
        return principal.api_key_id if principal is not None else ""


@lru_cache(maxsize=1024)
def _parse_key_by(key_by: str) -> tuple[str, ...]:
    return tuple(key_by.split("+"))


class IdentityResolver:
    """Built once per config; resolves the Caller of each request."""

    def __init__(self, config: IdentityConfig) -> None:
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.has_trusted = bool(self.trusted)
        self.client_id_header = config.client_id_header

    def resolve(self, peer: str, headers: CIMultiDictProxy[str], tenant: str = "") -> Caller:
        forwarded = headers.getall("X-Forwarded-For", None) if self.has_trusted else None
        address = client_address(peer, ",".join(forwarded) if forwarded else None, self.trusted)
        return Caller(address, client_id(headers.get(self.client_id_header)), tenant, headers)


class IdentityStep:
    """Chain step: who is calling (address, claimed client id), recorded in the event."""

    def __init__(self, resolver: IdentityResolver) -> None:
        self.resolver = resolver

    async def access(self, ex: Exchange) -> None:
        peer = ex.request.remote or ""
        resolver = self.resolver
        caller = resolver.resolve(peer, ex.request.headers)
        ex.caller = caller
        ex.trusted_peer = resolver.has_trusted and resolver.trusted.contains(peer)
        event = ex.event
        event.client_address = caller.address
        event.client_id = caller.client_id
        event.tenant = caller.tenant
