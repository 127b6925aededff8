"""Rate limiting: GCRA, sliding window and quotas in Redis (atomic scripts, one key per
check), the same in process, hybrid reservations, and failover.

GCRA semantics (both backends, see docs/policies.md): emission interval T = window_s / limit.
A fresh key may send `burst` requests at once; after that one request per T is allowed, so
the sustained rate is `limit` per `window_s`. Over any interval of length d a key gets at most
burst + floor(d / T) requests. A denied request is told exactly when it would be allowed
(retry_after) and when the key is back to a full burst (reset_after).

Sliding window counter: allowed while previous * (1 - elapsed / window) + current + cost
<= limit, where current/previous are the counts of the fixed window containing now and of
the one before. Quotas (policy.quota_period): a plain counter per calendar period (UTC day or
month), the period label being part of the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from proxy.deferred_metrics import DeferredCounter
from proxy.degrade import DegradeGate
from proxy.policy import Algorithm, Policy, QuotaPeriod, RedisKeys
from proxy.redis_lane import LaneScript, RedisLane

log = logging.getLogger(__name__)

GCRA_SCRIPT: Final = (Path(__file__).with_name("ratelimit_gcra.lua")).read_text(encoding="utf-8")
SLIDING_SCRIPT: Final = (Path(__file__).with_name("ratelimit_sliding.lua")
                         ).read_text(encoding="utf-8")
QUOTA_SCRIPT: Final = (Path(__file__).with_name("ratelimit_quota.lua")).read_text(encoding="utf-8")
_KEY_MAX: Final = 128  # longer client keys are hashed so state keys stay small
_QUOTA_GRACE_S: Final = 3600  # counters outlive their period by this much (clock skew)
_ARGS_MEMO_MAX: Final = 10_000  # policies whose script arguments are kept computed
_V = TypeVar("_V")

BACKEND_ERRORS = Counter("apigw_ratelimit_backend_errors_total",
                         "Rate-limit checks whose Redis call failed or timed out")
DEGRADED = Gauge("apigw_ratelimit_degraded",
                 "1 while rate limiting runs on the local fallback (Redis unavailable)")
CHECKS = Counter("apigw_ratelimit_checks_total", "Rate-limit checks",
                 ["backend", "outcome"])
HYBRID_LOCAL = Counter("apigw_ratelimit_hybrid_local_total",
                       "Hybrid checks answered from locally reserved tokens or a remembered "
                       "denial, without a Redis round trip", ["outcome"])
_HYBRID_COUNTERS: Final = {True: DeferredCounter(HYBRID_LOCAL.labels("allowed")),
                           False: DeferredCounter(HYBRID_LOCAL.labels("limited"))}
_CHECK_COUNTERS: Final = {(backend, allowed): DeferredCounter(CHECKS.labels(backend, outcome))
                          for backend in ("redis", "local")
                          for allowed, outcome in ((True, "allowed"), (False, "limited"))}


@dataclass(slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float  # 0 when allowed; else seconds until this request would be allowed
    reset_after_s: float  # seconds until the key has its full burst again
    backend: str  # "redis" | "local"


class RateLimitUnavailable(Exception):
    """The Redis backend is unreachable and the fail mode is closed."""


class RateLimiter(Protocol):
    async def check(self, policy: Policy, key: str, cost: int = 1) -> Decision: ...

    async def close(self) -> None: ...


def state_key(key: str) -> str:
    """The client key as it appears in state keys: long ones hashed, so size is bounded."""
    if len(key) <= _KEY_MAX:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _burst(policy: Policy) -> int:
    return policy.burst if policy.burst is not None else policy.limit


class QuotaPeriods:
    """The current calendar period (UTC) of a quota: its label and end, memoised."""

    def __init__(self) -> None:
        self._memo: dict[QuotaPeriod, tuple[float, float, str]] = {}

    def current(self, period: QuotaPeriod, now: float) -> tuple[str, float]:
        """(label, end as epoch seconds) of the period containing `now`."""
        memo = self._memo.get(period)
        if memo is not None and memo[0] <= now < memo[1]:
            return memo[2], memo[1]
        moment = datetime.fromtimestamp(now, UTC)
        if period is QuotaPeriod.DAY:
            start = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
            end = start + timedelta(days=1)
            label = start.strftime("%Y-%m-%d")
        else:
            start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
            end = (start + timedelta(days=32)).replace(day=1)
            label = start.strftime("%Y-%m")
        self._memo[period] = (start.timestamp(), end.timestamp(), label)
        return label, end.timestamp()


class RedisRateLimiter:
    """GCRA, sliding window and quota as Lua scripts on one key each; the clock of GCRA and
    sliding window is the Redis server's (TIME), quota periods follow the proxy's clock."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._keys = keys
        self._lane = RedisLane(redis)  # one pipelined connection (proxy/redis_lane.py)
        self._script = LaneScript(GCRA_SCRIPT)
        self._sliding = LaneScript(SLIDING_SCRIPT)
        self._quota = LaneScript(QUOTA_SCRIPT)
        self._periods = QuotaPeriods()
        self._gcra: dict[tuple[str, int], tuple[str, int, Policy]] = {}

    async def close(self) -> None:
        await self._lane.close()

    async def check(self, policy: Policy, key: str, cost: int = 1,
                    timeout_s: float | None = None) -> Decision:
        """One check; with `timeout_s`, LaneTimeout when Redis has not answered by then."""
        if policy.quota_period is not None:
            return await self._check_quota(policy, policy.quota_period, key, cost, timeout_s)
        redis_key = self._keys.ratelimit(policy.id, policy.version, state_key(key))
        reply: Any
        if policy.algorithm is Algorithm.SLIDING_WINDOW:
            reply = await self._lane.run(self._sliding, [redis_key], [
                round(policy.window_s * 1_000_000), policy.limit, cost], timeout_s)
        else:
            interval, burst = self._gcra_args(policy)
            reply = await self._lane.run(self._script, [redis_key], [interval, burst, cost],
                                         timeout_s)
        allowed, remaining, retry_us, reset_us = map(int, reply)
        decision = Decision(allowed=allowed == 1, limit=policy.limit, remaining=remaining,
                            retry_after_s=retry_us / 1e6, reset_after_s=reset_us / 1e6,
                            backend="redis")
        _CHECK_COUNTERS["redis", decision.allowed].inc()
        return decision

    def _gcra_args(self, policy: Policy) -> tuple[str, int]:
        """The GCRA script's emission interval (µs, as text) and burst, once per policy."""
        slot = (policy.id, policy.version)
        args = self._gcra.get(slot)
        if args is None or args[2] is not policy:
            args = (repr(policy.window_s * 1_000_000 / policy.limit), _burst(policy), policy)
            if len(self._gcra) >= _ARGS_MEMO_MAX:
                self._gcra.clear()
            self._gcra[slot] = args
        return args[0], args[1]

    async def _check_quota(self, policy: Policy, period: QuotaPeriod, key: str,
                           cost: int, timeout_s: float | None) -> Decision:
        now = time.time()
        label, end = self._periods.current(period, now)
        redis_key = self._keys.quota(policy.id, policy.version, state_key(key), label)
        expire_at_ms = int((end + _QUOTA_GRACE_S) * 1000)
        reply: Any = await self._lane.run(self._quota, [redis_key],
                                          [policy.limit, cost, expire_at_ms], timeout_s)
        allowed, remaining = map(int, reply)
        left = max(0.0, end - now)
        decision = Decision(allowed == 1, policy.limit, remaining,
                            0.0 if allowed == 1 else left, left, "redis")
        _CHECK_COUNTERS["redis", decision.allowed].inc()
        return decision


