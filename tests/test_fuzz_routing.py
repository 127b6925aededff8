"""Fuzzing path normalisation and route matching against references written apart from
proxy/routing.py: RFC 3986 dot-segment removal on the decoded path, and a regex per route.

The security property: whatever raw path a client sends, the route chosen is the one its
normalised path matches, and the path forwarded upstream - read back the way an upstream
reads it (percent-decoded, dot segments resolved) - is that same normalised path, so it
never lands outside what the route allows.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote, urlencode

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config import Route
from proxy.routing import MatchContext, PathError, Router, split_path

SEGMENTS = ["a", "b", "x", "", ".", "..", "%2e", "%2E%2e", ".%2e", "%61", "a%20b", "%7E", "~",
            "%252e", "{", "%", "%zz", "..."]


def reference_normal(raw: str) -> str:
    """Decode, collapse repeated slashes, remove dot segments (never above the root); a path
    ending in '/', '/.' or '/..' keeps a trailing slash."""
    collapsed = re.sub("/+", "/", unquote(raw))
    normal = posixpath.normpath(collapsed)
    if normal != "/" and re.search(r"/(\.{1,2})?$", collapsed):
        normal += "/"
    return normal


ROUTES = [
    Route.model_validate({"id": "a-prefix", "match": {"prefix": "/a"}, "upstream": "u"}),
    Route.model_validate({"id": "ab-prefix", "match": {"prefix": "/a/b"}, "upstream": "u"}),
    Route.model_validate({"id": "x-item", "match": {"path": "/x/{id}"}, "upstream": "u"}),
    Route.model_validate({"id": "x-exact", "match": {"path": "/x/a"}, "upstream": "u"}),
    Route.model_validate({"id": "strip", "match": {"prefix": "/b"}, "upstream": "u",
                          "strip_prefix": True}),
]
ROUTER = Router(ROUTES)


def reference_route(normal: str) -> str | None:
    if normal == "/x/a":
        return "x-exact"
    if re.fullmatch(r"/x/[^/]+", normal):
        return "x-item"
    for stem, route_id in (("/a/b", "ab-prefix"), ("/a", "a-prefix"), ("/b", "strip")):
        if normal == stem or normal.startswith(stem + "/"):
            return route_id
    return None


raw_paths = st.lists(st.sampled_from(SEGMENTS), max_size=7).map(lambda s: "/" + "/".join(s))


@settings(max_examples=1500, deadline=None)
@given(raw=raw_paths)
def test_normalisation_and_routing_agree_with_the_references(raw: str) -> None:
    try:
        encoded, decoded = split_path(raw)
    except PathError:
        assert "%2f" in raw.lower() or "%00" in raw
        return
    normal = "/" + "/".join(decoded)
    assert normal == reference_normal(raw), (raw, decoded)
    found = ROUTER.find("GET", decoded)
    assert (found.id if found else None) == reference_route(normal), (raw, normal)
    if found is None:
        return
    upstream_path = found.upstream_path(encoded)
    as_upstream_reads_it = reference_normal(upstream_path)
    if found.strip_segments:  # /b/rest goes upstream as /rest
        rebuilt = reference_normal("/b" + upstream_path)
        assert rebuilt.rstrip("/") == normal.rstrip("/"), (raw, upstream_path)
    else:
        assert as_upstream_reads_it == normal, (raw, upstream_path)
        assert reference_route(as_upstream_reads_it) == found.id


@settings(max_examples=300, deadline=None)
@given(raw=st.text(alphabet=st.characters(codec="utf-8"), max_size=60).map(lambda t: "/" + t))
def test_any_path_is_normalised_or_refused(raw: str) -> None:
    try:
        _, decoded = split_path(raw)
    except PathError:
        return
    for segment in decoded:
        assert segment not in (".", ".."), (raw, decoded)
        assert "/" not in segment, (raw, decoded)
    ROUTER.find("GET", decoded)


# --- conditions, typed parameters, regex and priority against a linear reference --------------

_HOSTS = ["a.example.com", "b.example.com", "x.a.example.com", "example.com"]
_HOST_SPECS = st.lists(st.sampled_from(["a.example.com", "*.example.com", "*.a.example.com"]),
                       max_size=2, unique=True)
_COND = st.dictionaries(st.sampled_from(["v", "w"]), st.sampled_from(["1", "2", True, False]),
                        max_size=2)
_SEG = st.sampled_from(["a", "7", "{p}", "{n:int}", "{u:uuid}"])
_UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@st.composite
def _route_spec(draw: st.DrawFn, index: int) -> Route:
    kind = draw(st.sampled_from(["path", "prefix", "regex", "rest"]))
    segments = draw(st.lists(_SEG, max_size=3))
    match: dict[str, object] = {}
    if kind == "path":
        match["path"] = "/" + "/".join(segments)
    elif kind == "rest":
        match["path"] = "/" + "/".join([*segments, "{r:path}"])
    elif kind == "prefix":
        match["prefix"] = "/" + "/".join(segments)
    else:
        match["regex"] = draw(st.sampled_from(["/a/[0-9]+", "^/7.*$", "/a|/7/a", "/a?"]))
    match["hosts"] = draw(_HOST_SPECS)
    match["headers"] = draw(_COND)
    match["query"] = draw(_COND)
    return Route.model_validate({
        "id": f"r{index}", "match": match, "upstream": "u",
        "methods": draw(st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2,
                                 unique=True)),
        "priority": draw(st.sampled_from([0, 0, 0, 1, -1]))})


def _segment_pattern(segment: str) -> tuple[str, bool, bool]:
    """(regex, is a parameter, is typed) for one template segment."""
    return {"{p}": ("[^/]+", True, False), "{n:int}": ("[0-9]+", True, True),
            "{u:uuid}": ("(?i:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
                         True, True),
            "{r:path}": ("[^/]+(/.*)?", True, False)}.get(segment,
                                                       (re.escape(segment), False, False))


def _reference_rank(item: Route, normal: str, host: str, headers: dict[str, str],
                    query: dict[str, str], order: int) -> tuple[int, ...] | None:
    """The documented rules, as a linear scan; None when the route does not apply."""
    match = item.match
    for name, required, wanted_of in (("h", match.headers, headers),
                                      ("q", match.query, query)):
        for key, wanted in required.items():
            present = key.lower() in wanted_of if name == "h" else key in wanted_of
            value = wanted_of.get(key.lower() if name == "h" else key)
            if (wanted is True and not present) or (wanted is False and present):
                return None
            if isinstance(wanted, str) and value != wanted:
                return None
    if match.hosts:
        if not any(host == spec or (spec.startswith("*.") and host.endswith(spec[1:])
                   and host != spec[2:]) for spec in match.hosts):
            return None
        wild = [spec for spec in match.hosts if spec.startswith("*.")]
        host_rank = (1, -min(map(len, wild))) if wild else (0, 0)
    else:
        host_rank = (2, 0)
    conditions = -(len(match.headers) + len(match.query))
    if match.regex is not None:
        if not re.fullmatch(match.regex, normal):
            return None
        return (-item.priority, *host_rank, 1, 0, 0, 0, conditions, order)
    template = match.path if match.path is not None else match.prefix
    assert template is not None
    parts = [part for part in template.split("/") if part]
    patterns = [_segment_pattern(part) for part in parts]
    body = "".join("/" + pattern for pattern, _, _ in patterns)
    typed = sum(is_typed for _, _, is_typed in patterns)
    if match.prefix is not None:
        if not re.fullmatch(body + "(/.*)?", normal) and not (body == "" and normal == "/"):
            return None
        return (-item.priority, *host_rank, 2, -len(parts), 0, -typed, conditions, order)
    if not re.fullmatch(body or "/", normal):
        return None
    literals = sum(not is_param for _, is_param, _ in patterns)
    rest = int(template.endswith("{r:path}"))
    return (-item.priority, *host_rank, 0, -literals, rest, -typed, conditions, order)


@settings(max_examples=600, deadline=None)
@given(data=st.data(), size=st.integers(min_value=1, max_value=10),
       request_segments=st.lists(st.sampled_from(["a", "7", "b", _UUID]), max_size=4),
       host=st.sampled_from(_HOSTS),
       headers=st.dictionaries(st.sampled_from(["v", "w"]), st.sampled_from(["1", "2"]),
                               max_size=2),
       query=st.dictionaries(st.sampled_from(["v", "w"]), st.sampled_from(["1", "2"]),
                             max_size=2),
       method=st.sampled_from(["GET", "HEAD", "POST", "PUT"]))
def test_conditions_and_priority_agree_with_a_linear_reference(
        data: st.DataObject, size: int, request_segments: list[str], host: str,
        headers: dict[str, str], query: dict[str, str], method: str) -> None:
    routes = [data.draw(_route_spec(index)) for index in range(size)]
    router = Router(routes)
    path = "/" + "/".join(request_segments)
    normal = "/" + "/".join(split_path(path)[1])
    context = MatchContext(host.upper(), CIMultiDict({key.upper(): value
                                                      for key, value in headers.items()}),
                           urlencode(query))
    applicable = []
    for order, item in enumerate(routes):
        rank = _reference_rank(item, normal, host, headers, query, order)
        if rank is not None:
            methods = set(item.methods) | ({"HEAD"} if "GET" in item.methods else set())
            applicable.append((rank, item.id, methods))
    fitting = sorted((rank, route_id) for rank, route_id, methods in applicable
                     if method in methods)
    found = router.find(method, split_path(path)[1], context)
    assert (found.id if found else None) == (fitting[0][1] if fitting else None)
    allowed = sorted(set().union(*(methods for _, _, methods in applicable)))
    assert router.allowed_methods(split_path(path)[1], context) == allowed
