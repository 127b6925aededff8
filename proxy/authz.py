"""Authorization: IP allow/deny lists, required scopes, and CORS - three chain steps.

- `CorsStep` (before routing): answers CORS preflights (OPTIONS with Origin and
  Access-Control-Request-Method) for routes with `cors:` itself - 204 with the allowed
  methods/headers, or 403 when the origin or method is not allowed - and adds
  Access-Control-Allow-Origin (and Vary: Origin) to every other response of such a route.
  Requests without an Origin header cost one header lookup.
- `IpAccessStep` (after routing, before authn): global `access:` lists, then the route's
  `authz.ip_allow` / `ip_deny` (CIDR, IPv4 and IPv6; deny wins; a non-empty allow list admits
  only its members) -> 403 `ip-denied`.
- `ScopeStep` (after authn): the principal's scopes must include the route's `authz.scopes`
  and `authz.method_scopes[method]`; missing ones -> 403 with an RFC 6750
  `insufficient_scope` challenge, no principal at all -> 401.

Each step is in the chain only when the configuration uses it (`when_used`): with no `cors:`,
no address list or no scopes anywhere, requests skip the step rather than look it up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import Counter

from proxy.auth.config import Access, Cors, RouteAuthz
from proxy.auth.step import auth_problem
from proxy.routing import MatchContext, PathError, Router, split_path

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.config import Route

DENIALS = Counter("apigw_authz_denials_total", "Requests refused by authorization",
                  ["reason"])
_DENIED_IP, _DENIED_SCOPE, _DENIED_CORS = (DENIALS.labels(r) for r in
                                           ("ip", "scope", "cors"))
_MEMO_MAX: Final = 10_000
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(cidrs: Iterable[str]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


class IpFilter:
    """Allow/deny CIDR lists with a bounded memo of decided addresses."""

    def __init__(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        self.allow = _networks(allow)
        self.deny = _networks(deny)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def admits(self, address: str) -> bool:
        known = self._memo.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            admitted = not self.allow  # an unparseable peer only passes open lists
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            admitted = (not any(ip in net for net in self.deny if net.version == ip.version)
                        and (not self.allow or any(ip in net for net in self.allow
                                                   if net.version == ip.version)))
        if len(self._memo) >= _MEMO_MAX:
            self._memo = {}
        self._memo[address] = admitted
        return admitted


class IpAccessStep:
    """Chain step: global and per-route IP lists."""

    @classmethod
    def when_used(cls, access: Access, routes: Sequence[Route]) -> list[IpAccessStep]:
        """The step, when a global or a route's address list exists."""
        used = bool(access.ip_allow or access.ip_deny) or any(
            route.authz is not None and bool(route.authz.ip_allow or route.authz.ip_deny)
            for route in routes)
        return [cls(access)] if used else []

    def __init__(self, access: Access) -> None:
        self.global_filter = IpFilter(access.ip_allow, access.ip_deny)
        self._routes: dict[str, IpFilter | None] = {}

    def _route_filter(self, route_id: str, authz: RouteAuthz | None) -> IpFilter | None:
        if route_id not in self._routes:
            made = IpFilter(authz.ip_allow, authz.ip_deny) if authz is not None else None
            self._routes[route_id] = made if made else None
        return self._routes[route_id]

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route, caller = ex.route, ex.caller
        assert route is not None
        assert caller is not None
        route_filter = self._route_filter(route.id, route.route.authz)
        for check in (self.global_filter, route_filter):
            if check and not check.admits(caller.address):
                _DENIED_IP.inc()
                ex.event.error_type = "ip_denied"
                return auth_problem(403, "ip-denied", "your address may not use this route",
                                    ex.request_id, ex.response_headers)
        return None


