"""API keys: stored as digests (HMAC-SHA256 with a server pepper, or SHA-256), in the config
or in Redis, with an id, owner, plan, tenant and scopes; revocation reaches every worker
within about a second.

Redis layout (names from `RedisKeys`): `<p>:apikeys` hash digest -> ApiKeyRecord JSON,
`<p>:apikeys:ids` hash id -> digest, `<p>:apikeys:version` bumped on every change,
`<p>:apikeys:changed` pub/sub. `ApiKeyStore` writes (issue, add, revoke - each audited in the
policy audit stream); `ApiKeyVerifier` (one per worker) reads: a lookup is cached per digest
for `cache_s`, and the whole cache is dropped on a change notification or when the polled
version moves (every `refresh_s`), so a revoked key is refused within refresh_s + one lookup.

    python -m proxy.auth.apikeys hash <key> [--pepper P]   # the `hash:` value for the config
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError

from proxy.auth.config import ApiKey, ApiKeys
from proxy.auth.jwt import AuthFailure
from proxy.identity import Principal
from proxy.policy import RedisKeys
from proxy.policy_store import AuditRecord, PolicyStore

log = logging.getLogger(__name__)

_KEY_SHAPE = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")
_NEGATIVE_TTL_S: Final = 5.0
_CACHE_MAX: Final = 100_000
_LOOKUP_TIMEOUT_S: Final = 0.25


def digest(key: str, pepper: str = "") -> str:
    """The stored form of a key: `hmac-sha256:<hex>` with a pepper, else `sha256:<hex>`."""
    if pepper:
        mac = hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
        return f"hmac-sha256:{mac}"
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def well_formed(key: str) -> bool:
    return bool(_KEY_SHAPE.match(key))


class ApiKeyRecord(BaseModel):
    """What is known about one key (never the key itself)."""

    id: str
    owner: str = ""
    plan: str = ""
    tenant: str = ""
    scopes: list[str] = Field(default_factory=list)
    revoked: bool = False
    expires_at: float | None = None
    created_at: float = Field(default_factory=time.time)

    def principal(self) -> Principal:
        return Principal(client_id=self.owner or self.id, method="api_key", tenant=self.tenant,
                         plan=self.plan, scopes=frozenset(self.scopes), api_key_id=self.id,
                         expires_at=self.expires_at)


def _from_config(key: ApiKey) -> ApiKeyRecord:
    return ApiKeyRecord(id=key.id, owner=key.owner, plan=key.plan, tenant=key.tenant,
                        scopes=key.scopes, revoked=key.revoked, created_at=0.0)


class ApiKeyStore:
    """Writes API keys into Redis (operators, tests, the demo)."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, pepper: str = "") -> None:
        self._redis = redis
        self.keys = keys
        self._pepper = pepper

    async def issue(self, record: ApiKeyRecord, *, actor: str, prefix: str = "ak_") -> str:
        """Create a random key for `record`; returns the key - shown once, never stored."""
        key = prefix + secrets.token_urlsafe(32)
        await self.add(key, record, actor=actor)
        return key

    async def add(self, key: str, record: ApiKeyRecord, *, actor: str) -> str:
        """Store `record` under the digest of a known `key`; returns the digest."""
        if not well_formed(key):
            raise ValueError("an API key is 16-256 characters of A-Z a-z 0-9 . _ ~ + / = -")
        stored = digest(key, self._pepper)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.api_keys, stored, record.model_dump_json())
            pipe.hset(self.keys.api_key_ids, record.id, stored)
            self._changed(pipe, record.id)
            await pipe.execute()
        await PolicyStore(self._redis, self.keys).audit(AuditRecord(
            actor=actor, action="apikey.create", subject=f"apikey:{record.id}",
            reason="issued", after=record.model_dump(mode="json")))
        return stored

    async def revoke(self, key_id: str, *, actor: str, reason: str) -> bool:
        stored: Any = await self._redis.hget(self.keys.api_key_ids, key_id)
        if stored is None:
            return False
        raw: Any = await self._redis.hget(self.keys.api_keys, stored)
        if raw is None:
            return False
        record = ApiKeyRecord.model_validate_json(raw)
        revoked = record.model_copy(update={"revoked": True})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.api_keys, stored, revoked.model_dump_json())
            self._changed(pipe, key_id)
            await pipe.execute()
        await PolicyStore(self._redis, self.keys).audit(AuditRecord(
            actor=actor, action="apikey.revoke", subject=f"apikey:{key_id}", reason=reason,
            before=record.model_dump(mode="json"), after=revoked.model_dump(mode="json")))
        return True

    def _changed(self, pipe: Any, key_id: str) -> None:
        pipe.incr(self.keys.api_keys_version)
        pipe.publish(self.keys.api_keys_channel, key_id)


