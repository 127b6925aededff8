"""Benchmark of the event pipeline: collector ingest, emitter cost, rollup query time.

    .venv/bin/python bench/pipeline.py                 # everything, ~3 minutes
    .venv/bin/python bench/pipeline.py --only ingest,emitter --events 300000

Sections (each prints a table; all servers are started here on free loopback ports, in a
temp dir, and stopped at the end):
- decode:  CPU per 50,000 events of the collector's steps, before (dicts -> Python columns ->
           Native insert) and after (Arrow, collector/batch.py), in this process.
- ingest:  one `collector.service` process (embedded ClickHouse) drains a stream that a
           writer fills; events/s wall and events per CPU-second of the collector process
           (utime+stime from /proc, so the embedded ClickHouse's threads count too).
- emitter: proxy-side CPU per event of `EventEmitter` for several batch sizes, and of the
           rejected design (one stream entry per event, pipelined XADD); Redis CPU and
           memory per event.
- proxy:   a 1-worker proxy (`apigw proxy`) under `wrk`, events on vs off, alternated in the
           same run; requests/s and proxy CPU per request.
- query:   the dashboard's time-series query (analytics.queries `_points`) over 10 million
           generated events: on the rollup `events_1m` vs the same result from raw `events`.

The numbers are for this machine at this moment: other processes share the CPUs, so compare
rows of one run, and prefer the CPU-per-event columns to wall-clock rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import redis as sync_redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from apigw.redis_server import RedisServer, free_port  # noqa: E402
from apigw.signals import interrupt_on_termination  # noqa: E402
from proxy.event import (  # noqa: E402
    EVENT_FIELDS,
    ROW_COLUMNS,
    RequestEvent,
    decode_batch,
    encode_batch,
    encode_rows,
)

STREAM = "apigw:events"
TICK = os.sysconf("SC_CLK_TCK")
ROUTES = [("orders-get", "GET", "/orders/{id}"), ("orders-create", "POST", "/orders"),
          ("users-get", "GET", "/users/{id}"), ("catalog-list", "GET", "/catalog/items"),
          ("catalog-item", "GET", "/catalog/items/{sku}")]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def events(n: int, start: int = 0, now: float | None = None) -> list[RequestEvent]:
    """Gateway-like events: what the proxy emits for traffic on five routes."""
    base = (now or time.time()) - 60
    out = []
    for i in range(start, start + n):
        route_id, method, template = ROUTES[i % len(ROUTES)]
        out.append(RequestEvent(
            timestamp=base + i * 1e-5, request_id=f"{i:032x}", http_request_method=method,
            url_path=template.replace("{id}", str(i % 997)).replace("{sku}", f"sku-{i % 89}"),
            http_response_status_code=503 if i % 50 == 0 else 200,
            duration_ms=1.0 + (i % 300) / 7, trace_id=f"{i * 7919:032x}",
            span_id=f"{i:016x}", gateway_instance="bench-1", route_id=route_id,
            http_route=template, url_query="page=2" if i % 3 else "", server_address="api.local",
            client_address=f"10.0.{i % 13}.{i % 251}", user_agent_original="bench/1.0",
            http_response_body_size=512 + i % 100, upstream="127.0.0.1:9101",
            upstream_duration_ms=0.8 + (i % 300) / 8, auth_outcome="success",
            client_id=f"client-{i % 40}", api_key_id=f"key-{i % 40}", tenant="acme",
            plan="gold", ratelimit_outcome="allowed", ratelimit_policy_id="orders",
            ratelimit_mode="enforce"))
    return out


def entry_fields(n_events: int, per_entry: int, rows: bool = True) -> list[dict[bytes, bytes]]:
    """Stream entries holding n_events in total (distinct request ids): as the emitter writes
    them (rows), or with `rows=False` in the array-of-objects format."""
    out = []
    for start in range(0, n_events, per_entry):
        batch = events(min(per_entry, n_events - start), start)
        out.append({b"v": b"1", b"c": ROW_COLUMNS, b"b": encode_rows(batch)} if rows
                   else {b"v": b"1", b"b": encode_batch(batch)})
    return out


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path,
            cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(args, env={**os.environ, **env}, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=cwd)
        try:
            yield child
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()


def wait_http(url: str, child: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(url)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- decode: the collector's steps in this process ---------------------------------------------

def bench_decode(tmp: Path, n: int = 50_000) -> None:
    from collector.batch import build_batch, event_columns
    from collector.clickhouse import SharedClient
    from collector.schema import migrate

    objects = [(f"{i}-0", f) for i, f in enumerate(entry_fields(n, 500, rows=False))]
    entries = [(f"{i}-0", f) for i, f in enumerate(entry_fields(n, 500))]
    ch = SharedClient(f"chdb://{tmp / 'decode'}")
    counter = itertools.count()

    def token() -> dict[str, Any]:
        return {"insert_deduplication_token": f"bench-{next(counter)}",
                "deduplicate_blocks_in_dependent_materialized_views": 1}

    def best(fn: Callable[[], Any], rounds: int = 3) -> tuple[float, Any]:
        result, cpu = None, float("inf")
        for _ in range(rounds):
            started = time.process_time()
            result = fn()
            cpu = min(cpu, time.process_time() - started)
        return cpu, result

    try:
        migrate(ch.client)
        old_decode, dicts = best(lambda: [e for _, f in objects
                                          for e in decode_batch(f[b"v"], f[b"b"])])
        old_columns, columns = best(lambda: event_columns(dicts))
        old_insert, _ = best(lambda: ch.client.insert(
            "events", columns, column_names=list(EVENT_FIELDS), column_oriented=True,
            settings=token()))
        objects_build, _ = best(lambda: build_batch(objects))
        new_build, batch = best(lambda: build_batch(entries))
        new_insert, _ = best(lambda: ch.client.insert_arrow("events", batch.table,
                                                            settings=token()))
    finally:
        ch.close()
    old = old_decode + old_columns + old_insert
    new = new_build + new_insert
    ms = 1000.0
    table(f"collector CPU per {n:,} events (this process, embedded ClickHouse)",
          ["path", "decode", "columns", "insert", "total", "events per CPU-second"],
          [["before: dicts -> lists -> Native", f"{old_decode * ms:.0f} ms",
            f"{old_columns * ms:.0f} ms", f"{old_insert * ms:.0f} ms", f"{old * ms:.0f} ms",
            f"{n / old:,.0f}"],
           ["objects -> Arrow (collector/batch.py)", f"{objects_build * ms:.0f} ms (with "
            "columns)", "-", f"{new_insert * ms:.0f} ms",
            f"{(objects_build + new_insert) * ms:.0f} ms",
            f"{n / (objects_build + new_insert):,.0f}"],
           ["rows -> Arrow (the emitter's format)", f"{new_build * ms:.0f} ms (with columns)",
            "-", f"{new_insert * ms:.0f} ms", f"{new * ms:.0f} ms", f"{n / new:,.0f}"]])


# -- ingest: one collector process --------------------------------------------------------------

def bench_ingest(tmp: Path, redis: RedisServer, n: int, read_counts: list[int],
                 collector_root: Path) -> None:
    bodies = entry_fields(min(n, 100_000), 500)
    per_entry = 500
    rows = []
    for read_count in read_counts:
        client = sync_redis.Redis.from_url(redis.url)
        client.flushall()
        port = free_port()
        env = {"APIGW_REDIS_URL": redis.url, "APIGW_LISTEN": f"127.0.0.1:{port}",
               "APIGW_CLICKHOUSE_DSN": f"chdb://{tmp / f'ingest-{read_count}'}",
               "APIGW_READ_COUNT": str(read_count), "APIGW_LOG_LEVEL": "WARNING",
               "APIGW_CONSUMER_NAME": "bench"}
        log = tmp / f"collector-{read_count}.log"
        with process([sys.executable, "-m", "collector.service"], env, log,
                     cwd=collector_root) as child:
            wait_http(f"http://127.0.0.1:{port}/healthz", child, log)
            time.sleep(0.5)
            cpu0, redis_cpu0 = proc_cpu(child.pid), proc_cpu(redis.process.pid)

            started = time.perf_counter()
            entries = n // per_entry
            for chunk in range(0, entries, 20):
                pipe = client.pipeline(transaction=False)
                for i in range(chunk, min(entries, chunk + 20)):
                    pipe.xadd(STREAM, bodies[i % len(bodies)])  # type: ignore[arg-type]
                pipe.execute()
            filled = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}/metrics"
            while metric(url, "apigw_collector_rows_written_total") < entries * per_entry:
                if child.poll() is not None:
                    raise RuntimeError(log.read_text()[-3000:])
                time.sleep(0.05)
            wall = time.perf_counter() - started
            cpu = proc_cpu(child.pid) - cpu0
            decode_cpu = metric(url, "apigw_collector_decode_cpu_seconds_total")
            insert_cpu = metric(url, "apigw_collector_insert_cpu_seconds_total")
            redis_cpu = proc_cpu(redis.process.pid) - redis_cpu0
        client.close()
        total = entries * per_entry
        rows.append([read_count, f"{read_count * per_entry:,}", f"{total:,}", f"{filled:.2f} s",
                     f"{wall:.2f} s", f"{total / wall:,.0f}", f"{cpu:.2f} s",
                     f"{total / cpu:,.0f}",
                     f"{decode_cpu:.2f} s" if decode_cpu else "-",
                     f"{total / decode_cpu:,.0f}" if decode_cpu else "-",
                     f"{insert_cpu:.2f} s" if insert_cpu else "-", f"{redis_cpu:.2f} s"])
    table("ingest: one collector process (embedded ClickHouse), stream -> events + rollups",
          ["read_count", "events/insert", "events", "stream filled in", "drained in",
           "events/s (wall)", "collector CPU", "events per collector CPU-s",
           "decode CPU", "events per decode CPU-s", "insert CPU (thread)", "redis CPU"], rows)
    print("\ncollector CPU: the whole process (utime+stime), embedded ClickHouse included "
          "(insert, materialized views, background merges). decode: stream entries -> Arrow "
          "(the collector's own work, what remains of it with a ClickHouse server). insert: "
          "the inserting thread, engine work included.")


# -- emitter: proxy-side cost per event ---------------------------------------------------------

async def _emit_run(url: str, design: str, batch_size: int, n: int,
                    sample: list[RequestEvent]) -> tuple[float, float, float]:
    from proxy.emitter import EventEmitter

    redis = aioredis.Redis.from_url(url)
    await redis.flushall()
    emitter: EventEmitter
    if design == "entry per event":
        emitter = _PerEventEmitter(redis, STREAM, batch_size=batch_size,
                                   flush_interval_s=0.2, buffer_max=n + 1,
                                   stream_maxlen=10_000_000)
    else:
        emitter = EventEmitter(redis, STREAM, batch_size=batch_size, flush_interval_s=0.2,
                               buffer_max=n + 1, stream_maxlen=10_000_000)
    await emitter.start()
    started = time.process_time()
    for i in range(n):
        emitter.emit(sample[i % len(sample)])
        if i % 64 == 0:
            await asyncio.sleep(0)  # a request boundary: the loop runs other tasks
    while emitter.stats["sent"] < n:  # noqa: ASYNC110 - polling is the measurement
        await asyncio.sleep(0.001)
    cpu = time.process_time() - started
    await emitter.stop()
    memory = float(await redis.memory_usage(STREAM, samples=0) or 0)
    await redis.aclose()
    return cpu, memory, 0.0


def _make_per_event_emitter() -> type:
    from proxy.emitter import EventEmitter

    class PerEventEmitter(EventEmitter):
        """The rejected design: one stream entry per event, XADDs pipelined per batch."""

        async def _send_some(self) -> None:
            count = min(len(self._buffer), self._batch_size * 8)
            batch = list(itertools.islice(self._buffer, count))
            pipe: Any
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in batch:
                    pipe.xadd(self._stream, {"v": "1", "e": orjson.dumps(event)},
                              maxlen=self._stream_maxlen, approximate=True)
                await pipe.execute()
            for _ in range(count):
                self._buffer.popleft()
            self._sent += count
            self._batches += count

    return PerEventEmitter


_PerEventEmitter: Any = None


def bench_emitter(redis: RedisServer, n: int) -> None:
    global _PerEventEmitter
    _PerEventEmitter = _make_per_event_emitter()
    sample = events(2_000)
    rows = []
    for design, batch_size in [("entry per batch", 50), ("entry per batch", 100),
                               ("entry per batch", 500), ("entry per batch", 2000),
                               ("entry per event", 500)]:
        redis_cpu0 = proc_cpu(redis.process.pid)
        cpu, memory, _ = asyncio.run(_emit_run(redis.url, design, batch_size, n, sample))
        redis_cpu = proc_cpu(redis.process.pid) - redis_cpu0
        rows.append([design, batch_size, f"{cpu / n * 1e6:.1f} us",
                     f"{n / cpu:,.0f}", f"{redis_cpu / n * 1e6:.1f} us",
                     f"{memory / n:.0f} B"])
    table(f"emitter: cost per event ({n:,} events, this process = one proxy worker)",
          ["design", "batch", "proxy CPU/event", "events per proxy CPU-s",
           "redis CPU/event", "stream memory/event"], rows)


# -- proxy: throughput with events on vs off ----------------------------------------------------

_UPSTREAM = """
import sys
from aiohttp import web
async def ok(request):
    return web.Response(text='{"ok":true}', content_type="application/json")
