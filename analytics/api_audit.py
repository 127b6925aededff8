"""Reading the audit log with filters: actor, action, subject (each exact or a prefix ending in
`*`) and a time range, newest first.

The log is the Redis stream `RedisKeys.audit` written by `PolicyStore.audit`; its entry ids
start with the time the record was written (ms), so the range bounds the scan itself. The other
filters are applied while scanning, at most `MAX_SCANNED` entries per call.
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis
from pydantic import ValidationError

from analytics.api_models import AuditParams
from proxy.policy_store import AuditRecord

PAGE: Final = 1000
MAX_SCANNED: Final = 20 * PAGE


def matches(value: str, pattern: str | None) -> bool:
    if pattern is None:
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _wanted(record: AuditRecord, params: AuditParams) -> bool:
    return (matches(record.subject, params.subject) and matches(record.actor, params.actor)
            and matches(record.action, params.action))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def audit_records(redis: aioredis.Redis, key: str, params: AuditParams,
                        ) -> list[AuditRecord]:
    """Up to `params.count` records matching every filter, newest first."""
    upper = str(int(params.to * 1000) - 1) if params.to is not None else "+"
    lower = str(int(params.from_ * 1000)) if params.from_ is not None else "-"
    found: list[AuditRecord] = []
    scanned = 0
    while scanned < MAX_SCANNED:
        entries: Any = await redis.xrevrange(key, max=upper, min=lower, count=PAGE)
        for entry_id, fields in entries:
            raw = fields.get(b"r", fields.get("r"))
            try:
                record = AuditRecord.model_validate_json(raw).model_copy(
                    update={"id": _text(entry_id)})
            except (ValidationError, TypeError, ValueError):
                continue  # unreadable (or foreign) entries are skipped, as the store does
            if _wanted(record, params):
                found.append(record)
                if len(found) >= params.count:
                    return found
        scanned += len(entries)
        if len(entries) < PAGE:
            break
        upper = "(" + _text(entries[-1][0])
    return found
