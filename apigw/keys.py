"""`apigw keys`: issue, revoke and list the API keys held in Redis.

The key is printed once, on standard output, when it is issued; only its digest is stored
(proxy.auth.apikeys.ApiKeyStore: HMAC-SHA256 with the pepper, or SHA-256 without one). The
pepper must be the gateway's `auth.api_keys.pepper`: it is read from the gateway config
(`--config` or APIGW_CONFIG, environment interpolated), else from APIGW_APIKEY_PEPPER.
Every change is audited in the policy audit stream (actor `cli:<user>` unless `--actor`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # imported when a subcommand runs, so `apigw --help` needs none of them
    import redis.asyncio as aioredis

    from proxy.auth.apikeys import ApiKeyRecord

PEPPER_ENV: Final = "APIGW_APIKEY_PEPPER"
_ID: Final = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_NAME: Final = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class KeysError(Exception):
    """A usage or environment problem, reported in one line."""


@dataclass(frozen=True)
class Target:
    redis_url: str
    prefix: str
    pepper: str
    pepper_from: str


def _pepper(config: Path | None) -> tuple[str, str]:
    """(pepper, where it came from): the gateway config's, else the environment's."""
    path = config or (Path(os.environ["APIGW_CONFIG"]) if os.environ.get("APIGW_CONFIG")
                      else None)
    if path is not None:
        from proxy.config import ConfigError, load_config

        try:
            loaded = load_config(path)
        except ConfigError as exc:
            raise KeysError(f"invalid gateway config:\n{exc}") from None
        return loaded.auth.api_keys.pepper.get_secret_value(), f"auth.api_keys.pepper of {path}"
    return os.environ.get(PEPPER_ENV, ""), PEPPER_ENV


def target(redis_url: str, prefix: str, config: Path | None) -> Target:
    pepper, source = _pepper(config)
    return Target(redis_url, prefix, pepper, source)


def _scopes(value: str) -> list[str]:
    scopes = [part.strip() for part in value.split(",") if part.strip()]
    for scope in scopes:
        if not _NAME.match(scope):
            raise KeysError(f"scope {scope!r} must be letters, digits and ._:@/+=-")
    return scopes


def _check_name(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if value and not pattern.match(value):
        raise KeysError(f"--{what} {value!r} must be 1-128 characters of letters, digits and "
                        + ("._:@/-" if pattern is _ID else "._:@/+=-"))


def record_from(args: argparse.Namespace, now: float) -> ApiKeyRecord:
    from proxy.auth.apikeys import ApiKeyRecord

    _check_name("id", args.id, _ID)
    for what in ("owner", "plan", "tenant"):
        _check_name(what, getattr(args, what), _NAME)
    if args.expires_in is not None and args.expires_in <= 0:
        raise KeysError("--expires-in must be a positive number of seconds")
    return ApiKeyRecord(id=args.id, owner=args.owner, plan=args.plan, tenant=args.tenant,
                        scopes=_scopes(args.scopes),
                        expires_at=None if args.expires_in is None else now + args.expires_in,
                        created_at=now)


async def _with_redis(where: Target, work: Any) -> Any:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(where.redis_url, socket_connect_timeout=3,
                                     socket_timeout=5)
    try:
        return await work(client)
    except (RedisError, OSError) as exc:
        raise KeysError(f"Redis at {_redact(where.redis_url)}: {type(exc).__name__}: "
                        f"{exc}") from None
    finally:
        await client.aclose()


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    password = urlsplit(url).password
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


async def issue(where: Target, record: ApiKeyRecord, actor: str) -> str:
    from proxy.auth.apikeys import ApiKeyStore
    from proxy.policy import RedisKeys

    async def work(client: aioredis.Redis) -> str:
        store = ApiKeyStore(client, RedisKeys(where.prefix), pepper=where.pepper)
        if await client.hexists(store.keys.api_key_ids, record.id):
            raise KeysError(f"an API key with id {record.id!r} exists; revoke it and issue "
                            "one with another id")
        return await store.issue(record, actor=actor)

    key: str = await _with_redis(where, work)
    return key


async def revoke(where: Target, key_id: str, reason: str, actor: str) -> bool:
    from proxy.auth.apikeys import ApiKeyStore
    from proxy.policy import RedisKeys

    async def work(client: aioredis.Redis) -> bool:
        store = ApiKeyStore(client, RedisKeys(where.prefix), pepper=where.pepper)
        return await store.revoke(key_id, actor=actor, reason=reason)

    done: bool = await _with_redis(where, work)
    return done


async def list_keys(where: Target) -> list[ApiKeyRecord]:
    from pydantic import ValidationError

    from proxy.auth.apikeys import ApiKeyRecord
    from proxy.policy import RedisKeys

    keys = RedisKeys(where.prefix)

    async def work(client: aioredis.Redis) -> list[ApiKeyRecord]:
        ids: Any = await client.hgetall(keys.api_key_ids)
        records = []
        for key_id, stored in sorted(ids.items()):
            raw: Any = await client.hget(keys.api_keys, stored)
            if raw is None:
                continue
            try:
                records.append(ApiKeyRecord.model_validate_json(raw))
            except ValidationError:
                print(f"warning: the record of key id {key_id.decode(errors='replace')!r} is "
                      "invalid; skipped", file=sys.stderr)
        return records

    found: list[ApiKeyRecord] = await _with_redis(where, work)
    return found


def _status(record: ApiKeyRecord, now: float) -> str:
    if record.revoked:
        return "revoked"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return "active"


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def format_table(records: list[ApiKeyRecord], now: float) -> str:
    header = ("ID", "OWNER", "PLAN", "TENANT", "SCOPES", "STATUS", "CREATED", "EXPIRES")
    rows = [header] + [(r.id, r.owner or "-", r.plan or "-", r.tenant or "-",
                        ",".join(r.scopes) or "-", _status(r, now), _when(r.created_at),
                        _when(r.expires_at)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                         strict=True)).rstrip()
                     for row in rows)


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"cli:{user}"


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter], common_env: str,
               run: Any) -> None:
    """The `keys` command and its subcommands (called by apigw.cli.build_parser)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "keys", help="issue, revoke and list API keys (stored hashed in Redis)",
        formatter_class=formatter,
        description="Manage the API keys the gateway looks up in Redis. A new key is printed\n"
                    "once on standard output; only its digest (HMAC-SHA256 with the pepper)\n"
                    "is stored. Revocation reaches every proxy worker within about\n"
                    "auth.api_keys.refresh_s (default 1 s). Every change is audited.",
        epilog="examples:\n"
               "  apigw keys issue --id mobile-1 --owner mobile-app --plan pro --tenant acme "
               "--scopes orders:read\n"
               "  apigw keys revoke mobile-1 --reason \"leaked in a crash report\"\n"
               "  apigw keys list\n\n"
               "pepper (must equal the gateway's auth.api_keys.pepper):\n"
               "  from --config FILE or APIGW_CONFIG (auth.api_keys.pepper), else\n"
               f"  {PEPPER_ENV}; empty = plain SHA-256 digests\n\n" + common_env)
    parser.set_defaults(run=run, keys_command=None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE",
                        help="gateway YAML whose auth.api_keys.pepper to use")
    common.add_argument("--actor", default=None, help="who is recorded in the audit stream "
                                                      "(default cli:$USER)")
    tools = parser.add_subparsers(dest="keys_command", metavar="{issue,revoke,list}")
    issuing = tools.add_parser("issue", help="create a key; prints it once",
                               formatter_class=formatter, parents=[common])
    issuing.add_argument("--id", required=True, help="key id (revoke by it)")
    issuing.add_argument("--owner", required=True,
                         help="the client id requests with this key are recorded under")
    issuing.add_argument("--plan", default="", help="plan (free, pro, ...) for default limits")
    issuing.add_argument("--tenant", default="")
    issuing.add_argument("--scopes", default="", metavar="A,B", help="comma-separated scopes")
    issuing.add_argument("--expires-in", type=float, metavar="SECONDS",
                         help="the key expires after this long (default: never)")
    revoking = tools.add_parser("revoke", help="revoke a key by id",
                                formatter_class=formatter, parents=[common])
    revoking.add_argument("id")
    revoking.add_argument("--reason", required=True, help="recorded in the audit stream")
    listing = tools.add_parser("list", help="every key's id, owner, plan, status (no secrets)",
                               formatter_class=formatter)
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run_keys(args: argparse.Namespace) -> int:
    """Run one `apigw keys` subcommand; KeysError for anything the user must fix."""
    import orjson
    from pydantic import ValidationError

    from apigw.settings import CommonSettings

    if args.keys_command is None:
        raise KeysError("choose one of: issue, revoke, list (see apigw keys --help)")
    try:
        settings = CommonSettings()
    except ValidationError as exc:
        raise KeysError(f"invalid settings: {exc.errors()[0]['msg']}") from None
    actor = getattr(args, "actor", None) or default_actor()
    now = time.time()
    if args.keys_command == "issue":
        record = record_from(args, now)
        where = target(settings.redis_url, settings.key_prefix, args.config)
        if not where.pepper:
            print(f"warning: no pepper ({where.pepper_from} is empty): the key is stored as "
                  "plain SHA-256", file=sys.stderr)
        key = asyncio.run(issue(where, record, actor))
        print(key, flush=True)
        expires = f", expires {_when(record.expires_at)}" if record.expires_at else ""
        print(f"issued API key {record.id!r} for {record.owner!r}{expires}; this is the only "
              "time it is shown", file=sys.stderr)
        return 0
    where = Target(settings.redis_url, settings.key_prefix, "", "")
    if args.keys_command == "revoke":
        if not args.reason.strip():
            raise KeysError("--reason must say why")
        if not asyncio.run(revoke(where, args.id, args.reason, actor)):
            print(f"no API key with id {args.id!r}", file=sys.stderr)
            return 1
        print(f"revoked API key {args.id!r}")
        return 0
    records = asyncio.run(list_keys(where))
    if args.json:
        for record in records:
            line = record.model_dump(mode="json")
            line["status"] = _status(record, now)
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
    else:
        print(format_table(records, now))
    return 0