app = web.Application()
app.router.add_get("/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def _gateway_yaml(upstream_port: int, events_on: bool) -> str:
    return (f"version: 1\nupstreams:\n  app:\n    url: http://127.0.0.1:{upstream_port}\n"
            "routes:\n  - id: orders\n    match: {path: \"/orders/{id}\"}\n"
            "    upstream: app\n"
            f"events:\n  enabled: {'true' if events_on else 'false'}\n")


def bench_proxy(tmp: Path, redis: RedisServer, seconds: float, rounds: int) -> None:
    if shutil.which("wrk") is None:
        print("\n(proxy section skipped: wrk is not installed)")
        return
    upstream_port = free_port()
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with process([sys.executable, "-c", _UPSTREAM, str(upstream_port)], {},
                 tmp / "upstream.log") as upstream:
        time.sleep(1.0)
        if upstream.poll() is not None:
            raise RuntimeError((tmp / "upstream.log").read_text())
        for _round, events_on in itertools.product(range(rounds), (True, False)):
            config = tmp / f"gw-{events_on}.yaml"
            config.write_text(_gateway_yaml(upstream_port, events_on))
            port, admin = free_port(), free_port()
            env = {"APIGW_CONFIG": str(config), "APIGW_LISTEN": f"127.0.0.1:{port}",
                   "APIGW_ADMIN_LISTEN": f"127.0.0.1:{admin}", "APIGW_REDIS_URL": redis.url,
                   "APIGW_WORKERS": "1", "APIGW_LOG_LEVEL": "WARNING"}
            log = tmp / f"proxy-{events_on}.log"
            with process([sys.executable, "-m", "apigw.cli", "proxy"], env, log) as child:
                wait_http(f"http://127.0.0.1:{admin}/healthz", child, log)
                url = f"http://127.0.0.1:{port}/orders/1"
                subprocess.run(["wrk", "-t1", "-c16", "-d1s", url], capture_output=True,
                               check=True)  # warm-up
                pids = _tree(child.pid)
                cpu0 = sum(proc_cpu(p) for p in pids)
                out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds:g}s", url],
                                     capture_output=True, text=True, check=True).stdout
                cpu = sum(proc_cpu(p) for p in pids) - cpu0
                found = re.search(r"Requests/sec:\s+([\d.]+)", out)
                total = re.search(r"(\d+) requests in", out)
                if not found or not total:
                    raise RuntimeError(out)
                results[events_on].append((float(found.group(1)), cpu / int(total.group(1))))
    rows = []
    median: dict[bool, tuple[float, float]] = {}
    for events_on in (False, True):
        rates = sorted(r for r, _ in results[events_on])
        cpus = sorted(c for _, c in results[events_on])
        median[events_on] = (rates[len(rates) // 2], cpus[len(cpus) // 2])
        rows.append(["on" if events_on else "off", " / ".join(f"{r:,.0f}" for r in rates),
                     f"{median[events_on][0]:,.0f}", f"{median[events_on][1] * 1e6:.0f} us"])
    (off, cpu_off), (on, cpu_on) = median[False], median[True]
    table(f"proxy: 1 worker under wrk -c32 for {seconds:g} s, events on vs off "
          f"(alternated, {rounds} rounds)",
          ["events", "requests/s per round", "median", "proxy CPU/request (median)"], rows)
    print(f"\nevents on: throughput {100 * (on - off) / off:+.1f}%, CPU per request "
          f"{100 * (cpu_on - cpu_off) / cpu_off:+.1f}% (CPU per request is the robust figure "
          "on a shared machine; throughput follows the neighbours' load)")


def _tree(pid: int) -> list[int]:
    """The process and its children (the supervisor forks workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            pids.extend(_tree(int(child)))
    return pids


# -- query: rollups vs raw over 10M events -------------------------------------------------------

_GENERATE = """
INSERT INTO events (timestamp, request_id, http_request_method, url_path,
    http_response_status_code, duration_ms, route_id, http_route, client_id, client_address,
    http_response_body_size, auth_outcome, trace_id)
SELECT
    fromUnixTimestamp64Milli(toInt64({start_ms:Int64} + intDiv(number * {span_ms:Int64},
                             {n:UInt64})), 'UTC'),
    lower(hex(sipHash128(number))),
    ['GET', 'POST', 'GET', 'GET', 'GET'][number % 5 + 1],
    concat('/p/', toString(number % 997)),
    multiIf(number % 97 = 0, 503, number % 31 = 0, 429, 200),
    1 + (number % 300) / 7,
    ['orders-get', 'orders-create', 'users-get', 'catalog-list', 'catalog-item'][number % 5 + 1],
    -- braces spelled as char(): a literal '{' would start a query parameter
    ['/orders/' || char(123) || 'id' || char(125), '/orders',
     '/users/' || char(123) || 'id' || char(125), '/catalog/items',
     '/catalog/items/' || char(123) || 'sku' || char(125)][number % 5 + 1],
    concat('client-', toString(number % 500)),
    concat('10.0.', toString(number % 13), '.', toString(number % 251)),
    512, 'success', lower(hex(sipHash128(number, 1)))
FROM numbers({n:UInt64})
"""

_BUCKETS = "SELECT intDiv(toUInt32(minute), {step:UInt32}) * {step:UInt32} AS bucket, "
_ROLLUP_TAIL = (" FROM events_1m WHERE minute >= toDateTime({start:UInt32}, 'UTC') "
                "AND minute < toDateTime({end:UInt32}, 'UTC') {endpoint} "
                "GROUP BY bucket ORDER BY bucket")
_ROLLUP_COUNTS = ("sum(requests) AS n, sum(errors_5xx) AS e5, sum(errors_4xx) AS e4, "
                  "sum(rate_limited) AS rl, sum(auth_failures) AS af, ")
# before migration 4: the reservoir `quantiles` state
_ROLLUP_RESERVOIR = (_BUCKETS + _ROLLUP_COUNTS + "quantilesMerge(0.5, 0.95, 0.99)(duration_q) AS q"
                     + _ROLLUP_TAIL)
_RAW = ("SELECT intDiv(toUInt32(toStartOfMinute(timestamp)), {step:UInt32}) * {step:UInt32} "
        "AS bucket, count() AS n, countIf(http_response_status_code >= 500) AS e5, "
        "countIf(http_response_status_code >= 400 AND http_response_status_code < 500) AS e4, "
        "countIf(http_response_status_code = 429) AS rl, countIf(auth_outcome = 'failure') AS af, "
        "{quantiles}(0.5, 0.95, 0.99)(duration_ms) AS q FROM events "
        "WHERE timestamp >= toDateTime({start:UInt32}, 'UTC') "
        "AND timestamp < toDateTime({end:UInt32}, 'UTC') {endpoint} "
        "GROUP BY bucket ORDER BY bucket")
_ENDPOINT = ("AND route_id = {route:String} AND http_request_method = {method:String} "
             "AND http_route = {template:String}")


def _best_of(ch: Any, sql: str, params: dict[str, Any], rounds: int = 5) -> tuple[float, Any]:
    result = ch.client.query(sql, parameters=params)  # warm
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = ch.client.query(sql, parameters=params)
        best = min(best, time.perf_counter() - t0)
    return best, [tuple(r) for r in result.result_rows]


def _refill_rollup(ch: Any) -> None:
    """Rebuild events_1m from events with the view's current query: the rows the view writes
    after migration 4 (t-digest state, empty reservoir state)."""
    select = ch.client.query("SELECT as_select FROM system.tables WHERE database = "
                             "currentDatabase() AND name = 'events_1m_mv'").result_rows[0][0]
    columns = [row[0] for row in ch.client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() "
        "AND table = 'events_1m_mv' ORDER BY position").result_rows]
    ch.client.command("TRUNCATE TABLE events_1m")
    ch.client.command(f"INSERT INTO events_1m ({', '.join(columns)}) {select}")
    ch.client.command("OPTIMIZE TABLE events_1m FINAL")


def _column_bytes(ch: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in ch.client.query(
        "SELECT name, data_compressed_bytes FROM system.columns WHERE database = "
        "currentDatabase() AND table = 'events_1m' "
        "AND name IN ('duration_q', 'duration_td')").result_rows}


def _worst_error(approx: list[Any], exact: list[Any]) -> float:
    """Largest relative error of any quantile of any bucket."""
    worst = 0.0
    for a, e in zip(approx, exact, strict=True):
        for x, y in zip(a[-1], e[-1], strict=True):
            worst = max(worst, abs(x - y) / y if y else 0.0)
    return worst


def bench_query(tmp: Path, n: int) -> None:
    """The time-series query on raw events, on the rollup with the reservoir state (schema
    before migration 4) and with the t-digest state (after), over the same n events."""
    from collector.clickhouse import SharedClient
    from collector.schema import DURATION_QUANTILES, MIGRATIONS, migrate

    ch = SharedClient(f"chdb://{tmp / 'query'}")
    try:
        migrate(ch.client, [m for m in MIGRATIONS if m[0] < 4])
        end = int(time.time()) // 60 * 60
        span = 24 * 3600
        started = time.perf_counter()
        ch.client.command(_GENERATE, parameters={
            "start_ms": (end - span) * 1000, "span_ms": span * 1000, "n": n})
        generated = time.perf_counter() - started
        ch.client.command("OPTIMIZE TABLE events_1m FINAL")
        sizes: dict[str, int] = {str(k): int(v) for k, v in ch.client.query(
            "SELECT table, sum(rows) FROM system.parts WHERE active AND database = "
            "currentDatabase() GROUP BY table").result_rows}
        params = {"start": end - span, "end": end, "step": 300, "route": "orders-get",
                  "method": "GET", "template": "/orders/{id}"}
        shapes = (("all endpoints, 24 h, 5-min buckets", ""),
                  ("one endpoint, 24 h, 5-min buckets", _ENDPOINT))
        timings: dict[str, dict[str, float]] = {label: {} for label, _ in shapes}
        results: dict[str, dict[str, Any]] = {label: {} for label, _ in shapes}
        for label, endpoint in shapes:
            for name, sql in (("raw", _RAW.replace("{quantiles}", "quantiles")),
                              ("exact", _RAW.replace("{quantiles}", "quantilesExact")),
                              ("reservoir", _ROLLUP_RESERVOIR)):
                timings[label][name], results[label][name] = _best_of(
                    ch, sql.replace("{endpoint}", endpoint), params,
                    rounds=1 if name == "exact" else 5)
        state_bytes = _column_bytes(ch)
        migrate(ch.client)  # migration 4: the view now writes t-digest states
        _refill_rollup(ch)
        tdigest = (_BUCKETS + _ROLLUP_COUNTS + DURATION_QUANTILES + " AS q" + _ROLLUP_TAIL)
        for label, endpoint in shapes:
            timings[label]["tdigest"], results[label]["tdigest"] = _best_of(
                ch, tdigest.replace("{endpoint}", endpoint), params)
        state_bytes["duration_td"] = _column_bytes(ch)["duration_td"]
    finally:
        ch.close()
    rows = []
    for label, _ in shapes:
        t, r = timings[label], results[label]
        counts = {name: [row[:3] for row in r[name]] for name in ("raw", "reservoir", "tdigest")}
        same = counts["raw"] == counts["reservoir"] == counts["tdigest"]
        rows.append([label, f"{t['raw'] * 1000:.0f} ms", f"{t['reservoir'] * 1000:.1f} ms",
                     f"{t['tdigest'] * 1000:.1f} ms", f"{t['raw'] / t['tdigest']:.0f}x",
                     f"{_worst_error(r['reservoir'], r['exact']):.2%}",
                     f"{_worst_error(r['tdigest'], r['exact']):.2%}",
                     "yes" if same else "NO"])
    table(f"dashboard time-series query over {n:,} events (generated in {generated:.0f} s; "
          f"events rows {sizes.get('events', 0):,}, events_1m rows {sizes.get('events_1m', 0):,})",
          ["query", "raw events", "rollup, quantiles state (before)",
           "rollup, t-digest state (after)", "speed-up raw/after",
           "worst p50/p95/p99 error before", "after", "same counts"], rows)
    print(f"\nlatency state on disk (compressed): quantiles {state_bytes.get('duration_q', 0):,} B "
          f"before; t-digest {state_bytes.get('duration_td', 0):,} B. Errors are "
          "relative to quantilesExact on raw events, worst bucket and quantile.")


# -- main ---------------------------------------------------------------------------------------

def main() -> int:
    interrupt_on_termination()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="decode,ingest,emitter,proxy,query",
                        help="comma-separated sections")
    parser.add_argument("--events", type=int, default=500_000, help="events for ingest")
    parser.add_argument("--read-counts", default="100,200",
                        help="collector APIGW_READ_COUNT values to compare")
    parser.add_argument("--collector-root", type=Path, default=ROOT,
                        help="run the ingest collector from another checkout, e.g. "
                             "`git worktree add /tmp/before HEAD~1`, to compare")
    parser.add_argument("--emitter-events", type=int, default=100_000)
    parser.add_argument("--proxy-seconds", type=float, default=4.0)
    parser.add_argument("--proxy-rounds", type=int, default=3)
    parser.add_argument("--query-events", type=int, default=10_000_000)
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"# event pipeline benchmark ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f})")
    with tempfile.TemporaryDirectory(prefix="apigw-bench-") as name:
        tmp = Path(name)
        redis = RedisServer(tmp / "redis").start()
        try:
            if "decode" in only:
                bench_decode(tmp)
            if "ingest" in only:
                bench_ingest(tmp, redis, args.events,
                             [int(x) for x in args.read_counts.split(",")],
                             args.collector_root.resolve())
            if "emitter" in only:
                bench_emitter(redis, args.emitter_events)
            if "proxy" in only:
                bench_proxy(tmp, redis, args.proxy_seconds, args.proxy_rounds)
            if "query" in only:
                bench_query(tmp, args.query_events)
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
