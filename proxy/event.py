"""The request event: one flat record per request, the contract between proxy and collector.

Field names follow the OpenTelemetry HTTP semantic conventions with dots replaced by
underscores (`http.request.method` -> `http_request_method`), so the same name is used in
Python, on the wire and as the ClickHouse column. Gateway facts have plain names.
Never put the Authorization header, cookies or credential query parameters in an event.

Wire format on the Redis Stream: one stream entry per batch, fields `v` (schema version),
`c` (the field names, comma-separated) and `b` (an orjson array of rows, each the values of
one event in the order `c` names them). Without `c`, `b` is an array of event objects (the
first format; still read, and what tools may write). Rows because the collector's decode is
dominated by building Python objects: positional rows skip the keys on both ends (the
emitter's encode is ~2x cheaper, the collector's decode ~1.5x; bench/pipeline.py). The
names travel with every batch, so proxies and collectors of different releases agree on
what each position means. An emitter also writes
"dropped" markers, fields `v`, `k` = `dropped` and `d` (an orjson object naming the emitter
and the sequence ranges it dropped, by reason). See docs/events.md.

Every event carries its emitter's identity and a gap-free sequence number
(`gateway_emitter`, `gateway_event_seq`, from 1), so the collector can tell which events of
an emitter never arrived (docs/reliability.md, "Loss accounting").
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Final

import orjson

SCHEMA_VERSION: Final = 1


@dataclass(slots=True)
class RequestEvent:
    """What the gateway knows about one request once it has answered it."""

    timestamp: float  # request start, seconds since the epoch (UTC)
    request_id: str
    http_request_method: str
    url_path: str
    http_response_status_code: int
    duration_ms: float  # gateway time, first byte in to last byte out
    schema_version: int = SCHEMA_VERSION
    trace_id: str = ""
    span_id: str = ""
    gateway_instance: str = ""
    route_id: str = ""  # "" when no route matched
    http_route: str = ""  # the route template, e.g. /orders/{id}; "" when unmatched
    url_query: str = ""  # with credential parameters redacted
    url_scheme: str = "http"
    server_address: str = ""  # the Host the client asked for
    network_protocol_version: str = "1.1"
    client_address: str = ""
    user_agent_original: str = ""
    http_request_body_size: int = 0
    http_response_body_size: int = 0
    upstream: str = ""  # the upstream target, host:port
    upstream_duration_ms: float = 0.0
    error_type: str = ""  # "" when the request succeeded; else a class, e.g. upstream_timeout
    auth_outcome: str = "none"  # none | success | failure
    auth_reason: str = ""  # failure class: missing, malformed, bad_signature, expired, ...
    client_id: str = ""
    api_key_id: str = ""
    tenant: str = ""
    plan: str = ""
    ratelimit_outcome: str = "none"  # none | allowed | limited | shadow_limited | error
    ratelimit_policy_id: str = ""
    ratelimit_mode: str = ""  # enforce | shadow | off
    cache_outcome: str = "none"  # none | hit | miss | bypass | coalesced | unavailable
    retries: int = 0
    gateway_emitter: str = ""  # the emitter that numbered it: instance:pid:nonce
    gateway_event_seq: int = 0  # that emitter's gap-free event number, from 1 (0: unnumbered)


EVENT_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(RequestEvent))


ROW_COLUMNS: Final[bytes] = ",".join(EVENT_FIELDS).encode()  # the `c` field of a rows batch
_ROW: Final = operator.attrgetter(*EVENT_FIELDS)


def encode_batch(events: list[RequestEvent]) -> bytes:
    """A batch as an array of event objects: the `b` field of an entry without `c`."""
    return orjson.dumps(events)


def encode_rows(events: list[RequestEvent]) -> bytes:
    """A batch as an array of rows in EVENT_FIELDS order: the `b` field next to
    `c` = ROW_COLUMNS."""
    return orjson.dumps([_ROW(event) for event in events])


def row_columns(columns: bytes | str) -> tuple[str, ...]:
    """The field names of a rows batch's `c` field; EventDecodeError if they are not
    distinct non-empty names."""
    text = columns.decode("utf-8", "replace") if isinstance(columns, bytes) else columns
    names = tuple(text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise EventDecodeError(f"field names {text[:200]!r} are not distinct non-empty names")
    return names


class EventDecodeError(ValueError):
    """A stream entry that is not a valid event batch (a poison entry)."""


def decode_batch(version: bytes | str, payload: bytes,
                 columns: bytes | str | None = None) -> list[dict[str, Any]]:
    """Parse a stream entry back into event dicts; raise EventDecodeError if it is poison.
    `columns`: the entry's `c` field (a rows batch), None for an array of objects."""
    try:
        schema = int(version)
    except (TypeError, ValueError) as exc:
        raise EventDecodeError(f"schema version {version!r} is not an integer") from exc
    if schema != SCHEMA_VERSION:
        raise EventDecodeError(f"unsupported event schema version {schema}")
    try:
        items = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"payload is not JSON: {exc}") from exc
    if columns is not None:
        names = row_columns(columns)
        if not isinstance(items, list) or not all(
                isinstance(row, list) and len(row) == len(names) for row in items):
            raise EventDecodeError(f"payload is not a JSON array of rows of {len(names)} "
                                   "values")
        items = [dict(zip(names, row, strict=True)) for row in items]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise EventDecodeError("payload is not a JSON array of objects")
    for item in items:
        missing = [name for name in _REQUIRED if name not in item]
        if missing:
            raise EventDecodeError(f"event lacks required fields {missing}")
    return items


MARKER_KIND: Final = "dropped"


@dataclass(frozen=True, slots=True)
class DroppedRange:
    """Events `seq_from`..`seq_to` (inclusive) of one emitter, dropped by it for `reason`."""

    emitter: str
    seq_from: int
    seq_to: int
    reason: str


def encode_dropped(emitter: str, ranges: list[tuple[int, int, str]]) -> dict[str, bytes]:
    """The stream entry fields of a dropped marker: (seq_from, seq_to, reason) ranges."""
    return {"v": str(SCHEMA_VERSION).encode(), "k": MARKER_KIND.encode(),
            "d": orjson.dumps({"emitter": emitter, "ranges": ranges})}


def decode_dropped(payload: bytes) -> list[DroppedRange]:
    """Parse a dropped marker's `d` field; raise EventDecodeError if it is poison."""
    try:
        body = orjson.loads(payload)
        emitter, ranges = body["emitter"], body["ranges"]
        if not isinstance(emitter, str) or not emitter or not isinstance(ranges, list):
            raise TypeError("emitter or ranges of the wrong type")
        result = [DroppedRange(emitter, int(low), int(high), str(reason))
                  for low, high, reason in ranges
                  if type(low) is int and type(high) is int and type(reason) is str]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EventDecodeError(f"dropped marker is not valid: {exc}") from exc
    if len(result) != len(ranges) or any(r.seq_from < 1 or r.seq_to < r.seq_from or
                                         not r.reason for r in result):
        raise EventDecodeError("dropped marker has a range that is not [from >= 1, to >= from, "
                               "reason]")
    return result


_REQUIRED: Final = tuple(
    f.name for f in dataclasses.fields(RequestEvent)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
