"""The collector: Redis Stream of event batches -> ClickHouse `events`, exactly once.

Delivery guarantees, and how:
- At least once: a stream entry is acknowledged (XACK) only after its rows are in ClickHouse
  (or after it went to the dead-letter stream). Unacknowledged entries stay pending in the
  consumer group: this consumer re-reads its own at start (id "0"); entries of a consumer
  that died are claimed by another once idle for `claim_idle_ms`.
- At most once: every insert carries `insert_deduplication_token`, a hash of the batch's entry
  ids, and the tables keep a deduplication window, so inserting the same batch again (crash
  between insert and XACK, a lost XACK reply) adds nothing to `events` or to the rollups.
  The same batch is always re-formed because a consumer has at most one batch in flight, and
  reclaiming takes over one dead consumer's whole pending list at once (XPENDING + XCLAIM,
  rather than XAUTOCLAIM, which would cut across consumers' batches and change the token).
- Nothing poisons the pipeline: an undecodable entry, or an event whose fields have the wrong
  type, goes to the dead-letter stream with the reason, then is acknowledged.
- ClickHouse down: the insert is retried with exponential back-off, nothing is acknowledged,
  the stream holds the backlog and the lag gauges show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from collector import metrics
from collector.clickhouse import SharedClient
from collector.settings import CollectorSettings
from proxy.event import EVENT_FIELDS, EventDecodeError, RequestEvent, decode_batch

log = logging.getLogger(__name__)

Entry = tuple[str, dict[bytes, bytes] | None]

# Column bounds for integer fields; the others are UInt64 (see collector/schema.py).
_INT_BOUNDS: Final = {"http_response_status_code": 0xFFFF, "schema_version": 0xFF,
                      "retries": 0xFFFF}
_UINT64_MAX: Final = 2**64 - 1
_MAX_TIMESTAMP: Final = 10_413_792_000.0  # 2300-01-01, past DateTime64's range end


class RowError(ValueError):
    """An event whose fields can't be stored in the events table."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Column:
    name: str
    kind: str  # timestamp | str | int | float
    default: Any
    high: int = _UINT64_MAX


def _columns() -> tuple[_Column, ...]:
    columns = []
    for field in dataclasses.fields(RequestEvent):
        kind = "timestamp" if field.name == "timestamp" else str(field.type)
        if kind not in ("timestamp", "str", "int", "float"):
            raise TypeError(f"RequestEvent.{field.name} has type {field.type}: teach the "
                            "collector to store it")
        default = None if field.default is dataclasses.MISSING else field.default
        columns.append(_Column(field.name, kind, default,
                               _INT_BOUNDS.get(field.name, _UINT64_MAX)))
    return tuple(columns)


COLUMNS: Final = _columns()
assert tuple(c.name for c in COLUMNS) == EVENT_FIELDS


def _bad(column: _Column, value: Any) -> RowError:
    return RowError(f"field {column.name}: {value!r} is not a valid {column.kind}")


def _convert(column: _Column, value: Any) -> Any:
    kind = column.kind
    if kind == "str":
        if type(value) is str:
            return value
    elif kind == "int":
        if type(value) is int and 0 <= value <= column.high:
            return value
    elif kind == "float":
        if type(value) in (float, int) and math.isfinite(value):
            return float(value)
    elif type(value) in (float, int) and 0 <= value < _MAX_TIMESTAMP:
        return round(value * 1000)  # DateTime64(3) ticks: epoch milliseconds, UTC
    raise _bad(column, value)


def event_row(event: dict[str, Any]) -> list[Any]:
    """One event as a row in EVENT_FIELDS order; RowError if a field can't be stored."""
    return [_convert(c, event.get(c.name, c.default)) for c in COLUMNS]


def _column_ok(column: _Column, values: list[Any]) -> bool:
    types = set(map(type, values))
    kind = column.kind
    if kind == "str":
        return types <= {str}
    if kind == "int":
        return types <= {int} and (not values or (min(values) >= 0 and
                                                  max(values) <= column.high))
    if not types <= {float, int}:
        return False
    if kind == "timestamp":
        return not values or (min(values) >= 0 and max(values) < _MAX_TIMESTAMP)
    return all(map(math.isfinite, values))


