"""Malformed and hostile HTTP on raw sockets to the gateway (asyncio streams, no client library
in the way), in-process behind two recording upstreams.

Routes: /public/* -> the public upstream, /private/* (GET only) -> the private upstream. Every
case checks the status the gateway answers (or that it closed the connection), that nothing was
forwarded when it should not be, that an upstream never received a path that resolves outside
its route's prefix, and, at the end of each test, that no Traceback and no error-level record
reached the logs. Cases are counted per category into tests/artifacts/bad_input_counts.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from apigw.logs import JsonFormatter
from apigw.redis_server import free_port
from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.server import start_listener
from proxy.settings import ProxySettings

ARTIFACTS = Path(__file__).parent / "artifacts"
CLOSED = 0  # "the gateway closed the connection without a response"
UPSTREAM_LOGGER = "tests.upstream"  # the recording upstreams' server logs, not the gateway's


@dataclass
class Recorder:
    """An upstream that remembers every request target it received."""

    name: str
    targets: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.targets.append(request.raw_path)
        with contextlib.suppress(ConnectionResetError):  # the gateway gave up on a slow body
            await request.read()
        return web.Response(text=self.name)


@dataclass
class Target:
    port: int
    public: Recorder
    private: Recorder
    gateway: Gateway


class LogTrap(logging.Handler):
    """Every record at WARNING or above, formatted as the processes format them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(JsonFormatter("proxy"))
        self.lines: list[str] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == UPSTREAM_LOGGER:
            return
        line = self.format(record)
        self.lines.append(line)
        if record.levelno >= logging.ERROR or "Traceback" in line:
            self.errors.append(line)


@pytest.fixture
def log_trap() -> Iterator[LogTrap]:
    trap = LogTrap()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(trap)
    root.setLevel(logging.INFO)
    try:
        yield trap
    finally:
        root.removeHandler(trap)
        root.setLevel(old_level)


async def _serve(recorder: Recorder) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None, logger=logging.getLogger(UPSTREAM_LOGGER))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def target(redis_url: str, log_trap: LogTrap) -> AsyncIterator[Target]:
    public, private = Recorder("public"), Recorder("private")
    public_runner, public_port = await _serve(public)
    private_runner, private_port = await _serve(private)
    config = GatewayConfig.model_validate({
        "version": 1,
        "upstreams": {"public": {"url": f"http://127.0.0.1:{public_port}",
                                 "timeouts": {"connect_s": 1, "read_s": 2, "total_s": 2}},
                      "private": {"url": f"http://127.0.0.1:{private_port}"}},
        "routes": [{"id": "public", "match": {"prefix": "/public"}, "upstream": "public"},
                   {"id": "private", "match": {"prefix": "/private"}, "methods": ["GET"],
                    "upstream": "private"}],
        "events": {"flush_interval_ms": 50},
    })
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, instance="bad-input",
                             listen=f"127.0.0.1:{port}", shutdown_grace_s=1)
    redis = aioredis.Redis.from_url(redis_url)
    gateway = Gateway(config, settings, redis)
    await gateway.start()
    runner = await start_listener(gateway, settings.listen, shutdown_grace_s=1)
    try:
        yield Target(port, public, private, gateway)
    finally:
        await runner.cleanup()
        await gateway.stop(timeout_s=2)
        await redis.aclose()
        await public_runner.cleanup()
        await private_runner.cleanup()
    assert not log_trap.errors, "\n".join(log_trap.errors[:5])


