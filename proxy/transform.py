"""Request and response transformations per route (Kong's request-/response-transformer).

    transform:
      max_body_bytes: 65536            # bodies reshaped only up to this size
      request:
        headers: {remove: [X-Debug], rename: {X-Old: X-New}, add: {X-Source: gateway}}
        path: /v2/orders/{id}          # route template parameters, still percent-encoded
        query: {remove: [debug], add: {version: "2"}}
        body: {remove: [internal], rename: {customer.id: customer_id}, add: {source: api}}
      response:
        headers: {...}                 # as for the request
        body: {...}

Operations run in the order remove, rename, add; `add` sets (replacing any value). Body
fields are top-level names or dotted paths into nested objects; `add` values are any JSON.
Bodies are reshaped only when they are a JSON object (`application/json` or `+json`), not
content-encoded, and at most `max_body_bytes` (request bodies also need a Content-Length);
anything else passes through untouched and is counted in
`apigw_transform_skipped_total{route_id,phase,reason}` - never an error for the client.
Response headers are transformed on every response, also streamed ones; a cached route
stores the transformed response.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, unquote_plus

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.config import Route
    from proxy.response_filter import BufferedResponse
    from proxy.routing import CompiledRoute

TRANSFORM_SKIPPED = Counter("apigw_transform_skipped_total",
                            "Bodies passed through untouched by a transform",
                            ["route_id", "phase", "reason"])

_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FIELD: Final = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeaderOps(_Strict):
    remove: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict, description="old name -> new name")
    add: dict[str, str] = Field(default_factory=dict, description="Set (replacing).")


class QueryOps(_Strict):
    remove: list[str] = Field(default_factory=list)
    add: dict[str, str] = Field(default_factory=dict, description="Set (replacing).")


class BodyOps(_Strict):
    remove: list[str] = Field(default_factory=list, description="Fields, dotted paths ok.")
    rename: dict[str, str] = Field(default_factory=dict)
    add: dict[str, Any] = Field(default_factory=dict, description="Field -> JSON value.")

    @field_validator("remove")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        _check_fields(value)
        return value

    @field_validator("rename")
    @classmethod
    def _rename_paths(cls, value: dict[str, str]) -> dict[str, str]:
        _check_fields([*value, *value.values()])
        return value

    @field_validator("add")
    @classmethod
    def _add_paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_fields(list(value))
        return value


def _check_fields(fields: Sequence[str]) -> None:
    for name in fields:
        if not _FIELD.match(name):
            raise ValueError(f"{name!r} is not a field name or dotted path (a.b.c)")


class RequestTransform(_Strict):
    headers: HeaderOps | None = None
    path: str | None = Field(default=None, description="Upstream path template, e.g. "
                                                       "/v2/orders/{id}.")
    query: QueryOps | None = None
    body: BodyOps | None = None

    @field_validator("path")
    @classmethod
    def _path_shape(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or "?" in value):
            raise ValueError("must start with '/' and hold no query")
        return value


class ResponseTransform(_Strict):
    headers: HeaderOps | None = None
    body: BodyOps | None = None


class TransformConfig(_Strict):
    max_body_bytes: int = Field(default=1024 * 1024, gt=0, le=64 * 1024 * 1024)
    request: RequestTransform = Field(default_factory=RequestTransform)
    response: ResponseTransform = Field(default_factory=ResponseTransform)


def check_transform_references(routes: Sequence[Route]) -> None:
    """A path template may only use the route's own template parameters."""
    for index, route in enumerate(routes):
        transform: TransformConfig | None = route.transform
        if transform is None or transform.request.path is None:
            continue
        own = route.match.param_names()
        used = set(_PLACEHOLDER.findall(transform.request.path))
        if used - own:
            raise ValueError(f"routes[{index}].transform.request.path uses "
                             f"{sorted(used - own)}, not parameters of {route.template!r}")


# --- operations --------------------------------------------------------------------------------

def apply_headers(headers: CIMultiDict[str], ops: HeaderOps) -> None:
    for name in ops.remove:
        headers.popall(name, None)
    for old, new in ops.rename.items():
        values = headers.popall(old, None)
        if values:
            headers.popall(new, None)
            for value in values:
                headers.add(new, value)
    for name, value in ops.add.items():
        headers[name] = value


def apply_query(query: str, ops: QueryOps) -> str:
    removed = {name for name in ops.remove} | set(ops.add)
    kept = [part for part in query.split("&") if part and
            unquote_plus(part.partition("=")[0]) not in removed]
    kept += [f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in ops.add.items()]
    return "&".join(kept)


def render_path(template: str, params: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda match: params[match.group(1)], template)


def apply_body(document: dict[str, Any], ops: BodyOps) -> None:
    for path in ops.remove:
        _pop(document, path)
    for old, new in ops.rename.items():
        found, value = _pop(document, old)
        if found:
            _set(document, new, value)
    for path, value in ops.add.items():
        _set(document, path, value)


def _pop(document: dict[str, Any], path: str) -> tuple[bool, Any]:
    *parents, last = path.split(".")
    node: Any = document
    for name in parents:
        node = node.get(name) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        return True, node.pop(last)
    return False, None


