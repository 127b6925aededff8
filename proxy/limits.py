"""Per-route request limits: URL length (414), header size (431), body size (413).

Config (`limits:` on a route): `max_url_bytes`, `max_header_bytes` (names + values + 4 per
field, as on the wire), `max_body_bytes`. A declared Content-Length over the limit is refused
before `100 Continue` is sent and before anything reaches the upstream; a chunked body is
counted as it streams and cut off at the limit (413, connection closed, since the rest of the
body is never read). Global bounds on malformed or huge requests are aiohttp's parser
limits (400 before the gateway sees the request).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RouteLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_url_bytes: int | None = Field(default=None, gt=0, le=1_000_000)
    max_header_bytes: int | None = Field(default=None, gt=0, le=10_000_000)
    max_body_bytes: int | None = Field(default=None, ge=0, le=1 << 40)


class BodyTooLarge(Exception):
    """A streamed request body passed the route's max_body_bytes."""


def header_bytes(raw_headers: tuple[tuple[bytes, bytes], ...]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in raw_headers)
