"""Soak: the proxy under the demo's traffic mix at ~70% of its measured capacity for N minutes.

Starts a redis-server, the demo upstreams (in this process, with capacities high enough that
they never fail), `apigw proxy` on examples/demo.yaml and a collector on a chDB directory,
all in a temp dir. Measures the proxy's capacity with a short closed-loop burst, then drives
the demo traffic (apigw.demo.traffic) at 70% of it and prints, per minute: the proxy's RSS,
open file descriptors, event-loop lag (latency of /healthz on the admin port, served by the
same event loop as the traffic) and the requests and errors of that minute.

Fails (exit 1) when RSS or open FDs grew more than 10%, or when more than 0.1% of requests
failed (5xx or no answer). Growth is measured after a warm-up (the first minute, while
connection pools fill; `--warmup-minutes`) from the median of the first third of the
remaining minutes to the median of the last third: sockets come and go with keep-alive pools
(+-30% minute to minute), a leak keeps growing.

    .venv/bin/python scripts/soak.py --minutes 10          # what `make soak` runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apigw.demo import upstream_env  # noqa: E402
from apigw.demo.traffic import NORMAL, Options, Traffic  # noqa: E402
from apigw.demo.upstreams import SERVICES  # noqa: E402
from apigw.demo.upstreams import start as start_upstreams  # noqa: E402
from apigw.redis_server import RedisServer, free_port  # noqa: E402

GROWTH_LIMIT = 0.10
ERROR_LIMIT = 0.001
BURST_PATHS = ("/orders/17", "/users/3", "/catalog/items", "/catalog/items/SKU-1003")


@dataclass
class Minute:
    minute: int
    rss_mb: float
    fds: int
    sockets: int
    lag_p50_ms: float
    lag_max_ms: float
    sent: int
    errors: int  # 5xx + no answer
    limited: int


def _tree_pids(pid: int) -> list[int]:
    """The process and its descendants (the proxy's workers, if any)."""
    pids = [pid]
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (child / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) in pids:
                pids.append(int(child.name))
    return pids


def rss_mb(pid: int) -> float:
    total = 0
    for member in _tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def open_fds(pid: int) -> tuple[int, int, set[str]]:
    """(open file descriptors, of which sockets, the sockets' inodes) of the process tree."""
    total = sockets = 0
    inodes: set[str] = set()
    for member in _tree_pids(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{member}/fd"):
                total += 1
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{member}/fd/{fd}")
                    if target.startswith("socket:["):
                        sockets += 1
                        inodes.add(target[8:-1])
    return total, sockets, inodes


def socket_peers(pid: int, inodes: set[str], ports: dict[int, str]) -> dict[str, int]:
    """The process's TCP sockets by what they talk to: the local port they serve (clients,
    admin) or the remote port they reach (upstreams, redis)."""
    counts: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] not in inodes:
                    continue
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                kind = ports.get(local) or ports.get(remote) or "other"
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback http)
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def _spawn(args: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


async def measure_capacity(target: str, seconds: float, concurrency: int) -> float:
    """Closed loop, `concurrency` at a time: requests/s the proxy sustains."""
    done = 0
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(target, connector=connector) as session:

        async def worker(index: int) -> None:
            nonlocal done
            n = index
            while time.monotonic() < stop_at:
                path = BURST_PATHS[n % len(BURST_PATHS)]
                n += 1
                async with session.get(path, headers={"X-Client-Id": f"burst-{n % 50}"}) as r:
                    await r.read()
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.monotonic() - started)


async def loop_lag(admin: str, session: aiohttp.ClientSession, samples: int = 20
                   ) -> tuple[float, float]:
    lags = []
    for _ in range(samples):
        started = time.perf_counter()
        async with session.get(f"{admin}/healthz") as response:
            await response.read()
        lags.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.05)
    return statistics.median(lags), max(lags)


