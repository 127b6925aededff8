"""The rate-limit chain step: the most specific rate policy and the most specific quota for
(route, method, tenant, plan, key) decide; and the limiter stack for the configured backend.

For each of the two (when one applies): enforce + over limit -> 429 with Retry-After, the
IETF RateLimit-Policy / RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10; one list
item per policy checked) and optionally legacy X-RateLimit-*; shadow + over limit ->
forwarded, recorded as shadow_limited; Redis down -> the policy's fail mode (open: local
limiter; closed: 503). An unexpected limiter error lets the request through.

Tenants are isolated: the state key of a request with a tenant is prefixed by the tenant, so
one tenant's clients never spend another tenant's budget even under the same key_by.

Two phases (two chain steps over the same policies and limiter): `PreAuthRateLimitStep` runs
before authentication and checks only policies keyed by `ip` alone with no tenant or plan
(`policy_store.is_pre_auth`), so a client whose every request fails authentication is still
limited, and a limited address gets its 429 before its credentials are checked.
`RateLimitStep` runs after authentication with the usual selection; a policy the pre-auth
phase already checked for this request is not checked (or counted) again. The RateLimit
fields list the policies of both phases.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import TYPE_CHECKING, Final

from aiohttp import web

from proxy.config import RateLimit
from proxy.policy import Mode, Policy, RedisKeys
from proxy.policy_store import PolicyCache, Selected
from proxy.problem import problem_response
from proxy.ratelimit import (
    Decision,
    FailoverRateLimiter,
    HybridRateLimiter,
    LocalRateLimiter,
    RateLimiter,
    RateLimitUnavailable,
    RedisRateLimiter,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from proxy.app import Exchange

log = logging.getLogger(__name__)

_TENANT_SEP: Final = "\x1f"
_MODE_TEXT: Final = {mode: mode.value for mode in Mode}  # plain str for the event


def build_limiter(config: RateLimit, redis: aioredis.Redis, keys: RedisKeys, *, workers: int,
                  timeout_s: float) -> FailoverRateLimiter:
    """The limiter stack of one worker for `ratelimit.backend` (redis, hybrid or local)."""
    local = LocalRateLimiter(divisor=config.expected_replicas * workers)
    primary: RateLimiter
    if config.backend == "local":
        primary = local
    elif config.backend == "hybrid":
        primary = HybridRateLimiter(RedisRateLimiter(redis, keys), batch=config.hybrid_batch,
                                    refill_timeout_s=timeout_s)
    else:
        primary = RedisRateLimiter(redis, keys)
    return FailoverRateLimiter(primary, local, fail_mode=config.fail_mode, timeout_s=timeout_s)


def ratelimit_headers(policy_id: str, limit: int, window_s: float, remaining: int,
                      reset_s: float) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers-10 fields for one policy."""
    return {"RateLimit-Policy": policy_item(policy_id, limit, window_s),
            "RateLimit": state_item(policy_id, remaining, reset_s)}


@functools.lru_cache(maxsize=4096)
def policy_item(policy_id: str, limit: int, window_s: float) -> str:
    """The RateLimit-Policy item of one policy (the same for every request it checks)."""
    return f'"{policy_id}";q={limit};w={max(1, math.ceil(window_s))}'


def state_item(policy_id: str, remaining: int, reset_s: float) -> str:
    return f'"{policy_id}";r={max(0, remaining)};t={max(0, math.ceil(reset_s))}'


def _window_of(policy: Policy) -> float:
    if policy.quota_period is not None:  # the calendar period's length, not window_s
        return 86_400.0 if policy.quota_period == "day" else 86_400.0 * 30
    return policy.window_s


class RateLimitChecks:
    """What the rate-limit phases of one request checked: the ids (never checked twice) and
    the enforced checks with their decisions (the RateLimit fields)."""

    __slots__ = ("enforced", "ids")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.enforced: list[tuple[Policy, Decision]] = []


