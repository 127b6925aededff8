"""The authn chain step: verify the route's accepted credentials and set the principal.

Per route (`routes[].auth`): the methods are tried in their configured order and the first
credential present decides (a bad one is never retried with another method). No credential
-> 401 `missing` (or anonymous when `optional`), a bad one -> 401 with the reason class, the
API-key store unreachable -> 503. The 401 carries one `WWW-Authenticate` challenge per
accepted method (RFC 6750 `Bearer` with `error="invalid_token"` when a token was rejected,
and `ApiKey` naming the header). The event records auth_outcome / auth_reason and, on
success, client_id, tenant, plan and api_key_id. Nothing is logged per request; the outcome
counts go to `apigw_auth_outcomes_total`. With `hide_credentials` the accepted credential
headers (Authorization for jwt, the API-key header and query parameter for api_key) are
removed from what is forwarded upstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote_plus

import orjson
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter

from proxy.auth.apikeys import ApiKeyVerifier
from proxy.auth.config import Auth, RouteAuth
from proxy.auth.jwt import AuthFailure, JwtVerifier
from proxy.deferred_metrics import DeferredCounter
from proxy.identity import Principal

if TYPE_CHECKING:
    from proxy.app import Exchange

AUTH_OUTCOMES = Counter("apigw_auth_outcomes_total", "Authentication outcomes",
                        ["method", "outcome", "reason"])
_SUCCESSES: Final = {method: DeferredCounter(AUTH_OUTCOMES.labels(method, "success", ""))
                     for method in ("jwt", "api_key")}  # one per request: counted deferred
_TITLES: Final = {401: "Authentication required", 403: "Forbidden",
                  503: "Authentication unavailable"}
_MAX_HEADER: Final = 16_384


def auth_problem(status: int, slug: str, detail: str, request_id: str,
                 headers: Mapping[str, str], challenges: Sequence[str] = ()) -> web.Response:
    """An RFC 9457 problem response (same shape as proxy.problem) with any challenges."""
    body = orjson.dumps({"type": f"urn:apigw:problem:{slug}", "title": _TITLES[status],
                         "status": status, "detail": detail, "instance": request_id})
    out: CIMultiDict[str] = CIMultiDict(headers)
    out["X-Request-Id"] = request_id
    for challenge in challenges:
        out.add("WWW-Authenticate", challenge)
    if status == 503:
        out["Retry-After"] = "1"
    return web.Response(status=status, body=body, content_type="application/problem+json",
                        headers=out)


class _Route:
    __slots__ = ("allowed_issuers", "config", "methods")

    def __init__(self, config: RouteAuth) -> None:
        self.config = config
        self.methods = tuple(config.methods)
        self.allowed_issuers = frozenset(config.issuers) if config.issuers is not None else None


class AuthnStep:
    """Chain step (see the module docstring)."""

    def __init__(self, config: Auth, jwt_verifier: JwtVerifier,
                 api_keys: ApiKeyVerifier) -> None:
        self.config = config
        self.jwt = jwt_verifier
        self.api_keys = api_keys
        self.realm = config.realm
        self._header = config.api_keys.header
        self._query = config.api_keys.query_param
        self._routes: dict[str, _Route | None] = {}

    async def start(self) -> None:
        await self.jwt.start()
        await self.api_keys.start()

    async def stop(self) -> None:
        await self.jwt.stop()
        await self.api_keys.stop()

    def _route(self, route_id: str, config: RouteAuth | None) -> _Route | None:
        found = self._routes.get(route_id, False)
        if found is False:
            found = _Route(config) if config is not None else None
            self._routes[route_id] = found
        return found  # type: ignore[return-value]

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route = ex.route
        assert route is not None
        spec = self._route(route.id, route.route.auth)
        if spec is None:
            return None
        event = ex.event
        method = ""
        try:
            method, credential = self._credential(ex, spec)
            if not method:
                if spec.config.optional:
                    return None
                raise AuthFailure("missing", "credentials required")
            principal = (await self.jwt.verify(credential, spec.allowed_issuers)
                         if method == "jwt" else await self.api_keys.verify(credential))
        except AuthFailure as failure:
            event.auth_outcome = "failure"
            event.auth_reason = failure.reason
            AUTH_OUTCOMES.labels(method or "none", "failure", failure.reason).inc()
            return self._reject(ex, spec, method, failure)
        assert ex.caller is not None
        ex.caller.authenticate(principal)
        _record(ex, principal)
        _SUCCESSES[method].inc()
        if spec.config.hide_credentials:
            self._hide(ex, spec)
        return None

    def _hide(self, ex: Exchange, spec: _Route) -> None:
        """`hide_credentials`: the upstream gets no credential of the route's methods."""
        drop = set()
        if "jwt" in spec.methods:
            drop.add("authorization")
        if "api_key" in spec.methods:
            drop.add(self._header.lower())
            if self._query and ex.query:
                ex.query = _without_param(ex.query, self._query)
        headers = ex.request.headers
        if any(name in headers for name in drop):
            kept: CIMultiDict[str] = CIMultiDict(
                (name, value) for name, value in headers.items() if name.lower() not in drop)
            ex.request = ex.request.clone(headers=kept)  # the body is not read yet

    def _credential(self, ex: Exchange, spec: _Route) -> tuple[str, str]:
        """(method, credential) of the first accepted method whose credential is present."""
        headers = ex.request.headers
        for method in spec.methods:
            if method == "jwt":
                values = headers.getall("Authorization", ())
                if not values:
                    continue
                if len(values) > 1:
                    raise AuthFailure("malformed", "several Authorization headers")
                value = values[0]
                if len(value) > _MAX_HEADER:
                    raise AuthFailure("malformed", "Authorization header too large")
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() != "bearer":
                    if "api_key" in spec.methods:
                        continue
                    raise AuthFailure("malformed", "expected a Bearer token")
                token = token.strip()
                if not token:
                    raise AuthFailure("malformed", "empty Bearer token")
                return "jwt", token
            values = headers.getall(self._header, ())
            if len(values) > 1:
                raise AuthFailure("malformed", f"several {self._header} headers")
            if not values and self._query and ex.query:
                values = ex.request.query.getall(self._query, ())
                if len(values) > 1:
                    raise AuthFailure("malformed", "several API keys in the query")
            if values:
                if len(values[0]) > _MAX_HEADER:
                    raise AuthFailure("malformed", "API key too large")
                return "api_key", values[0].strip()
        return "", ""

    def _reject(self, ex: Exchange, spec: _Route, method: str,
                failure: AuthFailure) -> web.Response:
        if failure.reason == "unavailable":
            return auth_problem(503, "auth-unavailable", failure.detail, ex.request_id,
                                ex.response_headers)
        challenges = []
        for accepted in spec.methods:
            if accepted == "jwt":
                challenge = f'Bearer realm="{self.realm}"'
                if method == "jwt":
                    challenge += f', error="invalid_token", error_description="{failure.detail}"'
                challenges.append(challenge)
            else:
                challenges.append(f'ApiKey realm="{self.realm}", header="{self._header}"')
        return auth_problem(401, "unauthorized", failure.detail, ex.request_id,
                            ex.response_headers, challenges)


def _without_param(query: str, name: str) -> str:
    """The raw query string without any `name=` parameter (names compared decoded)."""
    kept = [part for part in query.split("&")
            if unquote_plus(part.partition("=")[0]) != name]
    return "&".join(kept)


def _record(ex: Exchange, principal: Principal) -> None:
    event = ex.event
    event.auth_outcome = "success"
    event.auth_reason = ""
    event.client_id = principal.client_id
    event.tenant = principal.tenant
    event.plan = principal.plan
    event.api_key_id = principal.api_key_id