async def exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[int, bytes]:
    """Send raw bytes; (status of the first response or CLOSED, everything read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    received += chunk
                    if b"\r\n\r\n" in received and _complete(received):
                        break
        except TimeoutError:
            pass
    except ConnectionError:
        received = b""
    finally:
        writer.close()
    if not received.startswith(b"HTTP/"):
        return CLOSED, received
    return int(received.split(b" ", 2)[1]), received


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return True


def resolves_within(raw_target: str, prefix: str) -> bool:
    """Would an upstream that decodes %XX and treats '\\' as '/' see a path under `prefix`?"""
    path = unquote(raw_target.split("?", 1)[0]).replace("\\", "/")
    normal = posixpath.normpath(path)
    return normal == prefix or normal.startswith(prefix + "/")


def assert_confined(t: Target) -> None:
    for raw in t.public.targets:
        assert resolves_within(raw, "/public"), f"public upstream got {raw!r}"
    for raw in t.private.targets:
        assert resolves_within(raw, "/private"), f"private upstream got {raw!r}"


def count(category: str, cases: int) -> None:
    """Record how many cases a category ran; rebuild the summary table."""
    directory = ARTIFACTS / "bad_input"
    directory.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in category)
    (directory / f"{slug}.json").write_text(json.dumps({"category": category,
                                                            "cases": cases}))
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    lines = ["| category | cases |", "|---|---|"]
    lines += [f"| {row['category']} | {row['cases']} |" for row in rows]
    lines.append(f"| total | {sum(row['cases'] for row in rows)} |")
    (ARTIFACTS / "bad_input_counts.md").write_text("\n".join(lines) + "\n")


H = b"Host: gw.test\r\n"

# (name, raw request, accepted statuses); CLOSED means no response at all. None of them may
# reach an upstream.
SMUGGLING: list[tuple[str, bytes, set[int]]] = [
    ("CL.TE", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private/x HTTP/1.1\r\n" + H + b"\r\n",
     {400}),
    ("TE.CL", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", {400}),
    ("duplicate CL differing", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
     b"Content-Length: 5\r\n\r\nabcde", {400}),
    ("duplicate CL same", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
     b"Content-Length: 4\r\n\r\nabcd", {400}),
    ("CL list", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: 4, 4\r\n\r\nabcd",
     {400}),
    ("CL negative", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", {400}),
    ("CL plus sign", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: +4\r\n\r\nabcd",
     {400}),
    ("CL hex", b"POST /public/a HTTP/1.1\r\n" + H + b"Content-Length: 0x4\r\n\r\nabcd", {400}),
    ("TE obs-fold", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n"
     b"\r\n0\r\n\r\n", {400}),
    ("header obs-fold", b"GET /public/a HTTP/1.1\r\n" + H + b"X-A: 1\r\n 2\r\n\r\n", {400}),
    ("TE xchunked", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n"
     b"\r\n0\r\n\r\n", {400, 501}),
    ("TE chunked then identity", b"POST /public/a HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", {400, 501}),
    ("TE twice", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", {400, 501}),
    ("TE space before colon", b"POST /public/a HTTP/1.1\r\n" + H +
     b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", {400}),
    ("TE tab value", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\x0b\r\n"
     b"\r\n0\r\n\r\n", {400, 501}),
    ("TE in HTTP/1.0", b"POST /public/a HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 4\r\n\r\n0\r\n\r\n", {400}),
    ("chunk size not hex", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
     b"\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk size negative", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
     b"\r\n\r\n-1\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk size overflow", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
     b"\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk size with space", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
     b"\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", {400}),
    ("chunk bare LF", b"POST /public/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
     b"\r\n\r\n3\nabc\n0\n\n", {400}),
]

HEADERS_AND_LINES: list[tuple[str, bytes, set[int]]] = [
    ("NUL in header value", b"GET /public/a HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", {400}),
    ("NUL in header name", b"GET /public/a HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n", {400}),
    ("bare CR in header value", b"GET /public/a HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n",
     {400}),
    ("bare LF line endings", b"GET /public/a HTTP/1.1\n" + H.replace(b"\r\n", b"\n") +
     b"X-A: b\n\n", {400}),
    ("space in header name", b"GET /public/a HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n", {400}),
    ("no colon", b"GET /public/a HTTP/1.1\r\n" + H + b"X-A b\r\n\r\n", {400}),
    ("NUL in target", b"GET /public/a\x00b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("CR in target", b"GET /public/a\rb HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("space in target", b"GET /public/a b HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("unknown version", b"GET /public/a HTTP/9.9\r\n" + H + b"\r\n", {400, 505}),
    ("garbage version", b"GET /public/a HTTQ/1.1\r\n" + H + b"\r\n", {400, 505}),
    ("lowercase method", b"get /public/a HTTP/1.1\r\n" + H + b"\r\n", {400, 405, 501}),
    ("invalid method token", b"G(T /public/a HTTP/1.1\r\n" + H + b"\r\n", {400, 405, 501}),
    ("TLS client hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
     {400, CLOSED}),
]

TARGETS: list[tuple[str, bytes, set[int]]] = [
    # absolute-form: routed by its path only; the Host it names is never where it goes.
    ("absolute-form to a route", b"GET http://evil.example/public/a HTTP/1.1\r\n" + H + b"\r\n",
     {200}),
    ("absolute-form to nothing", b"GET http://evil.example/nowhere HTTP/1.1\r\n" + H + b"\r\n",
     {404}),
    ("absolute-form https", b"GET https://evil.example:8443/nowhere HTTP/1.1\r\n" + H +
     b"\r\n", {404}),
    ("asterisk-form OPTIONS", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("asterisk-form GET", b"GET * HTTP/1.1\r\n" + H + b"\r\n", {400}),
    ("authority-form CONNECT", b"CONNECT evil.example:443 HTTP/1.1\r\n" + H + b"\r\n",
     {400, 405, 501}),
    ("relative target", b"GET public/a HTTP/1.1\r\n" + H + b"\r\n", {400}),
]

# (name, target, accepted statuses, which upstream may answer: "public" | "private" | None)
PATHS: list[tuple[str, str, set[int], str | None]] = [
    ("dot-dot into private", "/public/../private/x", {200}, "private"),
    ("dot-dot above root", "/../../../etc/passwd", {404}, None),
    ("encoded dot-dot", "/public/%2e%2e/private/x", {200}, "private"),
    ("upper-case encoded dot-dot", "/public/%2E%2E/private/x", {200}, "private"),
    ("mixed dot-dot", "/public/.%2e/private/x", {200}, "private"),
    ("encoded dot segment", "/public/%2e/a", {200}, "public"),
    ("double slash", "//private/x", {200}, "private"),
    ("many slashes", "/public////a//b", {200}, "public"),
    ("encoded slash", "/public%2F..%2Fprivate/x", {400}, None),
    ("encoded slash lower", "/public/a%2fb", {400}, None),
    ("encoded NUL", "/public/a%00b", {400}, None),
    ("double-encoded dot-dot", "/public/%252e%252e/private/x", {200}, "public"),
    ("dot-dot past prefix", "/public/../../private/x", {200}, "private"),
    ("dot-dot to root", "/public/..", {404}, None),
    ("semicolon dot-dot", "/public/..;/private/x", {200}, "public"),
    ("prefix look-alike", "/publicity/x", {404}, None),
    ("private via POST", "/private/x", {405}, None),
    ("overlong UTF-8 dot", "/public/%c0%ae%c0%ae/private/x", {200, 400}, "public"),
    ("unicode full stop", "/public/%ef%bc%8e%ef%bc%8e/private/x", {200, 400}, "public"),
]


async def _run_cases(t: Target, cases: list[tuple[str, bytes, set[int]]]) -> list[str]:
    failures = []
    for name, raw, accepted in cases:
        before = len(t.public.targets) + len(t.private.targets)
        status, received = await exchange(t.port, raw)
        forwarded = len(t.public.targets) + len(t.private.targets) - before
        if status not in accepted:
            failures.append(f"{name}: got {status or 'closed'} {received[:120]!r}, "
                            f"expected {sorted(accepted)}")
        if (status >= 400 or status == CLOSED) and forwarded:
            failures.append(f"{name}: rejected with {status} but forwarded upstream")
    assert_confined(t)
    return failures


async def test_smuggling_variants_are_rejected_and_never_forwarded(target: Target) -> None:
    failures = await _run_cases(target, SMUGGLING)
    count("smuggling (CL/TE, obs-fold, chunk sizes)", len(SMUGGLING))
    assert not failures, "\n".join(failures)
    assert target.public.targets == []  # not the smuggled GET either
    assert target.private.targets == []


async def test_bad_header_bytes_and_request_lines(target: Target) -> None:
    failures = await _run_cases(target, HEADERS_AND_LINES)
    count("header bytes, request lines, versions, methods", len(HEADERS_AND_LINES))
    assert not failures, "\n".join(failures)
    assert target.public.targets == []


async def test_absolute_asterisk_and_authority_form_targets(target: Target) -> None:
    failures = await _run_cases(target, TARGETS)
    count("request-target forms", len(TARGETS))
    assert not failures, "\n".join(failures)
    assert target.public.targets == ["/public/a"]  # the absolute-form one, by its path
    assert target.private.targets == []


async def test_path_tricks_are_normalised_before_routing(target: Target) -> None:
    failures = []
    for name, path, accepted, upstream in PATHS:
        method = b"POST" if "POST" in name else b"GET"
        before = {"public": len(target.public.targets), "private": len(target.private.targets)}
        status, _ = await exchange(
            target.port, method + b" " + path.encode() + b" HTTP/1.1\r\n" + H + b"\r\n")
        reached = [which for which, recorder in (("public", target.public),
                                                 ("private", target.private))
                   if len(recorder.targets) > before[which]]
        if status not in accepted:
            failures.append(f"{name} {path}: got {status}, expected {sorted(accepted)}")
        if status == 200 and reached != [upstream]:
            failures.append(f"{name} {path}: reached {reached}, expected {upstream}")
        if status != 200 and reached:
            failures.append(f"{name} {path}: {status} but reached {reached}")
    count("path tricks", len(PATHS))
    assert not failures, "\n".join(failures)
    assert_confined(target)


async def test_http09_request_is_refused(target: Target) -> None:
    count("HTTP/0.9 request line", 1)
    status, _ = await exchange(target.port, b"GET /public/a\r\n\r\n")
    assert status in (400, 505, CLOSED)
    assert target.public.targets == []


async def test_backslash_paths_are_refused(target: Target) -> None:
    count("backslash paths", 2)
    statuses = [(await exchange(target.port, b"GET " + path + b" HTTP/1.1\r\n" + H +
                                b"\r\n"))[0]
                for path in (b"/public/..\\private/x", b"/public/..%5cprivate/x")]
    assert_confined(target)
    assert statuses == [400, 400]


async def test_overlong_request_line_and_headers_are_refused(target: Target) -> None:
    cases: list[tuple[str, bytes, set[int]]] = [
        ("request line 20 KB", b"GET /public/" + b"a" * 20_000 + b" HTTP/1.1\r\n" + H + b"\r\n",
         {400, 414}),
        ("query 20 KB", b"GET /public/a?q=" + b"a" * 20_000 + b" HTTP/1.1\r\n" + H + b"\r\n",
         {400, 414}),
        ("one header 20 KB", b"GET /public/a HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 20_000 +
         b"\r\n\r\n", {400, 431}),
        ("header name 20 KB", b"GET /public/a HTTP/1.1\r\n" + H + b"X" * 20_000 +
         b": a\r\n\r\n", {400, 431}),
        ("500 headers", b"GET /public/a HTTP/1.1\r\n" + H +
         b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n", {400, 431}),
        ("headers 1 MB in total", b"GET /public/a HTTP/1.1\r\n" + H +
         b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(128)) + b"\r\n",
         {400, 431}),
    ]
    failures = await _run_cases(target, cases)
    count("overlong lines and headers", len(cases))
    assert not failures, "\n".join(failures)
    assert target.public.targets == []


async def test_overlong_target_is_414_and_overlong_headers_431(target: Target) -> None:
    count("414/431 statuses", 2)
    status_line, _ = await exchange(target.port, b"GET /public/" + b"a" * 20_000 +
                                    b" HTTP/1.1\r\n" + H + b"\r\n")
    status_headers, _ = await exchange(target.port, b"GET /public/a HTTP/1.1\r\n" + H +
                                       b"X-A: " + b"a" * 20_000 + b"\r\n\r\n")
    assert (status_line, status_headers) == (414, 431)


async def test_slow_request_body_is_cut_off_by_the_upstream_timeout(target: Target) -> None:
    """A body dribbled one byte at a time holds a connection upstream only until the route's
    upstream total timeout (2 s here): then 504, and the connection is not held."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    started = time.monotonic()
    writer.write(b"POST /public/slow HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n")

    async def dribble() -> None:
        for _ in range(20):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.5)

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(8):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        sender.cancel()
        writer.close()
    count("slow body", 1)
    assert head.startswith(b"HTTP/1.1 504"), head
    assert time.monotonic() - started < 5


