"""Aggregation routes: one request, several upstream calls in parallel, one JSON answer
(KrakenD's model).

    - id: order-view
      match: {path: "/order-view/{id}"}
      methods: [GET]
      upstream: orders                 # the default upstream of the backends
      aggregate:
        merge: keyed                   # keyed: {name: body, ...}; flat: top-level keys merged
        allow_partial: true
        backends:
          - {name: order, path: "/orders/{id}", timeout_s: 1.0}
          - {name: user, upstream: users, path: "/users/{id}", timeout_s: 0.5}

Each backend is a GET to its upstream (balancing, outlier detection and the circuit breaker
apply) with the route's template parameters substituted into its path and the request's
forwarding headers. A backend fails when it cannot be reached (`connect_error`), exceeds
its `timeout_s` (`timeout`), answers a non-2xx status (`status_503`), a body over
`max_body_bytes` (`too_large`) or not JSON (`invalid_json`; flat merge also needs an
object). The response lists failures under `_errors: {name: reason}`. With
`allow_partial: false`, or when every backend failed, the answer is a 504 problem when a
timeout was among the failures and a 502 otherwise, with the same `errors`. The event
records `error_type` `aggregate_partial` (some failed, 200) or the class of the first
failure; `upstream` lists the targets, `upstream_duration_ms` is the slowest call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from proxy.problem import problem_response

if TYPE_CHECKING:
    from proxy.app import Exchange
    from proxy.config import Route, Upstream
    from proxy.pool import UpstreamPool

ERRORS_KEY: Final = "_errors"
_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DROPPED: Final = ("Content-Length", "Content-Type", "Content-Encoding")


class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Key of its part in the response and in `_errors`.")
    upstream: str | None = Field(default=None, description="Default: the route's upstream.")
    path: str = Field(description="Path template; {param} from the route's template.")
    timeout_s: float = Field(default=2.0, gt=0, le=300)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0, le=64 * 1024 * 1024)

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not value or len(value) > 64 or not _NAME_CHARS.issuperset(value):
            raise ValueError("must be 1-64 letters, digits, _ or -")
        return value

    @field_validator("path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


class AggregateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[Backend] = Field(min_length=1, max_length=32)
    merge: Literal["keyed", "flat"] = "keyed"
    allow_partial: bool = True
    forward_query: bool = Field(default=False, description="Pass the request's query on.")

    @model_validator(mode="after")
    def _unique(self) -> AggregateConfig:
        names = [backend.name for backend in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        return self


def check_aggregate_references(routes: Sequence[Route], upstreams: dict[str, Upstream]) -> None:
    """Backends name known upstreams and only the route's template parameters."""
    from proxy.transform import _PLACEHOLDER

    for index, route in enumerate(routes):
        config: AggregateConfig | None = route.aggregate
        if config is None:
            continue
        own = route.match.param_names()
        for number, backend in enumerate(config.backends):
            where = f"routes[{index}].aggregate.backends[{number}]"
            if backend.upstream is not None and backend.upstream not in upstreams:
                raise ValueError(f"{where}.upstream {backend.upstream!r} is not one of the "
                                 f"upstreams {sorted(upstreams)}")
            unknown = set(_PLACEHOLDER.findall(backend.path)) - own
            if unknown:
                raise ValueError(f"{where}.path uses {sorted(unknown)}, not parameters of "
                                 f"{route.template!r}")


