"""The benchmark: the gateway side by side with nginx, a naive aiohttp proxy and the upstream.

Run by `make bench` (bench/run.sh). Starts everything on loopback from a temp dir, pins it
with taskset, measures each target with wrk twice in alternation, prints the table and the
goal ratios, and writes the same as JSON under bench/results/. Every process it starts is
stopped by its own pid on exit, whatever the exit. See bench/README.md.

Pinning on a 2-core machine: core 0 ("load") runs wrk, the upstream nginx and redis-server;
core 1 ("sut") runs only the system under test (nginx proxy, naive proxy or a gateway). For
`direct` the upstream is moved to core 1, since it is then the system under test. The
scaling pair (`full-1w-shared`, `full-2w`) is measured with nothing pinned: two workers need
both cores, so wrk, the upstream and Redis share the cores with them (noted in the output).

Environment: BENCH_DURATION (throughput run, default 10s), BENCH_LATENCY_DURATION (c=1 run,
default 5s), BENCH_WARMUP (1s), BENCH_ROUNDS (2), BENCH_CONNECTIONS (50), BENCH_ONLY
(comma-separated target names), BENCH_MEMORY_DURATION (memory run at ~80% of capacity,
default 30s; 300s for the 5-minute check; 0 skips it), BENCH_PROFILE=1 or a target name
(py-spy profile of the full chain or that target: top functions and own time by area),
BENCH_KEEP=1 (keep the temp dir with logs), BENCH_BASE_ROOT=<checkout> (every selected gateway
configuration also runs from that checkout, e.g. a `git worktree` of the previous commit, as
`<name>-base`: before and after in one run), BENCH_VARIANT_ENV=NAME=VALUE[,...] (every selected
gateway configuration also runs with those variables as `<name>-variant`),
BENCH_VARIANT_PYTHON=<interpreter of another venv> (the naive proxy and every selected gateway
configuration also run under that interpreter as `<name>-py`: e.g. Debian's python3.11 against
a pyenv build, side by side).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apigw.redis_server import RedisServer, free_port, terminate  # noqa: E402
from apigw.signals import interrupt_on_termination  # noqa: E402

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LOAD_CPU = "0"
SUT_CPU = "1"
ALL_CPUS = "0,1"
PATH = "/api/orders/12345"
CLIENT_HEADERS = ["X-Client-Id: bench-client"]
JWT_SECRET = os.environ.get("BENCH_JWT_SECRET", "bench-secret-not-for-production-0123456789")
_UNITS = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0, "m": 60_000_000.0}


def env_seconds(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip()
    if not re.fullmatch(r"\d+(\.\d+)?[smh]?", value):
        raise SystemExit(f"bench: {name}={value!r} is not a duration such as 10s or 2m")
    return value if value[-1] in "smh" else value + "s"


def to_seconds(duration: str) -> float:
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}[duration[-1]]
    return float(duration[:-1]) * scale


# --- processes --------------------------------------------------------------------------------

class Processes:
    """Every child this benchmark starts; stop_all() stops each by its own pid, newest first."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], cpus: str | None,
              env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        command = (["taskset", "-c", cpus] if cpus else []) + args
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                       start_new_session=True)
        self.started.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        terminate(process, timeout)

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            self.stop(process)
        self.started.clear()


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (for a supervisor with worker processes)."""
    found = [pid]
    for current in found:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{current}/task/{task}/children").read_text()
                    found.extend(int(child) for child in text.split())
    return found


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def pin(pids: list[int], cpus: str) -> None:
    cores = {int(core) for core in cpus.split(",")}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cores)


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None,
              ) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


# --- wrk --------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0


def _micros(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    result = WrkResult()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{output}")
    result.rps = float(rps.group(1))
    for percent, attr in (("50", "p50_us"), ("99", "p99_us")):
        found = re.search(rf"^\s+{percent}(?:\.0+)?%\s+(\S+)", output, re.MULTILINE)
        if found:
            setattr(result, attr, _micros(found.group(1)))
    requests = re.search(r"(\d+) requests in", output)
    result.requests = int(requests.group(1)) if requests else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result.non_2xx = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    result.socket_errors = sum(int(n) for n in errors.groups()) if errors else 0
    return result


def wrk(url: str, connections: int, duration: str, cpus: str | None,
        headers: list[str], script: Path | None = None,
        env: dict[str, str] | None = None) -> WrkResult:
    args = (["taskset", "-c", cpus] if cpus else []) + [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}", "--latency", "--timeout", "5s"]
    for header in headers:
        args += ["-H", header]
    if script is not None:
        args += ["-s", str(script)]
    timeout = to_seconds(duration) + 30
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# --- targets ----------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    kind: str  # direct | nginx | naive | floor | gateway
    port: int
    pids: list[int]  # the system under test (for CPU and RSS)
    cpus: str | None  # where wrk runs while measuring it
    note: str = ""
    headers: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"


@dataclass
class Measurement:
    target: str
    round: int
    rps: float
    p50_us: float
    p99_us: float
    c50_p50_us: float
    c50_p99_us: float
    sut_cpu_pct: float  # CPU used by the system under test during the throughput run
    non_2xx: int
    socket_errors: int

    @property
    def rps_per_core(self) -> float:
        """Throughput per CPU-second of the system under test: robust to CPU contention."""
        return self.rps * 100.0 / self.sut_cpu_pct if self.sut_cpu_pct else 0.0


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True)
        self.procs = Processes(self.logs)
        self.duration = env_seconds("BENCH_DURATION", "10s")
        self.latency_duration = env_seconds("BENCH_LATENCY_DURATION", "5s")
        self.warmup = env_seconds("BENCH_WARMUP", "1s")
        self.rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
        self.connections = int(os.environ.get("BENCH_CONNECTIONS", "50"))
        self.memory_duration = env_seconds("BENCH_MEMORY_DURATION", "30s")
        base = os.environ.get("BENCH_BASE_ROOT", "").strip()
        self.base_root = Path(base).resolve() if base else None
        variant = os.environ.get("BENCH_VARIANT_ENV", "").strip()
        self.variant_env = dict(item.split("=", 1) for item in variant.split(",") if "=" in item)
        variant_python = os.environ.get("BENCH_VARIANT_PYTHON", "").strip()
        self.variant_python = variant_python or None
        only = os.environ.get("BENCH_ONLY", "").strip()
        self.only = {name.strip() for name in only.split(",") if name.strip()}
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.upstream_pid = 0
        self.redis_pids: list[int] = []
        self.redis_url = ""
        self.upstream_port = 0
        self.python = sys.executable

    # -- starting things ---------------------------------------------------------------------

    def render_nginx(self, template: str, **values: int) -> Path:
        text = (BENCH / "nginx" / template).read_text()
        text = text.replace("@TMP@", str(self.tmp))
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        path = self.tmp / template
        path.write_text(text)
        return path

    def start_nginx(self, name: str, conf: Path, port: int, cpus: str) -> subprocess.Popen[bytes]:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        process = self.procs.start(name, [nginx, "-p", str(self.tmp), "-e",
                                          str(self.tmp / f"{name}-error.log"), "-c", str(conf)],
                                   cpus)
        wait_http(f"http://127.0.0.1:{port}/", process=process)
        return process

    def start_infrastructure(self) -> None:
        self.upstream_port = free_port()
        upstream = self.start_nginx("upstream", self.render_nginx(
            "upstream.conf", PORT=self.upstream_port), self.upstream_port, LOAD_CPU)
        self.upstream_pid = upstream.pid
        redis = RedisServer(self.tmp / "redis")
        redis.start()
        assert redis.process is not None
        self.procs.started.insert(0, ("redis", redis.process))  # stopped last
        self.redis_pids = [redis.process.pid]
        pin(self.redis_pids, LOAD_CPU)
        self.redis_url = redis.url

    def want(self, name: str) -> bool:
        return not self.only or name in self.only

    def add_direct(self) -> None:
        if self.want("direct"):
            self.targets.append(Target("direct", "direct", self.upstream_port,
                                       [self.upstream_pid], LOAD_CPU,
                                       "wrk -> upstream nginx (moved to the sut core)"))

    def add_nginx(self) -> None:
        if not self.want("nginx"):
            return
        port = free_port()
        conf = self.render_nginx("proxy.conf", PORT=port, UPSTREAM_PORT=self.upstream_port)
        process = self.start_nginx("nginx-proxy", conf, port, SUT_CPU)
        self.targets.append(Target("nginx", "nginx", port, [process.pid], LOAD_CPU,
                                   "nginx proxy_pass, 1 worker, upstream keepalive"))

    def add_naive(self) -> None:
        if not self.want("naive"):
            return
        runs = [("naive", self.python, "")]
        if self.variant_python is not None:
            runs.append(("naive-py", self.variant_python, f" [{self.variant_python}]"))
        for name, python, note in runs:
            port = free_port()
            process = self.procs.start(name, [
                python, str(BENCH / "naive_proxy.py"), "--listen", f"127.0.0.1:{port}",
                "--upstream", f"http://127.0.0.1:{self.upstream_port}"], SUT_CPU)
            wait_http(f"http://127.0.0.1:{port}{PATH}", process=process)
            self.targets.append(Target(
                name, "naive", port, [process.pid], LOAD_CPU,
                "aiohttp web.Application + shared ClientSession + uvloop" + note))

    def add_floor(self) -> None:
        """Opt-in (named in BENCH_ONLY): `floor_proxy.py`, the least a Python proxy on uvloop
        does per request: as callbacks, with one Task per request, with aiohttp's C request
        parser and the gateway's upstream client but no server framework, and as aiohttp's
        server with the gateway's upstream client and nothing of its chain."""
        for style in ("callbacks", "task", "llhttp", "aiohttp"):
            name = f"floor-{style}"
            if name not in self.only:
                continue
            port = free_port()
            process = self.procs.start(name, [
                self.python, str(BENCH / "floor_proxy.py"), "--listen", f"127.0.0.1:{port}",
                "--upstream", f"127.0.0.1:{self.upstream_port}", "--style", style], SUT_CPU,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            wait_http(f"http://127.0.0.1:{port}{PATH}", process=process)
            self.targets.append(Target(name, "floor", port, [process.pid], LOAD_CPU,
                                       f"floor_proxy.py --style {style}"))

    def gateway_config(self, name: str, source: str, routes: int) -> Path:
        document: dict[str, Any] = yaml.safe_load((BENCH / "configs" / source).read_text())
        if routes > len(document["routes"]):
            document["routes"] = many_routes(routes, document["routes"])
        path = self.tmp / f"gw-{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    def add_gateway(self, name: str, source: str, *, workers: int = 1, routes: int = 10,
                    pinned: bool = True, env: dict[str, str] | None = None,
                    note: str = "") -> None:
        """Start one gateway configuration; one that fails to start is reported and skipped
        (the proxy is being changed by others: the rest of the run still counts). With
        BENCH_BASE_ROOT, the same configuration also runs from that checkout as `<name>-base`;
        with BENCH_VARIANT_ENV, also with those variables as `<name>-variant` (before/after
        pairs measured side by side)."""
        if not self.want(name):
            return
        env = env or {}
        python = self.python
        runs = [(name, ROOT, note, env, python)]
        if self.base_root is not None:
            runs.append((f"{name}-base", self.base_root, f"{note} [{self.base_root}]", env,
                         python))
        if self.variant_env:
            runs.append((f"{name}-variant", ROOT, f"{note} [{self.variant_env}]",
                         {**env, **self.variant_env}, python))
        if self.variant_python is not None:
            runs.append((f"{name}-py", ROOT, f"{note} [{self.variant_python}]", env,
                         self.variant_python))
        for run_name, root, run_note, run_env, run_python in runs:
            try:
                self._add_gateway(run_name, source, workers, routes, pinned, run_env,
                                  run_note, root, run_python)
            except (RuntimeError, OSError) as exc:
                print(f"bench: SKIPPED {run_name}: {exc} "
                      f"(log: {self.logs / f'gw-{run_name}.log'})", flush=True)
                self.skipped[run_name] = str(exc)

    def gateway_env(self, name: str, tag: str, root: Path = ROOT) -> dict[str, str]:
        """The environment of a gateway process named `name`: this run's Redis (keys and
        instance prefixed by `tag`), data dir and upstream; `root`'s packages first when it is
        another checkout."""
        env = {**os.environ, "APIGW_REDIS_URL": self.redis_url,
               "APIGW_KEY_PREFIX": f"{tag}-{name}", "APIGW_EVENTS_STREAM": f"{tag}:events",
               "APIGW_LOG_LEVEL": "WARNING", "APIGW_DATA_DIR": str(self.tmp / "data"),
               "APIGW_INSTANCE": f"{tag}-{name}",
               "BENCH_UPSTREAM_URL": f"http://127.0.0.1:{self.upstream_port}",
               "BENCH_JWT_SECRET": JWT_SECRET}
        if root != ROOT:  # the other checkout's packages first (and as the working dir)
            env["PYTHONPATH"] = str(root)
        return env

    def _add_gateway(self, name: str, source: str, workers: int, routes: int, pinned: bool,
                     env: dict[str, str], note: str, root: Path, python: str) -> None:
        port, admin = free_port(), free_port()
        config = self.gateway_config(name, source, routes)
        process_env = {**self.gateway_env(name, "bench", root), **env}
        process = self.procs.start(f"gw-{name}", [
            python, "-m", "apigw.cli", "proxy", "--config", str(config),
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
            "--workers", str(workers)], SUT_CPU if pinned else None, env=process_env, cwd=root)
        wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=60, process=process)
        pids = descendants(process.pid) if workers > 1 else [process.pid]
        headers = client_headers(source)
        target = Target(name, "gateway", port, pids, LOAD_CPU if pinned else None, note,
                        headers=headers)
        check = urllib.request.Request(target.url, headers=dict(
            header.split(": ", 1) for header in headers))
        with urllib.request.urlopen(check, timeout=5.0) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {PATH} answered {response.status}")
        self.targets.append(target)

    def start_targets(self) -> None:
        self.add_direct()
        self.add_nginx()
        self.add_naive()
        self.add_floor()
        self.add_gateway("minimal", "minimal.yaml", note="routing+identity+metrics, no events")
        self.add_gateway("events", "events.yaml", note="minimal + events to the Redis Stream")
        self.add_gateway("ratelimit", "ratelimit.yaml", note="minimal + Redis GCRA limit")
        self.add_gateway("full", "full.yaml",
                         note="JWT HS256 + Redis limit + events + metrics")
        self.add_gateway("full-hybrid", "full-hybrid.yaml",
                         note="full with the hybrid limiter (batches of 100 from Redis)")
        self.add_gateway("routes1000", "minimal.yaml", routes=1000,
                         note="minimal with 1,000 routes (the hit route defined last)")
        self.add_gateway("full-1w-shared", "full.yaml", pinned=False,
                         note="full, 1 worker, nothing pinned (baseline of the 2-worker run)")
        self.add_gateway("full-2w", "full.yaml", workers=2, pinned=False,
                         note="full, 2 workers, nothing pinned")

    # -- measuring ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def placement(self, target: Target) -> Iterator[None]:
        """Move the upstream (and Redis) for targets that need another placement."""
        helpers = [self.upstream_pid, *self.redis_pids]
        if target.kind == "direct":
            pin([self.upstream_pid], SUT_CPU)
        elif target.cpus is None:
            pin(helpers, ALL_CPUS)
        try:
            yield
        finally:
            pin(helpers, LOAD_CPU)

    def measure(self, target: Target, round_no: int) -> Measurement:
        with self.placement(target):
            wrk(target.url, self.connections, self.warmup, target.cpus, target.headers)
            pids = descendants(target.pids[0]) if len(target.pids) > 1 else target.pids
            cpu_before, wall_before = cpu_seconds(pids), time.monotonic()
            loaded = wrk(target.url, self.connections, self.duration, target.cpus,
                         target.headers)
            cpu = (cpu_seconds(pids) - cpu_before) / (time.monotonic() - wall_before)
            single = wrk(target.url, 1, self.latency_duration, target.cpus, target.headers)
        return Measurement(target.name, round_no, loaded.rps, single.p50_us, single.p99_us,
                           loaded.p50_us, loaded.p99_us, round(cpu * 100, 1),
                           loaded.non_2xx + single.non_2xx,
                           loaded.socket_errors + single.socket_errors)

    def run_rounds(self) -> list[Measurement]:
        results: list[Measurement] = []
        for round_no in range(1, self.rounds + 1):
            order = self.targets if round_no % 2 else list(reversed(self.targets))
            for target in order:
                measurement = self.measure(target, round_no)
                results.append(measurement)
                print(f"  round {round_no} {target.name:<15} {measurement.rps:>9.0f} req/s  "
                      f"p50 {measurement.p50_us:>7.0f} us  p99 {measurement.p99_us:>7.0f} us  "
                      f"sut cpu {measurement.sut_cpu_pct:>5.1f}%  "
                      f"{measurement.rps_per_core:>7.0f} req/cpu-s", flush=True)
        return results

    def memory_run(self, capacity: float) -> dict[str, Any]:
        """RSS of the full-chain worker over a run at ~80% of its measured capacity."""
        seconds = to_seconds(self.memory_duration)
        target = next((t for t in self.targets if t.name == "full"), None)
        if seconds <= 0 or target is None or capacity <= 0:
            return {}
        rate = 0.8 * capacity
        script = self.tmp / "paced.lua"
        script.write_text('local d = tonumber(os.getenv("BENCH_DELAY_MS") or "10")\n'
                          "function delay() return d end\n")
        delay_ms = 10
        connections = max(1, round(rate * (delay_ms + 1) / 1000))
        # RSS follows concurrency (buffers per client and upstream connection): steering never
        # goes past the concurrency the capacity was measured with, so a starved proxy shows
        # as a lower achieved rate, not as "growth" from hundreds of extra connections.
        ceiling = max(self.connections, connections)
        segment = min(10.0, seconds)
        pid = target.pids[0]
        samples: list[tuple[float, float]] = []
        rates: list[float] = []
        used: list[int] = []  # wrk connections per segment: concurrency sets the RSS high-water
        started = time.monotonic()
        env = {**os.environ, "BENCH_DELAY_MS": str(delay_ms)}
        while time.monotonic() - started < seconds:
            result = wrk(target.url, connections, f"{segment:g}s", target.cpus, target.headers,
                         script, env)
            rates.append(result.rps)
            used.append(connections)
            samples.append((round(time.monotonic() - started, 1), round(rss_mib(pid), 1)))
            if result.rps > 0:  # steer the next segment towards the target rate
                connections = max(1, min(ceiling, round(connections * rate / result.rps)))
        values = [rss for _, rss in samples]
        settled = values[1:] if len(values) > 2 else values
        growth = (settled[-1] - settled[0]) / settled[0] * 100 if settled[0] else 0.0
        return {"target": target.name, "seconds": seconds, "target_rps": round(rate),
                "achieved_rps": round(sum(rates[1:] or rates) / len(rates[1:] or rates)),
                "capacity_rps": round(capacity), "rss_mib": samples, "connections": used,
                "growth_pct_after_first_segment": round(growth, 1),
                "flat_within_10pct": abs(growth) <= 10.0}

    def profile(self, name: str) -> dict[str, Any]:
        """py-spy samples of one gateway under load: top functions by own and total time."""
        target = next((t for t in self.targets if t.name == name), None)
        spy = shutil.which("py-spy") or str(Path(self.python).parent / "py-spy")
        if target is None or not Path(spy).exists():
            return {}
        raw = self.tmp / f"{name}.collapsed"
        seconds = max(5, int(to_seconds(self.duration)))
        with self.placement(target):
            spy_proc = subprocess.Popen([spy, "record", "--nonblocking", "-r", "250", "-f", "raw",
                                         "-o", str(raw), "-d", str(seconds + 1), "-p",
                                         str(target.pids[0])], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.0)
                wrk(target.url, self.connections, f"{seconds}s", target.cpus, target.headers)
                spy_proc.wait(timeout=60)
            finally:
                self.procs.stop(spy_proc)
        return summarise_profile(raw) if raw.exists() else {}


