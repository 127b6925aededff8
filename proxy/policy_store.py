"""Policies in Redis: the versioned, audited store, and the per-worker cache the proxy reads.

`PolicyStore` is what writers use (config seeding, operators, the analytics job). Every change
is one MULTI/EXEC transaction guarded by WATCH: the hash field, the history list, the global
version counter, an audit record and a pub/sub notification move together.

`PolicyCache` is what the proxy reads on every request. It holds the effective policies in
memory, learns about changes by pub/sub with a poll of the version counter as a safety net,
and never raises into the request path. See docs/policies.md.

Readers trust nothing they find in Redis: a record that is not a valid policy, is larger than
`MAX_RECORD_BYTES` (only its size is fetched) or claims an id other than its hash field is
skipped - counted in apigw_policy_invalid_records_total, logged once without its content - and
the last good version of that id keeps applying (tests/test_hostile_policies.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError, WatchError

from proxy.policy import Mode, Policy, RedisKeys, Source

log = logging.getLogger(__name__)

HISTORY_MAX: Final = 100  # versions kept per policy
AUDIT_MAXLEN: Final = 100_000  # approximate bound on the audit stream
_WRITE_ATTEMPTS: Final = 200  # optimistic-lock retries before giving up
_INDEX_MAX: Final = 50_000  # (route, method, tenant) combinations memoised by the cache
_IGNORED_ON_COMPARE: Final = frozenset({"version", "updated_at", "updated_by", "reason"})
MAX_RECORD_BYTES: Final = 64 * 1024  # a policy is a few hundred bytes; larger ones are refused
_REPORTED_MAX: Final = 10_000  # distinct bad records remembered so each is logged once
_SHOWN_CHARS: Final = 100  # of a (hostile) hash field name in a log line
_PROBLEM_CHARS: Final = 300
# One consistent read of the version counter and every current record, where a record larger
# than ARGV[1] is answered by its size only: a hostile 10 MB record must not cross the network
# on every reload of every worker. Reply: version, then field, value-or-size pairs.
_SNAPSHOT_LUA: Final = """
local reply = {redis.call('GET', KEYS[1]) or '0'}
local limit = tonumber(ARGV[1])
for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
  reply[#reply + 1] = field
  local size = redis.call('HSTRLEN', KEYS[2], field)
  if size > limit then
    reply[#reply + 1] = size
  else
    reply[#reply + 1] = redis.call('HGET', KEYS[2], field)
  end
end
return reply
"""

INVALID_RECORDS = Counter("apigw_policy_invalid_records_total",
                          "Policy records in Redis that failed to parse or validate")
CACHE_RELOADS = Counter("apigw_policy_cache_reloads_total",
                        "Policy cache reloads from Redis", ["outcome"])
CACHE_HEALTHY = Gauge("apigw_policy_cache_healthy",
                      "1 while the policy cache can reach Redis, 0 while it serves its last copy")
SELECT_ERRORS = Counter("apigw_policy_select_errors_total",
                        "Unexpected errors while selecting a policy (the request got no policy)")


class AuditRecord(BaseModel):
    """One entry of the audit stream: who did what to which subject, and why."""

    id: str = ""  # the stream entry id, filled when read back
    ts: float = Field(default_factory=time.time)
    actor: str
    action: str
    subject: str
    reason: str
    evidence: str = ""
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class PolicyConflictError(RuntimeError):
    """A write kept losing the optimistic lock to concurrent writers."""


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


_reported: set[tuple[str, str, int]] = set()


def _warn_once(key: tuple[str, str, int], message: str, **fields: Any) -> None:
    """Every reload meets the same bad data again: warn the first time, debug after that."""
    if key in _reported:
        log.debug(message, extra=fields)
        return
    if len(_reported) >= _REPORTED_MAX:
        _reported.clear()
    _reported.add(key)
    log.warning(message, extra=fields)


def _problem(exc: ValueError) -> str:
    """What is wrong with a record, never its content (a record may hold a client's key)."""
    if not isinstance(exc, ValidationError):
        return type(exc).__name__
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"[:_PROBLEM_CHARS]


def _parse(policy_id: str, raw: bytes | str, where: str) -> Policy | None:
    """The policy a stored record holds, or None - counted, and logged once per distinct
    record - when it is too large, not a valid policy, or claims an id other than the key it
    is stored under (a record must not stand in for another policy)."""
    if len(raw) > MAX_RECORD_BYTES:
        _too_large(policy_id, len(raw), where)
        return None
    try:
        policy = Policy.from_json(raw)
    except ValueError as exc:
        problem = _problem(exc)
    else:
        if policy.id == policy_id:
            return policy
        problem = "the record's id is not the key it is stored under"
    INVALID_RECORDS.inc()
    _warn_once((where, policy_id, hash(raw)), "invalid policy record skipped",
               policy_id=policy_id[:_SHOWN_CHARS], where=where, error=problem, bytes=len(raw))
    return None


def _too_large(policy_id: str, size: int, where: str) -> None:
    INVALID_RECORDS.inc()
    _warn_once((where, policy_id, size), "invalid policy record skipped",
               policy_id=policy_id[:_SHOWN_CHARS], where=where, bytes=size,
               error=f"record of {size} bytes, more than the {MAX_RECORD_BYTES} allowed")


def _counter(raw: bytes | str | None) -> int:
    """The policies version counter. One that is not an integer reads as -1 (reported once):
    readers then reload on notifications and when it is repaired."""
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        _warn_once(("counter", "", hash(raw)), "policy version counter is not an integer; "
                   "reloading on notifications only until it is repaired", bytes=len(raw))
        return -1


def _content(policy: Policy) -> dict[str, Any]:
    return policy.model_dump(mode="json", exclude=set(_IGNORED_ON_COMPARE))


def _dump(policy: Policy | None) -> dict[str, Any] | None:
    return None if policy is None else policy.model_dump(mode="json")


@dataclass(slots=True)
class Snapshot:
    """What one read of Redis returned: per policy id the current version followed by the
    earlier versions it would revert to (only loaded for policies that can expire)."""

    version: int
    chains: dict[str, list[Policy]] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)
    fallback: dict[str, list[Policy]] = field(default_factory=dict)  # history of invalid ones


def effective_of(chain: Sequence[Policy], now: float) -> Policy | None:
    """The newest unexpired version in a newest-first chain, or None."""
    for policy in chain:
        if not policy.is_expired(now):
            return policy
    return None


def next_expiry(chains: Iterable[Sequence[Policy]], now: float) -> float:
    """The earliest future moment at which some chain's effective version changes."""
    soonest = float("inf")
    for chain in chains:
        current = effective_of(chain, now)
        if current is not None and current.expires_at is not None:
            soonest = min(soonest, current.expires_at)
    return soonest


class PolicyStore:
    """Versioned, audited policy records in Redis (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self.keys = keys
        self._snapshot_script = redis.register_script(_SNAPSHOT_LUA)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    # -- reads ---------------------------------------------------------------------------

    async def get(self, policy_id: str) -> Policy | None:
        raw = await self._redis.hget(self.keys.policies, policy_id)
        return None if raw is None else _parse(policy_id, raw, "current")

    async def list(self) -> list[Policy]:
        raw = await self._redis.hgetall(self.keys.policies)
        policies = (_parse(_text(pid), value, "current") for pid, value in raw.items())
        return sorted((p for p in policies if p is not None), key=lambda p: p.id)

    async def history(self, policy_id: str) -> builtins.list[Policy]:
        raw = await self._redis.lrange(self.keys.policy_history(policy_id), 0, -1)
        policies = (_parse(policy_id, value, "history") for value in raw)
        return [p for p in policies if p is not None]

    async def version(self) -> int:
        return _counter(await self._redis.get(self.keys.policies_version))

    async def snapshot(self) -> Snapshot:
        """A consistent read of every current policy, plus the history of those that expire."""
        reply: Any = await self._snapshot_script(
            keys=[self.keys.policies_version, self.keys.policies], args=[MAX_RECORD_BYTES])
        snap = Snapshot(version=_counter(reply[0]))
        needs_history: dict[str, Policy | None] = {}  # expiring, or broken (None)
        for pid_raw, raw in zip(reply[1::2], reply[2::2], strict=True):
            pid = _text(pid_raw)
            if isinstance(raw, int):  # only its size: see _SNAPSHOT_LUA
                _too_large(pid, raw, "current")
                policy = None
            else:
                policy = _parse(pid, raw, "current")
            if policy is None:
                snap.invalid.add(pid)
                needs_history[pid] = None
                continue
            snap.chains[pid] = [policy]
            if policy.expires_at is not None:
                needs_history[pid] = policy
        if needs_history:
            async with self._redis.pipeline(transaction=False) as pipe:
                for pid in needs_history:
                    pipe.lrange(self.keys.policy_history(pid), 0, -1)
                histories = await pipe.execute(raise_on_error=False)
            for (pid, policy), raw_history in zip(needs_history.items(), histories, strict=True):
                if isinstance(raw_history, Exception):  # e.g. WRONGTYPE: not a list
                    _warn_once(("history", pid, 0), "policy history unreadable; ignored",
                               policy_id=pid[:_SHOWN_CHARS], error=str(raw_history)[:200])
                    raw_history = []
                parsed = (_parse(pid, raw, "history") for raw in raw_history)
                earlier = sorted((p for p in parsed if p is not None
                                  and (policy is None or p.version < policy.version)),
                                 key=lambda p: p.version, reverse=True)
                if policy is not None:
                    snap.chains[pid].extend(earlier)
                elif earlier:  # a broken current record: its last good version applies
                    snap.fallback[pid] = earlier
        return snap

    async def effective(self, now: float | None = None) -> builtins.list[Policy]:
        """Current policies, an expired one replaced by its newest unexpired earlier version
        (dropped when there is none)."""
        at = time.time() if now is None else now
        snap = await self.snapshot()
        chains = [*snap.chains.values(), *snap.fallback.values()]
        chosen = (effective_of(chain, at) for chain in chains)
        return sorted((p for p in chosen if p is not None), key=lambda p: p.id)

    # -- writes --------------------------------------------------------------------------

    async def put(self, policy: Policy, *, actor: str, reason: str, evidence: str = "") -> Policy:
        """Store `policy` as the next version of its id, with history, audit and notification."""

        def build(current: Policy | None, last_version: int) -> Policy:
            version = (current.version + 1 if current is not None
                       else max(policy.version, last_version + 1))
            return policy.model_copy(update={"version": version, "updated_at": time.time(),
                                             "updated_by": actor, "reason": reason})

        written = await self._write(policy.id, build, actor=actor, reason=reason,
                                    evidence=evidence, action=None)
        assert written is not None
        return written

    async def delete(self, policy_id: str, *, actor: str, reason: str, evidence: str = "") -> bool:
        """Remove the current version (history stays, so a rollback can restore it)."""

        def audit_for(before: Policy | None, raw: bytes | str) -> AuditRecord:
            return AuditRecord(actor=actor, action="policy.delete", subject=policy_id,
                               reason=reason, evidence=evidence,
                               before=_dump(before) if before else {"raw": _text(raw)})

        deleted = await self._remove(policy_id, audit_for)
        if deleted:
            log.info("policy deleted", extra={"policy_id": policy_id, "actor": actor})
        return deleted

    async def rollback(self, policy_id: str, *, actor: str, reason: str,
                       to_version: int | None = None) -> Policy:
        """Write a new version whose content equals an earlier one: `to_version`, or the one
        before the current version (or, for a deleted policy, its last version)."""

        def build(current: Policy | None, last_version: int, history: list[Policy]) -> Policy:
            if to_version is not None:
                target = next((p for p in history if p.version == to_version), None)
                if target is None:
                    raise KeyError(f"policy {policy_id!r} has no version {to_version} in its "
                                   f"history (kept: {sorted(p.version for p in history)})")
            else:
                below = current.version if current is not None else last_version + 1
                target = next((p for p in history if p.version < below), None)
                if target is None:
                    raise KeyError(f"policy {policy_id!r} has no earlier version to roll back to")
            if target.is_expired():
                raise ValueError(f"policy {policy_id!r} version {target.version} expired at "
                                 f"{target.expires_at}; put a new policy instead")
            version = max(current.version if current else 0, last_version) + 1
            return target.model_copy(update={"version": version, "updated_at": time.time(),
                                             "updated_by": actor, "reason": reason})

        written = await self._write(policy_id, build, actor=actor, reason=reason,
                                    evidence="", action="policy.rollback", needs_history=True)
        assert written is not None
        return written

    async def seed(self, policies: Iterable[Policy], *, actor: str = "config") -> int:
        """Write the YAML baseline: absent ids and changed config-sourced ones are written;
        runtime overrides (operator, analytics) are left alone until they expire."""
        written = 0
        for baseline in policies:
            candidate = baseline.model_copy(update={"source": Source.CONFIG})

            def build(current: Policy | None, last_version: int,
                      candidate: Policy = candidate) -> Policy | None:
                if current is not None:
                    if current.source is not Source.CONFIG and not current.is_expired():
                        return None
                    if (current.source is Source.CONFIG
                            and _content(current) == _content(candidate)):
                        return None
                version = (current.version + 1 if current is not None
                           else max(candidate.version, last_version + 1))
                return candidate.model_copy(update={
                    "version": version, "updated_at": time.time(), "updated_by": actor,
                    "reason": candidate.reason or "baseline from the gateway config"})

            if await self._write(candidate.id, build, actor=actor,
                                 reason="baseline from the gateway config", evidence="",
                                 action="policy.seed") is not None:
                written += 1
        return written

    async def revert_expired(self, now: float | None = None, *, actor: str = "expiry") -> int:
        """Make expiry reverts explicit: for each expired current version, write its effective
        earlier version as a new version (or delete it when there is none), with audit.
        Readers already apply reverts on their own; this makes them visible and audited."""
        at = time.time() if now is None else now
        snap = await self.snapshot()
        changed = 0
        for policy_id, chain in snap.chains.items():
            current = chain[0]
            if not current.is_expired(at):
                continue
            target = effective_of(chain, at)
            reason = f"version {current.version} expired at {current.expires_at}"

            def build(now_current: Policy | None, last_version: int, expired: Policy = current,
                      target: Policy | None = target, reason: str = reason) -> Policy | None:
                if now_current is None or now_current.version != expired.version:
                    return None  # somebody else changed it meanwhile
                if target is None:
                    return None
                return target.model_copy(update={"version": last_version + 1,
                                                 "updated_at": time.time(),
                                                 "updated_by": actor, "reason": reason})

            if target is None:
                changed += await self._delete_if_version(policy_id, current.version,
                                                         actor=actor, reason=reason)
            elif await self._write(policy_id, build, actor=actor, reason=reason,
                                   evidence="", action="policy.expire") is not None:
                changed += 1
        return changed

    async def audit(self, record: AuditRecord) -> str:
        """Append an audit record; returns its stream id."""
        entry_id = await self._redis.xadd(self.keys.audit, {"r": record.model_dump_json()},
                                          maxlen=AUDIT_MAXLEN, approximate=True)
        return _text(entry_id)

    async def audit_log(self, count: int = 200,
                        subject: str | None = None) -> builtins.list[AuditRecord]:
        """Newest first; with `subject`, only records about it (scans at most 20 pages)."""
        found: builtins.list[AuditRecord] = []
        upper = "+"
        page = max(count, 100) if subject is not None else count
        for _ in range(20 if subject is not None else 1):
            entries: Any = await self._redis.xrevrange(self.keys.audit, max=upper, min="-",
                                                  count=page)
            for entry_id, fields in entries:
                record = self._parse_audit(_text(entry_id), fields)
                if record is not None and (subject is None or record.subject == subject):
                    found.append(record)
                    if len(found) >= count:
                        return found
            if len(entries) < page:
                break
            upper = "(" + _text(entries[-1][0])
        return found

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _parse_audit(entry_id: str, fields: dict[Any, Any]) -> AuditRecord | None:
        raw = fields.get(b"r", fields.get("r"))
        if raw is None:
            return None
        try:
            return AuditRecord.model_validate_json(raw).model_copy(update={"id": entry_id})
        except ValidationError:
            log.warning("unreadable audit record skipped", extra={"entry_id": entry_id})
            return None

    def _queue_audit(self, pipe: Any, record: AuditRecord) -> None:
        pipe.xadd(self.keys.audit, {"r": record.model_dump_json()}, maxlen=AUDIT_MAXLEN,
                  approximate=True)

    async def _write(self, policy_id: str, build: Callable[..., Policy | None], *, actor: str,
                     reason: str, evidence: str, action: str | None,
                     needs_history: bool = False) -> Policy | None:
        """Read the current record under WATCH, let `build` decide the new one (None = no
        change), then commit hash + history + version + audit + publish atomically."""
        keys = self.keys
        history_key = keys.policy_history(policy_id)
        pipe: Any
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_WRITE_ATTEMPTS):
                try:
                    await pipe.watch(keys.policies)
                    raw = await pipe.hget(keys.policies, policy_id)
                    current = None if raw is None else _parse(policy_id, raw, "current")
                    raw_history = await pipe.lrange(history_key, 0, -1 if needs_history else 0)
                    history = [p for p in (_parse(policy_id, r, "history") for r in raw_history)
                               if p is not None]
                    last_version = max([p.version for p in history[:1]]
                                       + [current.version if current else 0])
                    new = (build(current, last_version, history) if needs_history
                           else build(current, last_version))
                    if new is None:
                        await pipe.unwatch()
                        return None
                    new = Policy.model_validate(new.model_dump())  # re-validate what we store
                    doing = action or ("policy.update" if current is not None else "policy.create")
                    record = AuditRecord(actor=actor, action=doing, subject=policy_id,
                                         reason=reason, evidence=evidence, before=_dump(current),
                                         after=_dump(new))
                    encoded = new.to_json()
                    pipe.multi()
                    pipe.hset(keys.policies, policy_id, encoded)
                    pipe.lpush(history_key, encoded)
                    pipe.ltrim(history_key, 0, HISTORY_MAX - 1)
                    pipe.incr(keys.policies_version)
                    self._queue_audit(pipe, record)
                    pipe.publish(keys.policies_channel, policy_id)
                    await pipe.execute()
                    log.info("policy written", extra={
                        "policy_id": policy_id, "version": new.version, "action": doing,
                        "actor": actor, "source": new.source.value, "mode": new.mode.value})
                    return new
                except WatchError:
                    await asyncio.sleep(random.uniform(0, 0.005))
        raise PolicyConflictError(f"policy {policy_id!r}: too many concurrent writers")

    async def _delete_if_version(self, policy_id: str, version: int, *, actor: str,
                                 reason: str) -> int:
        def audit_for(current: Policy | None, raw: bytes | str) -> AuditRecord | None:
            if current is None or current.version != version:
                return None
            return AuditRecord(actor=actor, action="policy.expire", subject=policy_id,
                               reason=reason, before=_dump(current), after=None)

        return int(await self._remove(policy_id, audit_for))

    async def _remove(self, policy_id: str,
                      audit_for: Callable[[Policy | None, bytes | str], AuditRecord | None]
                      ) -> bool:
        """Delete the current version when `audit_for` gives the audit record for it (None:
        leave it), atomically with the version bump, the audit entry and the notification."""
        keys = self.keys
        pipe: Any
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_WRITE_ATTEMPTS):
                try:
                    await pipe.watch(keys.policies)
                    raw = await pipe.hget(keys.policies, policy_id)
                    record = (None if raw is None
                              else audit_for(_parse(policy_id, raw, "current"), raw))
                    if record is None:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hdel(keys.policies, policy_id)
                    pipe.incr(keys.policies_version)
                    self._queue_audit(pipe, record)
                    pipe.publish(keys.policies_channel, policy_id)
                    await pipe.execute()
                    return True
                except WatchError:
                    await asyncio.sleep(random.uniform(0, 0.005))
        raise PolicyConflictError(f"policy {policy_id!r}: too many concurrent writers")


Selected = tuple[Policy, str]
PRE_AUTH_KEY_BY: Final = "ip"  # the only key known before authentication


def is_pre_auth(policy: Policy) -> bool:
    """Enforced before authentication: keyed by the client address alone, and not scoped to a
    tenant or a plan (both come from the verified principal)."""
    return policy.key_by == PRE_AUTH_KEY_BY and policy.tenant is None and policy.plan is None


_NONE_SELECTED: Final[tuple[Selected | None, Selected | None]] = (None, None)


def _first_matching(candidates: tuple[Policy, ...],
                    key_of: Callable[[str], str]) -> Selected | None:
    """The first candidate (most specific first) whose match key, if any, is this request's."""
    for policy in candidates:
        key = key_of(policy.key_by)
        if policy.match_key is None or policy.match_key == key:
            return policy, key
    return None


class PolicyCache:
    """The effective policies of one proxy worker, kept fresh from Redis.

    `select()` is the hot path: a dict lookup of the precomputed candidates for
    (route, method, tenant), then a walk of those candidates. Everything that talks to Redis
    runs in background tasks; while Redis is unreachable the last good copy (or, if Redis was
    never reached, the YAML baseline) keeps applying and `healthy` is False.
    """

    def __init__(self, store: PolicyStore, baseline: Sequence[Policy], refresh_s: float = 1.0,
                 *, io_timeout_s: float = 2.0, max_backoff_s: float = 10.0) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._io_timeout_s = io_timeout_s
        self._max_backoff_s = max_backoff_s
        self.healthy = False
        self.version = 0
        self.loaded_from = "baseline"  # or "redis"
        self._chains: dict[str, list[Policy]] = {p.id: [p] for p in baseline}
        self._effective: list[Policy] = []
        # (route, method, tenant, plan, pre_auth) -> (rate-limit candidates, quota candidates)
        self._index: dict[tuple[str, str, str, str, bool],
                          tuple[tuple[Policy, ...], tuple[Policy, ...]]] = {}
        self._next_expiry = float("inf")
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._rebuild(time.time())

    @property
    def policies(self) -> list[Policy]:
        """The effective policies right now (a copy)."""
        return list(self._effective)

    async def start(self) -> None:
        try:
            await self._reload()
        except Exception as exc:
            self._mark_unhealthy(exc)
            log.warning("policies: Redis unreachable at start, serving the config baseline",
                        extra={"policies": len(self._effective), "error": repr(exc)[:200]})
        self._tasks = [asyncio.create_task(self._refresh_loop(), name="policy-refresh"),
                       asyncio.create_task(self._listen_loop(), name="policy-listen")]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def select(self, route_id: str, method: str, tenant: str,
               key_of: Callable[[str], str], plan: str = "",
               quota: bool = False, pre_auth: bool = False) -> Selected | None:
        """The most specific applicable policy and the rate-limit key it computes, or None.

        Rate-limit policies and quotas (`quota_period` set) are selected separately: with
        `quota=True` only quotas are candidates, else only rate-limit policies. With
        `pre_auth=True` only policies `is_pre_auth` accepts are candidates (the phase before
        authentication, when the client address is the only trustworthy key)."""
        try:
            candidates = self._candidate_pair(route_id, method, tenant, plan, pre_auth)[quota]
            return _first_matching(candidates, key_of)
        except Exception:
            SELECT_ERRORS.inc()
            log.exception("policy selection failed; request continues without a policy")
            return None

    def select_both(self, route_id: str, method: str, tenant: str,
                    key_of: Callable[[str], str], plan: str = "", pre_auth: bool = False
                    ) -> tuple[Selected | None, Selected | None]:
        """`select` of the rate-limit policy and of the quota, with one lookup: (rate, quota)."""
        try:
            rates, quotas = self._candidate_pair(route_id, method, tenant, plan, pre_auth)
            if not rates and not quotas:
                return _NONE_SELECTED
            return _first_matching(rates, key_of), _first_matching(quotas, key_of)
        except Exception:
            SELECT_ERRORS.inc()
            log.exception("policy selection failed; request continues without a policy")
            return _NONE_SELECTED

    # -- internals -----------------------------------------------------------------------

    def _candidate_pair(self, route_id: str, method: str, tenant: str, plan: str,
                        pre_auth: bool) -> tuple[tuple[Policy, ...], tuple[Policy, ...]]:
        if time.time() >= self._next_expiry:
            self._rebuild(time.time())
        combo = (route_id, method, tenant, plan, pre_auth)
        pair = self._index.get(combo)
        if pair is None:
            pair = (self._candidates(route_id, method, tenant, plan, False, pre_auth),
                    self._candidates(route_id, method, tenant, plan, True, pre_auth))
            if len(self._index) >= _INDEX_MAX:
                self._index = {}
            self._index[combo] = pair
        return pair

    def _candidates(self, route_id: str, method: str, tenant: str, plan: str,
                    quota: bool, pre_auth: bool) -> tuple[Policy, ...]:
        matching = [p for p in self._effective
                    if p.is_quota is quota and p.applies_to(route_id, method, tenant, plan)
                    and (not pre_auth or is_pre_auth(p))]
        matching.sort(key=lambda p: (-p.specificity, p.id))
        return tuple(matching)

    def _rebuild(self, now: float) -> None:
        chosen = (effective_of(chain, now) for chain in self._chains.values())
        self._effective = sorted((p for p in chosen if p is not None and p.mode is not Mode.OFF),
                                 key=lambda p: p.id)
        self._next_expiry = next_expiry(self._chains.values(), now)
        self._index = {}

    async def _reload(self) -> None:
        async with asyncio.timeout(self._io_timeout_s):
            snap = await self._store.snapshot()
        chains = snap.chains
        for policy_id in snap.invalid:  # keep the last good version of a broken record
            kept = self._chains.get(policy_id) or snap.fallback.get(policy_id)
            if kept:
                chains[policy_id] = kept
        self._chains = chains
        self.version = snap.version
        self.loaded_from = "redis"
        self._rebuild(time.time())
        if not self.healthy:
            log.info("policies loaded from Redis", extra={"version": self.version,
                                                          "policies": len(self._effective)})
        self.healthy = True
        CACHE_HEALTHY.set(1)
        CACHE_RELOADS.labels("ok").inc()

    def _mark_unhealthy(self, exc: BaseException) -> None:
        if self.healthy:
            log.warning("policies: Redis unreachable, keeping the last good copy",
                        extra={"error": repr(exc)[:200], "version": self.version})
        self.healthy = False
        CACHE_HEALTHY.set(0)
        CACHE_RELOADS.labels("error").inc()

    async def _refresh_loop(self) -> None:
        delay = self._refresh_s
        while not self._stopping:
            notified = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                    notified = True
            self._wake.clear()
            if self._stopping:
                return
            try:
                if notified or not self.healthy:
                    await self._reload()
                else:
                    async with asyncio.timeout(self._io_timeout_s):
                        current = await self._store.version()
                    if current != self.version:
                        await self._reload()
                delay = self._refresh_s
            except (RedisError, OSError, TimeoutError) as exc:
                self._mark_unhealthy(exc)
                delay = min(max(delay * 2, self._refresh_s), self._max_backoff_s)
            except Exception:
                log.exception("policy refresh failed")
                delay = min(max(delay * 2, self._refresh_s), self._max_backoff_s)
            now = time.time()
            if now >= self._next_expiry:
                self._rebuild(now)

    async def _listen_loop(self) -> None:
        delay = 0.1
        channel = self._store.keys.policies_channel
        while not self._stopping:
            pubsub: Any = self._store.redis.pubsub()
            try:
                async with asyncio.timeout(self._io_timeout_s):
                    await pubsub.subscribe(channel)
                self._wake.set()  # anything published while we were not listening
                delay = 0.1
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None:
                        self._wake.set()
            except (RedisError, OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
            except Exception:
                log.exception("policy subscription failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
