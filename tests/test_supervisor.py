"""The supervisor with real child processes: prefixes, order, readiness, restarts, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from apigw.redis_server import free_port
from apigw.supervisor import Child, Supervisor, http_probe, tcp_probe


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


TICKER = _python("""
    import time
    for n in range(100000):
        print("tick", n, flush=True)
        time.sleep(0.05)
""")

CRASHER = _python("""
    import sys
    print("up and about to crash", flush=True)
    sys.exit(3)
""")


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _wait_for(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_prefixes_output_and_stops_everything() -> None:
    out = io.StringIO()
    supervisor = Supervisor([Child("alpha", TICKER), Child("beta-long", TICKER)], out=out)
    stop = asyncio.Event()
    ready = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop, on_ready=ready.set))
    pids: list[int] = []
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await _wait_for(lambda: "[alpha]" in out.getvalue() and "[beta-long]" in out.getvalue())
        pids = list(supervisor.pids().values())
        assert len(pids) == 2
        stop.set()
        assert await asyncio.wait_for(run, 30) == 0
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        _kill_leftovers(pids)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("[alpha]      tick ") for line in lines), lines[:5]
    assert any(line.startswith("[beta-long]  tick ") for line in lines), lines[:5]
    assert "\033[" not in out.getvalue()  # not a tty: no colour
    stops = [line for line in lines if "stopping" in line]
    assert stops[0].endswith(f"stopping beta-long (pid {pids[1]})")  # reverse order
    assert stops[1].endswith(f"stopping alpha (pid {pids[0]})")
    assert not any(_alive(pid) for pid in pids)
    assert supervisor.pids() == {}


async def test_restarts_a_crashed_child_then_gives_up() -> None:
    out = io.StringIO()
    supervisor = Supervisor([Child("steady", TICKER), Child("crasher", CRASHER)], out=out,
                            max_restarts=2, backoff_initial_s=0.05, backoff_max_s=0.2)
    steady_pid = 0
    stop = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop))
    try:
        await _wait_for(lambda: "steady" in supervisor.pids(), 10)
        steady_pid = supervisor.pids()["steady"]
        assert await asyncio.wait_for(run, 30) == 1  # gave up: everything stopped
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        _kill_leftovers([steady_pid])
    text = out.getvalue()
    assert text.count("[crasher]    up and about to crash") == 3, text
    assert "crasher exited with code 3; restarting in 0.1s" in text
    assert "giving up" in text
    assert not _alive(steady_pid)


async def test_starts_in_order_waiting_for_readiness(tmp_path: Path) -> None:
    port = free_port()
    server = _python(f"""
        import http.server, time
        time.sleep(0.5)
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/healthz" else 404)
                self.end_headers()
            def log_message(self, *args):
                pass
        print("serving", flush=True)
        http.server.HTTPServer(("127.0.0.1", {port}), Handler).serve_forever()
    """)
    marker = tmp_path / "second-started"
    second = _python(f"""
        import pathlib, time
        pathlib.Path({str(marker)!r}).write_text("x")
        time.sleep(60)
    """)
    out = io.StringIO()
    supervisor = Supervisor([
        Child("server", server, ready=http_probe(f"http://127.0.0.1:{port}/healthz"),
              ready_what="healthz", ready_timeout_s=20),
        Child("second", second, ready=tcp_probe("127.0.0.1", port))], out=out)
    stop = asyncio.Event()
    ready = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop, on_ready=ready.set))
    pids: list[int] = []
    try:
        await asyncio.wait_for(ready.wait(), 30)
        pids = list(supervisor.pids().values())
        text = out.getvalue()
        assert text.index("server is ready at healthz") < text.index("started second")
        await _wait_for(marker.exists, 10)
    finally:
        stop.set()
        assert await asyncio.wait_for(run, 30) == 0
        _kill_leftovers(pids)
    assert not any(_alive(pid) for pid in pids)


async def test_readiness_timeout_stops_what_was_started() -> None:
    out = io.StringIO()
    supervisor = Supervisor([
        Child("first", TICKER),
        Child("never-ready", TICKER, ready=tcp_probe("127.0.0.1", free_port()),
              ready_what="its port", ready_timeout_s=1.0),
        Child("not-started", TICKER)], out=out)
    pids: list[int] = []
    run = asyncio.create_task(supervisor.run(asyncio.Event()))
    try:
        await _wait_for(lambda: len(supervisor.pids()) == 2, 10)
        pids = list(supervisor.pids().values())
        assert await asyncio.wait_for(run, 30) == 1
    finally:
        if not run.done():
            run.cancel()
            await supervisor.shutdown()
        _kill_leftovers(pids)
    text = out.getvalue()
    assert "never-ready was not ready at its port within 1s" in text
    assert "not-started" not in text
    assert not any(_alive(pid) for pid in pids)


async def test_kills_a_child_that_ignores_sigterm_and_its_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    stubborn = _python(f"""
        import pathlib, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path({str(pid_file)!r}).write_text(str(grandchild.pid))
        print("ignoring SIGTERM", flush=True)
        while True:
            time.sleep(1)
    """)
    out = io.StringIO()
    supervisor = Supervisor([Child("stubborn", stubborn, stop_timeout_s=1.0)], out=out)
    stop = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop))
    pids: list[int] = []
    try:
        await _wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", 10)
        pids = [supervisor.pids()["stubborn"], int(pid_file.read_text())]
        await _wait_for(lambda: "ignoring SIGTERM" in out.getvalue(), 10)
        stop.set()
        assert await asyncio.wait_for(run, 30) == 0
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        _kill_leftovers(pids)
    assert "did not stop within 1s; killing it" in out.getvalue()
    await _wait_for(lambda: not any(_alive(pid) for pid in pids), 5)


def test_supervised_command_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The whole thing as a process: SIGTERM to the supervisor leaves no child behind."""
    import subprocess

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    child_code = (f"import os, pathlib, time; pathlib.Path({str(pid_dir)!r}, str(os.getpid()))"
                  ".write_text(''); print('started', flush=True); time.sleep(600)")
    script = textwrap.dedent(f"""
        import sys
        from apigw.supervisor import Child, Supervisor, run_until_signalled
        child = [sys.executable, "-c", {child_code!r}]
        sys.exit(run_until_signalled(Supervisor([Child("a", child), Child("b", child)]),
                 lambda: print("all ready", flush=True)))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               cwd=Path(__file__).parent.parent)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while len(list(pid_dir.iterdir())) < 2:
            assert time.monotonic() < deadline
            assert process.poll() is None
            time.sleep(0.05)
        pids = [int(path.name) for path in pid_dir.iterdir()]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _kill_leftovers(pids)
    assert process.returncode == 0, output
    assert "SIGTERM received: stopping everything" in output
    assert "[a]          started" in output
    assert not any(_alive(pid) for pid in pids), output


async def test_colours_the_prefix_on_a_terminal() -> None:
    out = io.StringIO()
    supervisor = Supervisor([Child("once", _python("print('hello', flush=True)"),
                                   restart=False)], out=out, colour=True)
    stop = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop))
    try:
        await _wait_for(lambda: "exited with code 0" in out.getvalue(), 10)
    finally:
        stop.set()
        assert await asyncio.wait_for(run, 30) == 0
    assert "\033[36m[once]" in out.getvalue()
    assert "\033[0m hello\n" in out.getvalue()