class ScopeStep:
    """Chain step: required scopes of the route and method."""

    @classmethod
    def when_used(cls, realm: str, routes: Sequence[Route]) -> list[ScopeStep]:
        """The step, when some route requires scopes."""
        used = any(route.authz is not None
                   and bool(route.authz.scopes or route.authz.method_scopes)
                   for route in routes)
        return [cls(realm)] if used else []

    def __init__(self, realm: str = "apigw") -> None:
        self.realm = realm
        self._required: dict[tuple[str, str], frozenset[str]] = {}

    def required(self, route_id: str, method: str, authz: RouteAuthz | None) -> frozenset[str]:
        key = (route_id, method)
        found = self._required.get(key)
        if found is None:
            found = frozenset() if authz is None else frozenset(
                [*authz.scopes, *authz.method_scopes.get(method, ())])
            if len(self._required) < _MEMO_MAX:
                self._required[key] = found
        return found

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route, caller = ex.route, ex.caller
        assert route is not None
        assert caller is not None
        needed = self.required(route.id, ex.event.http_request_method, route.route.authz)
        if not needed:
            return None
        if caller.principal is None:
            _DENIED_SCOPE.inc()
            ex.event.error_type = "unauthenticated"
            return auth_problem(401, "unauthorized", "credentials required", ex.request_id,
                                ex.response_headers, [f'Bearer realm="{self.realm}"'])
        missing = needed - caller.scopes
        if not missing:
            return None
        _DENIED_SCOPE.inc()
        ex.event.error_type = "insufficient_scope"
        scope = " ".join(sorted(needed))
        return auth_problem(403, "insufficient-scope",
                            f"missing scope(s): {' '.join(sorted(missing))}", ex.request_id,
                            ex.response_headers,
                            [f'Bearer realm="{self.realm}", error="insufficient_scope", '
                             f'scope="{scope}"'])


class _CorsRoute:
    __slots__ = ("any_origin", "config", "headers", "methods", "origins", "preflight_base",
                 "simple_base")

    def __init__(self, config: Cors) -> None:
        self.config = config
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(config.allow_origins)
        self.methods = frozenset(m.upper() for m in config.allow_methods)
        self.headers = frozenset(h.lower() for h in config.allow_headers)
        self.simple_base: dict[str, str] = {}
        if config.expose_headers:
            self.simple_base["Access-Control-Expose-Headers"] = ", ".join(config.expose_headers)
        if config.allow_credentials:
            self.simple_base["Access-Control-Allow-Credentials"] = "true"
        self.preflight_base = {
            "Access-Control-Allow-Methods": ", ".join(sorted(self.methods)),
            "Access-Control-Allow-Headers": ", ".join(config.allow_headers),
            "Access-Control-Max-Age": str(config.max_age_s)}
        if config.allow_credentials:
            self.preflight_base["Access-Control-Allow-Credentials"] = "true"

    def origin_headers(self, origin: str) -> dict[str, str] | None:
        if self.any_origin and not self.config.allow_credentials:
            return {"Access-Control-Allow-Origin": "*"}
        if origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return None


class CorsStep:
    """Chain step, before routing (see the module docstring)."""

    @classmethod
    def when_used(cls, router: Router, routes: Sequence[Route]) -> list[CorsStep]:
        """The step, when some route has `cors:`."""
        return [cls(router)] if any(route.cors is not None for route in routes) else []

    def __init__(self, router: Router) -> None:
        self.router = router
        self._routes: dict[str, _CorsRoute | None] = {}

    def _config(self, method: str, path: str,
                context: MatchContext | None = None) -> tuple[_CorsRoute | None, str, str]:
        try:
            _, decoded = split_path(path)
        except PathError:
            return None, "", ""
        route = self.router.find(method, decoded, context)
        if route is None:
            return None, "", ""
        found = self._routes.get(route.id, False)
        if found is False:
            found = _CorsRoute(route.route.cors) if route.route.cors is not None else None
            self._routes[route.id] = found
        return found, route.id, route.template  # type: ignore[return-value]

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        headers = ex.request.headers
        origin = headers.get("Origin")
        if origin is None:
            return None
        wanted = headers.get("Access-Control-Request-Method")
        preflight = ex.event.http_request_method == "OPTIONS" and wanted is not None
        method = wanted.upper() if preflight and wanted else ex.event.http_request_method
        cors, route_id, template = self._config(method, ex.path,
                                                MatchContext.of(ex.request, ex.query))
        if cors is None:
            return None
        allowed = cors.origin_headers(origin)
        if not preflight:
            if allowed is not None:
                ex.response_headers.update(allowed)
                ex.response_headers.update(cors.simple_base)
            return None
        ex.event.route_id, ex.event.http_route = route_id, template
        asked = {h.strip().lower() for h in headers.get("Access-Control-Request-Headers",
                                                        "").split(",") if h.strip()}
        if allowed is None or method not in cors.methods or not asked <= cors.headers:
            _DENIED_CORS.inc()
            ex.event.error_type = "cors_rejected"
            return auth_problem(403, "cors-rejected", "origin, method or headers not allowed "
                                "by this route's CORS policy", ex.request_id,
                                ex.response_headers)
        response = web.Response(status=204, headers={**ex.response_headers, **allowed,
                                                     **cors.preflight_base})
        if "Vary" not in allowed:
            response.headers["Vary"] = "Origin"
        return response