async def test_slow_loris_headers_are_cut_off_on_a_configurable_timeout(
        redis_url: str) -> None:
    fields = ProxySettings.model_fields
    assert "client_header_timeout_s" in fields, sorted(fields)
    config = GatewayConfig.model_validate({
        "upstreams": {"u": {"url": f"http://127.0.0.1:{free_port()}"}},
        "routes": [{"id": "r", "match": {"prefix": "/"}, "upstream": "u"}]})
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, listen=f"127.0.0.1:{port}",
                             client_header_timeout_s=1.0)
    redis = aioredis.Redis.from_url(redis_url)
    gateway = Gateway(config, settings, redis)
    await gateway.start()
    runner = await start_listener(gateway, settings.listen)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n")
        started = time.monotonic()
        closed_after = None
        for index in range(12):
            writer.write(b"X-%d: 1\r\n" % index)
            try:
                async with asyncio.timeout(0.5):
                    await reader.read(1)  # EOF or a 408: the gateway gave up on us
            except TimeoutError:
                continue
            closed_after = time.monotonic() - started
            break
        writer.close()
        assert closed_after is not None
        assert closed_after < 3
    finally:
        await runner.cleanup()
        await gateway.stop(timeout_s=1)
        await redis.aclose()


async def test_idle_keepalive_and_stalled_body_are_cut_off(redis_url: str,
                                                          log_trap: LogTrap) -> None:
    """Header timeout answers 408 once bytes arrived; an idle keep-alive connection closes
    after keepalive_timeout_s; a body that stalls for client_body_timeout_s fails (never
    forwarded complete) and the connection closes."""
    upstream = Recorder("u")
    upstream_runner, upstream_port = await _serve(upstream)
    config = GatewayConfig.model_validate({
        "upstreams": {"u": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "routes": [{"id": "r", "match": {"prefix": "/"}, "upstream": "u"}]})
    port = free_port()
    settings = ProxySettings(redis_url=redis_url, listen=f"127.0.0.1:{port}",
                             client_header_timeout_s=0.5, client_body_timeout_s=0.5,
                             keepalive_timeout_s=1.0)
    redis = aioredis.Redis.from_url(redis_url)
    gateway = Gateway(config, settings, redis)
    await gateway.start()
    runner = await start_listener(gateway, settings.listen)
    try:
        count("client timeouts (header 408, keep-alive, body)", 3)
        status, _ = await exchange(port, b"GET / HTTP/1.1\r\n" + H, timeout=3)
        assert status == 408

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
        await reader.readuntil(b"\r\n\r\n")
        started = time.monotonic()
        async with asyncio.timeout(3):
            while await reader.read(65536):
                pass
        idle = time.monotonic() - started
        writer.close()
        assert 0.5 < idle < 2.5, idle  # the keep-alive timeout, not the header timeout

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /slow HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        received = b""
        async with asyncio.timeout(4):
            while chunk := await reader.read(65536):
                received += chunk
        writer.close()
        assert time.monotonic() - started < 3
        assert received.startswith(b"HTTP/1.1 408"), received[:80]
        assert b"request-timeout" in received
    finally:
        await runner.cleanup()
        await gateway.stop(timeout_s=1)
        await redis.aclose()
        await upstream_runner.cleanup()
    assert not log_trap.errors, "\n".join(log_trap.errors[:5])
