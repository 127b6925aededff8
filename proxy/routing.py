"""Routing: compile the route table once per config, then match a request fast.

A route matches on its path (`match.path` template, `match.prefix` or `match.regex`), its
methods, and optionally the Host (`match.hosts`), headers (`match.headers`) and query
parameters (`match.query`).

Templates: `/orders/{id}` - a `{name}` segment matches exactly one non-empty path segment;
typed: `{id:int}` ASCII digits, `{id:uuid}` 8-4-4-4-12 hex, `{rest:path}` (last segment only)
the rest of the path, at least one non-empty segment. Prefixes: `/catalog` matches `/catalog`,
`/catalog/` and everything below it, segment-wise (never `/catalogue`); `/` matches every
path. Regex: the whole normalised, decoded path must match (`fullmatch`: anchored even
without `^...$`); its http_route is `match.template`, else the regex source.

Hosts: the Host header, lower-cased, port and trailing dot removed; `*.example.com` matches any
name ending in `.example.com` (not `example.com` itself). Headers: a value must equal one of
the header's values; `true` = present, `false` = absent. Query: the same on the decoded query.

Priority, deterministic (`CompiledRoute.rank`, lower sorts first):
1. explicit `priority` (higher first);
2. host: routes with only exact hosts, then wildcard ones (longer suffix first; a route
   listing both ranks as its broadest), then routes without hosts;
3. path: whole-path matches (exact or templated) beat regex routes, which beat prefix routes;
   among templates, more literal segments first, then single-segment over `{x:path}`, then
   more typed parameters; among prefixes, more segments first;
4. more header/query conditions first;
5. config order.
A route listing GET also answers HEAD. A method mismatch falls through to the next route; when
routes match the path and conditions but none the method: 405 with Allow; else 404.

Path normalisation before matching (`split_path`): `//` collapses to `/`; `.` and `..`
segments are resolved (also percent-encoded ones like `%2e%2e`), never above the root;
segments are percent-decoded for matching only, the upstream gets the original encoding.
An encoded slash (`%2F`) or NUL (`%00`) in the path is rejected with 400 (`PathError`):
routing on a decoded `/` would let a client reach a route the path does not look like. So is
a backslash, raw or encoded (`\\`, `%5C`): upstreams that treat it as `/` (IIS, some
frameworks) would resolve `/public/..\\private` outside the route's prefix.

Matching: a dict for fully literal paths, then a segment trie (literal children in a dict,
parameter children by type), so the cost depends on the path's depth, not the table size.
Routes found for the path are then checked for method and conditions; regex routes are tried
one by one (after a literal-prefix check), so their cost grows with their number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, unquote

from aiohttp import web
from multidict import MultiMapping

from proxy.config import Route
from proxy.problem import problem_response

if TYPE_CHECKING:
    from aiohttp.web import BaseRequest

    from proxy.app import Exchange

MAX_PATH: Final = 2048  # longest url_path kept in an event
_PATH_KIND: Final = 0
_REGEX_KIND: Final = 1
_PREFIX_KIND: Final = 2
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                          r"[0-9a-fA-F]{12}")
_REGEX_META: Final = frozenset(".^$*+?{}[]\\|()")


class PathError(ValueError):
    """A request path the gateway refuses to route (answered with 400)."""


def _is_int(segment: str) -> bool:
    return segment.isascii() and segment.isdigit()


def _is_uuid(segment: str) -> bool:
    return len(segment) == 36 and _UUID.fullmatch(segment) is not None


def _is_str(segment: str) -> bool:
    return segment != ""


_CHECKS: Final[dict[str, Callable[[str], bool]]] = {"str": _is_str, "int": _is_int,
                                                    "uuid": _is_uuid}


class MatchContext:
    """What conditions look at besides the path: Host, headers and the query string."""

    __slots__ = ("_query", "_raw_query", "headers", "host")

    def __init__(self, host: str, headers: MultiMapping[str], query: str = "") -> None:
        self.host = normal_host(host)
        self.headers = headers
        self._raw_query = query
        self._query: dict[str, list[str]] | None = None

    @classmethod
    def of(cls, request: BaseRequest, query: str) -> MatchContext:
        return cls(request.headers.get("Host", ""), request.headers, query)

    def query_values(self, name: str) -> list[str]:
        if self._query is None:
            parsed: dict[str, list[str]] = {}
            for key, value in parse_qsl(self._raw_query, keep_blank_values=True):
                parsed.setdefault(key, []).append(value)
            self._query = parsed
        return self._query.get(name, [])


def normal_host(value: str) -> str:
    """A Host header as routes compare it: lower-case, without port or trailing dot."""
    host = value.strip().lower()
    if host.startswith("["):  # IPv6 literal
        return host[:host.find("]") + 1] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        host = name
    return host.rstrip(".")


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route ready for matching and forwarding."""

    route: Route
    id: str
    template: str  # recorded as the event's http_route
    upstream: str
    methods: frozenset[str]
    params: tuple[tuple[int, str], ...]  # (segment index, name) of single-segment params
    strip_segments: int  # leading segments removed before forwarding (strip_prefix)
    rank: tuple[int, ...]  # lower sorts first (module docstring)
    rest_param: tuple[int, str] | None = None  # a trailing {name:path}
    regex: re.Pattern[str] | None = None
    regex_prefix: str = ""  # literal start every path the regex matches has
    exact_hosts: frozenset[str] = frozenset()
    host_suffixes: tuple[str, ...] = ()  # ".example.com" for *.example.com
    headers: tuple[tuple[str, str | bool], ...] = ()
    query: tuple[tuple[str, str | bool], ...] = ()
    conditional: bool = False  # hosts, headers or query to check

    def path_params(self, segments: Sequence[str]) -> dict[str, str]:
        params = {name: segments[index] for index, name in self.params}
        if self.rest_param is not None:
            index, name = self.rest_param
            params[name] = "/".join(segments[index:])
        return params

    def upstream_path(self, raw_segments: Sequence[str]) -> str:
        """The path sent upstream, from the (normalised, still encoded) request segments."""
        if self.strip_segments:
            raw_segments = raw_segments[self.strip_segments:]
            if not raw_segments:
                return "/"
        return "/" + "/".join(raw_segments)

    def applies(self, context: MatchContext | None) -> bool:
        """Host, header and query conditions hold (no context: only unconditional routes)."""
        if not self.conditional:
            return True
        if context is None:
            return False
        if self.exact_hosts or self.host_suffixes:
            host = context.host
            if host not in self.exact_hosts and not any(
                    host.endswith(suffix) and len(host) > len(suffix)
                    for suffix in self.host_suffixes):
                return False
        for name, wanted in self.headers:
            values = context.headers.getall(name, [])
            if not _condition_holds(wanted, values):
                return False
        for name, wanted in self.query:
            if not _condition_holds(wanted, context.query_values(name)):
                return False
        return True

    def accepts(self, method: str, context: MatchContext | None) -> bool:
        return method in self.methods and self.applies(context)


