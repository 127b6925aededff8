"""free_port: ports for test and demo servers that an outgoing connection cannot take first."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from apigw import redis_server
from apigw.redis_server import free_port


def test_ports_are_outside_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low, high = redis_server._ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high for port in ports), (low, high)
    for port in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(redis_server, "_candidate_ranges", lambda: [(busy, busy)])
        port = free_port()  # every pick is the busy port: then the kernel's choice
        assert port != busy
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_without_a_readable_range_the_usual_default_is_assumed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(redis_server, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert redis_server._ephemeral_range() == redis_server.FALLBACK_EPHEMERAL_RANGE
    port = free_port()
    assert not 32768 <= port <= 60999
