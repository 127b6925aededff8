"""Instructions per request: the gateway's CPU work counted, not timed.

On a shared or noisy machine a 3% change in req/s is lost in the noise; the number of
instructions the gateway's process executes per request is not (valgrind's callgrind counts
them; the same build, config and requests give the same count to within ~0.1%). This runs
each selected gateway configuration under callgrind (instrumentation switched on only once it
serves), sends the same requests one at a time over one keep-alive connection, and reports
user-space instructions per request, per round and their median. With `--base <checkout>`
each configuration also runs from that checkout (e.g. `git worktree add /tmp/base HEAD~1`):
before and after side by side.

What it does not count: the kernel's part (socket calls, scheduling), cache misses and
stalls. It answers "does this change make the gateway do less work per request"; whether
that shows as req/s is the wall-clock benchmark's question (bench/harness.py).

    .venv/bin/python bench/instructions.py --configs minimal,full --base /tmp/base

Needs valgrind (Debian package `valgrind`; installed when missing and run as root); started
processes are stopped by their own pids.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    PATH,
    ROOT,
    SUT_CPU,
    Bench,
    client_headers,
    wait_http,
)

from apigw.redis_server import free_port

READY_TIMEOUT_S = 240.0  # a Python start under valgrind takes 30-60 s


@dataclass
class Counted:
    name: str
    port: int
    pid: int
    out: Path
    headers: dict[str, str]
    per_request: list[float] = field(default_factory=list)


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def newest_dump(out: Path) -> Path:
    """callgrind's newest dump of `out` (`<out>.<n>`, n counting up)."""
    return max(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))


def last_dump_total(out: Path) -> int:
    """Instructions in the newest dump: counts since the previous dump."""
    dump = newest_dump(out)
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {dump}")


def keep_dump(target: Counted, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(newest_dump(target.out), into / f"callgrind-{target.name}.out")


def send(port: int, headers: dict[str, str], count: int, concurrency: int = 1) -> None:
    """`count` requests over `concurrency` keep-alive connections at once (threads)."""
    if concurrency > 1:
        shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(send, port, headers, n) for n in shares]:
                future.result()
        return
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            connection.request("GET", PATH, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {PATH} answered {response.status}")
    finally:
        connection.close()


def start(bench: Bench, name: str, source: str, root: Path, tmp: Path) -> Counted:
    port, admin = free_port(), free_port()
    config = bench.gateway_config(name, source, 10)
    out = tmp / f"callgrind-{name}.out"
    env = bench.gateway_env(name, "instr", root)
    process = bench.procs.start(f"cg-{name}", [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        bench.python, "-m", "apigw.cli", "proxy", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--workers", "1"],
        SUT_CPU, env=env, cwd=root)
    wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=READY_TIMEOUT_S, process=process)
    headers = dict(header.split(": ", 1) for header in client_headers(source))
    return Counted(name, port, process.pid, out, headers)


def ensure_valgrind() -> None:
    """Installs Debian's valgrind when missing and running as root (as bench/run.sh does for
    wrk and nginx); otherwise says how."""
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("instructions: installing valgrind (Debian package)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("instructions: valgrind is not installed "
                         "(apt-get install -y valgrind)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="minimal,full",
                        help="bench/configs names, comma-separated (minimal, full, ...)")
    parser.add_argument("--base", type=Path, help="another checkout to count side by side")
    parser.add_argument("--requests", type=int, default=2000, help="per round and target")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1,
                        help="connections sending at once (1: one request at a time, every "
                        "request pays a whole event-loop turn; 16+: the loop batches, as under "
                        "the throughput benchmark's load)")
    parser.add_argument("--keep", type=Path, help="copy each target's last dump here "
                        "(callgrind-<target>.out, for callgrind_annotate)")
    args = parser.parse_args()
    ensure_valgrind()
    with tempfile.TemporaryDirectory(prefix="apigw-instr-") as tmp_dir:
        tmp = Path(tmp_dir)
        bench = Bench(tmp)
        try:
            bench.start_infrastructure()
            targets: list[Counted] = []
            for source in args.configs.split(","):
                runs = [(source, ROOT)]
                if args.base is not None:
                    runs.append((f"{source}-base", args.base.resolve()))
                for name, root in runs:
                    print(f"instructions: starting {name} under callgrind", flush=True)
                    targets.append(start(bench, name, f"{source}.yaml", root, tmp))
            for target in targets:
                send(target.port, target.headers, args.warmup, args.concurrency)
                callgrind_control("-i", "on", str(target.pid))
                send(target.port, target.headers, args.warmup, args.concurrency)
            for round_no in range(1, args.rounds + 1):
                order = targets if round_no % 2 else list(reversed(targets))
                for target in order:
                    callgrind_control("-d", str(target.pid))  # start counting from here
                    send(target.port, target.headers, args.requests, args.concurrency)
                    callgrind_control("-d", str(target.pid))
                    per_request = last_dump_total(target.out) / args.requests
                    target.per_request.append(per_request)
                    if args.keep is not None:
                        keep_dump(target, args.keep)
                    print(f"  round {round_no} {target.name:<16} {per_request:>10,.0f} "
                          "instructions / request", flush=True)
        finally:
            bench.procs.stop_all()
    print("\n| target | instructions / request, per round | median | vs base |")
    print("|---|---|---|---|")
    medians = {t.name: statistics.median(t.per_request) for t in targets}
    for target in targets:
        base = medians.get(f"{target.name}-base")
        versus = f"{(medians[target.name] / base - 1) * 100:+.2f}%" if base else ""
        rounds = " / ".join(f"{value:,.0f}" for value in target.per_request)
        print(f"| {target.name} | {rounds} | {medians[target.name]:,.0f} | {versus} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