def _condition_holds(wanted: str | bool, values: Sequence[str]) -> bool:
    if wanted is True:
        return bool(values)
    if wanted is False:
        return not values
    return wanted in values


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    params: list[tuple[Callable[[str], bool], _Node]] = field(default_factory=list)
    param_kinds: dict[str, _Node] = field(default_factory=dict)
    exact: list[CompiledRoute] = field(default_factory=list)  # templated routes ending here
    rest: list[CompiledRoute] = field(default_factory=list)  # {x:path} routes ending here
    prefix: list[CompiledRoute] = field(default_factory=list)  # prefix routes ending here


def split_path(raw_path: str) -> tuple[list[str], list[str]]:
    """Normalise a request path (no query) into (encoded segments, decoded segments).

    `/` gives `[""]`; a trailing slash gives a trailing empty segment.
    """
    if not raw_path.startswith("/"):
        raise PathError("the request target must be a path starting with '/'")
    if "\\" in raw_path:
        raise PathError("a backslash in the path is not allowed")
    if "%" not in raw_path and "//" not in raw_path and "/." not in raw_path:
        segments = raw_path[1:].split("/")
        return segments, segments
    lowered = raw_path.lower()
    if "%2f" in lowered:
        raise PathError("an encoded slash (%2F) in the path is not allowed")
    if "%00" in lowered:
        raise PathError("an encoded NUL (%00) in the path is not allowed")
    if "%5c" in lowered:
        raise PathError("an encoded backslash (%5C) in the path is not allowed")
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


