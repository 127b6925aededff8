"""RFC 9457 problem details: the body of every error the gateway itself answers.

`type` is a URN naming the problem class (`urn:apigw:problem:<slug>`), `title` is fixed per
class, `detail` explains this occurrence, `instance` is the request id (also sent as
X-Request-Id), so a client report leads straight to the request's event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import orjson
from aiohttp import web

CONTENT_TYPE: Final = "application/problem+json"

# slug -> (status, title)
PROBLEMS: Final[dict[str, tuple[int, str]]] = {
    "bad-request": (400, "Bad request"),
    "bad-path": (400, "Path not accepted"),
    "route-not-found": (404, "No route for this path"),
    "method-not-allowed": (405, "Method not allowed on this route"),
    "request-timeout": (408, "Request body not received in time"),
    "payload-too-large": (413, "Request body too large for this route"),
    "uri-too-long": (414, "Request target too long"),
    "rate-limited": (429, "Too many requests"),
    "headers-too-large": (431, "Request header fields too large"),
    "internal-error": (500, "Gateway internal error"),
    "upstream-unreachable": (502, "Upstream unreachable"),
    "upstream-reset": (502, "Upstream closed the connection"),
    "upstream-bad-response": (502, "Upstream sent an invalid response"),
    "rate-limit-unavailable": (503, "Rate limiting unavailable"),
    "shutting-down": (503, "Gateway shutting down"),
    "circuit-open": (503, "Upstream circuit open"),
    "route-overloaded": (503, "Route at its in-flight limit"),
    "upstream-timeout": (504, "Upstream timed out"),
}


def problem_body(slug: str, detail: str, request_id: str,
                 extra: Mapping[str, object] | None = None) -> tuple[int, bytes]:
    status, title = PROBLEMS[slug]
    document: dict[str, object] = {"type": f"urn:apigw:problem:{slug}", "title": title,
                                   "status": status, "detail": detail, "instance": request_id}
    if extra:  # extension members never replace the standard ones (RFC 9457, 3.2)
        document.update((name, value) for name, value in extra.items() if name not in document)
    return status, orjson.dumps(document)


def problem_response(slug: str, detail: str, request_id: str, *,
                     headers: Mapping[str, str] | None = None,
                     extra: Mapping[str, object] | None = None) -> web.Response:
    """An application/problem+json response carrying X-Request-Id (and any extra headers)."""
    status, body = problem_body(slug, detail, request_id, extra)
    response = web.Response(status=status, body=body, content_type=CONTENT_TYPE)
    response.headers["X-Request-Id"] = request_id
    if headers:
        response.headers.update(headers)
    return response
