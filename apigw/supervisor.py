"""Run a set of child processes: prefixed output, ordered start, readiness, restarts, clean stop.

Each child runs in its own session (process group), so a Ctrl-C in the terminal reaches only
the supervisor, which then stops the children itself, in reverse start order: SIGTERM to the
child's group, a grace period, then SIGKILL. Groups are addressed by the child's own pid, so
nothing but our own children is ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

Probe = Callable[[], Awaitable[bool]]

_COLOURS = (36, 33, 35, 32, 34, 91, 96, 93, 95, 92)
_LINE_LIMIT = 1 << 20
_SUPERVISOR = "supervisor"


def http_probe(url: str, timeout_s: float = 2.0) -> Probe:
    """Ready when a GET of `url` (plain http) answers with a 2xx status."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {target} HTTP/1.0\r\nHost: {host}:{port}\r\n"
               "Connection: close\r\n\r\n").encode()

    async def probe() -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(request)
                    await writer.drain()
                    status_line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        fields = status_line.split()
        return len(fields) >= 2 and fields[1][:1] == b"2"

    return probe


def tcp_probe(host: str, port: int, timeout_s: float = 1.0) -> Probe:
    """Ready when a TCP connection to host:port succeeds."""

    async def probe() -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return True
        except (OSError, TimeoutError):
            return False

    return probe


@dataclass
class Child:
    """What to run: a command, extra environment, and how to tell it is ready."""

    name: str
    args: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ready: Probe | None = None
    ready_what: str = ""  # shown in messages, e.g. the health URL
    ready_timeout_s: float = 60.0
    restart: bool = True  # restart after an unexpected exit
    stop_timeout_s: float = 10.0


class _Running:
    """Runtime state of one child."""

    def __init__(self, spec: Child, colour: int) -> None:
        self.spec = spec
        self.colour = colour
        self.process: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.crashes: deque[float] = deque()
        self.starts = 0
        self.finished = False
        self.gave_up = False


