"""IP lists (v4, v6, mapped), scope requirements and config checks of auth/authz."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.auth.config import Cors, RouteAuthz
from proxy.authz import CorsStep, IpAccessStep, IpFilter, ScopeStep
from proxy.config import ConfigError, load_config, parse_config
from proxy.routing import Router

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_ip_filter_v4_v6_and_deny_first() -> None:
    both = IpFilter(["10.0.0.0/8", "2001:db8::/32"], ["10.6.6.0/24", "2001:db8:bad::/48"])
    assert both.admits("10.1.2.3")
    assert not both.admits("10.6.6.7")  # deny wins over allow
    assert not both.admits("192.168.1.1")  # not in the allow list
    assert both.admits("2001:db8::1")
    assert not both.admits("2001:db8:bad::1")
    assert both.admits("::ffff:10.1.2.3")  # IPv4-mapped IPv6 is the IPv4 address
    assert not both.admits("not-an-ip")
    deny_only = IpFilter([], ["127.0.0.0/8"])
    assert not deny_only.admits("127.0.0.1")
    assert deny_only.admits("::1")
    assert deny_only.admits("garbage")  # an open list lets unparseable peers through
    assert not IpFilter([], [])


def test_scope_requirements_per_method() -> None:
    step = ScopeStep()
    authz = RouteAuthz(scopes=["a"], method_scopes={"post": ["b"]})
    assert step.required("r", "GET", authz) == {"a"}
    assert step.required("r", "POST", authz) == {"a", "b"}
    assert step.required("x", "GET", None) == frozenset()


def test_steps_are_in_the_chain_only_when_the_config_uses_them() -> None:
    def config(route_extra: str = "", top: str = "") -> str:
        return f"""
version: 1
upstreams: {{app: {{url: "http://127.0.0.1:1"}}}}
routes:
  - {{id: plain, match: {{prefix: /a}}, upstream: app}}
  - {{id: r, match: {{prefix: /}}, upstream: app{route_extra}}}
{top}"""

    def chain(text: str) -> list[type]:
        parsed = parse_config(text, "t.yaml", environ={})
        router = Router(parsed.routes)
        return [type(step) for step in (
            *CorsStep.when_used(router, parsed.routes),
            *IpAccessStep.when_used(parsed.access, parsed.routes),
            *ScopeStep.when_used(parsed.auth.realm, parsed.routes))]

    assert chain(config()) == []
    assert chain(config(", authz: {ip_deny: [10.0.0.0/8]}")) == [IpAccessStep]
    assert chain(config(top="access: {ip_allow: [127.0.0.0/8]}")) == [IpAccessStep]
    assert chain(config(", authz: {scopes: [read]}")) == [ScopeStep]
    assert chain(config(", authz: {method_scopes: {post: [write]}}")) == [ScopeStep]
    assert chain(config(", cors: {allow_origins: ['https://a.example']}")) == [CorsStep]


def test_bad_auth_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not an IPv4/IPv6"):
        RouteAuthz(ip_deny=["10.0.0.300/8"])
    with pytest.raises(ValueError, match="allow_credentials"):
        Cors(allow_origins=["*"], allow_credentials=True)
    text = """
version: 1
upstreams: {app: {url: "http://127.0.0.1:1"}}
routes:
  - {id: r, match: {prefix: /}, upstream: app, auth: {methods: [jwt], issuers: [nope]}}
auth: {jwt: {a: {issuer: x, algorithms: [HS256], secret: s3cr3t-s3cr3t-s3cr3t-s3cr3t-xx}}}
"""
    with pytest.raises(ConfigError, match=r"issuers \['nope'\] are not in auth.jwt"):
        parse_config(text, "t.yaml", environ={})
    without_issuers = text.split("auth: {jwt")[0].replace(", issuers: [nope]", "")
    with pytest.raises(ConfigError, match=r"accepts jwt but auth\.jwt names no issuer"):
        parse_config(without_issuers, "t.yaml", environ={})


def test_example_auth_config_is_valid_and_secrets_are_redacted() -> None:
    config = load_config(EXAMPLES / "auth.yaml", environ={})
    assert config.route("orders-get") is not None
    dumped = config.model_dump_json()
    assert "demo-secret-change-me" not in dumped  # SecretStr: never in /config or hashes
    assert "demo-pepper-change-me" not in dumped
