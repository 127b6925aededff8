"""Routing: compile the route table once per config, then match (method, path) fast.

Templates: `/orders/{id}` - a `{name}` segment matches exactly one non-empty path segment.
Prefixes: `/catalog` matches `/catalog`, `/catalog/` and everything below it, segment-wise
(never `/catalogue`); `/` matches every path.

Priority, deterministic: routes whose whole path matches (exact or templated) beat prefix
routes; among them, more literal segments first; among prefixes, more segments first; ties go
to config order. A route listing GET also answers HEAD.

Path normalisation before matching (`split_path`): `//` collapses to `/`; `.` and `..`
segments are resolved (also percent-encoded ones like `%2e%2e`), never above the root;
segments are percent-decoded for matching only, the upstream gets the original encoding.
An encoded slash (`%2F`) or NUL (`%00`) in the path is rejected with 400 (`PathError`):
routing on a decoded `/` would let a client reach a route the path does not look like.

Matching: a dict for fully literal paths, then a segment trie (literal children in a dict,
one parameter child per node), so the cost depends on the path's depth, not the table size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from aiohttp import web

from proxy.config import Route
from proxy.problem import problem_response

if TYPE_CHECKING:
    from proxy.app import Exchange

MAX_PATH: Final = 2048  # longest url_path kept in an event
_PATH_KIND: Final = 0
_PREFIX_KIND: Final = 1


class PathError(ValueError):
    """A request path the gateway refuses to route (answered with 400)."""


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route ready for matching and forwarding."""

    route: Route
    id: str
    template: str  # recorded as the event's http_route
    upstream: str
    methods: frozenset[str]
    params: tuple[tuple[int, str], ...]  # (segment index, name)
    strip_segments: int  # leading segments removed before forwarding (strip_prefix)
    priority: tuple[int, int, int]  # lower sorts first

    def path_params(self, segments: Sequence[str]) -> dict[str, str]:
        return {name: segments[index] for index, name in self.params}

    def upstream_path(self, raw_segments: Sequence[str]) -> str:
        """The path sent upstream, from the (normalised, still encoded) request segments."""
        if self.strip_segments:
            raw_segments = raw_segments[self.strip_segments:]
            if not raw_segments:
                return "/"
        return "/" + "/".join(raw_segments)


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    exact: list[CompiledRoute] = field(default_factory=list)  # templated routes ending here
    prefix: list[CompiledRoute] = field(default_factory=list)  # prefix routes ending here


def split_path(raw_path: str) -> tuple[list[str], list[str]]:
    """Normalise a request path (no query) into (encoded segments, decoded segments).

    `/` gives `[""]`; a trailing slash gives a trailing empty segment.
    """
    if not raw_path.startswith("/"):
        raise PathError("the request target must be a path starting with '/'")
    if "%" not in raw_path and "//" not in raw_path and "/." not in raw_path:
        segments = raw_path[1:].split("/")
        return segments, segments
    lowered = raw_path.lower()
    if "%2f" in lowered:
        raise PathError("an encoded slash (%2F) in the path is not allowed")
    if "%00" in lowered:
        raise PathError("an encoded NUL (%00) in the path is not allowed")
    parts = raw_path[1:].split("/")
    last = len(parts) - 1
    raw: list[str] = []
    decoded: list[str] = []
    for index, part in enumerate(parts):
        value = unquote(part) if "%" in part else part
        if value in ("", ".", ".."):
            if value == ".." and raw:
                raw.pop()
                decoded.pop()
            if index == last:  # "/a/", "/a/." and "/a/b/.." all end in a slash
                raw.append("")
                decoded.append("")
            continue
        raw.append(part)
        decoded.append(value)
    if not raw:
        return [""], [""]
    return raw, decoded


def _template_segments(template: str, prefix: bool) -> list[str]:
    """Segments of a template; a path template's trailing slash is kept as a last ""."""
    parts = template.split("/")[1:]
    segments = [part for part in parts[:-1] if part]
    if parts[-1] or not prefix:
        segments.append(parts[-1])
    return segments if segments != [""] else ([] if prefix else [""])


def _is_param(segment: str) -> bool:
    return len(segment) > 2 and segment[0] == "{" and segment[-1] == "}"


