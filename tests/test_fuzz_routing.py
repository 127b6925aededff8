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
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Route
from proxy.routing import PathError, Router, split_path

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