def client_headers(source: str) -> list[str]:
    """The header lines the benchmark's client sends to a gateway run from config `source`
    (the `full*` configs authenticate: a bearer token)."""
    headers = list(CLIENT_HEADERS)
    if source.startswith("full"):
        headers.append(f"Authorization: Bearer {bench_token()}")
    return headers


def bench_token() -> str:
    """An HS256 token for full.yaml's `bench` issuer, valid for the whole run."""
    import jwt

    now = int(time.time())
    claims = {"iss": "bench", "sub": "bench-client", "iat": now, "exp": now + 3600,
              "scope": "orders:read", "tenant": "bench"}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def many_routes(count: int, base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`count` routes: generated literal, templated and prefix routes, then the base routes
    (the benchmark's route is the last one, the worst place for a linear scan)."""
    generated: list[dict[str, Any]] = []
    for index in range(count - len(base)):
        kind = index % 3
        if kind == 0:
            match = {"path": f"/svc{index}/items/{{id}}"}
        elif kind == 1:
            match = {"path": f"/api/v{index}/things"}
        else:
            match = {"prefix": f"/legacy{index}"}
        generated.append({"id": f"gen-{index}", "match": match, "methods": ["GET"],
                          "upstream": "app"})
    return generated + base


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    own: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    areas: dict[str, int] = defaultdict(int)
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        if frames and "(idle)" in frames[-1]:
            continue
        samples += count
        own[frames[-1]] += count
        areas[_area(frames[-1])] += count
        for frame in set(frames):
            total[frame] += count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(table.items(), key=lambda item: -item[1])[:top]
        return [(name, round(100 * value / samples, 1)) for name, value in best]

    return {"samples": samples, "own_pct": ranked(own), "total_pct": ranked(total),
            "area_pct": ranked(areas)}


_AREAS = (("redis/", "redis client (redis-py)"), ("prometheus_client/", "metrics"),
          ("aiohttp/client", "upstream client (aiohttp)"),
          ("aiohttp/connector", "upstream client (aiohttp)"),
          ("aiohttp/", "server side (aiohttp)"), ("multidict/", "headers (multidict)"),
          ("yarl/", "URLs (yarl)"), ("asyncio/", "event loop (asyncio/uvloop)"),
          ("uvloop/", "event loop (asyncio/uvloop)"), ("proxy/", "gateway code (proxy/)"))


def _area(frame: str) -> str:
    """Which part of the stack a leaf frame belongs to (own time by area)."""
    where = frame.rpartition("(")[2]
    for marker, area in _AREAS:
        if where.startswith(marker) or f"/{marker}" in where:
            return area
    return "other"


def _short(frame: str) -> str:
    """'handle (proxy/app.py:250)' -> 'handle (proxy/app.py)', paths shortened."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# --- reporting --------------------------------------------------------------------------------

def ratios(results: list[Measurement], round_no: int) -> dict[str, Any]:
    """The goal ratios from one round: every number in a ratio measured side by side."""
    rows = {m.target: m for m in results if m.round == round_no}
    out: dict[str, Any] = {}
    nginx, naive, direct = rows.get("nginx"), rows.get("naive"), rows.get("direct")
    for name in ("full", "full-hybrid"):
        full = rows.get(name)
        if full and nginx:
            per_cpu = full.rps_per_core / nginx.rps_per_core if nginx.rps_per_core else 0.0
            out[f"{name}_vs_nginx"] = {"ratio": round(full.rps / nginx.rps, 3),
                                       "goal": ">= 0.20", "per_cpu_ratio": round(per_cpu, 3)}
        if full and naive:
            per_cpu = full.rps_per_core / naive.rps_per_core if naive.rps_per_core else 0.0
            out[f"{name}_vs_naive"] = {"ratio": round(full.rps / naive.rps, 2),
                                       "goal": ">= 1.5", "per_cpu_ratio": round(per_cpu, 2)}
    if direct:
        for name in ("full", "full-hybrid", "minimal", "nginx", "naive"):
            row = rows.get(name)
            if row:
                out[f"added_p50_{name}_us"] = {"value": round(row.p50_us - direct.p50_us),
                                               "goal": "<= 100" if "full" in name else ""}
    one, two = rows.get("full-1w-shared"), rows.get("full-2w")
    if one and two:
        out["two_vs_one_worker"] = {"ratio": round(two.rps / one.rps, 2), "goal": ">= 1.7"}
    small, large = rows.get("minimal"), rows.get("routes1000")
    if small and large:
        out["routes_1000_vs_10"] = {"ratio": round(large.rps / small.rps, 3),
                                    "per_cpu_ratio": round(large.rps_per_core
                                                           / max(small.rps_per_core, 1.0), 3),
                                    "p50_delta_us": round(large.p50_us - small.p50_us),
                                    "goal": ">= 0.95 (within 5%)"}
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    versions = subprocess.run([sys.executable, "-c", "import aiohttp, uvloop; "
                               "print(aiohttp.__version__, uvloop.__version__)"],
                              capture_output=True, text=True, check=False).stdout.split()
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        shared = any("libpython" in line for line in maps)
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(),
            "python_executable": os.path.realpath(sys.executable),
            "python_build": ("libpython shared" if shared else "libpython static")
            + f", {platform.python_compiler()}, built {platform.python_build()[1]}",
            "aiohttp": versions[0] if versions else "",
            "uvloop": versions[1] if len(versions) > 1 else "",
            "nginx": nginx.stderr.strip().rpartition("/")[2],
            "wrk": (wrk_v.stdout or wrk_v.stderr).split()[1] if (wrk_v.stdout or wrk_v.stderr)
            else "",
            "pinning": "wrk+upstream+redis on core 0, system under test on core 1; "
                       "scaling pair unpinned"}


def print_table(results: list[Measurement], targets: list[Target]) -> None:
    rounds = sorted({m.round for m in results})
    head = f"{'target':<15}" + "".join(f" | r{r} req/s   p50 us   p99 us  cpu% req/cpu-s"
                                       for r in rounds)
    print("\n" + head)
    print("-" * len(head))
    for target in targets:
        line = f"{target.name:<15}"
        for round_no in rounds:
            row = next((m for m in results if m.target == target.name and m.round == round_no),
                       None)
            if row is None:
                line += " |" + " " * 47
                continue
            line += (f" | {row.rps:>9.0f} {row.p50_us:>8.0f} {row.p99_us:>8.0f} "
                     f"{row.sut_cpu_pct:>5.0f} {row.rps_per_core:>9.0f}")
        print(line)
    bad = [m for m in results if m.non_2xx or m.socket_errors]
    for row in bad:
        print(f"WARNING {row.target} round {row.round}: {row.non_2xx} non-2xx, "
              f"{row.socket_errors} socket errors")


def print_ratios(found: dict[int, dict[str, Any]]) -> None:
    for round_no, table in found.items():
        print(f"\nratios, round {round_no} (measured side by side):")
        for name, value in table.items():
            shown = {k: v for k, v in value.items() if v != ""}
            print(f"  {name:<22} " + "  ".join(f"{k}={v}" for k, v in shown.items()))


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="apigw-bench-"))
    bench = Bench(tmp)
    interrupt_on_termination()
    started = time.monotonic()
    try:
        print(f"bench: starting (temp dir {tmp})", flush=True)
        host = machine()
        print(f"bench: python {host['python']} {host['python_executable']} "
              f"({host['python_build']})", flush=True)
        bench.start_infrastructure()
        bench.start_targets()
        print(f"bench: {len(bench.targets)} targets ready; {bench.rounds} rounds of "
              f"wrk -t1 -c{bench.connections} -d{bench.duration} (+ -c1 -d"
              f"{bench.latency_duration})", flush=True)
        results = bench.run_rounds()
        print_table(results, bench.targets)
        found = {round_no: ratios(results, round_no) for round_no in range(1, bench.rounds + 1)}
        print_ratios(found)
        capacity = max((m.rps for m in results if m.target == "full"), default=0.0)
        memory = bench.memory_run(capacity)
        if memory:
            print(f"\nmemory: full chain at {memory['achieved_rps']} req/s (target "
                  f"{memory['target_rps']}, 80% of {memory['capacity_rps']}) for "
                  f"{memory['seconds']:g}s: RSS MiB {memory['rss_mib']}; growth after the "
                  f"first segment {memory['growth_pct_after_first_segment']}% -> "
                  f"{'flat' if memory['flat_within_10pct'] else 'NOT flat'}; wrk connections "
                  f"per segment {memory['connections']}")
        profiled = os.environ.get("BENCH_PROFILE", "")
        profiled = "full" if profiled == "1" else profiled
        profile = bench.profile(profiled) if profiled else {}
        if profile:
            print(f"\nprofile of {profiled} ({profile['samples']} samples), own time:")
            for name, pct in profile["own_pct"]:
                print(f"  {pct:>5.1f}%  {name}")
            print("own time by area:")
            for name, pct in profile["area_pct"]:
                print(f"  {pct:>5.1f}%  {name}")
        document = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": host,
                    "settings": {"duration": bench.duration,
                                 "latency_duration": bench.latency_duration,
                                 "connections": bench.connections, "rounds": bench.rounds,
                                 "path": PATH},
                    "targets": [{"name": t.name, "kind": t.kind, "note": t.note,
                                 "pinned": t.cpus is not None} for t in bench.targets],
                    "skipped": bench.skipped,
                    "results": [{**asdict(m), "rps_per_core": round(m.rps_per_core)}
                                for m in results],
                    "ratios": found,
                    "memory": memory, "profile": profile,
                    "elapsed_s": round(time.monotonic() - started)}
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in (RESULTS / f"bench-{stamp}.json", RESULTS / "latest.json"):
            path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nbench: done in {document['elapsed_s']}s; results in "
              f"{RESULTS / f'bench-{stamp}.json'}")
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        bench.procs.stop_all()
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"bench: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
