"""Graceful stop for every long-running process: SIGTERM and SIGINT set one event; scripts
turn SIGTERM and SIGHUP into KeyboardInterrupt."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType


def stop_on_signals() -> asyncio.Event:
    """An event the running loop sets on SIGTERM or SIGINT (call inside the loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def interrupt_on_termination() -> None:
    """For scripts that stop what they started in `finally` blocks (the benchmarks): SIGTERM
    and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so those blocks run instead of the
    process dying with its servers and browser left running."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
