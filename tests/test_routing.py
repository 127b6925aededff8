"""Routing: templates, prefixes, priority, methods (405), path normalisation, and a brute-force
reference check on random route tables."""

from __future__ import annotations

import re
import time
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from pydantic import ValidationError

from proxy.config import Route, RouteMatch
from proxy.routing import CompiledRoute, MatchContext, PathError, Router, normal_host, split_path
from tests import test_proxy as _proxy_tests
from tests.test_proxy import GatewayFactory, make_config, read_events

client = _proxy_tests.client  # fixtures
start_gateway = _proxy_tests.start_gateway
upstream = _proxy_tests.upstream


def route(route_id: str, *, path: str | None = None, prefix: str | None = None,
          methods: list[str] | None = None, strip_prefix: bool = False,
          priority: int = 0, **match: Any) -> Route:
    if path is not None:
        match["path"] = path
    if prefix is not None:
        match["prefix"] = prefix
    data: dict[str, Any] = {"id": route_id, "match": match, "upstream": "app",
                            "strip_prefix": strip_prefix, "priority": priority}
    if methods is not None:
        data["methods"] = methods
    return Route.model_validate(data)


def context(host: str = "", headers: dict[str, str] | None = None,
            query: str = "") -> MatchContext:
    return MatchContext(host, CIMultiDict(headers or {}), query)


def find(router: Router, method: str, path: str, ctx: MatchContext | None = None) -> str | None:
    found = router.find(method, split_path(path)[1], ctx)
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


# --- typed parameters, regex, host, headers, query, priority ---------------------------------

def test_typed_parameters() -> None:
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    router = Router([route("by-int", path="/orders/{id:int}"),
                     route("by-uuid", path="/orders/{id:uuid}"),
                     route("by-name", path="/orders/{name}"),
                     route("files", path="/files/{rest:path}"),
                     route("file-one", path="/files/{name:str}")])
    assert find(router, "GET", "/orders/42") == "by-int"
    assert find(router, "GET", f"/orders/{uuid}") == "by-uuid"
    assert find(router, "GET", f"/orders/{uuid.upper()}") == "by-uuid"
    assert find(router, "GET", "/orders/4x2") == "by-name"
    assert find(router, "GET", "/orders/%C2%B2") == "by-name"  # a unicode digit is no int
    assert find(router, "GET", "/files/a") == "file-one"  # one segment beats {x:path}
    assert find(router, "GET", "/files/a/b/c.txt") == "files"
    assert find(router, "GET", "/files/a/") == "files"
    assert find(router, "GET", "/files/") is None
    assert find(router, "GET", "/files") is None
    files = router.find("GET", ["files", "a", "b"])
    assert files is not None
    assert files.path_params(["files", "a%20x", "b"]) == {"rest": "a%20x/b"}
    assert files.template == "/files/{rest:path}"
    only_int = Router([route("by-int", path="/orders/{id:int}", methods=["GET"])])
    assert only_int.allowed_methods(["orders", "x"]) == []  # 404, not 405
    assert only_int.allowed_methods(["orders", "7"]) == ["GET", "HEAD"]


def test_regex_routes_are_anchored_and_name_their_template() -> None:
    router = Router([route("items", regex="^/v[0-9]+/items$", template="/v{n}/items"),
                     route("bare", regex="/raw/[a-z]+"),
                     route("either", regex="/alt|/other"),
                     route("v1-items", path="/v1/items")])
    assert find(router, "GET", "/v2/items") == "items"
    assert find(router, "GET", "/v1/items") == "v1-items"  # a whole-path match beats a regex
    assert find(router, "GET", "/v2/items/x") is None
    assert find(router, "GET", "/x/v2/items") is None
    assert find(router, "GET", "/raw/abc") == "bare"
    assert find(router, "GET", "/raw/abc/d") is None  # anchored without ^ and $
    assert find(router, "GET", "/other") == "either"
    assert find(router, "GET", "/v%32/items") == "items"  # matched on the decoded path
    assert [compiled.template for compiled in router.routes[:2]] == ["/v{n}/items",
                                                                     "/raw/[a-z]+"]


