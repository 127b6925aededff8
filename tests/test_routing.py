"""Routing: templates, prefixes, priority, methods (405), path normalisation, and a brute-force
reference check on random route tables."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Route
from proxy.routing import PathError, Router, split_path


def route(route_id: str, *, path: str | None = None, prefix: str | None = None,
          methods: list[str] | None = None, strip_prefix: bool = False) -> Route:
    match = {"path": path} if path is not None else {"prefix": prefix}
    data: dict[str, Any] = {"id": route_id, "match": match, "upstream": "app",
                            "strip_prefix": strip_prefix}
    if methods is not None:
        data["methods"] = methods
    return Route.model_validate(data)


def find(router: Router, method: str, path: str) -> str | None:
    found = router.find(method, split_path(path)[1])
    return found.id if found else None


# --- normalisation --------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "encoded", "decoded"), [
    ("/", [""], [""]),
    ("/orders/12", ["orders", "12"], ["orders", "12"]),
    ("/orders/12/", ["orders", "12", ""], ["orders", "12", ""]),
    ("//orders///12", ["orders", "12"], ["orders", "12"]),
    ("/a/./b/../c", ["a", "c"], ["a", "c"]),
    ("/../../a", ["a"], ["a"]),
    ("/a/..", [""], [""]),
    ("/a/b/.", ["a", "b", ""], ["a", "b", ""]),
    ("/a/%2e%2E/b", ["b"], ["b"]),
    ("/caf%C3%A9/x%20y", ["caf%C3%A9", "x%20y"], ["café", "x y"]),
])
def test_split_path(raw: str, encoded: list[str], decoded: list[str]) -> None:
    assert split_path(raw) == (encoded, decoded)


@pytest.mark.parametrize("raw", ["/a%2Fb", "/a%2fb/c", "/x%00", "*", "orders"])
def test_split_path_rejects(raw: str) -> None:
    with pytest.raises(PathError):
        split_path(raw)


# --- matching -------------------------------------------------------------------------------

def test_templates_match_one_non_empty_segment() -> None:
    router = Router([route("order", path="/orders/{id}")])
    assert find(router, "GET", "/orders/42") == "order"
    assert find(router, "GET", "/orders/") is None
    assert find(router, "GET", "/orders") is None
    assert find(router, "GET", "/orders/42/items") is None
    found = router.find("GET", ["orders", "a b"])
    assert found is not None
    assert found.path_params(["orders", "a b"]) == {"id": "a b"}


def test_prefix_is_segment_wise() -> None:
    router = Router([route("cat", prefix="/catalog")])
    for path in ("/catalog", "/catalog/", "/catalog/items/7"):
        assert find(router, "GET", path) == "cat", path
    assert find(router, "GET", "/catalogue") is None
    assert find(router, "GET", "/") is None


def test_priority_literal_then_more_literals_then_prefix_length_then_order() -> None:
    router = Router([
        route("root", prefix="/"),
        route("api", prefix="/api"),
        route("api-v1", prefix="/api/v1"),
        route("any-two", path="/{a}/{b}"),
        route("user", path="/api/{id}"),
        route("user-dup", path="/api/{other}"),
        route("me", path="/api/me"),
        route("x-items", path="/{x}/items"),
    ])
    assert find(router, "GET", "/api/me") == "me"
    assert find(router, "GET", "/api/7") == "user"  # more literals than /{a}/{b}; then order
    assert find(router, "GET", "/zzz/items") == "x-items"
    assert find(router, "GET", "/q/r") == "any-two"  # a full path match beats any prefix
    assert find(router, "GET", "/api/v1/deep/path") == "api-v1"
    assert find(router, "GET", "/api/v2/deep/path") == "api"
    assert find(router, "GET", "/elsewhere/a/b") == "root"


def test_methods_head_follows_get_and_405_lists_allowed() -> None:
    router = Router([route("read", path="/orders/{id}", methods=["GET"]),
                     route("write", path="/orders/{id}", methods=["PUT", "DELETE"])])
    assert find(router, "HEAD", "/orders/1") == "read"
    assert find(router, "DELETE", "/orders/1") == "write"
    assert find(router, "POST", "/orders/1") is None
    assert router.allowed_methods(["orders", "1"]) == ["DELETE", "GET", "HEAD", "PUT"]
    assert router.allowed_methods(["nothing"]) == []


def test_method_mismatch_falls_through_to_a_broader_route() -> None:
    router = Router([route("only-get", path="/a/b", methods=["GET"]),
                     route("fallback", prefix="/a")])
    assert find(router, "POST", "/a/b") == "fallback"


def test_trailing_slash_is_significant_for_paths() -> None:
    router = Router([route("plain", path="/a"), route("slash", path="/a/"),
                     route("tmpl-slash", path="/b/{id}/")])
    assert find(router, "GET", "/a") == "plain"
    assert find(router, "GET", "/a/") == "slash"
    assert find(router, "GET", "/b/1/") == "tmpl-slash"
    assert find(router, "GET", "/b/1") is None


def test_upstream_path_keeps_encoding_and_strips_prefix() -> None:
    router = Router([route("api", prefix="/api/", strip_prefix=True),
                     route("raw", prefix="/raw")])
    encoded, decoded = split_path("/api/caf%C3%A9/x")
    found = router.find("GET", decoded)
    assert found is not None
    assert found.upstream_path(encoded) == "/caf%C3%A9/x"
    assert found.upstream_path(split_path("/api")[0]) == "/"
    found = router.find("GET", ["raw", "x"])
    assert found is not None
    assert found.upstream_path(["raw", "x"]) == "/raw/x"


def test_thousand_routes_stay_fast() -> None:
    routes = [route(f"r{i}", path=f"/svc{i}/items/{{id}}") for i in range(1000)]
    routes += [route(f"l{i}", path=f"/static{i}/page") for i in range(1000)]
    big = Router(routes)
    small = Router(routes[:10])
    segments = ["svc5", "items", "77"]

    def cost(router: Router) -> float:
        start = time.perf_counter()
        for _ in range(20_000):
            router.find("GET", segments)
        return time.perf_counter() - start

    small_cost, big_cost = min(cost(small) for _ in range(3)), min(cost(big) for _ in range(3))
    assert find(big, "GET", "/svc999/items/1") == "r999"
    assert big_cost < small_cost * 2.0, (small_cost, big_cost)


# --- brute-force reference ------------------------------------------------------------------

def _reference(routes: list[Route], method: str, path: str) -> tuple[str | None, list[str]]:
    """Linear scan with the documented rules, written independently of the router."""
    _, decoded = split_path(path)
    normal = "/" + "/".join(decoded)
    candidates = []
    for order, item in enumerate(routes):
        methods = set(item.methods) | ({"HEAD"} if "GET" in item.methods else set())
        if item.match.path is not None:
            template = item.match.path
            pattern = "^" + "".join("[^/]+" if re.fullmatch(r"\{\w+\}", part) else
                                    re.escape(part) for part in re.split(r"(\{\w+\})",
                                                                         template)) + "$"
            if re.match(pattern, normal):
                literals = sum(1 for part in template.split("/")
                               if part and not part.startswith("{"))
                candidates.append(((0, -literals, order), item.id, methods))
        else:
            assert item.match.prefix is not None
            stem = item.match.prefix.rstrip("/")
            if normal == stem or normal.startswith(stem + "/"):
                depth = len([part for part in stem.split("/") if part])
                candidates.append(((1, -depth, order), item.id, methods))
    allowed = sorted(set().union(*(methods for _, _, methods in candidates)))
    fitting = sorted((key, route_id) for key, route_id, methods in candidates
                     if method in methods)
    return (fitting[0][1] if fitting else None), allowed


_SEGMENT = st.sampled_from(["a", "b", "{p}", "{q}"])
_PATH_TEMPLATE = st.lists(_SEGMENT, min_size=0, max_size=3).map(lambda s: "/" + "/".join(s))
_PREFIX = st.lists(st.sampled_from(["a", "b"]), max_size=3).map(lambda s: "/" + "/".join(s))
_METHODS = st.lists(st.sampled_from(["GET", "POST", "DELETE"]), min_size=1, max_size=3,
                    unique=True)
_ROUTE = st.one_of(
    st.tuples(st.just("path"), _PATH_TEMPLATE, _METHODS),
    st.tuples(st.just("prefix"), _PREFIX, _METHODS))
_REQUEST_PATH = st.tuples(st.lists(st.sampled_from(["a", "b", "x", "."]), max_size=4),
                          st.booleans()).map(
    lambda t: "/" + "/".join(t[0]) + ("/" if t[1] and t[0] else ""))


@settings(max_examples=500, deadline=None)
@given(specs=st.lists(_ROUTE, min_size=1, max_size=12), path=_REQUEST_PATH,
       method=st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT"]))
def test_router_agrees_with_reference(specs: list[tuple[str, str, list[str]]], path: str,
                                      method: str) -> None:
    routes = [route(f"r{index}", methods=methods,
                    path=template if kind == "path" else None,
                    prefix=template if kind == "prefix" else None)
              for index, (kind, template, methods) in enumerate(specs)]
    router = Router(routes)
    expected, allowed = _reference(routes, method, path)
    assert find(router, method, path) == expected
    assert router.allowed_methods(split_path(path)[1]) == allowed