def _param(segment: str) -> tuple[str, str] | None:
    """(name, type) of a `{name}` / `{name:type}` segment, None for a literal one."""
    if len(segment) <= 2 or segment[0] != "{" or segment[-1] != "}":
        return None
    name, _, kind = segment[1:-1].partition(":")
    if kind in _CHECKS or kind == "path":
        return name, kind
    return segment[1:-1], "str"


def _regex_prefix(pattern: str) -> str:
    """The literal text every match of an (unanchored-by-flags) pattern starts with."""
    if "|" in pattern:  # an alternative may start anywhere
        return ""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    literal: list[str] = []
    for char in pattern:
        if char in _REGEX_META:
            if char in "*?{" and literal:  # the last literal was optional/repeated
                literal.pop()
            break
        literal.append(char)
    return "".join(literal)


def _host_rank(hosts: Sequence[str]) -> tuple[int, int]:
    if not hosts:
        return 2, 0
    wildcards = [host for host in hosts if host.startswith("*.")]
    if not wildcards:
        return 0, 0
    return 1, -min(len(host) for host in wildcards)


def compile_route(route: Route, order: int) -> CompiledRoute:
    methods = set(route.methods)
    if "GET" in methods:
        methods.add("HEAD")
    match = route.match
    conditions = -(len(match.headers) + len(match.query))
    head = (-route.priority, *_host_rank(match.hosts))
    params: tuple[tuple[int, str], ...] = ()
    rest: tuple[int, str] | None = None
    regex: re.Pattern[str] | None = None
    strip = 0
    if match.regex is not None:
        regex = re.compile(match.regex)
        rank = (*head, _REGEX_KIND, 0, 0, 0, conditions, order)
    else:
        is_prefix = match.prefix is not None
        template = match.prefix if is_prefix else match.path
        assert template is not None
        segments = _template_segments(template, is_prefix)
        typed = 0
        found: list[tuple[int, str]] = []
        for index, segment in enumerate(segments):
            parsed = _param(segment)
            if parsed is None:
                continue
            name, kind = parsed
            if kind == "path":
                rest = (index, name)
                continue
            typed += kind in ("int", "uuid")
            found.append((index, name))
        params = tuple(found)
        literals = len(segments) - len(params) - (rest is not None)
        if is_prefix:
            rank = (*head, _PREFIX_KIND, -len(segments), 0, -typed, conditions, order)
            strip = len(segments) if route.strip_prefix else 0
        else:
            rank = (*head, _PATH_KIND, -literals, int(rest is not None), -typed, conditions, order)
    hosts = match.hosts
    return CompiledRoute(
        route=route, id=route.id, template=route.template, upstream=route.upstream,
        methods=frozenset(methods), params=params, strip_segments=strip, rank=rank,
        rest_param=rest, regex=regex,
        regex_prefix=_regex_prefix(match.regex) if match.regex is not None else "",
        exact_hosts=frozenset(host for host in hosts if not host.startswith("*.")),
        host_suffixes=tuple(host[1:] for host in hosts if host.startswith("*.")),
        headers=tuple((name.lower(), value) for name, value in match.headers.items()),
        query=tuple(match.query.items()),
        conditional=bool(hosts or match.headers or match.query))


