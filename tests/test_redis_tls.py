"""Redis over TLS (`rediss://`) with an ACL user, for real: a redis-server serving TLS only
(no plaintext port) with the passwordless `default` user switched off, its certificate from a
throwaway CA (tests/test_tls.py's `make_pki`). The gateway, the collector and the control
plane connect with `APIGW_REDIS_URL=rediss://user:password@127.0.0.1:PORT/0?ssl_ca_certs=CA`;
a wrong password or an untrusted certificate is a clear, logged refusal - no traceback, no
hang, no password in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from apigw.redis_server import RedisServer, RedisTls, RedisUser, free_port
from proxy.settings import ProxySettings
from tests.faults import FlakyUpstream, stream_caught_up, wait_until
from tests.processes import ManagedProcess, apigw_command, managed
from tests.test_tls import Pki, make_pki

pytestmark = pytest.mark.e2e

USER = "gateway"
PASSWORD = "tls-redis-pw-5e1f0c"  # searched for in every log line
LIMIT = 3

CONFIG = """
version: 1
upstreams:
  app: {{url: "{upstream}"}}
routes:
  - {{id: orders, match: {{path: "/orders/{{id}}"}}, methods: [GET], upstream: app}}
events: {{flush_interval_ms: 50}}
ratelimit:
  policy_refresh_s: 0.5
  policies:
    - {{id: per-client, key_by: client_id, limit: {limit}, window_s: 60}}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("redis-pki"))


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"),
                         tls=RedisTls(cert_file=pki.cert, key_file=pki.key, ca_file=pki.ca),
                         user=RedisUser(USER, PASSWORD)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def tls_client(tls_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(tls_redis.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[FlakyUpstream]:
    server = FlakyUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _config(tmp_path: Path, upstream: FlakyUpstream) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(upstream=upstream.url, limit=LIMIT))
    return path


def _proxy_command(config: Path, port: int, admin: int) -> list[str]:
    return apigw_command("proxy", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                         "--admin", f"127.0.0.1:{admin}", "--workers", "1")


async def _statuses(url: str, count: int, client: str) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(url, headers={"X-Client-Id": client}) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


def _clean(*processes: ManagedProcess) -> None:
    for process in processes:
        text = process.log()
        assert "Traceback" not in text, text[-3000:]
        assert PASSWORD not in text, f"the Redis password is in the {process.name} log"


def test_the_server_really_is_tls_only_with_acl(tls_redis: RedisServer) -> None:
    """The premise: no plaintext, no anonymous access, the right user gets in."""
    plain = redis.Redis(host=tls_redis.host, port=tls_redis.port, socket_timeout=1,
                        retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()
    anonymous = redis.Redis.from_url(tls_redis.url.replace(f"{USER}:{PASSWORD}@", ""))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    client = redis.Redis.from_url(tls_redis.url)
    assert client.acl_whoami() in (USER, USER.encode())
    client.close()


async def test_gateway_collector_and_controlplane_over_tls(
        tmp_path: Path, tls_redis: RedisServer, tls_client: aioredis.Redis,
        upstream: FlakyUpstream) -> None:
    config = _config(tmp_path, upstream)
    port, admin, api_port = free_port(), free_port(), free_port()
    env = {"APIGW_REDIS_URL": tls_redis.url, "APIGW_DATA_DIR": str(tmp_path / "data"),
           "APIGW_INTERVAL_S": "3600", "APIGW_LOG_LEVEL": "INFO"}
    api = f"http://127.0.0.1:{api_port}/api/v1"
    with managed("controlplane", apigw_command("controlplane", "--listen",
                                               f"127.0.0.1:{api_port}"), env, tmp_path) as cp, \
            managed("proxy", _proxy_command(config, port, admin), env, tmp_path) as proxy:
        await asyncio.to_thread(proxy.wait_http, f"http://127.0.0.1:{admin}/readyz", 60)
        await asyncio.to_thread(cp.wait_http, f"http://127.0.0.1:{api_port}/readyz", 90)
        _, ready = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{admin}/readyz")
        assert ready["redis"]["reachable"] is True, ready
        assert ready["policies"]["loaded_from"] == "redis", ready

        statuses = await _statuses(f"http://127.0.0.1:{port}/orders/1", LIMIT + 2, "tls-client")
        other = await _statuses(f"http://127.0.0.1:{port}/orders/2", 1, "someone-else")
        assert statuses == [200] * LIMIT + [429, 429]
        assert other == [200]
        # The budget lives in the TLS Redis: the limiter did not fall back to local counters.
        assert [key async for key in tls_client.scan_iter("apigw:rl:*")]

        # Every request's event reached the stream, and the control plane's collector read and
        # stored them (it reads the same TLS Redis), and its API reads the policy from there.
        sent = len(statuses) + len(other)

        async def stored() -> bool:
            _, body = await asyncio.to_thread(_get_json, f"{api}/endpoints?minutes=60")
            return sum(int(item["requests"]) for item in body["endpoints"]) == sent

        await wait_until(stored, 30, "the events in ClickHouse")
        await wait_until(lambda: stream_caught_up(tls_client), 10, "the stream acknowledged")
        _, policies = await asyncio.to_thread(_get_json, f"{api}/policies")
        assert "per-client" in json.dumps(policies)
        _, cp_ready = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{api_port}/readyz")
        assert cp_ready["checks"]["redis"] == "ok", cp_ready
    _clean(proxy, cp)


@pytest.mark.parametrize("fault", ["wrong password", "untrusted certificate"])
async def test_wrong_password_or_untrusted_cert_is_a_clear_refusal(
        fault: str, tmp_path: Path, tls_redis: RedisServer, pki: Pki,
        upstream: FlakyUpstream) -> None:
    """The proxy keeps serving on its config baseline and local limiter (its fail-open
    promise) and says why Redis is unusable; the collector retries with backoff and is not
    ready. Both start, answer, log the cause once per attempt and stop on SIGTERM."""
    if fault == "wrong password":
        url = tls_redis.url.replace(PASSWORD, "not-the-password")
        kind, reason, why = "auth", "AuthenticationError", "invalid username-password pair"
    else:
        url = _untrusted(tls_redis, pki)
        kind, reason, why = "network", "ConnectionError", "certificate verify failed"
    config = _config(tmp_path, upstream)
    port, admin, collector_admin = free_port(), free_port(), free_port()
    env = {"APIGW_REDIS_URL": url, "APIGW_LOG_LEVEL": "INFO", "APIGW_BLOCK_MS": "100",
           "APIGW_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'clickhouse'}"}
    with managed("proxy", _proxy_command(config, port, admin), env, tmp_path) as proxy, \
            managed("collector", [sys.executable, "-m", "collector.service"],
                    {**env, "APIGW_LISTEN": f"127.0.0.1:{collector_admin}"},
                    tmp_path) as collector:
        await asyncio.to_thread(proxy.wait_http, f"http://127.0.0.1:{admin}/healthz", 60)
        await asyncio.to_thread(collector.wait_http,
                                f"http://127.0.0.1:{collector_admin}/healthz", 60)
        _, ready = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{admin}/readyz")
        redis_state = ready["redis"]
        assert redis_state["reachable"] is False, ready
        assert redis_state["error"] == reason, ready
        assert why in redis_state["reason"], ready
        assert PASSWORD not in redis_state["reason"], ready
        assert ready["policies"]["loaded_from"] == "baseline", ready
        statuses = await _statuses(f"http://127.0.0.1:{port}/orders/1", LIMIT + 1, "c")
        assert statuses == [200] * LIMIT + [429]  # the local limiter, on the YAML baseline

        status, collector_ready = await asyncio.to_thread(
            _get_json, f"http://127.0.0.1:{collector_admin}/readyz")
        assert status == 503
        # The reason, not just the type (redis-py's repr hides "certificate verify failed").
        assert collector_ready["redis"].startswith(f"unreachable: {reason}: "), collector_ready
        assert why in collector_ready["redis"], collector_ready
        await wait_until(lambda: _logged(collector, "redis error; retrying", why), 10,
                         "the collector's retry warning, with the reason")
        assert _logged(proxy, "could not seed policies into Redis; continuing with the config "
                              "baseline", f"{reason}: ", why), proxy.log()[-2000:]
        assert f'"error":"{kind}:{reason}"' in proxy.log()
    assert proxy.process.returncode == 0
    assert collector.process.returncode == 0
    # Its events could not be written: at shutdown they are dropped and counted, not lost.
    flushed = [json.loads(line) for line in proxy.log().splitlines()
               if '"msg":"events flushed"' in line]
    assert flushed, proxy.log()[-2000:]
    assert flushed[-1]["emitted"] == flushed[-1]["dropped"] == LIMIT + 1, flushed
    _clean(proxy, collector)


async def test_controlplane_wrong_password_without_traceback(
        tmp_path: Path, tls_redis: RedisServer) -> None:
    """Every component of the control plane (collector, scheduled analytics run, lease
    release at shutdown) says in one line that Redis refused it, keeps retrying, and stops
    cleanly: no traceback, no password."""
    port = free_port()
    env = {"APIGW_REDIS_URL": tls_redis.url.replace(PASSWORD, "not-the-password"),
           "APIGW_DATA_DIR": str(tmp_path / "data"), "APIGW_LOG_LEVEL": "INFO",
           "APIGW_INTERVAL_S": "0.5"}
    with managed("controlplane", apigw_command("controlplane", "--listen", f"127.0.0.1:{port}"),
                 env, tmp_path) as cp:
        await asyncio.to_thread(cp.wait_http, f"http://127.0.0.1:{port}/healthz", 90)
        status, ready = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/readyz")
        assert status == 503, ready
        assert ready["checks"]["redis"] == "error: AuthenticationError", ready
        await wait_until(lambda: "redis error; retrying" in cp.log(), 10, "a retry warning")

        def analytics_failures() -> list[dict[str, Any]]:
            return [entry for entry in _log_entries(cp)
                    if entry["msg"] == "analytics run failed: redis error; retrying"]

        await wait_until(lambda: len(analytics_failures()) >= 2, 15,
                         "the scheduled analytics run retried")
    failure = analytics_failures()[0]
    assert failure["error"].startswith("AuthenticationError: invalid username-password"), failure
    release = [entry for entry in _log_entries(cp)
               if entry["msg"] == "could not release the analytics lease"]
    assert [entry["error"].split(":")[0] for entry in release] == ["AuthenticationError"], release
    assert cp.process.returncode == 0
    _clean(cp)


async def test_analytics_service_wrong_password_is_one_line_and_503(
        tmp_path: Path, tls_redis: RedisServer) -> None:
    """`apigw analytics` alone: its scheduled run and POST /run say in one line that Redis
    refused it; /run answers 503 (a dependency is down), not 500; no traceback."""
    port = free_port()
    env = {"APIGW_REDIS_URL": tls_redis.url.replace(PASSWORD, "not-the-password"),
           "APIGW_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'clickhouse'}",
           "APIGW_LOG_LEVEL": "INFO"}
    with managed("analytics", apigw_command("analytics", "--listen", f"127.0.0.1:{port}"),
                 env, tmp_path) as service:
        await asyncio.to_thread(service.wait_http, f"http://127.0.0.1:{port}/healthz", 90)
        status, ready = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/readyz")
        assert status == 503, ready
        assert any(problem.startswith("redis: AuthenticationError: invalid username-password")
                   for problem in ready["problems"]), ready
        request = urllib.request.Request(f"http://127.0.0.1:{port}/run", method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
        assert caught.value.code == 503
        with caught.value:
            problem = json.loads(caught.value.read())
        assert problem["detail"].startswith("Redis unavailable: AuthenticationError"), problem
        await wait_until(lambda: _logged(service, "on-demand analytics run failed: redis error",
                                         "AuthenticationError"), 10, "the /run failure line")
        assert _logged(service, "analytics run failed: redis error; retrying",
                       "AuthenticationError"), service.log()[-2000:]
    assert service.process.returncode == 0
    _clean(service)


def _untrusted(tls_redis: RedisServer, pki: Pki) -> str:
    """The server's URL, trusting another CA than the one that signed its certificate."""
    return tls_redis.url.replace(str(pki.ca), str(pki.self_signed))


def _logged(process: ManagedProcess, msg: str, *parts: str) -> bool:
    """A log line `msg` whose error holds every one of `parts`."""
    return any(entry.get("msg") == msg and all(part in str(entry.get("error")) for part in parts)
               for entry in _log_entries(process))


async def test_untrusted_certificate_reason_in_the_supervisors_readiness(
        tmp_path: Path, tls_redis: RedisServer, pki: Pki, upstream: FlakyUpstream) -> None:
    """With --workers 2 the parent's /readyz says why Redis is unusable, not only the type."""
    config = _config(tmp_path, upstream)
    port, admin = free_port(), free_port()
    command = _proxy_command(config, port, admin)
    command[command.index("--workers") + 1] = "2"
    env = {"APIGW_REDIS_URL": _untrusted(tls_redis, pki), "APIGW_LOG_LEVEL": "INFO"}
    with managed("proxy", command, env, tmp_path) as proxy:
        await asyncio.to_thread(proxy.wait_http, f"http://127.0.0.1:{admin}/healthz", 60)
        _, ready = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{admin}/readyz")
        assert ready["redis"]["reachable"] is False, ready
        assert ready["redis"]["error"] == "ConnectionError", ready
        assert "certificate verify failed" in ready["redis"]["reason"], ready
        assert _logged(proxy, "could not seed policies into Redis; continuing with the config "
                              "baseline", "certificate verify failed"), proxy.log()[-2000:]
    assert proxy.process.returncode == 0
    _clean(proxy)


def _log_entries(process: ManagedProcess) -> list[dict[str, Any]]:
    """The JSON log lines of a process so far (a line still being written is skipped)."""
    entries = []
    for line in process.log().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return [entry for entry in entries if isinstance(entry, dict)]


def test_url_mistakes_are_settings_errors_without_the_password(pki: Pki, tmp_path: Path) -> None:
    cases = {
        f"redis://u:{PASSWORD}@127.0.0.1:1/0?ssl_ca_certs={pki.ca}":
            "ssl_ca_certs only apply to a rediss:// (TLS) URL",
        f"rediss://u:{PASSWORD}@127.0.0.1:1/0?ssl_ca_certs={tmp_path / 'missing.pem'}":
            f"ssl_ca_certs={tmp_path / 'missing.pem'}: no such file",
        f"rediss://u:{PASSWORD}@127.0.0.1:1/0?ssl_cert_reqs=sometimes":
            "ssl_cert_reqs=sometimes: use one of required, optional, none",
        f"http://u:{PASSWORD}@127.0.0.1:1/0": "must start with redis://, rediss:// or unix://",
    }
    for url, message in cases.items():
        with pytest.raises(ValidationError) as caught:
            ProxySettings(redis_url=url)
        assert message in str(caught.value)
        assert PASSWORD not in str(caught.value)
    ok = f"rediss://u:{PASSWORD}@127.0.0.1:1/0?ssl_ca_certs={pki.ca}&ssl_cert_reqs=required"
    assert ProxySettings(redis_url=ok).redis_url == ok


def test_cli_reports_a_bad_redis_url_in_one_line(tmp_path: Path) -> None:
    env = {"APIGW_REDIS_URL": f"rediss://u:{PASSWORD}@127.0.0.1:1/0"
                              f"?ssl_ca_certs={tmp_path / 'missing.pem'}"}
    done = subprocess.run(apigw_command("collector"), env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "APIGW_REDIS_URL" in done.stderr, done.stderr
    assert "no such file" in done.stderr, done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
