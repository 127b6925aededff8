"""Shared fixtures: real Redis on a free port, a real embedded ClickHouse in a temp dir."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from apigw.redis_server import RedisServer, free_port


@pytest.fixture(autouse=True)
def _main_module_kept() -> Iterator[None]:
    """streamlit's AppTest runs a page as `__main__` and leaves it there; a later test that
    spawns a process would have multiprocessing's spawn re-run that page in the child."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean Redis database for this test (the server is shared by the session)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def chdb_dsn(tmp_path: Path) -> str:
    """DSN of a fresh embedded ClickHouse store in a temp directory."""
    return f"chdb://{tmp_path / 'clickhouse'}"


@pytest.fixture
def port() -> int:
    return free_port()