def compile_route(route: Route, order: int) -> CompiledRoute:
    methods = set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")
    is_prefix = route.match.prefix is not None
    template = route.match.prefix if is_prefix else route.match.path
    assert template is not None
    segments = _template_segments(template, is_prefix)
    params = tuple((index, segment[1:-1]) for index, segment in enumerate(segments)
                   if _is_param(segment))
    if is_prefix:
        priority = (_PREFIX_KIND, -len(segments), order)
    else:
        priority = (_PATH_KIND, -(len(segments) - len(params)), order)
    return CompiledRoute(route=route, id=route.id, template=route.template,
                         upstream=route.upstream, methods=frozenset(methods), params=params,
                         strip_segments=len(segments) if is_prefix and route.strip_prefix else 0,
                         priority=priority)


class Router:
    """The compiled route table of one config version."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = [compile_route(route, order) for order, route in enumerate(routes)]
        self._literal: dict[str, list[CompiledRoute]] = {}
        self._root = _Node()
        for compiled in self.routes:
            route = compiled.route
            if route.match.path is not None and not compiled.params:
                key = _literal_key(route.match.path)
                self._literal.setdefault(key, []).append(compiled)
                continue
            template = route.match.path if route.match.path is not None else route.match.prefix
            assert template is not None
            node = self._root
            for segment in _template_segments(template, route.match.prefix is not None):
                if _is_param(segment):
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
                else:
                    node = node.literal.setdefault(segment, _Node())
            (node.prefix if route.match.prefix is not None else node.exact).append(compiled)
        for routes_here in self._literal.values():
            routes_here.sort(key=_priority)
        self._sort(self._root)

    def _sort(self, node: _Node) -> None:
        node.exact.sort(key=_priority)
        node.prefix.sort(key=_priority)
        for child in node.literal.values():
            self._sort(child)
        if node.param is not None:
            self._sort(node.param)

    def find(self, method: str, segments: list[str]) -> CompiledRoute | None:
        """The best route for this method and (decoded, normalised) path, or None."""
        literal = self._literal.get("/" + "/".join(segments))
        if literal is not None:
            for compiled in literal:
                if method in compiled.methods:
                    return compiled
        best: CompiledRoute | None = None
        for compiled in self._trie_candidates(segments):
            if method in compiled.methods and (best is None or compiled.priority < best.priority):
                best = compiled
        return best

    def allowed_methods(self, segments: list[str]) -> list[str]:
        """Methods some route accepts for this path (for 405 Allow); empty when none match."""
        methods: set[str] = set()
        for compiled in self._literal.get("/" + "/".join(segments), ()):
            methods |= compiled.methods
        for compiled in self._trie_candidates(segments):
            methods |= compiled.methods
        return sorted(methods)

    def _trie_candidates(self, segments: list[str]) -> Iterator[CompiledRoute]:
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            yield from node.prefix
            if depth == len(segments):
                yield from node.exact
                continue
            segment = segments[depth]
            child = node.literal.get(segment)
            if child is not None:
                stack.append((child, depth + 1))
            if node.param is not None and segment:
                stack.append((node.param, depth + 1))


def _literal_key(path: str) -> str:
    return "/" + "/".join(_template_segments(path, prefix=False))


def _priority(compiled: CompiledRoute) -> tuple[int, int, int]:
    return compiled.priority


class RouteStep:
    """Chain step: normalise the path and pick the route (400, 404 or 405 when none)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def access(self, ex: Exchange) -> web.StreamResponse | None:
        try:
            raw, decoded = split_path(ex.path)
        except PathError as exc:
            return problem_response("bad-path", str(exc), ex.request_id,
                                    headers=ex.response_headers)
        ex.raw_segments = raw
        ex.segments = decoded
        if raw is not decoded:  # normalised: record what is routed and forwarded
            ex.event.url_path = ("/" + "/".join(raw))[:MAX_PATH]
        method = ex.event.http_request_method
        route = self.router.find(method, decoded)
        if route is None:
            allowed = self.router.allowed_methods(decoded)
            if allowed:
                headers = {**ex.response_headers, "Allow": ", ".join(allowed)}
                return problem_response("method-not-allowed",
                                        f"{method} is not allowed here; allowed: "
                                        f"{', '.join(allowed)}", ex.request_id, headers=headers)
            return problem_response("route-not-found", "no route matches this path",
                                    ex.request_id, headers=ex.response_headers)
        ex.route = route
        ex.event.route_id = route.id
        ex.event.http_route = route.template
        return None