class Supervisor:
    """Starts children in order, restarts crashed ones (bounded), stops all in reverse order."""

    def __init__(self, children: Sequence[Child], *, out: TextIO | None = None,
                 colour: bool | None = None, max_restarts: int = 5,
                 restart_window_s: float = 60.0, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 10.0) -> None:
        names = [child.name for child in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._out = out if out is not None else sys.stdout
        self._colour = self._out.isatty() if colour is None else colour
        self._width = max([len(_SUPERVISOR), *map(len, names)])
        self._children = [_Running(child, _COLOURS[index % len(_COLOURS)])
                          for index, child in enumerate(children)]
        self._max_restarts = max_restarts
        self._window_s = restart_window_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._failed = asyncio.Event()
        self._shutting_down = False

    # -- public ----------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Pids of the children that are running now."""
        return {state.spec.name: state.process.pid for state in self._children
                if state.process is not None and state.process.returncode is None}

    def say(self, message: str) -> None:
        self._emit(_SUPERVISOR, 0, message)

    async def run(self, stop: asyncio.Event,
                  on_ready: Callable[[], None] | None = None) -> int:
        """Run until `stop` is set (0) or a child fails for good (1); always stops everything."""
        try:
            for state in self._children:
                if stop.is_set():
                    return 0
                state.task = asyncio.create_task(self._keep_running(state),
                                                 name=f"supervise-{state.spec.name}")
                if not await self._wait_ready(state, stop):
                    return 0 if stop.is_set() else 1
            if on_ready is not None:
                on_ready()
            stop_wait = asyncio.create_task(stop.wait())
            failed_wait = asyncio.create_task(self._failed.wait())
            try:
                await asyncio.wait({stop_wait, failed_wait},
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
                failed_wait.cancel()
            return 0 if stop.is_set() and not self._failed.is_set() else 1
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop every child, last started first. Safe to call more than once."""
        self._shutting_down = True
        for state in reversed(self._children):
            await self._stop(state)

    # -- children --------------------------------------------------------------------------

    async def _spawn(self, state: _Running) -> asyncio.subprocess.Process:
        spec = state.spec
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        return await asyncio.create_subprocess_exec(
            *spec.args, env=env, cwd=spec.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, limit=_LINE_LIMIT)

    async def _keep_running(self, state: _Running) -> None:
        spec = state.spec
        while not state.stopping.is_set():
            try:
                process = await self._spawn(state)
            except OSError as exc:
                self.say(f"cannot start {spec.name}: {exc}")
                returncode: int | None = None
            else:
                state.process = process
                state.starts += 1
                self.say(f"started {spec.name} (pid {process.pid})")
                if state.stopping.is_set():  # stop() ran while the process was being spawned
                    _kill_group(process.pid, signal.SIGTERM)
                pump = asyncio.create_task(self._pump(state, process))
                returncode = await process.wait()
                _kill_group(process.pid, signal.SIGKILL)  # leftovers of a dead leader
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(pump, timeout=2.0)
            if state.stopping.is_set():
                return
            if not spec.restart:
                state.finished = True
                self.say(f"{spec.name} exited with {_describe(returncode)}")
                if returncode != 0:
                    self._give_up(state)
                return
            now = time.monotonic()
            while state.crashes and now - state.crashes[0] > self._window_s:
                state.crashes.popleft()
            state.crashes.append(now)
            if len(state.crashes) > self._max_restarts:
                self.say(f"{spec.name} exited with {_describe(returncode)}; it crashed "
                         f"{len(state.crashes)} times within {self._window_s:.0f}s, giving up")
                self._give_up(state)
                return
            delay = min(self._backoff_max_s,
                        self._backoff_initial_s * 2 ** (len(state.crashes) - 1))
            self.say(f"{spec.name} exited with {_describe(returncode)}; "
                     f"restarting in {delay:.1f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.stopping.wait(), timeout=delay)

    def _give_up(self, state: _Running) -> None:
        state.gave_up = True
        if not self._shutting_down:
            self._failed.set()

    async def _pump(self, state: _Running, process: asyncio.subprocess.Process) -> None:
        stream = process.stdout
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the limit: its start was dropped
                continue
            if not line:
                return
            self._emit(state.spec.name, state.colour,
                       line.decode("utf-8", errors="replace").rstrip("\r\n"))

    async def _wait_ready(self, state: _Running, stop: asyncio.Event) -> bool:
        spec = state.spec
        if spec.ready is None:
            return True
        deadline = time.monotonic() + spec.ready_timeout_s
        what = f" at {spec.ready_what}" if spec.ready_what else ""
        while time.monotonic() < deadline:
            if stop.is_set():
                return False
            if state.gave_up or self._failed.is_set():
                self.say(f"{spec.name} failed before it became ready")
                return False
            if state.process is not None and state.process.returncode is None \
                    and await spec.ready():
                self.say(f"{spec.name} is ready{what}")
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)
        self.say(f"{spec.name} was not ready{what} within {spec.ready_timeout_s:.0f}s; "
                 "stopping everything")
        return False

    async def _stop(self, state: _Running) -> None:
        state.stopping.set()
        process = state.process
        if process is not None and process.returncode is None:
            self.say(f"stopping {state.spec.name} (pid {process.pid})")
            _kill_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=state.spec.stop_timeout_s)
            except TimeoutError:
                self.say(f"{state.spec.name} did not stop within "
                         f"{state.spec.stop_timeout_s:.0f}s; killing it")
                _kill_group(process.pid, signal.SIGKILL)
                await process.wait()
            _kill_group(process.pid, signal.SIGKILL)
        if state.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(state.task),
                                       timeout=state.spec.stop_timeout_s + 5)
            except TimeoutError:
                if state.process is not None:
                    _kill_group(state.process.pid, signal.SIGKILL)
                await state.task

    # -- output ----------------------------------------------------------------------------

    def _emit(self, name: str, colour: int, text: str) -> None:
        label = f"[{name}]".ljust(self._width + 2)
        if self._colour:
            label = f"\033[{colour or 1}m{label}\033[0m"
        try:
            self._out.write(f"{label} {text}\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not take the supervisor down


def _kill_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by our child `pid` (it was started in its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "no process"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
    return f"code {returncode}"


def run_until_signalled(supervisor: Supervisor,
                        on_ready: Callable[[], None] | None = None) -> int:
    """Run the supervisor until SIGINT/SIGTERM/SIGHUP; returns its exit status."""

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, _on_signal, supervisor, stop, sig)
        try:
            return await supervisor.run(stop, on_ready)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


def _on_signal(supervisor: Supervisor, stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        supervisor.say(f"{sig.name} received: stopping everything")
    stop.set()
