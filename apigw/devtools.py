"""Headless Chromium driven over the Chrome DevTools Protocol (CDP).

Used by the dashboard's real-browser test (tests/test_dashboard_browser.py) and the page-load
benchmark (bench/dashboard_pageload.py). Chromium is Debian's `chromium` package;
`install_chromium` installs it with apt-get when running as root. `browser()` starts it on a
free loopback DevTools port in its own process group, yields a `DevTools` session on its first
page, and stops it by its pid (SIGTERM, then SIGKILL) however the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp

from apigw.redis_server import free_port

WINDOW: Final = (1400, 1000)  # width, height in CSS pixels
FLAGS: Final = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"]
CALL_TIMEOUT_S: Final = 30.0
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0


class DevToolsError(Exception):
    """Chromium answered a DevTools call with an error, or did not start."""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def install_chromium() -> str | None:
    """apt-get install chromium (root only); None when that is not possible here."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True,
                       timeout=300)
        subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError):
        return None
    return find_chromium()


class DevTools:
    """The few DevTools calls the dashboard's test and benchmark need, over the page's
    websocket. Events arriving while a call waits for its answer are dropped."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, pid: int = 0) -> None:
        self.ws = ws
        self.next_id = 0
        self.pid = pid  # the browser's, which leads its process group

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), CALL_TIMEOUT_S)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (None when it threw)."""
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")


@contextlib.asynccontextmanager
async def browser(chromium: str, profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with a DevTools port; yields its page, stops it afterwards."""
    port = free_port()
    args = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1", "about:blank"]
    process = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        async with aiohttp.ClientSession() as session:
            page = await _page_target(session, port, process)
            async with session.ws_connect(page, max_msg_size=0) as ws:
                devtools = DevTools(ws, process.pid)
                await devtools.call("Page.enable")
                yield devtools
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def _page_target(session: aiohttp.ClientSession, port: int,
                       process: asyncio.subprocess.Process) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise DevToolsError(f"chromium exited with {process.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
        await asyncio.sleep(0.2)
    raise DevToolsError("chromium's DevTools endpoint did not come up")
