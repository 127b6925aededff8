"""Scripts that start servers stop them when they are themselves stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for a benchmark: starts a child, stops it in `finally`, waits to be signalled.
SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    from apigw.signals import interrupt_on_termination
    if sys.argv[1] == "handled":
        interrupt_on_termination()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        print(child.pid, flush=True)
        time.sleep(120)
    finally:
        child.kill()
        child.wait()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signalled_child(mode: str, signum: int) -> int:
    """Run SCRIPT, signal it once its child runs; the child's pid (reaped here if left)."""
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert script.stdout is not None
        child_pid = int(script.stdout.readline())
        script.send_signal(signum)
        script.wait(30)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    return child_pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_script_stops_what_it_started(signum: int) -> None:
    child_pid = _signalled_child("handled", signum)
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)


def test_without_it_the_child_outlives_the_script() -> None:
    """What the handler is for: the default SIGTERM ends a script without its `finally`."""
    child_pid = _signalled_child("default", signal.SIGTERM)
    try:
        time.sleep(0.3)
        assert _alive(child_pid)
    finally:
        os.kill(child_pid, signal.SIGKILL)
