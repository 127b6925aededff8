"""Helpers of the fault suite: steady load, a misbehaving upstream, the pipeline's books.

Everything is real: an open-loop load generator over aiohttp, a raw-socket upstream whose
behaviour is switched at run time (hang, reset, 5xx, half a body), a redis-server of the
test's own that is stopped and started on the same port, the collector in-process or as a
subprocess on a chDB directory, and the gateway in-process or as `apigw proxy`.

Each fault test produces a `FaultResult`; `record()` writes it to tests/artifacts/faults/ and
rebuilds tests/artifacts/fault_table.md from every result there (the table in
docs/reliability.md is copied from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from collector.clickhouse import SharedClient
from collector.consumer import Collector
from collector.schema import migrate
from collector.settings import CollectorSettings

ARTIFACTS = Path(__file__).parent / "artifacts"
STREAM = "apigw:events"
DEAD_STREAM = "apigw:events:dead"


def env_seconds(name: str, default: float, full: float) -> float:
    """A duration from $name, else the issue's full figure under APIGW_FAULT_FULL=1, else the
    short CI default."""
    if os.environ.get(name):
        return float(os.environ[name])
    return full if os.environ.get("APIGW_FAULT_FULL") == "1" else default


# --- load ------------------------------------------------------------------------------------

@dataclass(slots=True)
class Sample:
    phase: str
    path: str
    started: float  # monotonic
    latency_s: float
    status: int | None  # None: no response at all
    error: str  # exception class name when the exchange failed ("" otherwise)


class Load:
    """Open-loop load: `rate` requests/s whatever the answers, paths taken in turn.

    Open loop matters for faults: a hanging upstream must not slow the generator down (a
    closed loop would hide the damage by sending less). At most `max_in_flight` requests are
    outstanding; beyond that a tick is counted in `skipped` instead of sent.
    """

    def __init__(self, base_url: str, paths: Sequence[str], rate: float,
                 timeout_s: float = 5.0, max_in_flight: int = 256,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url
        self.paths = list(paths)
        self.rate = rate
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.headers = headers or {}
        self.phase = "before"
        self.samples: list[Sample] = []
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.phase_started: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        self.phase = phase
        self.phase_started[phase] = time.monotonic()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self.mark("before")
        self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            await self._runner
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.timeout_s + 2)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        interval = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        index = 0
        while not self._stop.is_set():
            if len(self._tasks) >= self.max_in_flight:
                self.skipped += 1
            else:
                path = self.paths[index % len(self.paths)]
                index += 1
                task = asyncio.create_task(self._one(path))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
            else:
                next_at = loop.time()  # fell behind: don't burst to catch up

    async def _one(self, path: str) -> None:
        assert self._session is not None
        phase = self.phase
        started = time.monotonic()
        status: int | None = None
        error = ""
        try:
            async with self._session.get(self.base_url + path, headers=self.headers) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = type(exc).__name__
        self.samples.append(Sample(phase, path, started, time.monotonic() - started, status,
                                   error))

    def answered(self) -> int:
        """Requests that got a status line back (an event is owed for each)."""
        return sum(sample.status is not None for sample in self.samples)


def p99_ms(samples: Iterable[Sample]) -> float:
    latencies = sorted(sample.latency_s for sample in samples)
    if not latencies:
        return 0.0
    return round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 1)


Judge = Callable[[Sample], str]  # "ok" | "correct" (an expected failure) | "incorrect"


def judge_ok_only(sample: Sample) -> str:
    return "ok" if sample.status is not None and sample.status < 400 and not sample.error \
        else "incorrect"


def judge_upstream_fault(broken_prefix: str, allowed: frozenset[int] = frozenset({502, 503, 504}),
                         truncation_ok: bool = False) -> Judge:
    """Requests under `broken_prefix` may fail with 502/503/504 (or, with `truncation_ok`, a
    visibly cut body); everything else must succeed. A 500 is never correct."""

    def judge(sample: Sample) -> str:
        if sample.status is not None and sample.status < 400 and not sample.error:
            return "ok"
        if not sample.path.startswith(broken_prefix):
            return "incorrect"
        if sample.status in allowed and not sample.error:
            return "correct"
        if truncation_ok and sample.error in ("ClientPayloadError", "ServerDisconnectedError"):
            return "correct"
        return "incorrect"

    return judge


def recovery_s(samples: Sequence[Sample], judge: Judge, fault_end: float) -> float:
    """Seconds from the end of the fault to the start of the last failed request after it."""
    late = [s.started for s in samples if s.started >= fault_end and judge(s) != "ok"]
    return round(max(late) - fault_end, 2) if late else 0.0


# --- results ---------------------------------------------------------------------------------

@dataclass
class FaultResult:
    name: str
    fault: str
    fault_s: float
    rate: float
    sent: int = 0
    failed: int = 0
    failed_correct: int = 0
    failed_incorrect: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    p99_before_ms: float = 0.0
    p99_during_ms: float = 0.0
    p99_after_ms: float = 0.0
    recover_requests_s: float = 0.0
    recover_pipeline_s: float = 0.0
    answered: int = 0
    emitted: int = 0
    rows: int = 0
    rollup_requests: int = 0
    dropped: int = 0
    dead_lettered: int = 0
    unexplained: int = 0
    note: str = ""

    def fill_requests(self, load: Load, judge: Judge, fault_end: float) -> None:
        samples = load.samples
        verdicts = [judge(sample) for sample in samples]
        self.sent = len(samples)
        self.failed = sum(v != "ok" for v in verdicts)
        self.failed_correct = verdicts.count("correct")
        self.failed_incorrect = verdicts.count("incorrect")
        kinds: Counter[str] = Counter()
        for sample, verdict in zip(samples, verdicts, strict=True):
            if verdict != "ok":
                kind = str(sample.status) if sample.status is not None else sample.error
                if sample.error and sample.status is not None:
                    kind = f"{sample.status}+{sample.error}"
                kinds[f"{kind}{'' if verdict == 'correct' else '!'}"] += 1
        self.failure_kinds = dict(sorted(kinds.items()))
        self.p99_before_ms = p99_ms(s for s in samples if s.phase == "before")
        self.p99_during_ms = p99_ms(s for s in samples if s.phase not in ("before", "after"))
        self.p99_after_ms = p99_ms(s for s in samples if s.phase == "after")
        self.recover_requests_s = recovery_s(samples, judge, fault_end)
        self.answered = load.answered()

    def incorrect_samples(self, load: Load, judge: Judge) -> list[Sample]:
        return [sample for sample in load.samples if judge(sample) == "incorrect"][:10]


_COLUMNS = ("fault", "fault_s", "rate", "sent", "failed", "failed_incorrect", "failure_kinds",
            "p99_before_ms", "p99_during_ms", "p99_after_ms", "recover_requests_s",
            "recover_pipeline_s", "emitted", "rows", "rollup_requests", "dropped",
            "dead_lettered", "unexplained", "note")
_HEADERS = ("fault", "fault s", "req/s", "sent", "failed", "wrong status", "failures (! = wrong)",
            "p99 before ms", "p99 during ms", "p99 after ms", "requests ok after s",
            "pipeline caught up after s", "events emitted", "rows", "rollup requests",
            "counted drops", "dead-lettered", "unexplained loss", "note")


def record(result: FaultResult) -> str:
    """Save the result and rebuild the table of every result saved so far; return the table."""
    directory = ARTIFACTS / "faults"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{result.name}.json").write_text(json.dumps(asdict(result), indent=1))
    rows = [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    for row in rows:
        cells = []
        for column in _COLUMNS:
            value = row.get(column, "")
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
            cells.append(str(value).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (ARTIFACTS / "fault_table.md").write_text(table)
    print("\n" + table)
    return table


# --- a misbehaving upstream on a raw socket ----------------------------------------------------

class FlakyUpstream:
    """An HTTP/1.1 upstream on a raw socket; `mode` says how it answers the next request.

    ok: 200 with a small body (keep-alive); hang: reads and never answers; reset: closes the
    connection with RST before answering; 5xx: 503; half: promises 10,000 bytes, sends 5,000
    and closes.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ConnectionError):
                    return
                target = head.split(b" ", 2)[1].decode(errors="replace")
                self.received.append(target)
                mode = self.mode
                if mode == "hang":
                    await reader.read()  # until the gateway gives up and closes
                    return
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    writer.close()
                    return
                if mode == "half":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: 10000\r\n\r\n" + b"h" * 5000)
                    await writer.drain()
                    writer.close()
                    return
                status = b"503 Service Unavailable" if mode == "5xx" else b"200 OK"
                body = b'{"ok": false}' if mode == "5xx" else b'{"ok": true}'
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            writer.close()


