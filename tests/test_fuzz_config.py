"""Fuzzing the config loader: whatever the file holds, the answer is a GatewayConfig or a
ConfigError that says where and why - never another exception, never a hang."""

from __future__ import annotations

import time
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, GatewayConfig, parse_config

KEYS = ["version", "upstreams", "routes", "identity", "events", "ratelimit", "url", "timeouts",
        "connect_s", "read_s", "total_s", "max_connections", "id", "match", "path", "prefix",
        "methods", "upstream", "strip_prefix", "client_id_header", "trusted_proxies", "enabled",
        "batch_size", "flush_interval_ms", "buffer_max", "stream_maxlen", "redact_query_params",
        "fail_mode", "expected_replicas", "policy_refresh_s", "policies", "key_by", "limit",
        "window_s", "burst", "mode", "route_id", "expires_at", "app", "auth", "jwt", "api_keys"]

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["GET", "POST", "/a", "/a/{id}", "http://127.0.0.1:1", "open", "closed",
                     "enforce", "shadow", "off", "client_id", "ip", "${HOME}", "${NOPE}",
                     "${X:-http://h}", "::1/128", "10.0.0.0/8", "not-a-cidr", "0", "1e309"]))

DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children,
                        max_size=6)),
    max_leaves=30)

VALID: dict[str, Any] = {
    "version": 1,
    "upstreams": {"app": {"url": "http://127.0.0.1:9001"}},
    "routes": [{"id": "orders", "match": {"path": "/orders/{id}"}, "methods": ["GET"],
                "upstream": "app"}],
    "ratelimit": {"policies": [{"id": "p", "key_by": "client_id", "limit": 10,
                                "window_s": 60}]},
}


def _load(text: str) -> GatewayConfig | None:
    try:
        return parse_config(text, "fuzz.yaml", environ={"HOME": "/root"})
    except ConfigError as exc:
        message = str(exc)
    assert message.startswith("fuzz.yaml"), message  # it says where
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_any_text(text: str) -> None:
    _load(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS)
def test_any_yaml_document(document: Any) -> None:
    _load(yaml.safe_dump(document))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(_paths(VALID)[1:]), junk=DOCUMENTS)
def test_a_valid_config_with_one_part_replaced(where: tuple[Any, ...], junk: Any) -> None:
    document: Any = yaml.safe_load(yaml.safe_dump(VALID))
    parent = document
    for part in where[:-1]:
        parent = parent[part]
    parent[where[-1]] = junk
    _load(yaml.safe_dump(document))


def test_alias_bomb_is_refused_quickly() -> None:
    """'Billion laughs' in YAML: aliases make a tree of 9^9 nodes out of a few lines."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        previous = chr(ord("a") + level - 1)
        name = chr(ord("a") + level)
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    lines.append("routes: *i")
    started = time.monotonic()
    assert _load("\n".join(lines)) is None
    assert time.monotonic() - started < 2.0


def test_deep_nesting_is_refused_without_a_crash() -> None:
    assert _load("routes: " + "[" * 5000 + "]" * 5000) is None
    assert _load("routes: " + "{a: " * 2000 + "1" + "}" * 2000) is None