def test_hosts_exact_and_wildcard() -> None:
    router = Router([route("any", prefix="/"),
                     route("wild", prefix="/", hosts=["*.example.com"]),
                     route("deep-wild", prefix="/", hosts=["*.eu.example.com"]),
                     route("api", prefix="/", hosts=["api.example.com", "API2.example.com."])])
    assert find(router, "GET", "/x", context("api.example.com")) == "api"
    assert find(router, "GET", "/x", context("API.Example.COM:8443")) == "api"
    assert find(router, "GET", "/x", context("api2.example.com")) == "api"
    assert find(router, "GET", "/x", context("shop.example.com")) == "wild"
    assert find(router, "GET", "/x", context("a.b.example.com")) == "wild"
    assert find(router, "GET", "/x", context("a.eu.example.com")) == "deep-wild"
    assert find(router, "GET", "/x", context("example.com")) == "any"
    assert find(router, "GET", "/x", context("")) == "any"
    assert find(router, "GET", "/x") == "any"  # no context: conditional routes don't apply
    assert normal_host("[::1]:8080") == "[::1]"
    assert normal_host("Host.Example.:80") == "host.example"


def test_host_route_beats_a_more_specific_path_elsewhere() -> None:
    router = Router([route("health", path="/healthz"),
                     route("tenant", prefix="/", hosts=["t1.example.com"])])
    assert find(router, "GET", "/healthz", context("t1.example.com")) == "tenant"
    assert find(router, "GET", "/healthz", context("other.example.com")) == "health"


def test_header_and_query_conditions_share_a_path() -> None:
    router = Router([route("plain", path="/items"),
                     route("v2", path="/items", headers={"X-Api-Version": 2}),
                     route("traced", path="/items", headers={"x-trace": True}),
                     route("beta", path="/items", query={"beta": "1"}),
                     route("no-cookie", path="/items", query={"nocache": True},
                           headers={"Cookie": False})])
    assert find(router, "GET", "/items", context()) == "plain"
    assert find(router, "GET", "/items", context(headers={"x-api-version": "2"})) == "v2"
    assert find(router, "GET", "/items", context(headers={"X-Api-Version": "3"})) == "plain"
    assert find(router, "GET", "/items", context(headers={"X-Trace": ""})) == "traced"
    assert find(router, "GET", "/items", context(query="a=b&beta=1")) == "beta"
    assert find(router, "GET", "/items", context(query="beta=2")) == "plain"
    assert find(router, "GET", "/items", context(query="nocache")) == "no-cookie"
    assert find(router, "GET", "/items",
                context(headers={"Cookie": "a=1"}, query="nocache")) == "plain"
    multi = CIMultiDict([("X-Api-Version", "1"), ("X-Api-Version", "2")])
    assert find(router, "GET", "/items", MatchContext("", multi, "")) == "v2"


def test_conditions_decide_404_versus_405() -> None:
    router = Router([route("v2-get", path="/items", methods=["GET"],
                           headers={"X-Api-Version": "2"})])
    segments = ["items"]
    assert router.allowed_methods(segments, context()) == []  # no route applies: 404
    matching = context(headers={"X-Api-Version": "2"})
    assert router.find("POST", segments, matching) is None
    assert router.allowed_methods(segments, matching) == ["GET", "HEAD"]  # 405


def test_explicit_priority_first_then_specificity_then_order() -> None:
    router = Router([route("catch-all", prefix="/", priority=10),
                     route("exact", path="/a/b"),
                     route("low", path="/c", priority=-1),
                     route("tmpl", path="/{x}"),
                     route("first", path="/d/{x}"),
                     route("second", path="/d/{y}")])
    assert find(router, "GET", "/a/b") == "catch-all"
    router = Router([route("exact", path="/a/b"), route("low", path="/c", priority=-1),
                     route("tmpl", path="/{x}"), route("first", path="/d/{x}"),
                     route("second", path="/d/{y}")])
    assert find(router, "GET", "/a/b") == "exact"
    assert find(router, "GET", "/c") == "tmpl"  # negative priority loses to a template
    assert find(router, "GET", "/d/1") == "first"