# --- the collector and the books -------------------------------------------------------------

def collector_settings(redis_url: str, dsn: str, name: str = "fault-collector"
                       ) -> CollectorSettings:
    return CollectorSettings(redis_url=redis_url, clickhouse_dsn=dsn, consumer_name=name,
                             block_ms=100, retry_initial_s=0.05, retry_max_s=0.5,
                             claim_idle_ms=1000, claim_interval_s=0.5)


class InProcessCollector:
    """The collector in this process: a task running `Collector.run` on its own chDB dir."""

    def __init__(self, redis_url: str, dsn: str) -> None:
        self.settings = collector_settings(redis_url, dsn)
        self.dsn = dsn
        self.ch: SharedClient | None = None
        self.redis: aioredis.Redis | None = None
        self.collector: Collector | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.ch = await asyncio.to_thread(SharedClient, self.dsn)

        def prepare() -> None:
            assert self.ch is not None
            with self.ch.lock:
                migrate(self.ch.client)

        await asyncio.to_thread(prepare)
        self.redis = aioredis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=1,
                                             socket_timeout=5)
        self.collector = Collector(self.settings, self.redis, self.ch)
        self._task = asyncio.create_task(self.collector.run(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=30)
        if self.redis is not None:
            await self.redis.aclose()

    async def counts(self) -> tuple[int, int]:
        assert self.ch is not None
        return await asyncio.to_thread(counts_with, self.ch)

    async def close(self) -> None:
        if self.ch is not None:
            await asyncio.to_thread(self.ch.close)
            self.ch = None


def counts_with(ch: SharedClient) -> tuple[int, int]:
    """(rows in events, requests summed over the events_1m rollup)."""
    with ch.lock:
        row = ch.client.query("SELECT (SELECT count() FROM events), "
                              "(SELECT sum(requests) FROM events_1m)").result_rows[0]
    return int(row[0]), int(row[1])


def counts_of_store(dsn: str) -> tuple[int, int]:
    """Open the store (nobody else may hold it), count, close."""
    ch = SharedClient(dsn)
    try:
        return counts_with(ch)
    finally:
        ch.close()


async def stream_caught_up(redis: aioredis.Redis, group: str = "collector") -> bool:
    """Everything written to the stream was delivered to the group and acknowledged."""
    try:
        info: Any = await redis.xinfo_stream(STREAM)
        groups: Any = await redis.xinfo_groups(STREAM)
    except aioredis.ResponseError:
        return False
    mine = next((g for g in groups if _text(g["name"]) == group), None)
    if mine is None:
        return False
    return (int(mine["pending"]) == 0
            and _text(mine["last-delivered-id"]) == _text(info["last-generated-id"]))


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
                     interval: float = 0.1) -> float:
    """Poll an async or plain predicate; return the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
        except (OSError, aioredis.RedisError):
            value = False
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def dead_lettered(redis: aioredis.Redis) -> int:
    """Events in the dead-letter stream (each entry holds a batch)."""
    from proxy.event import decode_batch

    total = 0
    entries: Any = await redis.xrange(DEAD_STREAM)
    for _, fields in entries:
        try:
            total += len(decode_batch(fields[b"v"], fields[b"b"], fields.get(b"c")))
        except Exception:  # an undecodable letter still stands for at least one event
            total += 1
    return total


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[Load]:
    await load.start()
    try:
        yield load
    finally:
        await load.stop()


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of a metric family in Prometheus text (all label sets, all pids)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