def _set(document: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = document
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = node[name] = {}
        node = child
    node[last] = value


def _json_type(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def reshape(body: bytes, headers: Mapping[str, str], ops: BodyOps, limit: int
            ) -> tuple[bytes | None, str]:
    """The reshaped body, or (None, why it was left alone)."""
    if not _json_type(headers.get("Content-Type", "")):
        return None, "not_json"
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        return None, "encoded"
    if len(body) > limit:
        return None, "too_large"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(document, dict):
        return None, "not_object"
    apply_body(document, ops)
    return orjson.dumps(document), ""


# --- the step -----------------------------------------------------------------------------------

class _ResponseFilter:
    def __init__(self, route_id: str, config: TransformConfig) -> None:
        self.route_id = route_id
        self.config = config
        self.ops = config.response

    def body_limit(self, ex: Exchange, status: int, headers: CIMultiDict[str]) -> int:
        if self.ops.body is None or not _json_type(headers.get("Content-Type", "")):
            return 0
        return self.config.max_body_bytes

    def on_response(self, ex: Exchange, response: BufferedResponse) -> None:
        ops = self.ops
        if ops.headers is not None:
            apply_headers(response.headers, ops.headers)
        if ops.body is None:
            return
        if response.body is None:
            if ex.request.method != "HEAD" and response.status not in (204, 304) and \
                    _json_type(response.headers.get("Content-Type", "")):
                TRANSFORM_SKIPPED.labels(self.route_id, "response", "too_large").inc()
            return
        body, reason = reshape(response.body, response.headers, ops.body,
                               self.config.max_body_bytes)
        if body is None:
            if reason != "not_json":
                TRANSFORM_SKIPPED.labels(self.route_id, "response", reason).inc()
            return
        response.body = body


class TransformStep:
    """Chain step (after the cache): rewrite the request, register the response filter."""

    @classmethod
    def when_used(cls, routes: Sequence[Route]) -> list[TransformStep]:
        """The step, when some route uses it (else the chain does without)."""
        return [cls()] if any(route.transform is not None for route in routes) else []

    def __init__(self) -> None:
        self._filters: dict[str, _ResponseFilter] = {}

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route = ex.route
        if route is None:
            return None
        config: TransformConfig | None = route.route.transform
        if config is None:
            return None
        ops = config.request
        if ops.path is not None:
            rewrite_path(ex, route, render_path(ops.path, route.path_params(ex.raw_segments)))
        if ops.query is not None:
            ex.query = apply_query(ex.query, ops.query)
        if ops.headers is not None or ops.body is not None:
            await self._request(ex, route, config)
        response_ops = config.response
        if response_ops.headers is not None or response_ops.body is not None:
            response_filter = self._filters.get(route.id)
            if response_filter is None:
                response_filter = self._filters[route.id] = _ResponseFilter(route.id, config)
            ex.response_filters.append(response_filter)
        return None

    async def _request(self, ex: Exchange, route: CompiledRoute,
                       config: TransformConfig) -> None:
        request = ex.request
        headers = CIMultiDict(request.headers)
        ops = config.request
        if ops.headers is not None:
            apply_headers(headers, ops.headers)
        new_body: bytes | None = None
        if ops.body is not None and request.body_exists:
            new_body = await self._request_body(ex, route, config, ops.body, headers)
            if new_body is not None:
                headers["Content-Length"] = str(len(new_body))
                headers.popall("Expect", None)
        clone = request.clone(headers=headers)
        if new_body is not None:
            reader = StreamReader(request.protocol, 2 ** 16, loop=asyncio.get_running_loop())
            reader.feed_data(new_body)
            reader.feed_eof()
            clone._payload = reader  # the forwarder streams request.content: this body
        ex.request = clone

    async def _request_body(self, ex: Exchange, route: CompiledRoute, config: TransformConfig,
                            ops: BodyOps, headers: CIMultiDict[str]) -> bytes | None:
        request = ex.request
        length = request.content_length
        limit = config.max_body_bytes
        limits = route.route.limits
        if limits is not None and limits.max_body_bytes is not None:
            limit = min(limit, limits.max_body_bytes)
        reason = ""
        if not _json_type(headers.get("Content-Type", "")):
            return None
        if length is None:
            reason = "unknown_length"
        elif length > limit:
            reason = "too_large"
        if reason:
            TRANSFORM_SKIPPED.labels(route.id, "request", reason).inc()
            return None
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw = await request.content.read()
        body, reason = reshape(raw, headers, ops, limit)
        if body is None:
            TRANSFORM_SKIPPED.labels(route.id, "request", reason).inc()
            return raw  # already read: handed on unchanged
        return body


def rewrite_path(ex: Exchange, route: CompiledRoute, path: str) -> None:
    """Make the forwarder send `path`: it sends the route's upstream_path(raw_segments),
    which drops the first strip_segments segments (strip_prefix)."""
    ex.raw_segments = [""] * route.strip_segments + path[1:].split("/")