@pytest.mark.parametrize(("match", "message"), [
    ({"path": "/a", "regex": "^/a$"}, "exactly one"),
    ({"path": "/a/{id:float}"}, "unknown type"),
    ({"path": "/a/{rest:path}/b"}, "last segment"),
    ({"prefix": "/a/{rest:path}"}, "last segment"),
    ({"path": "/a", "template": "/a"}, "only with `regex`"),
    ({"regex": "^/a(["}, "does not compile"),
    ({"prefix": "/", "hosts": ["a.*.com"]}, "not a host name"),
    ({"prefix": "/", "hosts": ["exa mple.com"]}, "not a host name"),
    ({"prefix": "/", "headers": {"Bad Header": "1"}}, "not a header name"),
])
def test_match_config_errors(match: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        RouteMatch.model_validate(match)


# --- operation counts with 1,000 routes -------------------------------------------------------

def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count route checks (method + conditions) made by the router."""
    counter = [0]
    original_accepts = CompiledRoute.accepts
    original_applies = CompiledRoute.applies

    def accepts(self: CompiledRoute, method: str, ctx: MatchContext | None) -> bool:
        counter[0] += 1
        return original_accepts(self, method, ctx)

    def applies(self: CompiledRoute, ctx: MatchContext | None) -> bool:
        counter[0] += 1
        return original_applies(self, ctx)

    monkeypatch.setattr(CompiledRoute, "accepts", accepts)
    monkeypatch.setattr(CompiledRoute, "applies", applies)
    return counter


def _big_table(size: int) -> list[Route]:
    routes: list[Route] = []
    for i in range(size // 5):
        routes += [route(f"lit{i}", path=f"/static{i}/page"),
                   route(f"tmpl{i}", path=f"/svc{i}/items/{{id:int}}"),
                   route(f"pre{i}", prefix=f"/files{i}"),
                   route(f"host{i}", path=f"/svc{i}/items/{{id:int}}",
                         hosts=[f"t{i}.example.com"]),
                   route(f"hdr{i}", path=f"/static{i}/page", headers={"X-Beta": "1"})]
    return routes


@pytest.mark.parametrize(("path", "host", "expected"), [
    ("/static7/page", "x", "lit7"),
    ("/svc7/items/12", "x", "tmpl7"),
    ("/svc7/items/12", "t7.example.com", "host7"),
    ("/files7/a/b", "x", "pre7"),
    ("/nothing/here", "x", None),
])
def test_thousand_routes_check_only_the_candidates(monkeypatch: pytest.MonkeyPatch, path: str,
                                                   host: str, expected: str | None) -> None:
    small, big = Router(_big_table(50)), Router(_big_table(1000))
    assert len(big.routes) == 1000
    counter = _count_checks(monkeypatch)
    costs = []
    for router in (small, big):
        counter[0] = 0
        assert find(router, "GET", path, context(host)) == expected
        router.allowed_methods(split_path(path)[1], context(host))
        costs.append(counter[0])
    assert costs[0] == costs[1], costs  # independent of the table's size
    assert costs[1] <= 6, costs



# --- through the gateway ----------------------------------------------------------------------

async def test_route_conditions_through_the_gateway(
        upstream: str, start_gateway: GatewayFactory, client: aiohttp.ClientSession) -> None:
    routes = [
        {"id": "order", "match": {"path": "/orders/{id:int}"}, "methods": ["GET"],
         "upstream": "app"},
        {"id": "order-v2", "match": {"path": "/orders/{id:int}",
                                     "headers": {"X-Api-Version": "2"}},
         "methods": ["GET"], "upstream": "app"},
        {"id": "tenant", "match": {"prefix": "/", "hosts": ["*.tenants.test"]},
         "methods": ["GET"], "upstream": "app"},
        {"id": "items", "match": {"regex": "^/echo/v[0-9]+$", "template": "/echo/v{n}"},
         "upstream": "app"},
    ]
    gw = await start_gateway(make_config(upstream, routes=routes))
    cases = [("/orders/7", {}, 200), ("/orders/7", {"X-Api-Version": "2"}, 200),
             ("/orders/x", {}, 404), ("/orders/x", {"Host": "a.tenants.test"}, 200),
             ("/echo/v3", {}, 200)]
    for path, headers, status in cases:
        async with client.get(f"{gw.url}{path}", headers=headers) as response:
            assert response.status == status, (path, headers)
    async with client.post(f"{gw.url}/orders/7", headers={"X-Api-Version": "2"}) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
    events = await read_events(gw.redis, len(cases) + 1)
    seen = [(event["route_id"], event["http_route"]) for event in events]
    assert seen == [("order", "/orders/{id:int}"), ("order-v2", "/orders/{id:int}"),
                    ("", ""), ("tenant", "/*"), ("items", "/echo/v{n}"), ("", "")]
