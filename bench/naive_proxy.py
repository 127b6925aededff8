"""The Python baseline of the benchmark: the proxy most people would write with aiohttp.

A routing `web.Application` with one catch-all route, one shared `ClientSession` (keep-alive
pool) and uvloop; the request body is read whole, the response body too; hop-by-hop headers
are dropped. No policies, no events, no metrics.

    python bench/naive_proxy.py --listen 127.0.0.1:8001 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding",
                         "upgrade", "host", "content-length"})
_SESSION = web.AppKey("session", aiohttp.ClientSession)
_UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.Response:
    session = request.app[_SESSION]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    body = await request.read()
    async with session.request(request.method, request.app[_UPSTREAM] + request.raw_path,
                               headers=headers, data=body or None,
                               allow_redirects=False) as upstream:
        payload = await upstream.read()
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        return web.Response(status=upstream.status, body=payload, headers=out)


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    app[_UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=0)
        app[_SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[_SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8001", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL of the upstream")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    web.run_app(build_app(args.upstream), host=host, port=int(port), access_log=None,
                print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