class _Limiting:
    """What both phases share: the check of one policy, and the response fields."""

    def __init__(self, policies: PolicyCache, limiter: RateLimiter, *,
                 legacy_headers: bool = False) -> None:
        self.policies = policies
        self.limiter = limiter
        self.legacy_headers = legacy_headers
        self._last_error_log = 0.0

    async def _check_selected(self, ex: Exchange, selections: tuple[Selected | None, ...],
                              tenant: str) -> web.StreamResponse | None:
        checks = ex.ratelimit_checks
        if checks is None:
            checks = ex.ratelimit_checks = RateLimitChecks()
        response: web.StreamResponse | None = None
        for selected in selections:
            if selected is None:
                continue
            policy, key = selected
            if policy.id in checks.ids:
                continue
            checks.ids.add(policy.id)
            if tenant:
                key = tenant + _TENANT_SEP + key
            response = await self._check(ex, policy, key, checks.enforced)
            if response is not None:
                break
        return self._finish(ex, checks.enforced, response)

    async def _check(self, ex: Exchange, policy: Policy, key: str,
                     checked: list[tuple[Policy, Decision]]) -> web.StreamResponse | None:
        event = ex.event
        first = event.ratelimit_policy_id == ""
        if first:
            event.ratelimit_policy_id = policy.id
            event.ratelimit_mode = _MODE_TEXT[policy.mode]
        try:
            decision = await self.limiter.check(policy, key)
        except RateLimitUnavailable:
            event.ratelimit_policy_id, event.ratelimit_mode = policy.id, _MODE_TEXT[policy.mode]
            event.ratelimit_outcome = "error"
            event.error_type = "ratelimit_unavailable"
            return problem_response("rate-limit-unavailable",
                                    "rate limiting is unavailable and fails closed",
                                    ex.request_id,
                                    headers={**ex.response_headers, "Retry-After": "1"})
        except Exception as exc:  # a limiter bug must not take traffic down: fail open
            if event.ratelimit_outcome == "none":
                event.ratelimit_outcome = "error"
            now = time.monotonic()
            if now - self._last_error_log > 10.0:
                self._last_error_log = now
                log.warning("rate-limit check failed; request allowed",
                            extra={"policy_id": policy.id, "error": repr(exc)[:200]})
            return None
        if decision.allowed:
            if event.ratelimit_outcome in ("none", "error"):
                event.ratelimit_outcome = "allowed"
        elif policy.mode is Mode.SHADOW:
            if event.ratelimit_outcome != "limited":
                event.ratelimit_policy_id, event.ratelimit_mode = policy.id, _MODE_TEXT[policy.mode]
                event.ratelimit_outcome = "shadow_limited"
            return None
        else:
            event.ratelimit_policy_id, event.ratelimit_mode = policy.id, _MODE_TEXT[policy.mode]
            event.ratelimit_outcome = "limited"
        if policy.mode is not Mode.ENFORCE:
            return None
        checked.append((policy, decision))
        if decision.allowed:
            return None
        retry_after = max(1, math.ceil(decision.retry_after_s))
        what = (f"quota of {policy.limit} requests per {policy.quota_period}"
                if policy.quota_period is not None
                else f"limit of {policy.limit} requests per {policy.window_s:g}s")
        return problem_response(
            "rate-limited", f"{what} exceeded; retry after {retry_after}s", ex.request_id,
            headers={"Retry-After": str(retry_after)}, extra={"policy": policy.id})

    def _finish(self, ex: Exchange, checked: list[tuple[Policy, Decision]],
                response: web.StreamResponse | None) -> web.StreamResponse | None:
        if checked:
            headers = ex.response_headers
            if len(checked) == 1:  # the usual case: one policy, no list to join
                (policy, decision), = checked
                headers["RateLimit-Policy"] = policy_item(policy.id, decision.limit,
                                                          _window_of(policy))
                headers["RateLimit"] = state_item(policy.id, decision.remaining,
                                                  decision.reset_after_s)
            else:
                headers["RateLimit-Policy"] = ", ".join(
                    policy_item(p.id, d.limit, _window_of(p)) for p, d in checked)
                headers["RateLimit"] = ", ".join(
                    state_item(p.id, d.remaining, d.reset_after_s) for p, d in checked)
            if self.legacy_headers:
                _, tightest = min(checked, key=lambda pd: pd[1].remaining)
                headers["X-RateLimit-Limit"] = str(tightest.limit)
                headers["X-RateLimit-Remaining"] = str(max(0, tightest.remaining))
                headers["X-RateLimit-Reset"] = str(max(0, math.ceil(tightest.reset_after_s)))
        if response is not None:
            for name, value in ex.response_headers.items():
                if name not in response.headers:
                    response.headers[name] = value
        return response


class PreAuthRateLimitStep(_Limiting):
    """Chain step before authentication: the policies keyed by the client address alone."""

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route, caller = ex.route, ex.caller
        assert route is not None
        assert caller is not None
        selections = self.policies.select_both(route.id, ex.event.http_request_method, "",
                                               caller.key_of, pre_auth=True)
        if selections[0] is None and selections[1] is None:
            return None
        return await self._check_selected(ex, selections, "")


class RateLimitStep(_Limiting):
    """Chain step after authentication (see the module docstring)."""

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route, caller = ex.route, ex.caller
        assert route is not None
        assert caller is not None
        tenant = caller.tenant
        selections = self.policies.select_both(route.id, ex.event.http_request_method, tenant,
                                               caller.key_of, caller.plan)
        if selections[0] is None and selections[1] is None:
            return None
        return await self._check_selected(ex, selections, tenant)