async def soak(args: argparse.Namespace, workdir: Path) -> int:
    redis = RedisServer(workdir / "redis").start()
    ports = [free_port() for _ in SERVICES]
    runners = await start_upstreams("127.0.0.1", ports, capacities={
        name: 1e9 for name in SERVICES}, seed=7)
    proxy_port, admin_port, collector_port = free_port(), free_port(), free_port()
    env = {**os.environ, **upstream_env("127.0.0.1", ports), "APIGW_REDIS_URL": redis.url,
           "APIGW_DATA_DIR": str(workdir / "data"), "APIGW_LOG_LEVEL": "WARNING",
           "APIGW_CLICKHOUSE_DSN": f"chdb://{workdir / 'clickhouse'}"}
    logs = (workdir / "proxy.log").open("wb"), (workdir / "collector.log").open("wb")
    proxy = _spawn(["-m", "apigw.cli", "proxy", "--config", str(ROOT / "examples" / "demo.yaml"),
                    "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
                    "--workers", str(args.workers)], env, logs[0])
    collector = _spawn(["-m", "collector.service"],
                       {**env, "APIGW_LISTEN": f"127.0.0.1:{collector_port}"}, logs[1])
    target, admin = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}"
    port_names = {proxy_port: "clients", admin_port: "admin", redis.port: "redis",
                  **{port: f"upstream:{name}" for name, port in zip(SERVICES, ports,
                                                                     strict=True)}}
    try:
        await asyncio.to_thread(_wait_http, f"{admin}/readyz", proxy)
        await asyncio.to_thread(_wait_http, f"http://127.0.0.1:{collector_port}/healthz",
                                collector)
        capacity = await measure_capacity(target, args.burst_s, args.concurrency)
        rate = capacity * args.load
        clients = max(30, math.ceil(rate / 10))  # ~10 req/s each: under the demo's limit
        print(f"soak: capacity {capacity:.0f} req/s (closed loop, {args.concurrency} at a "
              f"time); driving {rate:.0f} req/s ({args.load:.0%}) with the demo mix from "
              f"{clients} clients for {args.minutes:g} min; proxy pid {proxy.pid}, "
              f"{args.workers} worker(s)", flush=True)
        traffic = Traffic(Options(target=target, clients=clients, client_rate=rate / clients,
                                  incident_after=args.minutes * 60 + 3600,
                                  duration=args.minutes * 60 + 30, report_every=3600,
                                  seed=11), out=lambda line: None)
        traffic_stop = asyncio.Event()
        generator = asyncio.create_task(traffic.run(traffic_stop))
        minutes: list[Minute] = []
        print(f"{'min':>4} {'rss MB':>8} {'fds':>5} {'sockets':>7} {'lag p50 ms':>10} "
              f"{'lag max ms':>10} {'sent':>7} {'errors':>6} {'429':>5}", flush=True)
        last = traffic.totals[NORMAL].copy()
        async with aiohttp.ClientSession() as session:
            for minute in range(1, int(args.minutes) + 1):
                await asyncio.sleep(max(0.0, 60.0 - 1.2))
                lag_p50, lag_max = await loop_lag(admin, session)
                now = traffic.totals[NORMAL].copy()
                delta = now.minus(last)
                last = now
                fds, sockets, inodes = open_fds(proxy.pid)
                peers = socket_peers(proxy.pid, inodes, port_names)
                row = Minute(minute, round(rss_mb(proxy.pid), 1), fds, sockets,
                             round(lag_p50, 2), round(lag_max, 2), delta.sent,
                             delta.server_errors + delta.failed, delta.limited)
                minutes.append(row)
                print(f"{row.minute:>4} {row.rss_mb:>8} {row.fds:>5} {row.sockets:>7} "
                      f"{row.lag_p50_ms:>10} {row.lag_max_ms:>10} {row.sent:>7} "
                      f"{row.errors:>6} {row.limited:>5}  sockets: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(peers.items())), flush=True)
        traffic_stop.set()  # the last minute is measured: stop now rather than in 30 s
        await generator
    finally:
        for process in (proxy, collector):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in (proxy, collector):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()
        for runner in runners:
            await runner.cleanup()
        redis.stop()
    return verdict(minutes, args.warmup_minutes)


def _figure(minute: Minute, name: str) -> float:
    if name == "RSS MB":
        return minute.rss_mb
    if name == "open FDs":
        return minute.fds
    return minute.fds - minute.sockets


def verdict(minutes: list[Minute], warmup: int) -> int:
    if len(minutes) <= warmup:
        print(f"soak: FAIL - only {len(minutes)} minute(s), not more than the warm-up")
        return 1
    measured = minutes[warmup:]
    third = max(1, len(measured) // 3)
    head, tail = measured[:third], measured[-third:]
    print(f"soak: growth from minutes {head[0].minute}-{head[-1].minute} to "
          f"{tail[0].minute}-{tail[-1].minute} (medians; {warmup} min of warm-up left out)")
    sent = sum(m.sent for m in minutes)
    errors = sum(m.errors for m in minutes)
    problems = []
    for name in ("RSS MB", "open FDs", "non-socket FDs"):
        start = statistics.median(_figure(m, name) for m in head)
        end = statistics.median(_figure(m, name) for m in tail)
        growth = (end - start) / start if start else 0.0
        print(f"soak: {name} {start:g} -> {end:g} ({growth:+.1%})")
        if growth > GROWTH_LIMIT:
            problems.append(f"{name} grew {growth:.1%} (limit {GROWTH_LIMIT:.0%})")
    first, final = head[0], tail[-1]
    rate = errors / sent if sent else 1.0
    print(f"soak: {sent} requests, {errors} errors ({rate:.3%}), event-loop lag p50 "
          f"{first.lag_p50_ms} -> {final.lag_p50_ms} ms")
    if rate > ERROR_LIMIT:
        problems.append(f"{rate:.2%} of requests failed (limit {ERROR_LIMIT:.1%})")
    if problems:
        print("soak: FAIL - " + "; ".join(problems))
        return 1
    print("soak: PASS")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get(
        "SOAK_MINUTES", "10")))
    parser.add_argument("--load", type=float, default=0.7, help="share of the capacity")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--burst-s", type=float, default=10.0,
                        help="length of the capacity measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup-minutes", type=int, default=1,
                        help="minutes left out of the growth check while pools fill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="apigw-soak-") as workdir:
        return asyncio.run(soak(args, Path(workdir)))


if __name__ == "__main__":
    sys.exit(main())
