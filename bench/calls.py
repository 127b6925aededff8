"""Python calls per request: which functions a gateway request runs, and how often.

Instructions per request (bench/instructions.py) say how much work a request is; this says
where the interpreter spends it in calls. Each selected configuration is started with a
`sys.setprofile` hook that counts `call` events (Python functions; a coroutine's resumption
counts as a call) and `c_call` events (C functions called from Python) per function,
switched on by SIGUSR1 and dumped by SIGUSR2 around `--requests` requests sent over
`--concurrency` keep-alive connections. The hook slows the gateway ~3x: only the counts mean
anything, never the time.

    .venv/bin/python bench/calls.py --configs minimal,full --top 40 --python-only

Prints Python and C calls per request for each configuration, then its top functions.
Started processes (upstream nginx, Redis, gateways) are stopped by their own pids.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0


def serve(out: str, argv: list[str]) -> None:
    """In the gateway's process: install the signal-driven counter, then run `apigw`."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            counts[(code.co_filename, code.co_name)] += 1
        elif event == "c_call":
            counts[("C", getattr(arg, "__qualname__", repr(arg)))] += 1

    def start(*_: object) -> None:
        counts.clear()
        sys.setprofile(count)

    def dump(*_: object) -> None:
        sys.setprofile(None)
        Path(out).write_text(json.dumps([[where, name, n]
                                         for (where, name), n in counts.most_common()]))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["apigw", *argv]
    from apigw.cli import main as apigw_main

    apigw_main()


def short(where: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/", "python3.11/"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def measure(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import SUT_CPU, Bench, client_headers, wait_http
    from instructions import send

    from apigw.redis_server import free_port

    with tempfile.TemporaryDirectory(prefix="apigw-calls-") as tmp_dir:
        tmp = Path(tmp_dir)
        bench = Bench(tmp)
        try:
            bench.start_infrastructure()
            for source in args.configs.split(","):
                port, admin = free_port(), free_port()
                config = bench.gateway_config(source, f"{source}.yaml", 10)
                out = tmp / f"calls-{source}.json"
                env = {**bench.gateway_env(source, "calls"), "PYTHONPATH": str(ROOT)}
                process = bench.procs.start(f"calls-{source}", [
                    bench.python, str(Path(__file__).resolve()), "--serve", str(out), "--",
                    "proxy", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                    "--admin", f"127.0.0.1:{admin}", "--workers", "1"], SUT_CPU, env=env,
                    cwd=ROOT)
                wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=READY_TIMEOUT_S,
                          process=process)
                headers = dict(header.split(": ", 1) for header in client_headers(source))
                send(port, headers, args.warmup, args.concurrency)
                os.kill(process.pid, signal.SIGUSR1)
                time.sleep(0.2)
                send(port, headers, args.requests, args.concurrency)
                os.kill(process.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 10
                while not out.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                report(source, json.loads(out.read_text()), args.requests, args.top,
                       args.python_only)
        finally:
            bench.procs.stop_all()
    return 0


def report(source: str, rows: list[list[Any]], requests: int, top: int,
           python_only: bool) -> None:
    python = sum(n for where, _, n in rows if where != "C")
    native = sum(n for where, _, n in rows if where == "C")
    print(f"\n## {source}: {python / requests:.1f} Python calls and {native / requests:.1f} "
          "C calls per request\n")
    print("| per request | function |")
    print("|---|---|")
    listed = [row for row in rows if row[0] != "C"] if python_only else rows
    for where, name, n in listed[:top]:
        place = "C" if where == "C" else short(where)
        print(f"| {n / requests:.2f} | {place}: {name} |")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        separator = sys.argv.index("--")
        serve(sys.argv[2], sys.argv[separator + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="minimal,full",
                        help="bench/configs names, comma-separated")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=40, help="functions listed per config")
    parser.add_argument("--python-only", action="store_true",
                        help="list Python functions only (C calls still counted in the total)")
    return measure(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
