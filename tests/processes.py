"""Run the gateway's own processes from tests: real subprocesses, stopped by their own pids."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path


class ManagedProcess:
    """A child in its own process group, with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not healthy at {url} after {timeout}s:\n"
                           f"{self.log()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


def apigw_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "apigw.cli", *args]


@contextlib.contextmanager
def managed(name: str, args: list[str], env: Mapping[str, str],
            log_dir: Path) -> Iterator[ManagedProcess]:
    process = ManagedProcess(name, args, env, log_dir)
    try:
        yield process
    finally:
        process.stop()


def serve_process(config: Path, env: Mapping[str, str], log_dir: Path,
                  name: str = "proxy") -> ManagedProcess:
    """`proxy.server.serve(config)` in a child, its ProxySettings from the APIGW_* in `env`."""
    code = ("import sys; from pathlib import Path; from proxy.server import serve; "
            "from proxy.settings import ProxySettings; "
            f"sys.exit(serve(Path({str(config)!r}), ProxySettings()))")
    return ManagedProcess(name, [sys.executable, "-c", code], env, log_dir)
