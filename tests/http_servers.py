"""Real HTTP servers for tests: an aiohttp application on a free loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from apigw.redis_server import free_port


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 and a free port; yield its base URL; stop it on exit."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