class Router:
    """The compiled route table of one config version."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = [compile_route(route, order) for order, route in enumerate(routes)]
        self.conditional = any(compiled.conditional for compiled in self.routes)
        self._literal: dict[str, list[CompiledRoute]] = {}
        self._regex: list[CompiledRoute] = []
        self._root = _Node()
        others: list[CompiledRoute] = []
        for compiled in self.routes:
            match = compiled.route.match
            if compiled.regex is not None:
                self._regex.append(compiled)
                others.append(compiled)
                continue
            if match.path is not None and not compiled.params and compiled.rest_param is None:
                self._literal.setdefault(_literal_key(match.path), []).append(compiled)
                continue
            others.append(compiled)
            is_prefix = match.prefix is not None
            template = match.prefix if is_prefix else match.path
            assert template is not None
            node = self._root
            for segment in _template_segments(template, is_prefix):
                parsed = _param(segment)
                if parsed is None:
                    node = node.literal.setdefault(segment, _Node())
                elif parsed[1] == "path":
                    break
                else:
                    child = node.param_kinds.get(parsed[1])
                    if child is None:
                        child = node.param_kinds[parsed[1]] = _Node()
                        node.params.append((_CHECKS[parsed[1]], child))
                    node = child
            if is_prefix:
                node.prefix.append(compiled)
            elif compiled.rest_param is not None:
                node.rest.append(compiled)
            else:
                node.exact.append(compiled)
        for routes_here in self._literal.values():
            routes_here.sort(key=_rank)
        self._regex.sort(key=_rank)
        self._sort(self._root)
        # A literal route whose (priority, host) rank is at least as good as every other
        # route's beats them all (a template or prefix matching the same path has fewer
        # literals): then a literal hit needs no trie walk.
        self._literal_head = min((compiled.rank[:3] for compiled in others), default=None)

    def _sort(self, node: _Node) -> None:
        node.exact.sort(key=_rank)
        node.rest.sort(key=_rank)
        node.prefix.sort(key=_rank)
        for child in node.literal.values():
            self._sort(child)
        for _, child in node.params:
            self._sort(child)

    def find(self, method: str, segments: list[str],
             context: MatchContext | None = None) -> CompiledRoute | None:
        """The best route for this method, (decoded, normalised) path and request context."""
        best: CompiledRoute | None = None
        literal = self._literal.get("/" + "/".join(segments))
        if literal is not None:
            for compiled in literal:
                if compiled.accepts(method, context):
                    best = compiled
                    break
            if best is not None and (self._literal_head is None
                                     or best.rank[:3] <= self._literal_head):
                return best
        for compiled in self._path_candidates(segments):
            if (best is None or compiled.rank < best.rank) and compiled.accepts(method, context):
                best = compiled
        return best

    def allowed_methods(self, segments: list[str],
                        context: MatchContext | None = None) -> list[str]:
        """Methods some route accepts for this path and context (for 405 Allow); empty when
        none match."""
        methods: set[str] = set()
        for compiled in self._literal.get("/" + "/".join(segments), ()):
            if compiled.applies(context):
                methods |= compiled.methods
        for compiled in self._path_candidates(segments):
            if compiled.applies(context):
                methods |= compiled.methods
        return sorted(methods)

    def _path_candidates(self, segments: list[str]) -> Iterator[CompiledRoute]:
        """Non-literal routes whose path matches (in no particular order)."""
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        count = len(segments)
        while stack:
            node, depth = stack.pop()
            yield from node.prefix
            if depth == count:
                yield from node.exact
                continue
            segment = segments[depth]
            if node.rest and segment:
                yield from node.rest
            child = node.literal.get(segment)
            if child is not None:
                stack.append((child, depth + 1))
            for check, param_child in node.params:
                if check(segment):
                    stack.append((param_child, depth + 1))
        if self._regex:
            path = "/" + "/".join(segments)
            for compiled in self._regex:
                assert compiled.regex is not None
                if path.startswith(compiled.regex_prefix) and compiled.regex.fullmatch(path):
                    yield compiled


def _literal_key(path: str) -> str:
    return "/" + "/".join(_template_segments(path, prefix=False))


def _rank(compiled: CompiledRoute) -> tuple[int, ...]:
    return compiled.rank


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
        router = self.router
        context = MatchContext.of(ex.request, ex.query) if router.conditional else None
        route = router.find(method, decoded, context)
        if route is None:
            allowed = router.allowed_methods(decoded, context)
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