class _Failed(Exception):
    def __init__(self, reason: str, error_type: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


class AggregateStep:
    """Chain step before the forwarder: answers aggregation routes, passes the others on."""

    @classmethod
    def when_used(cls, routes: Sequence[Route],
                  upstreams: dict[str, UpstreamPool]) -> list[AggregateStep]:
        """The step, when some route uses it (else the chain does without)."""
        return [cls(upstreams)] if any(route.aggregate is not None for route in routes) else []

    def __init__(self, upstreams: dict[str, UpstreamPool]) -> None:
        self.upstreams = upstreams

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        route = ex.route
        if route is None:
            return None
        config: AggregateConfig | None = route.route.aggregate
        if config is None:
            return None
        from proxy.response_filter import BufferedResponse, apply_filters, finish
        from proxy.transform import render_path

        params = route.path_params(ex.raw_segments)
        query = ex.query if config.forward_query and ex.query else ""
        started = time.perf_counter()
        results = await asyncio.gather(*(
            self._call(ex, backend, self.upstreams[backend.upstream or route.upstream],
                       render_path(backend.path, params) + ("?" + query if query else ""),
                       config.merge == "flat")
            for backend in config.backends))
        event = ex.event
        event.upstream_duration_ms = (time.perf_counter() - started) * 1000.0
        event.upstream = ",".join(address for _, address, _ in results if address)[:256]
        merged: dict[str, Any] = {}
        errors: dict[str, str] = {}
        first_error = ""
        for backend, (value, _, failure) in zip(config.backends, results, strict=True):
            if failure is not None:
                errors[backend.name] = failure.reason
                first_error = first_error or failure.error_type
            elif config.merge == "flat":
                merged.update(value)
            else:
                merged[backend.name] = value
        if errors and (not config.allow_partial or len(errors) == len(config.backends)):
            event.error_type = first_error
            timeout = "timeout" in errors.values()
            slug = "upstream-timeout" if timeout else "upstream-bad-response"
            return problem_response(slug, f"{len(errors)} of {len(config.backends)} backends "
                                          "failed", ex.request_id,
                                    headers=ex.response_headers, extra={"errors": errors})
        if errors:
            event.error_type = "aggregate_partial"
            merged[ERRORS_KEY] = errors
        headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
        response = BufferedResponse(200, None, headers, orjson.dumps(merged))
        apply_filters(ex, response)
        return await finish(ex, response)

    async def _call(self, ex: Exchange, backend: Backend, pool: UpstreamPool,
                    path: str, flat: bool) -> tuple[Any, str, _Failed | None]:
        from proxy.forward import classify, upstream_request_headers  # forward imports config

        breaker = pool.breaker
        if breaker is not None and not breaker.allow():
            return None, "", _Failed("circuit_open", "circuit_open")
        ep = pool.pick(ex)
        headers = upstream_request_headers(ex, ep.host_header, ex.trusted_peer)
        for name in _DROPPED:
            headers.popall(name, None)
        ep.outstanding += 1
        status = 0
        try:
            async with asyncio.timeout(backend.timeout_s):
                async with pool.session.get(
                        URL(ep.base + path, encoded=True), headers=headers,
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=backend.timeout_s)) as response:
                    status = response.status
                    if not 200 <= status < 300:
                        raise _Failed(f"status_{status}", "upstream_status")
                    length = response.content_length
                    if length is not None and length > backend.max_body_bytes:
                        raise _Failed("too_large", "upstream_too_large")
                    body = await _read(response, backend.max_body_bytes)
            value = _parse(body, backend.name)
            if flat and not isinstance(value, dict):
                raise _Failed("not_object", "upstream_protocol_error")
        except _Failed as failed:
            pool.record(ep, "", status)
            return None, ep.address, failed
        except Exception as exc:  # every transport failure is a failed part, never a crash
            error_type = classify(exc)[0]
            pool.record(ep, error_type, 0)
            reason = ("timeout" if error_type in ("upstream_timeout", "upstream_connect_timeout")
                      else error_type.removeprefix("upstream_"))
            return None, ep.address, _Failed(reason, error_type)
        finally:
            ep.outstanding -= 1
        pool.record(ep, "", status)
        return value, ep.address, None


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _Failed("too_large", "upstream_too_large")
        parts.append(chunk)
    return b"".join(parts)


def _parse(body: bytes, name: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Failed("invalid_json", "upstream_protocol_error") from None