def event_columns(events: Sequence[dict[str, Any]]) -> list[list[Any]] | None:
    """All events as columns in EVENT_FIELDS order, or None if any event has a bad field.

    The fast path: one pass per column, in C where possible, instead of a call per value.
    """
    columns: list[list[Any]] = []
    for column in COLUMNS:
        values: list[Any] = list(map(dict.get, events, repeat(column.name),
                                     repeat(column.default)))
        if not _column_ok(column, values):
            return None
        if column.kind == "timestamp":
            values = [round(v * 1000) for v in values]  # DateTime64(3) ticks
        elif column.kind == "float" and int in set(map(type, values)):
            values = list(map(float, values))
        columns.append(values)
    return columns


def batch_token(entry_ids: Sequence[str]) -> str:
    """The insert deduplication token of a batch: a function of its stream entry ids only."""
    digest = hashlib.sha256(",".join(sorted(entry_ids)).encode()).hexdigest()
    return f"apigw-events-{digest[:40]}"


def entry_age_s(entry_id: str, now: float | None = None) -> float:
    """Age of a stream entry from the millisecond time in its id."""
    millis = int(entry_id.split("-", 1)[0])
    return max(0.0, (now if now is not None else time.time()) - millis / 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: dict[Any, Any] | None) -> dict[bytes, bytes] | None:
    """Entry fields with bytes keys and values, whatever the client's decode_responses."""
    if raw is None:
        return None
    return {(k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in raw.items()}


@dataclasses.dataclass(slots=True)
class _DeadLetter:
    entry_id: str
    reason: str
    fields: dict[bytes, bytes]


@dataclasses.dataclass(slots=True)
class Batch:
    """What one read of the stream turned into: rows to insert, entries to dead-letter."""

    entry_ids: list[str]
    columns: list[list[Any]]
    rows: int
    events_in: int
    dead: list[_DeadLetter]


def build_batch(entries: Sequence[Entry]) -> Batch:
    """Decode and convert stream entries; poison entries and bad events become dead letters."""
    dead: list[_DeadLetter] = []
    good: list[tuple[str, list[dict[str, Any]]]] = []
    for entry_id, fields in entries:
        if not fields:
            dead.append(_DeadLetter(entry_id, "entry was deleted from the stream before it "
                                              "was stored (stream trimmed by MAXLEN?)", {}))
            continue
        try:
            version = fields.get(b"v")
            payload = fields.get(b"b")
            if version is None or payload is None:
                raise EventDecodeError("entry lacks the fields v and b")
            good.append((entry_id, decode_batch(version, payload)))
        except EventDecodeError as exc:
            dead.append(_DeadLetter(entry_id, f"undecodable entry: {exc}", fields))
    events = [event for _, batch in good for event in batch]
    decoded = len(events)
    columns = event_columns(events)
    if columns is None:  # some event has a bad field: find them one by one
        events = []
        for entry_id, batch in good:
            rejected: list[dict[str, Any]] = []
            reasons: list[str] = []
            for event in batch:
                try:
                    event_row(event)
                except RowError as exc:
                    rejected.append(event)
                    reasons.append(str(exc))
                else:
                    events.append(event)
            if rejected:
                dead.append(_DeadLetter(
                    entry_id, f"{len(rejected)} event(s) with bad fields: " + "; ".join(
                        sorted(set(reasons))[:5]),
                    {b"v": b"1", b"b": orjson.dumps(rejected)}))
        columns = event_columns(events)
        assert columns is not None
    return Batch([entry_id for entry_id, _ in entries], columns, len(events), decoded, dead)


class Collector:
    """One consumer of the events stream's consumer group, writing to ClickHouse."""

    def __init__(self, settings: CollectorSettings, redis: aioredis.Redis,
                 ch: SharedClient) -> None:
        self.settings = settings
        self.redis = redis
        self.ch = ch
        self.stream = settings.events_stream
        self.group = settings.consumer_group
        self.consumer = settings.consumer_name
        self.stats: dict[str, int] = {
            "entries_read": 0, "events_in": 0, "rows_written": 0, "dead_lettered": 0,
            "insert_errors": 0, "batches": 0, "reclaimed": 0, "lag_entries": 0,
        }
        self._own_pending = True  # re-read this consumer's pending entries first
        self._next_claim = 0.0
        self._next_lag = 0.0
        self._group_ready = False
        self.last_insert_error: str | None = None  # set while a batch keeps failing

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in progress is finished (or left pending)."""
        log.info("collector started", extra={"stream": self.stream, "group": self.group,
                                             "consumer": self.consumer})
        backoff = self.settings.retry_initial_s
        while not stop.is_set():
            try:
                await self.step(stop)
                backoff = self.settings.retry_initial_s
            except (RedisError, OSError) as exc:
                log.warning("redis error; retrying", extra={"error": repr(exc),
                                                            "retry_in_s": backoff})
                self._own_pending = True
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, self.settings.retry_max_s)
        log.info("collector stopped", extra={"stats": dict(self.stats)})

    async def drain(self, idle_s: float = 0.5, timeout_s: float = 30) -> int:
        """Process until nothing new or pending arrived for `idle_s`; return rows written."""
        stop = asyncio.Event()
        deadline = asyncio.get_running_loop().call_later(timeout_s, stop.set)
        before = self.stats["rows_written"]
        block_ms = max(1, min(self.settings.block_ms, int(idle_s * 1000)))
        self._next_claim = 0.0
        try:
            quiet_since = time.monotonic()
            while not stop.is_set():
                if await self.step(stop, block_ms=block_ms):
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= idle_s:
                    break
            else:
                log.warning("drain timed out", extra={"timeout_s": timeout_s})
        finally:
            deadline.cancel()
        await self.update_lag()
        return self.stats["rows_written"] - before

    async def step(self, stop: asyncio.Event, block_ms: int | None = None) -> int:
        """Read and store one batch; return the number of entries handled (0: none waiting)."""
        await self._ensure_group()
        now = time.monotonic()
        if now >= self._next_lag:
            self._next_lag = now + 5.0
            await self.update_lag()
        if self._own_pending:
            entries = await self._read("0", block_ms=None)
            if entries:
                return await self._handle(entries, stop)
            self._own_pending = False
        if now >= self._next_claim:
            entries = await self.reclaim()
            if entries:
                return await self._handle(entries, stop)
            self._next_claim = now + self.settings.claim_interval_s
        entries = await self._read(">", block_ms=block_ms or self.settings.block_ms)
        return await self._handle(entries, stop) if entries else 0

    # -- stream operations ------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group", extra={"stream": self.stream, "group": self.group})
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self, start: str, block_ms: int | None) -> list[Entry]:
        try:
            reply: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: start},
                count=self.settings.read_count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream or group was deleted under us
                self._group_ready = False
                return []
            raise
        entries: list[Entry] = []
        for _stream, items in reply or []:
            entries.extend((_text(entry_id), _fields(fields)) for entry_id, fields in items)
        return entries

    async def reclaim(self) -> list[Entry]:
        """Take over the whole pending list of one consumer idle for `claim_idle_ms`."""
        idle = self.settings.claim_idle_ms
        pending: Any = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=self.settings.read_count * 10,
            idle=idle)
        owners: dict[str, list[str]] = {}
        for item in pending:
            owner = _text(item["consumer"])
            if owner != self.consumer:
                owners.setdefault(owner, []).append(_text(item["message_id"]))
        if not owners:
            return []
        owner, ids = next(iter(owners.items()))
        ids = ids[: self.settings.read_count]
        claimed: Any = await self.redis.xclaim(self.stream, self.group, self.consumer, idle,
                                               list(ids))
        entries: list[Entry] = [(_text(entry_id), _fields(fields))
                                for entry_id, fields in claimed if entry_id is not None]
        gone = set(ids) - {entry_id for entry_id, _ in entries}
        # Entries trimmed from the stream while pending come back without fields (or not at
        # all): they are dead-lettered so that they leave the pending list.
        entries.extend((entry_id, None) for entry_id in sorted(gone))
        if entries:
            self.stats["reclaimed"] += len(entries)
            metrics.RECLAIMED.inc(len(entries))
            log.warning("reclaimed pending entries of an idle consumer",
                        extra={"from_consumer": owner, "entries": len(entries)})
        return sorted(entries, key=lambda entry: _id_key(entry[0]))

    async def update_lag(self) -> None:
        """Refresh the lag gauges: entries and seconds not yet acknowledged by the group.

        Entries = pending + the group's `lag` (undelivered entries, Redis >= 7; older servers
        don't report it and only pending entries are counted). Seconds = age of the oldest
        pending or undelivered entry, from the time in its id (exact on every version).
        """
        try:
            groups: Any = await self.redis.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            return
        info = next((g for g in groups if _text(g["name"]) == self.group), None)
        if info is None:
            return
        pending = int(info["pending"])
        undelivered: Any = await self.redis.xrange(
            self.stream, min="(" + _text(info["last-delivered-id"]), count=1)
        oldest: list[str] = []
        if pending:
            summary: Any = await self.redis.xpending(self.stream, self.group)
            if summary.get("min"):
                oldest.append(_text(summary["min"]))
        if undelivered:
            oldest.append(_text(undelivered[0][0]))
        entries = pending + int(info.get("lag") or 0)
        self.stats["lag_entries"] = entries
        metrics.LAG_ENTRIES.set(entries)
        metrics.LAG_SECONDS.set(max((entry_age_s(i) for i in oldest), default=0.0))

    # -- one batch --------------------------------------------------------------------------

    async def _handle(self, entries: list[Entry], stop: asyncio.Event) -> int:
        self.stats["entries_read"] += len(entries)
        metrics.ENTRIES_READ.inc(len(entries))
        batch = await asyncio.to_thread(build_batch, entries)
        self.stats["events_in"] += batch.events_in
        metrics.EVENTS_IN.inc(batch.events_in)
        if batch.rows and not await self._insert(batch, stop):
            self._own_pending = True  # stopped while ClickHouse was down: entries stay pending
            return len(entries)
        await self._ack(batch)
        self.stats["batches"] += 1
        self.stats["rows_written"] += batch.rows
        metrics.ROWS_WRITTEN.inc(batch.rows)
        if batch.dead:
            self.stats["dead_lettered"] += len(batch.dead)
            metrics.DEAD_LETTERED.inc(len(batch.dead))
            for letter in batch.dead:
                log.warning("dead-lettered a stream entry",
                            extra={"entry_id": letter.entry_id, "reason": letter.reason})
        return len(entries)

    async def _insert(self, batch: Batch, stop: asyncio.Event) -> bool:
        """Insert the batch, retrying with back-off; False if stopped before it succeeded."""
        token = batch_token(batch.entry_ids)
        backoff = self.settings.retry_initial_s
        while True:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._insert_sync, batch.columns, token)
            except Exception as exc:  # any failure: the stream keeps the batch, try again
                self.stats["insert_errors"] += 1
                self.last_insert_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                metrics.INSERT_ERRORS.inc()
                log.warning("insert failed; will retry", extra={
                    "error": repr(exc)[:500], "rows": batch.rows, "retry_in_s": backoff})
                if await _sleep(stop, backoff):
                    return False
                backoff = min(backoff * 2, self.settings.retry_max_s)
                continue
            self.last_insert_error = None
            metrics.INSERT_DURATION.observe(time.perf_counter() - started)
            metrics.BATCH_ROWS.observe(batch.rows)
            return True

    def _insert_sync(self, columns: list[list[Any]], token: str) -> None:
        with self.ch.lock:
            self.ch.client.insert(
                "events", columns, column_names=list(EVENT_FIELDS), column_oriented=True,
                settings={"insert_deduplication_token": token,
                          "deduplicate_blocks_in_dependent_materialized_views": 1})

    async def _ack(self, batch: Batch) -> None:
        """Dead letters and the acknowledgement in one MULTI: both happen or neither does."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for letter in batch.dead:
                fields: dict[Any, Any] = {
                    **letter.fields, "reason": letter.reason, "source_id": letter.entry_id,
                    "source_stream": self.stream, "consumer": self.consumer,
                    "dead_at": repr(time.time())}
                pipe.xadd(self.settings.dead_letter_stream, fields,
                          maxlen=self.settings.dead_letter_maxlen, approximate=True)
            pipe.xack(self.stream, self.group, *batch.entry_ids)
            await pipe.execute()


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless stopped; True if `stop` was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()

