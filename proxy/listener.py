"""The client listener's aiohttp server, with requests rejected by the HTTP parser recorded.

aiohttp answers a message it cannot parse (conflicting Content-Length and Transfer-Encoding,
duplicate Content-Length, obs-fold, an invalid method or target, an over-long line) with 400
and closes the connection before any handler runs. `RecordingServer` hooks the protocol's
`handle_error` so such a request still produces one RequestEvent (method `_OTHER`, empty
path, status 400, `error_type` naming the parser's complaint), and is never forwarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.event import RequestEvent

BadRequestHook = Callable[[BaseRequest, int, BaseException | None], None]
_ERROR_TYPES = {"BadHttpMethod": "invalid_method", "InvalidURLError": "invalid_target",
                "LineTooLong": "line_too_long", "InvalidHeader": "invalid_header",
                "TransferEncodingError": "invalid_transfer_encoding",
                "ContentLengthError": "invalid_content_length"}


def error_type_of(exc: BaseException | None) -> str:
    if exc is None:
        return "malformed_request"
    name = type(exc).__name__
    return _ERROR_TYPES.get(name) or "malformed_request"


def bad_request_event(request: BaseRequest, status: int, exc: BaseException | None,
                      instance: str, request_id: str) -> RequestEvent:
    return RequestEvent(
        timestamp=time.time(), request_id=request_id, http_request_method="_OTHER",
        url_path="", http_response_status_code=status, duration_ms=0.0,
        gateway_instance=instance, client_address=request.remote or "",
        error_type=error_type_of(exc))


class _RecordingHandler(RequestHandler):
    def __init__(self, manager: RecordingServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._hook = manager.on_bad_request

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        try:
            self._hook(request, status, exc)
        except Exception:  # recording must never change the answer
            self.logger.exception("recording a rejected request failed")
        return super().handle_error(request, status, exc, message)


class RecordingServer(web.Server):
    def __init__(self, handler: Any, on_bad_request: BadRequestHook, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.on_bad_request = on_bad_request

    def __call__(self) -> RequestHandler:
        return _RecordingHandler(self, loop=self._loop, **self._kwargs)