class LocalRateLimiter:
    """The same GCRA in process memory (per worker), with limits divided by `divisor`.

    Used as the fail-open fallback: with `divisor` = expected replicas, the fleet as a whole
    stays close to the configured limit. At most `max_keys` keys are kept (least recently
    used evicted first; an evicted key starts over with a full burst).
    """

    def __init__(self, divisor: int = 1, max_keys: int = 100_000) -> None:
        if divisor < 1 or max_keys < 1:
            raise ValueError("divisor and max_keys must be at least 1")
        self.divisor = divisor
        self.max_keys = max_keys
        self._state: OrderedDict[tuple[str, int, str], tuple[float, int]] = OrderedDict()
        self._windows: OrderedDict[tuple[str, int, str], tuple[int, int, int]] = OrderedDict()
        self._quotas: OrderedDict[tuple[str, int, str], tuple[str, int]] = OrderedDict()
        self._periods = QuotaPeriods()

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._state) + len(self._windows) + len(self._quotas)

    def _keep(self, table: OrderedDict[tuple[str, int, str], _V], slot: tuple[str, int, str],
              value: _V) -> None:
        table[slot] = value
        table.move_to_end(slot)
        while len(table) > self.max_keys:
            table.popitem(last=False)

    def limits(self, policy: Policy) -> tuple[int, int, float]:
        """(limit, burst, interval_s) this limiter applies for `policy`."""
        limit = max(1, policy.limit // self.divisor)
        burst = max(1, _burst(policy) // self.divisor)
        return limit, burst, policy.window_s / limit

    async def check(self, policy: Policy, key: str, cost: int = 1) -> Decision:
        return self.check_now(policy, key, cost)

    def check_now(self, policy: Policy, key: str, cost: int = 1,
                  now: float | None = None) -> Decision:
        """One check; `now` is monotonic seconds (epoch seconds for quotas)."""
        if policy.quota_period is not None:
            return self._check_quota(policy, policy.quota_period, key, cost, now)
        if policy.algorithm is Algorithm.SLIDING_WINDOW:
            return self._check_window(policy, key, cost, now)
        limit, burst, interval = self.limits(policy)
        at = time.monotonic() if now is None else now
        slot = (policy.id, policy.version, state_key(key))
        base, count = self._state.get(slot, (at, 0))
        ahead = (base - at) + count * interval
        if ahead < 0:
            base, count, ahead = at, 0, 0.0
        capacity = burst * interval
        after = ahead + cost * interval
        if after <= capacity:
            self._keep(self._state, slot, (base, count + cost))
            decision = Decision(True, limit, math.floor((capacity - after) / interval + 1e-9),
                                0.0, after, "local")
        else:
            decision = Decision(False, limit,
                                max(0, math.floor((capacity - ahead) / interval + 1e-9)),
                                after - capacity, ahead, "local")
        _CHECK_COUNTERS["local", decision.allowed].inc()
        return decision

    def _check_window(self, policy: Policy, key: str, cost: int, now: float | None) -> Decision:
        limit = max(1, policy.limit // self.divisor)
        window = policy.window_s
        at = time.monotonic() if now is None else now
        index = math.floor(at / window)
        elapsed = at - index * window
        slot = (policy.id, policy.version, state_key(key))
        current, previous = 0, 0
        stored = self._windows.get(slot)
        if stored is not None:
            if stored[0] == index:
                current, previous = stored[1], stored[2]
            elif stored[0] == index - 1:
                previous = stored[1]
        estimate = previous * (window - elapsed) / window + current
        if estimate + cost <= limit:
            self._keep(self._windows, slot, (index, current + cost, previous))
            decision = Decision(True, limit, math.floor(limit - estimate - cost + 1e-9), 0.0,
                                2 * window - elapsed, "local")
        else:
            room = limit - current - cost
            if room >= 0 and previous > 0:
                retry = window * (1 - room / previous) - elapsed
            elif cost <= limit and current > 0:
                retry = (window - elapsed) + max(0.0, window * (1 - (limit - cost) / current))
            else:
                retry = window - elapsed
            reset = (window - elapsed) + (window if current > 0 else 0.0)
            decision = Decision(False, limit, max(0, math.floor(limit - estimate + 1e-9)),
                                max(retry, 1e-6), reset, "local")
        _CHECK_COUNTERS["local", decision.allowed].inc()
        return decision

    def _check_quota(self, policy: Policy, period: QuotaPeriod, key: str, cost: int,
                     now: float | None) -> Decision:
        limit = max(1, policy.limit // self.divisor)
        at = time.time() if now is None else now
        label, end = self._periods.current(period, at)
        slot = (policy.id, policy.version, state_key(key))
        stored = self._quotas.get(slot)
        used = stored[1] if stored is not None and stored[0] == label else 0
        left = max(0.0, end - at)
        if used + cost <= limit:
            used += cost
            self._keep(self._quotas, slot, (label, used))
            decision = Decision(True, limit, limit - used, 0.0, left, "local")
        else:
            decision = Decision(False, limit, max(0, limit - used), left, left, "local")
        _CHECK_COUNTERS["local", decision.allowed].inc()
        return decision


@dataclass(slots=True)
class _Held:
    tokens: int  # reserved in Redis, not used yet
    lease_until: float  # monotonic; unused tokens are given up after this
    deny_until: float  # monotonic; Redis said no token exists before this
    denied_cost: int
    remaining: int  # Redis's remaining at the last reservation (informational)
    reset_at: float


class HybridRateLimiter:
    """Tokens reserved from Redis in batches and spent locally, so a busy key costs one Redis
    round trip per `batch` requests instead of one per request.

    A reservation is a normal GCRA check with cost = batch (falling back to the exact cost
    when the batch does not fit), so reserved tokens come out of the shared budget and the
    fleet never admits more than the Redis limiter would have admitted by the time of
    reservation. Accuracy bound: tokens reserved but not used yet are invisible to other
    workers, so at any moment the fleet may under-admit by at most workers x (batch - 1)
    requests, and a reserved token may be used up to `lease_s` after it was counted.
    A denial is remembered until its retry_after, so a client hammering a limited key costs
    no Redis round trips either. Concurrent requests for one key share one reservation.

    Refill ahead: once a check leaves at most half a batch held, a top-up of (batch - held)
    is reserved in the background, so a busy key's requests rarely wait on Redis. It never
    holds more than a batch (the bound above stands). A failed or refused top-up changes
    nothing: the held tokens are spent and the next check reserves in the foreground,
    through the failover limiter's timeout and degraded mode.
    """

    def __init__(self, redis_limiter: RateLimiter, batch: int = 10, lease_s: float = 1.0,
                 max_keys: int = 100_000, refill_timeout_s: float = 0.25) -> None:
        if batch < 1 or lease_s <= 0 or max_keys < 1 or refill_timeout_s <= 0:
            raise ValueError("batch and max_keys must be at least 1, lease_s and "
                             "refill_timeout_s positive")
        self._redis = redis_limiter
        self.batch = batch
        self.lease_s = lease_s
        self.max_keys = max_keys
        self.refill_timeout_s = refill_timeout_s
        self._held: OrderedDict[tuple[str, int, str], _Held] = OrderedDict()
        self._pending: dict[tuple[str, int, str], asyncio.Future[None]] = {}
        self._refills: set[asyncio.Task[None]] = set()

    def batch_for(self, policy: Policy) -> int:
        """Reservation size: at most a quarter of the burst, so small limits stay exact."""
        return max(1, min(self.batch, _burst(policy) // 4))

    async def close(self) -> None:
        for task in list(self._refills):
            task.cancel()
        await asyncio.gather(*self._refills, return_exceptions=True)
        await self._redis.close()

    def held_tokens(self, policy: Policy, key: str) -> int:
        """Tokens this worker holds for the key (0 when none)."""
        held = self._held.get((policy.id, policy.version, state_key(key)))
        return held.tokens if held is not None else 0

    def check_held(self, policy: Policy, key: str, cost: int = 1) -> Decision | None:
        """The answer from tokens or a denial already held, without touching Redis; None when
        a reservation (or a quota, never reserved) needs Redis."""
        if policy.quota_period is not None:
            return None
        return self._local((policy.id, policy.version, state_key(key)), policy, key, cost)

    async def check(self, policy: Policy, key: str, cost: int = 1) -> Decision:
        if policy.quota_period is not None:  # reserved quota would be lost for the period
            return await self._redis.check(policy, key, cost)
        slot = (policy.id, policy.version, state_key(key))
        while True:  # each pass either finds tokens, a denial, or starts a reservation
            local = self._local(slot, policy, key, cost)
            if local is not None:
                return local
            pending = self._pending.get(slot)
            if pending is None:
                return await self._reserve(slot, policy, key, cost)
            await asyncio.shield(pending)  # someone is reserving for this key: share it

    def _local(self, slot: tuple[str, int, str], policy: Policy, key: str,
               cost: int) -> Decision | None:
        held = self._held.get(slot)
        if held is None:
            return None
        now = time.monotonic()
        if now < held.deny_until and cost >= held.denied_cost:
            _HYBRID_COUNTERS[False].inc()
            return Decision(False, policy.limit, 0, held.deny_until - now,
                            max(0.0, held.reset_at - now), "redis")
        if held.tokens >= cost and now < held.lease_until:
            held.tokens -= cost
            _HYBRID_COUNTERS[True].inc()
            self._refill_ahead(slot, policy, key)
            return Decision(True, policy.limit, held.remaining + held.tokens, 0.0,
                            max(0.0, held.reset_at - now), "redis")
        return None

    def _refill_ahead(self, slot: tuple[str, int, str], policy: Policy, key: str) -> None:
        held = self._held.get(slot)
        if held is None or slot in self._pending:
            return
        batch = self.batch_for(policy)
        if batch < 2 or held.tokens * 2 > batch:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending[slot] = future
        task = loop.create_task(
            self._top_up(slot, policy, key, batch - held.tokens, future))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _top_up(self, slot: tuple[str, int, str], policy: Policy, key: str, size: int,
                      future: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self.refill_timeout_s):
                decision = await self._redis.check(policy, key, size)
            held = self._held.get(slot)
            now = time.monotonic()
            if decision.allowed and held is not None and now < held.lease_until:
                held.tokens += size
                held.lease_until = now + self.lease_s
                held.remaining = decision.remaining
                held.reset_at = now + decision.reset_after_s
                self._held.move_to_end(slot)
        except Exception as exc:  # the foreground path retries with failover; only count it
            BACKEND_ERRORS.inc()
            log.debug("hybrid refill failed", extra={"policy": policy.id,
                                                     "error": type(exc).__name__})
        finally:
            del self._pending[slot]
            future.set_result(None)

    async def _reserve(self, slot: tuple[str, int, str], policy: Policy, key: str,
                       cost: int) -> Decision:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[slot] = future
        try:
            batch = max(cost, self.batch_for(policy))
            decision = await self._redis.check(policy, key, batch)
            taken = batch
            if not decision.allowed and batch > cost:
                decision = await self._redis.check(policy, key, cost)
                taken = cost
            now = time.monotonic()
            held = self._held.get(slot)
            if held is None or now >= held.lease_until:
                held = _Held(0, 0.0, 0.0, 0, 0, 0.0)
            if decision.allowed:
                held.tokens += taken - cost
                held.lease_until = now + self.lease_s
                held.deny_until = 0.0
            else:
                held.deny_until = now + decision.retry_after_s
                held.denied_cost = cost
            held.remaining = decision.remaining
            held.reset_at = now + decision.reset_after_s
            self._held[slot] = held
            self._held.move_to_end(slot)
            while len(self._held) > self.max_keys:
                self._held.popitem(last=False)
            if decision.allowed:
                decision.remaining += held.tokens
            return decision
        finally:
            del self._pending[slot]
            future.set_result(None)


class FailoverRateLimiter:
    """Redis first; on an error or timeout, the local limiter (open) or RateLimitUnavailable
    (closed) - the policy's own `fail_mode` when set, else this limiter's. After a failure
    Redis is not tried again for a backoff (1 s doubling to 10 s),
    then one probe decides; a success ends the degraded state."""

    def __init__(self, redis_limiter: RateLimiter, local_limiter: LocalRateLimiter,
                 fail_mode: Literal["open", "closed"] = "open", timeout_s: float = 0.25,
                 *, min_backoff_s: float = 1.0, max_backoff_s: float = 10.0) -> None:
        self._redis = redis_limiter
        self._held: Callable[[Policy, str, int], Decision | None] | None = (
            redis_limiter.check_held if isinstance(redis_limiter, HybridRateLimiter) else None)
        # the Redis limiter bounds its own calls (the lane's deadlines): no timer per check
        self._bounded = redis_limiter if isinstance(redis_limiter, RedisRateLimiter) else None
        self._local = local_limiter
        self.fail_mode = fail_mode
        self.timeout_s = timeout_s
        self._gate = DegradeGate(DEGRADED, log, "rate limiting degraded: Redis unavailable",
                                 "rate limiting recovered: Redis reachable again",
                                 min_backoff_s=min_backoff_s, max_backoff_s=max_backoff_s,
                                 log_extra={"fail_mode": fail_mode})

    @property
    def degraded(self) -> bool:
        return self._gate.degraded

    async def close(self) -> None:
        await self._redis.close()

    @property
    def last_error(self) -> str:
        return self._gate.last_error

    async def check(self, policy: Policy, key: str, cost: int = 1) -> Decision:
        gate = self._gate
        degraded = gate.degraded  # the gate's calls below are no-ops unless degraded (degrade.py)
        if degraded and gate.skipping():
            return self._fallback(policy, key, cost)
        if self._held is not None and not degraded:  # hybrid: most checks end here
            held = self._held(policy, key, cost)
            if held is not None:
                return held
        probing = degraded and gate.begin()
        bounded = self._bounded
        try:
            if bounded is not None:
                decision = await bounded.check(policy, key, cost, self.timeout_s)
            else:
                async with asyncio.timeout(self.timeout_s):
                    decision = await self._redis.check(policy, key, cost)
        except Exception as exc:  # Redis, network, timeout, or a bad reply: same remedy
            BACKEND_ERRORS.inc()
            gate.failed(exc, probing)
            return self._fallback(policy, key, cost)
        if gate.degraded:
            gate.succeeded()
        return decision

    def _fallback(self, policy: Policy, key: str, cost: int) -> Decision:
        if (policy.fail_mode or self.fail_mode) == "closed":
            raise RateLimitUnavailable(f"rate-limit backend unavailable: {self.last_error}")
        return self._local.check_now(policy, key, cost)
