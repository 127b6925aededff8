"""The collector: Redis Stream of event batches -> ClickHouse `events`, exactly once.

Delivery guarantees, and how:
- At least once: a stream entry is acknowledged (XACK) only after its rows are in ClickHouse
  (or after it went to the dead-letter stream). Unacknowledged entries stay pending in the
  consumer group: this consumer re-reads its own at start (id "0"); entries of a consumer
  that died are claimed by another once idle for `claim_idle_ms`.
- At most once: every insert carries `insert_deduplication_token`, a hash of the batch's entry
  ids, and the tables keep a deduplication window, so inserting the same batch again (crash
  between insert and XACK, a lost XACK reply) adds nothing to `events` or to the rollups.
  The same batch is always re-formed: a consumer's pending list is always full batches
  (`read_count` entries) followed by at most one partial one (it reads ahead only after a
  full batch), and it is re-read, or reclaimed from a dead consumer, `read_count` entries at a
  time in id order (XPENDING + XCLAIM of one consumer's entries, rather than XAUTOCLAIM,
  which would cut across consumers' batches and change the token). Changing `read_count`
  while entries are pending breaks this for those entries: drain first.
- Throughput: entries are decoded to Arrow (collector/batch.py) and inserted as one Arrow
  table; while a full batch is being inserted (in a worker thread, the GIL released), the
  next one is read and decoded.
- Nothing poisons the pipeline: an undecodable entry, or an event whose fields have the wrong
  type, goes to the dead-letter stream with the reason, then is acknowledged.
- ClickHouse down: the insert is retried with exponential back-off, nothing is acknowledged,
  the stream holds the backlog and the lag gauges show it.
- Counted loss: "dropped" markers of the emitters (and events dead-lettered for bad fields)
  are recorded in `event_loss` with the batch, before the acknowledgement; the loss
  accountant (collector/loss.py) runs beside the loop and records what never arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from apigw.logs import error_text
from collector import metrics
from collector.batch import (
    COLUMNS,
    Batch,
    Entry,
    RowError,
    build_batch,
    event_columns,
    event_row,
)
from collector.clickhouse import SharedClient
from collector.loss import LossAccountant, count_losses, record_losses
from collector.settings import CollectorSettings

__all__ = ["COLUMNS", "Batch", "Collector", "RowError", "batch_token", "build_batch",
           "entry_age_s", "event_columns", "event_row"]

log = logging.getLogger(__name__)


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
        self.accountant = LossAccountant(settings, redis, ch)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in progress is finished (or left pending)."""
        log.info("collector started", extra={"stream": self.stream, "group": self.group,
                                             "consumer": self.consumer})
        backoff = self.settings.retry_initial_s
        accounting = asyncio.create_task(self.accountant.run(stop), name="loss-accountant") \
            if self.settings.loss_accounting else None
        try:
            while not stop.is_set():
                try:
                    await self.step(stop)
                    backoff = self.settings.retry_initial_s
                except (RedisError, OSError) as exc:
                    log.warning("redis error; retrying", extra={"error": error_text(exc),
                                                                "retry_in_s": backoff})
                    self._own_pending = True
                    await _sleep(stop, backoff)
                    backoff = min(backoff * 2, self.settings.retry_max_s)
        finally:
            if accounting is not None:
                accounting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await accounting
        log.info("collector stopped", extra={"stats": dict(self.stats),
                                             "lost": self.accountant.lost})

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
        return await self._handle(entries, stop, prefetch=True) if entries else 0

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

    async def _handle(self, entries: list[Entry], stop: asyncio.Event,
                      prefetch: bool = False) -> int:
        """Store `entries` as one batch; return the number of entries handled.

        With `prefetch`, while a full batch (`read_count` entries) is being inserted, the next
        one is read and decoded, and stored in turn. Only after a full batch: a consumer's
        pending list is then always full batches followed by at most one partial batch, so
        re-reading it `read_count` entries at a time after a crash forms the same batches,
        with the same deduplication tokens.
        """
        handled = 0
        batch = await asyncio.to_thread(_build_timed, entries)
        while True:
            self._count_read(entries, batch)
            insert = asyncio.create_task(self._insert(batch, stop)) \
                if batch.rows or batch.losses else None
            following: list[Entry] = []
            following_batch: Batch | None = None
            if prefetch and len(entries) >= self.settings.read_count and not stop.is_set():
                try:
                    following = await self._read(">", block_ms=None)
                    if following:
                        following_batch = await asyncio.to_thread(_build_timed, following)
                except (RedisError, OSError) as exc:
                    # What was delivered (if anything) is pending: re-read it next step.
                    log.warning("read-ahead failed", extra={"error": error_text(exc)})
                    self._own_pending = True
                    following, following_batch = [], None
            if insert is not None and not await insert:
                self._own_pending = True  # stopped while ClickHouse was down: entries stay pending
                return handled + len(entries)
            await self._ack(batch)
            self._count_stored(batch)
            handled += len(entries)
            if following_batch is None:
                return handled
            entries, batch = following, following_batch

    def _count_read(self, entries: list[Entry], batch: Batch) -> None:
        self.stats["entries_read"] += len(entries)
        metrics.ENTRIES_READ.inc(len(entries))
        self.stats["events_in"] += batch.events_in
        metrics.EVENTS_IN.inc(batch.events_in)

    def _count_stored(self, batch: Batch) -> None:
        self.stats["batches"] += 1
        self.stats["rows_written"] += batch.rows
        metrics.ROWS_WRITTEN.inc(batch.rows)
        count_losses(batch.losses)
        if batch.dead:
            self.stats["dead_lettered"] += len(batch.dead)
            metrics.DEAD_LETTERED.inc(len(batch.dead))
            for letter in batch.dead:
                log.warning("dead-lettered a stream entry",
                            extra={"entry_id": letter.entry_id, "reason": letter.reason})

    async def _insert(self, batch: Batch, stop: asyncio.Event) -> bool:
        """Insert the batch, retrying with back-off; False if stopped before it succeeded."""
        token = batch_token(batch.entry_ids)
        backoff = self.settings.retry_initial_s
        while True:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._insert_sync, batch, token)
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

    def _insert_sync(self, batch: Batch, token: str) -> None:
        with self.ch.lock:
            started = time.thread_time()
            try:
                if batch.rows:
                    self.ch.client.insert_arrow(
                        "events", batch.table,
                        settings={"insert_deduplication_token": token,
                                  "deduplicate_blocks_in_dependent_materialized_views": 1})
                record_losses(self.ch.client, batch.losses)
            finally:
                metrics.INSERT_CPU.inc(time.thread_time() - started)

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


def _build_timed(entries: list[Entry]) -> Batch:
    started = time.thread_time()
    try:
        return build_batch(entries)
    finally:
        metrics.DECODE_CPU.inc(time.thread_time() - started)


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless stopped; True if `stop` was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()

