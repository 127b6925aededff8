"""Loss accounting: every event an emitter numbered is stored, or counted as lost with a reason.

Each proxy emitter numbers its events 1, 2, 3, ... without gaps (proxy/emitter.py). What the
pipeline knows about the numbers of one emitter:
- stored: `event_seq_blocks` (min/max/count per insert block, kept by a materialized view);
- reported: ranges the emitter dropped itself (its "dropped" markers) and events the collector
  dead-lettered for bad fields, written to `event_loss` when their stream entry is stored;
- its heartbeat in Redis (`RedisKeys.event_emitters`): the last number assigned, the last one
  handed to Redis, when, and whether it closed; and, for a worker the proxy's parent saw die,
  the exact last number it assigned (`RedisKeys.event_emitter_deaths`).

The accountant (one per collector process, one active at a time through a Redis lease) settles
numbers once nothing more can arrive for them, that is once every stream entry written up to
the heartbeat that vouches for them has been acknowledged by the consumer group:
- a live emitter: numbers up to the `handed` mark of a heartbeat seen one check earlier;
  missing ones were in the stream and never stored: `trimmed` (MAXLEN, or a Redis restart
  without persistence);
- a finished emitter (closed, recorded dead, or a heartbeat this accountant has seen unchanged
  for `emitter_grace_s`, by its own clock: a Redis outage or clock skew does not make a live
  emitter look dead): every number up to its final `assigned` mark; missing ones above
  `handed` never left the process: `worker_killed`.
Missing ranges go to `event_loss` and `apigw_events_lost_total{reason}`. Numbers assigned after
an emitter's last heartbeat by a process that died without its parent noticing (the whole
proxy SIGKILLed) are beyond reach: at most one flush interval of that worker's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from clickhouse_connect.driver.client import Client
from redis.exceptions import RedisError, ResponseError

from collector import metrics
from collector.clickhouse import SharedClient
from collector.settings import CollectorSettings
from proxy.policy import RedisKeys

log = logging.getLogger(__name__)

TRIMMED = "trimmed"
WORKER_KILLED = "worker_killed"
DEAD_LETTERED = "dead_lettered"
_LOSS_COLUMNS = ["emitter", "seq_from", "seq_to", "events", "reason", "detected_at"]


@dataclass(frozen=True, slots=True)
class LossRange:
    """Numbers `seq_from`..`seq_to` (inclusive) of one emitter, lost for `reason`."""

    emitter: str
    seq_from: int
    seq_to: int
    reason: str

    @property
    def events(self) -> int:
        return self.seq_to - self.seq_from + 1


def dropped_reason(reason: str) -> str:
    """The `event_loss` reason of a range an emitter reported dropped."""
    return f"dropped_{reason}"


def ranges_of(emitter: str, seqs: Iterable[int], reason: str) -> list[LossRange]:
    """Consecutive numbers joined into ranges (for the rare per-event paths)."""
    result: list[LossRange] = []
    for seq in sorted(set(seqs)):
        if result and result[-1].seq_to + 1 == seq:
            last = result[-1]
            result[-1] = LossRange(emitter, last.seq_from, seq, reason)
        else:
            result.append(LossRange(emitter, seq, seq, reason))
    return result


def record_losses(client: Client, ranges: Sequence[LossRange]) -> None:
    """Insert loss ranges (caller holds the client's lock). Idempotent once merged: the
    table replaces rows with the same (emitter, seq_from, reason)."""
    if not ranges:
        return
    now = datetime.now(UTC)
    client.insert("event_loss", [[r.emitter, r.seq_from, r.seq_to, r.events, r.reason, now]
                                 for r in ranges], column_names=_LOSS_COLUMNS)


def count_losses(ranges: Iterable[LossRange]) -> None:
    for r in ranges:
        metrics.EVENTS_LOST.labels(r.reason).inc(r.events)


def lost_by_reason(client: Client) -> dict[str, int]:
    """Counted loss so far, by reason (caller holds the client's lock)."""
    rows = client.query("SELECT reason, sum(events) FROM event_loss FINAL GROUP BY reason")
    return {str(reason): int(events) for reason, events in rows.result_rows}


def holes(low: int, high: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [low, high] outside every (inclusive) interval in `covered`."""
    result: list[tuple[int, int]] = []
    nxt = low
    for start, end in sorted(covered):
        if end < nxt:
            continue
        if start > high:
            break
        if start > nxt:
            result.append((nxt, start - 1))
        nxt = max(nxt, end + 1)
    if nxt <= high:
        result.append((nxt, high))
    return result


@dataclass(frozen=True, slots=True)
class Heartbeat:
    assigned: int
    handed: int
    at: float  # the emitter's wall clock, seconds
    closed: bool

    @classmethod
    def parse(cls, raw: bytes) -> Heartbeat | None:
        try:
            body = orjson.loads(raw)
            return cls(int(body["assigned"]), int(body["handed"]), float(body["at"]),
                       bool(body.get("closed", False)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to settle of one emitter: numbers up to `limit`; above `handed` = never sent."""

    emitter: str
    limit: int
    handed: int
    finished: bool


class LossAccountant:
    """Finds the numbers that never reached ClickHouse and records them as counted loss."""

    def __init__(self, settings: CollectorSettings, redis: aioredis.Redis,
                 ch: SharedClient) -> None:
        self.settings = settings
        self.redis = redis
        self.ch = ch
        self.keys = RedisKeys(settings.key_prefix)
        self.owner = settings.consumer_name
        self.lost: dict[str, int] = {}  # recorded by this accountant, by reason
        self._settled: dict[str, int] = {}  # emitter -> numbers 1..n settled
        self._previous: dict[str, Heartbeat] = {}  # live emitters' heartbeat one check ago
        self._unchanged: dict[str, tuple[Heartbeat, float]] = {}  # heartbeat, seen since

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.settings.loss_check_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set():
                return
            try:
                if await self._lease(interval):
                    await self.check()
            except (RedisError, OSError) as exc:
                log.warning("loss accounting skipped: redis", extra={"error": repr(exc)[:200]})
            except Exception:  # ClickHouse down and the like: the next check retries
                log.exception("loss accounting failed; will retry")

    async def _lease(self, interval: float) -> bool:
        """One accountant at a time (counters would double otherwise); the lease lasts three
        check intervals, so a dead holder is replaced soon."""
        ttl_ms = int(interval * 3000) + 1000
        key = self.keys.loss_accountant_lock
        if await self.redis.set(key, self.owner, nx=True, px=ttl_ms):
            return True
        holder: Any = await self.redis.get(key)
        if holder is not None and holder.decode() == self.owner:
            await self.redis.pexpire(key, ttl_ms)
            return True
        return False

    async def check(self) -> list[LossRange]:
        """One pass: settle what can be settled, record and count the missing ranges."""
        raw_beats: Any = await self.redis.hgetall(self.keys.event_emitters)
        raw_deaths: Any = await self.redis.hgetall(self.keys.event_emitter_deaths)
        # After reading the heartbeats: every entry written with one of them is in the stream.
        acked_before_ms = await self._acknowledged_before_ms()
        if acked_before_ms is None:
            return []
        margin_ms = self.settings.loss_clock_margin_ms
        now = time.time()
        seen_at = time.monotonic()
        beats = {key.decode(): beat for key, value in raw_beats.items()
                 if (beat := Heartbeat.parse(value)) is not None}
        deaths: dict[str, tuple[int, float]] = {}
        for key, value in raw_deaths.items():
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                body = orjson.loads(value)
                deaths[key.decode()] = (int(body["assigned"]), float(body["at"]))
        plans: list[_Plan] = []
        for emitter in beats.keys() | deaths.keys():
            beat = beats.get(emitter)
            death = deaths.get(emitter)
            silent = False
            if beat is not None:
                known, since = self._unchanged.get(emitter, (None, seen_at))
                if known != beat:
                    since = seen_at
                self._unchanged[emitter] = (beat, since)
                silent = seen_at - since > self.settings.emitter_grace_s
            if death is not None or beat is None or beat.closed or silent:
                assigned = max(beat.assigned if beat else 0, death[0] if death else 0)
                handed = beat.handed if beat else 0
                at = beat.at if beat else death[1] if death else now
                if acked_before_ms > at * 1000 + margin_ms:
                    plans.append(_Plan(emitter, assigned, handed, True))
                continue
            previous = self._previous.get(emitter)
            self._previous[emitter] = beat
            if previous is not None and acked_before_ms > previous.at * 1000 + margin_ms:
                plans.append(_Plan(emitter, previous.handed, previous.handed, False))
        for gone in self._unchanged.keys() - beats.keys():
            del self._unchanged[gone]
        if not plans:
            return []
        found = await asyncio.to_thread(self._settle, plans)
        finished = [plan.emitter for plan in plans if plan.finished]
        if finished:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.event_emitters, *finished)
                pipe.hdel(self.keys.event_emitter_deaths, *finished)
                await pipe.execute()
            for emitter in finished:
                self._settled.pop(emitter, None)
                self._previous.pop(emitter, None)
                self._unchanged.pop(emitter, None)
        count_losses(found)
        for r in found:
            self.lost[r.reason] = self.lost.get(r.reason, 0) + r.events
            log.warning("events lost", extra={"emitter": r.emitter, "seq_from": r.seq_from,
                                              "seq_to": r.seq_to, "events": r.events,
                                              "reason": r.reason})
        return found

    async def _acknowledged_before_ms(self) -> float | None:
        """A time (ms, stream id clock) before which the group acknowledged every entry
        still in the stream; inf when nothing is unacknowledged; None when unknown."""
        stream, group = self.settings.events_stream, self.settings.consumer_group
        try:
            groups: Any = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return None  # no stream yet
        info = next((g for g in groups if g["name"].decode() == group), None)
        if info is None:
            return None  # no collector has read yet
        oldest: list[str] = []
        if int(info["pending"]):
            summary: Any = await self.redis.xpending(stream, group)
            if summary.get("min"):
                oldest.append(_text(summary["min"]))
        undelivered: Any = await self.redis.xrange(
            stream, min="(" + _text(info["last-delivered-id"]), count=1)
        if undelivered:
            oldest.append(_text(undelivered[0][0]))
        if not oldest:
            return float("inf")
        return float(min(int(entry_id.split("-", 1)[0]) for entry_id in oldest))

    # -- ClickHouse side (a worker thread) ---------------------------------------------------

    def _settle(self, plans: list[_Plan]) -> list[LossRange]:
        with self.ch.lock:
            client = self.ch.client
            found: list[LossRange] = []
            for plan in plans:
                found += self._settle_one(client, plan)
            record_losses(client, found)
        return found

    def _settle_one(self, client: Client, plan: _Plan) -> list[LossRange]:
        start = self._settled.get(plan.emitter, 0) + 1
        params: dict[str, Any] = {"e": plan.emitter, "start": start}
        blocks = [(int(a), int(b), int(n)) for a, b, n in client.query(
            "SELECT seq_min, seq_max, events FROM event_seq_blocks WHERE emitter = {e:String} "
            "AND seq_max >= {start:UInt64}", parameters=params).result_rows]
        limit = max([plan.limit, *(b for _, b, _ in blocks)]) if plan.finished else plan.limit
        if limit < start:
            return []
        low = min([start, *(a for a, _, _ in blocks)])
        params["low"] = low
        known = {(int(a), int(b)) for a, b in client.query(
            "SELECT seq_from, seq_to FROM event_loss FINAL WHERE emitter = {e:String} "
            "AND seq_to >= {low:UInt64}", parameters=params).result_rows}
        missing = self._missing(client, plan.emitter, low, limit, blocks, known)
        self._settled[plan.emitter] = limit
        result: list[LossRange] = []
        for gap_from, gap_to in missing:
            gap_from, gap_to = max(gap_from, start), min(gap_to, limit)
            if gap_from > gap_to:
                continue
            if gap_from <= plan.handed:
                result.append(LossRange(plan.emitter, gap_from, min(gap_to, plan.handed),
                                        TRIMMED))
            if gap_to > plan.handed:
                result.append(LossRange(plan.emitter, max(gap_from, plan.handed + 1), gap_to,
                                        WORKER_KILLED))
        return result

    @staticmethod
    def _missing(client: Client, emitter: str, low: int, high: int,
                 blocks: list[tuple[int, int, int]],
                 known: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """Numbers in [low, high] neither stored nor already recorded. From the blocks alone
        when their counts add up; else the stored numbers of that stretch are read back."""
        spans = [(a, b) for a, b, _ in blocks] + sorted(known)
        missing = holes(low, high, spans)
        stretches = _merge(spans)
        for stretch_low, stretch_high in stretches:
            inside = sum(n for a, b, n in blocks if stretch_low <= a and b <= stretch_high)
            inside += sum(b - a + 1 for a, b in known if stretch_low <= a and b <= stretch_high)
            if inside == stretch_high - stretch_low + 1:
                continue  # stored and recorded numbers fill the stretch exactly
            present = client.query(
                "SELECT DISTINCT gateway_event_seq FROM events WHERE gateway_emitter = "
                "{e:String} AND gateway_event_seq BETWEEN {a:UInt64} AND {b:UInt64}",
                parameters={"e": emitter, "a": stretch_low, "b": stretch_high}).result_rows
            seqs = np.array(sorted(int(row[0]) for row in present), dtype=np.int64)
            missing += holes(stretch_low, stretch_high,
                             [*_runs(seqs), *(k for k in known
                                              if k[1] >= stretch_low and k[0] <= stretch_high)])
        return [(a, b) for a, b in _merge(missing) if b >= low and a <= high]


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _runs(seqs: np.ndarray[Any, np.dtype[np.int64]]) -> list[tuple[int, int]]:
    """Sorted distinct numbers -> runs of consecutive ones (vectorised)."""
    if not len(seqs):
        return []
    breaks = np.flatnonzero(np.diff(seqs) != 1)
    starts = np.concatenate(([seqs[0]], seqs[breaks + 1]))
    ends = np.concatenate((seqs[breaks], [seqs[-1]]))
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
