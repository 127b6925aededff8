"""A buffered upstream response sent to the client as one write, without aiohttp's
response objects.

Most proxied responses are small and complete by the time their headers are read. For those
the forwarder needs no streaming: `send_buffered` serialises the status line, the filtered
headers and the body into one `bytes` and writes it to the client's transport. It follows
what `aiohttp.web.Response.prepare()` would have sent (bench/README.md has the
measurement): `Content-Length` of the body, `Date` and `Server` when the upstream gave none,
`Content-Type: application/octet-stream` for an untyped non-empty body, and the
`Connection` header the request's keep-alive state calls for. What it returns is a
`SentResponse`: a finished `StreamResponse` that aiohttp's request handler accepts as is
(prepare and write_eof do nothing once the end was sent) and that still tells it whether to
keep the connection.

Header values come from the upstream's parsed response (llhttp rejects CR and LF in them)
and from the gateway's own headers; names and values are encoded as aiohttp encodes them
(UTF-8, undecodable bytes restored with surrogateescape).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_request import BaseRequest

_DATE: Final = "date"
_SERVER: Final = "server"
_CONTENT_TYPE: Final = "content-type"
_DEFAULT_TYPE: Final = "Content-Type: application/octet-stream\r\n"


class SentResponse(web.StreamResponse):
    """A response already written whole to the client: status and keep-alive only."""

    def __init__(self, status: int, reason: str, keep_alive: bool) -> None:
        # StreamResponse.__init__ is skipped on purpose: no headers object is needed once
        # the bytes are on the wire; the class attributes cover the rest of its state.
        self._state = {}
        self._status = status
        self._reason = reason
        self._keep_alive = keep_alive
        self._eof_sent = True


async def send_buffered(request: BaseRequest, status: int, reason: str,
                        header_pairs: Iterable[tuple[str, str]], extra: Mapping[str, str],
                        body: bytes) -> SentResponse:
    """Write the whole response (waiting while the client's socket is over its high-water
    mark, as aiohttp's writer does); raises ConnectionResetError when the client is gone."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    if "\n" in reason or "\r" in reason:
        raise ValueError("reason cannot contain CR or LF")
    version = request.version
    keep_alive = request.keep_alive
    overridden = {name.lower() for name in extra} if extra else ()
    lines = [f"HTTP/{version.major}.{version.minor} {status} {reason}\r\n"]
    append = lines.append
    seen_date = seen_server = seen_type = False
    for name, value in header_pairs:
        lower = name.lower()
        if lower in overridden:
            continue
        if lower == _DATE:
            seen_date = True
        elif lower == _SERVER:
            seen_server = True
        elif lower == _CONTENT_TYPE:
            seen_type = True
        append(f"{name}: {value}\r\n")
    for name, value in extra.items():
        append(f"{name}: {value}\r\n")
    append(f"Content-Length: {len(body)}\r\n")
    if body and not seen_type and _CONTENT_TYPE not in overridden:
        append(_DEFAULT_TYPE)
    if not seen_date and _DATE not in overridden:
        append(f"Date: {rfc822_formatted_time()}\r\n")
    if not seen_server and _SERVER not in overridden:
        append(f"Server: {SERVER_SOFTWARE}\r\n")
    if keep_alive:
        if version.major == 1 and version.minor == 0:
            append("Connection: keep-alive\r\n")
    elif version.major == 1 and version.minor == 1:
        append("Connection: close\r\n")
    append("\r\n")
    head = "".join(lines).encode("utf-8", "surrogateescape")
    data = head + body if body else head
    transport.write(data)
    writer = request.writer
    writer.output_size += len(data)
    if request.protocol.writing_paused:
        await writer.drain()
    return SentResponse(status, reason, keep_alive)
