"""ClickHouse credentials and TLS as the DSN asks (collector/clickhouse.py), on real sockets.

- What a client built from the DSN puts on the wire, read by a loopback listener of the
  test's own: `https://` (and `clickhouses://`) opens with a TLS handshake on any port, and
  the password never crosses in clear; `http://` is plain HTTP, as it says.
- Against a closed loopback port, no error the client or the collector's `open_store` raises
  carries the password.
- Against a real ClickHouse server over HTTPS, when one is installed (`clickhouse-server` on
  PATH, or $APIGW_CLICKHOUSE_SERVER): the CA from `?ca_cert=` is what makes the certificate
  trusted, a wrong password is refused, and neither error shows it. Skipped otherwise - see
  docs/security.md for what that leaves unexercised.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.exceptions import Error as ClickHouseError

from apigw.redis_server import free_port, terminate
from collector.clickhouse import make_client, redact_dsn
from collector.service import StoreUnavailableError, open_store
from tests.test_tls import Pki, make_pki

SECRET = "ch-dsn-secret-31f7"
TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a ClientHello


class FirstBytes:
    """A loopback TCP listener that records the first bytes of each connection, then closes
    it: enough to see whether a client speaks TLS or plain HTTP, and what it sent."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.received.append(conn.recv(65536))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def listener() -> Iterator[FirstBytes]:
    server = FirstBytes()
    try:
        yield server
    finally:
        server.close()


def _failure_text(exc: BaseException) -> str:
    """Everything an error could show: message, repr and its chain of causes."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("scheme", ["https", "clickhouses"])
def test_tls_scheme_speaks_tls_on_any_port(scheme: str, listener: FirstBytes) -> None:
    dsn = f"{scheme}://gateway:{SECRET}@127.0.0.1:{listener.port}/events"
    with pytest.raises(ClickHouseError) as caught:
        make_client(dsn)
    assert listener.received, "the client never connected"
    assert all(first[:1] == bytes([TLS_HANDSHAKE]) for first in listener.received), \
        listener.received[0][:80]
    assert all(SECRET.encode() not in first for first in listener.received)
    assert SECRET not in _failure_text(caught.value)


def test_http_scheme_is_plain_http(listener: FirstBytes) -> None:
    with pytest.raises(ClickHouseError) as caught:
        make_client(f"http://gateway:{SECRET}@127.0.0.1:{listener.port}/events")
    assert listener.received
    assert re.match(rb"^(GET|POST) /", listener.received[0]), listener.received[0][:80]
    assert SECRET not in _failure_text(caught.value)


@pytest.mark.parametrize("dsn", [
    f"https://gateway:{SECRET}@127.0.0.1:{{port}}/events",
    f"http://gateway:{SECRET}@127.0.0.1:{{port}}/events",
    f"http://127.0.0.1:{{port}}/events?user=gateway&password={SECRET}",
])
def test_closed_port_errors_never_show_the_password(dsn: str) -> None:
    dsn = dsn.format(port=free_port())
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        open_store(dsn)
    assert time.monotonic() - started < 30  # refused, not hung
    assert SECRET not in _failure_text(caught.value)
    assert redact_dsn(dsn) in str(caught.value)
    assert "***" in redact_dsn(dsn)


# --- a real ClickHouse server over HTTPS, when one is installed ------------------------------

_SERVER_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <https_port>{port}</https_port>
  <listen_host>127.0.0.1</listen_host>
  <openSSL><server>
    <certificateFile>{cert}</certificateFile>
    <privateKeyFile>{key}</privateKeyFile>
    <verificationMode>none</verificationMode>
    <loadDefaultCAFile>false</loadDefaultCAFile>
    <disableProtocols>sslv2,sslv3</disableProtocols>
  </server></openSSL>
  <path>{data}/</path>
  <tmp_path>{data}/tmp/</tmp_path>
  <user_files_path>{data}/user_files/</user_files_path>
  <users_config>{users}</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>67108864</mark_cache_size>
</yandex>
"""

_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default/></profiles>
  <users><gateway>
    <password>{password}</password>
    <networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota>
  </gateway></users>
  <quotas><default/></quotas>
</yandex>
"""


def _clickhouse_server() -> str | None:
    return os.environ.get("APIGW_CLICKHOUSE_SERVER") or shutil.which("clickhouse-server")


@pytest.fixture(scope="module")
def https_clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Pki]]:
    binary = _clickhouse_server()
    if binary is None:
        pytest.skip("no ClickHouse server here: install Debian's clickhouse-server or set "
                    "APIGW_CLICKHOUSE_SERVER to run the HTTPS server test")
    base = tmp_path_factory.mktemp("clickhouse-https")
    pki = make_pki(base)
    port = free_port()
    users = base / "users.xml"
    users.write_text(_USERS.format(password=SECRET))
    config = base / "config.xml"
    config.write_text(_SERVER_CONFIG.format(port=port, cert=pki.cert, key=pki.key,
                                            data=base / "data", users=users))
    log = (base / "server.log").open("wb")
    process = subprocess.Popen([binary, f"--config-file={config}"], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 30
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("clickhouse-server did not start:\n"
                                   + (base / "server.log").read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        yield port, pki
    finally:
        terminate(process, 10)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _outcome(dsn: str) -> str:
    """connected; tls (certificate refused); auth (credentials refused); or sql:<code> - the
    server ran the client's first query as that user and refused the query itself (an old
    server, e.g. Debian 12's 18.16, lacks what clickhouse-connect asks at start)."""
    try:
        client = make_client(dsn)
    except Exception as exc:
        text = _failure_text(exc)
        assert SECRET not in text, "the password is in the error"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "tls"
        code = re.search(r"Code: (\d+)", text)
        if code is None:
            raise
        return "auth" if code.group(1) in ("193", "516") else f"sql:{code.group(1)}"
    try:
        assert client.command("SELECT 1") == 1
    finally:
        client.close()
    return "connected"


def test_real_clickhouse_over_https(https_clickhouse: tuple[int, Pki]) -> None:
    port, pki = https_clickhouse
    base = f"https://gateway:{SECRET}@127.0.0.1:{port}/default"
    trusted = _outcome(f"{base}?ca_cert={pki.ca}")
    assert trusted == "connected" or trusted.startswith("sql:"), trusted
    assert _outcome(base) == "tls"  # the system CAs do not know the test CA
    assert _outcome(f"{base}?ca_cert={pki.self_signed}") == "tls"
    wrong = f"https://gateway:not-the-password@127.0.0.1:{port}/default?ca_cert={pki.ca}"
    assert _outcome(wrong) == "auth"
