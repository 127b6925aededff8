"""The `apigw` command: help texts, validate, usage errors, and `up` as a real supervised stack."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from apigw.cli import dashboard_command
from apigw.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("proxy", "collector", "analytics", "api", "controlplane", "dashboard", "up",
               "demo", "validate", "keys")

VALID = """
version: 1
upstreams:
  shop: {url: "${SHOP_URL:-http://127.0.0.1:9001}"}
routes:
  - id: orders
    match: {path: "/orders/{id}"}
    methods: [GET]
    upstream: shop
  - id: rest
    match: {prefix: /}
    upstream: shop
"""

BROKEN = """
version: 1
upstreams:
  shop: {url: "http://127.0.0.1:9001"}
routes:
  - id: orders
    match: {path: "/orders/{id}"}
    upstream: nowhere
"""


def apigw(*args: str, env: dict[str, str | None] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command; `env` adds variables, or removes those given as None."""
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run([sys.executable, "-m", "apigw.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False, env=environ)


def test_top_level_help_lists_every_subcommand() -> None:
    result = apigw("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert f"    {name}" in result.stdout
    assert "APIGW_REDIS_URL" in result.stdout
    assert "8080" in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_explains_itself(name: str) -> None:
    result = apigw(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: apigw {name}" in result.stdout
    assert "examples:" in result.stdout
    assert "environment" in result.stdout


def test_help_works_without_the_components() -> None:
    """Components are imported lazily: --help must not need any of them."""
    code = ("import sys\n"
            "for name in ('proxy', 'collector', 'analytics', 'dashboard', 'streamlit'):\n"
            "    sys.modules[name] = None\n"
            "from apigw.cli import main\n"
            "sys.argv = ['apigw', 'up', '--help']\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: apigw up" in result.stdout


def test_validate_accepts_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(VALID)
    result = apigw("validate", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {config} (2 routes, version ")


def test_validate_names_the_file_and_the_path_of_a_problem(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(BROKEN)
    result = apigw("validate", str(good), str(bad), str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert f"ok: {good}" in result.stdout
    assert str(bad) in result.stderr
    assert "routes[0].upstream 'nowhere' is not one of the upstreams ['shop']" in result.stderr
    assert f"{tmp_path / 'missing.yaml'}: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_reports_yaml_and_environment_problems(tmp_path: Path) -> None:
    unset = tmp_path / "unset.yaml"
    unset.write_text(VALID.replace("${SHOP_URL:-http://127.0.0.1:9001}", "${SHOP_URL}"))
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("routes: [unclosed\n")
    result = apigw("validate", str(unset), str(garbage), env={"SHOP_URL": None})
    assert result.returncode == 1
    assert "environment variable SHOP_URL is not set" in result.stderr
    assert f"{garbage}: not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    assert apigw().returncode == 2
    bad_listen = apigw("proxy", "--listen", "nonsense")
    assert bad_listen.returncode == 2
    assert "HOST:PORT" in bad_listen.stderr
    no_config = apigw("proxy", env={"APIGW_CONFIG": None})
    assert no_config.returncode == 2
    assert "no gateway config" in no_config.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    invalid = apigw("proxy", "--config", str(broken))
    assert invalid.returncode == 2
    assert "routes[0].upstream" in invalid.stderr
    bad_env = apigw("collector", env={"APIGW_REDIS_URL": "http://not-redis"})
    assert bad_env.returncode == 2
    assert "APIGW_REDIS_URL" in bad_env.stderr
    for result in (bad_listen, no_config, invalid, bad_env):
        assert "Traceback" not in result.stderr


def _free_stack_ports() -> list[str]:
    return ["--proxy-port", str(free_port()), "--admin-port", str(free_port()),
            "--api-port", str(free_port()), "--dashboard-port", str(free_port())]


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = apigw("up", "--data-dir", str(tmp_path / "data"), "--proxy-port", str(port),
                       "--admin-port", str(free_port()), "--api-port", str(free_port()),
                       "--no-dashboard")
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 (proxy) is already in use" in result.stderr
    assert "--proxy-port" in result.stderr


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = apigw("demo", "--data-dir", str(precious), "--upstream-ports",
                   f"{free_port()},{free_port()},{free_port()}", *_free_stack_ports())
    assert result.returncode == 2
    assert "refusing to wipe" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"


def test_dashboard_command_runs_streamlit_on_the_app() -> None:
    command = dashboard_command("127.0.0.1:8601")
    assert command[:4] == [sys.executable, "-m", "dashboard.serve", "run"]
    assert Path(command[4]) == ROOT / "dashboard" / "asgi.py"  # dashboard/app.py in st.App
    assert command[5:] == ["--server.address", "127.0.0.1", "--server.port", "8601",
                           "--server.headless", "true", "--browser.gatherUsageStats", "false",
                           "--client.toolbarMode", "viewer", "--server.fileWatcherType", "none",
                           "--server.runOnSave", "false"]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


@pytest.mark.e2e
def test_up_runs_the_stack_and_stops_it_cleanly(tmp_path: Path) -> None:
    """`apigw up` with its own Redis, the control plane and the proxy; SIGINT stops all."""
    upstream_port = free_port()
    ports = {name: free_port() for name in ("proxy", "admin", "api", "redis")}
    log = tmp_path / "up.log"
    env = {**os.environ, "APIGW_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}"}
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "apigw.cli", "up", "--config",
             str(ROOT / "examples" / "minimal.yaml"), "--data-dir", str(tmp_path / "data"),
             "--no-dashboard", "--proxy-port", str(ports["proxy"]), "--admin-port",
             str(ports["admin"]), "--api-port", str(ports["api"]), "--redis-port",
             str(ports["redis"])],
            stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            start_new_session=True)
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 240
        while "apigw is up:" not in log.read_text():
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        text = log.read_text()
        for match in re.finditer(r"^\[supervisor\] +started (\S+) \(pid (\d+)\)$", text,
                                 re.MULTILINE):
            pids[match[1]] = int(match[2])
        assert set(pids) == {"redis", "controlplane", "proxy"}, text
        assert f"redis://127.0.0.1:{ports['redis']}/0 (started here" in text
        assert _get(f"http://127.0.0.1:{ports['api']}/healthz") == 200
        assert _get(f"http://127.0.0.1:{ports['admin']}/readyz") == 200
        assert re.search(r"^\[controlplane\] +\S", text, re.MULTILINE), text
        assert re.search(r"^\[proxy\] +\S", text, re.MULTILINE), text
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    stops = re.findall(r"^\[supervisor\] +stopping (\S+) ", text, re.MULTILINE)
    assert stops == ["proxy", "controlplane", "redis"], text[-4000:]
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert (tmp_path / "data" / "redis" / "appendonlydir").exists() or \
        (tmp_path / "data" / "redis" / "appendonly.aof").exists()


@pytest.mark.e2e
def test_demo_serves_traffic_through_the_gateway_and_stops_cleanly(tmp_path: Path) -> None:
    """`apigw demo`: upstreams behind the proxy, the traffic generator gets 2xx; SIGINT stops."""
    data_dir = tmp_path / "demo"
    upstreams = ",".join(str(free_port()) for _ in range(3))
    log = tmp_path / "demo.log"
    env = {**os.environ, "APIGW_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "apigw.cli", "demo", "--data-dir", str(data_dir),
             "--no-dashboard", "--upstream-ports", upstreams, "--redis-port", str(free_port()),
             "--incident-after", "600", *_free_stack_ports()],
            stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            start_new_session=True)
    pids: dict[str, int] = {}
    report = None
    try:
        deadline = time.monotonic() + 240
        while report is None:
            text = log.read_text()
            report = re.search(r"^\[traffic\] +t=\+\d+s last 10s  normal\(30\): sent (\d+) "
                               r"2xx (\d+) 4xx (\d+) 429 (\d+) 5xx (\d+) err (\d+)", text,
                               re.MULTILINE)
            assert process.poll() is None, text[-4000:]
            assert time.monotonic() < deadline, text[-4000:]
            time.sleep(0.5)
        pids = {match[1]: int(match[2]) for match in re.finditer(
            r"^\[supervisor\] +started (\S+) \(pid (\d+)\)$", text, re.MULTILINE)}
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    text = log.read_text()
    assert set(pids) == {"redis", "upstreams", "controlplane", "proxy", "traffic"}, text[-4000:]
    sent, ok, client_errors, limited, server_errors, errors = (int(report[n])
                                                               for n in range(1, 7))
    assert sent > 100, report[0]
    # Every route of the demo config reaches a demo service: nothing unroutable, refused or
    # limited. The orders service answers 503 when a burst exceeds its capacity (22 req/s,
    # by design of the demo), so a few 5xx are its own, never the gateway's.
    assert (client_errors, limited, errors) == (0, 0, 0), report[0]
    assert ok + server_errors == sent, report[0]
    assert server_errors <= sent // 50, report[0]
    # authenticated clients (JWTs, API keys) are all served; anonymous visitors run alongside
    assert re.search(r"anonymous\(3\): sent \d+ 2xx \d+ 4xx \d+", text), text[-4000:]
    assert "demo timeline" in text
    assert (data_dir / ".apigw-demo").exists()
    assert process.returncode == 0, text[-4000:]
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