class ApiKeyVerifier:
    """One worker's view of the API keys (see the module docstring)."""

    def __init__(self, config: ApiKeys, redis: aioredis.Redis | None, keys: RedisKeys) -> None:
        self.config = config
        self._pepper = config.pepper.get_secret_value()
        self._static = {key.hash: _from_config(key) for key in config.keys}
        self._redis = redis if config.redis else None
        self._keys = keys
        self._cache: dict[str, tuple[ApiKeyRecord | None, float]] = {}
        self.version = -1
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        if self._redis is not None:
            self._tasks = [asyncio.create_task(self._poll_loop(), name="apikeys-poll"),
                           asyncio.create_task(self._listen_loop(), name="apikeys-listen")]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def invalidate(self) -> None:
        self._cache = {}

    async def verify(self, key: str) -> Principal:
        if not well_formed(key):
            raise AuthFailure("malformed", "API key is not well-formed")
        stored = digest(key, self._pepper)
        record = self._static.get(stored)
        if record is None and self._redis is not None:
            record = await self._lookup(stored)
        if record is None:
            raise AuthFailure("unknown_key", "API key not recognised")
        if record.revoked:
            raise AuthFailure("revoked", "API key revoked")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise AuthFailure("expired", "API key expired")
        return record.principal()

    async def _lookup(self, stored: str) -> ApiKeyRecord | None:
        assert self._redis is not None
        now = time.monotonic()
        cached = self._cache.get(stored)
        if cached is not None and now < cached[1]:
            return cached[0]
        try:
            async with asyncio.timeout(_LOOKUP_TIMEOUT_S):
                raw: Any = await self._redis.hget(self._keys.api_keys, stored)
        except (RedisError, OSError, TimeoutError):
            if cached is not None:  # stale, but the best knowledge we have
                return cached[0]
            raise AuthFailure("unavailable", "API key store unreachable") from None
        record: ApiKeyRecord | None = None
        if raw is not None:
            try:
                record = ApiKeyRecord.model_validate_json(raw)
            except ValidationError:
                log.error("invalid API key record in Redis ignored", extra={"digest": stored[:20]})
        if len(self._cache) >= _CACHE_MAX:
            self._cache = {}
        ttl = self.config.cache_s if record is not None else _NEGATIVE_TTL_S
        self._cache[stored] = (record, now + ttl)
        return record

    async def _poll_loop(self) -> None:
        assert self._redis is not None
        while not self._stopping:
            try:
                async with asyncio.timeout(2.0):
                    raw: Any = await self._redis.get(self._keys.api_keys_version)
                version = int(raw or 0)
                if version != self.version:
                    if self.version != -1:
                        self.invalidate()
                    self.version = version
            except (RedisError, OSError, TimeoutError, ValueError):
                pass  # the cache keeps serving; lookups say "unavailable" for unknown keys
            await asyncio.sleep(self.config.refresh_s)

    async def _listen_loop(self) -> None:
        assert self._redis is not None
        delay = 0.1
        while not self._stopping:
            pubsub: Any = self._redis.pubsub()
            try:
                async with asyncio.timeout(2.0):
                    await pubsub.subscribe(self._keys.api_keys_channel)
                self.invalidate()  # anything missed while not listening
                delay = 0.1
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None:
                        self.invalidate()
            except (RedisError, OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.auth.apikeys",
                                     description="Print the stored digest of an API key.")
    sub = parser.add_subparsers(dest="command", required=True)
    hashing = sub.add_parser("hash", help="the `hash:` value for auth.api_keys.keys")
    hashing.add_argument("key")
    hashing.add_argument("--pepper", default="", help="auth.api_keys.pepper, if set")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not well_formed(args.key):
        print("not a well-formed key (16-256 of A-Z a-z 0-9 . _ ~ + / = -)", file=sys.stderr)
        return 2
    print(digest(args.key, args.pepper))
    return 0


if __name__ == "__main__":
    sys.exit(main())
