"""Gateway config: clear errors (file, path inside it, what was expected), env interpolation,
and the shipped examples load."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
version: 1
upstreams:
  app: {url: "${APP_URL:-http://127.0.0.1:9001}"}
routes:
  - id: orders
    match: {path: "/orders/{id}"}
    methods: [get]
    upstream: app
"""


def test_default_used_when_variable_unset() -> None:
    config = parse_config(GOOD, "gw.yaml", environ={})
    assert config.upstreams["app"].url == "http://127.0.0.1:9001"
    assert config.routes[0].methods == ["GET"]


def test_variable_overrides_default() -> None:
    config = parse_config(GOOD, "gw.yaml", environ={"APP_URL": "http://10.0.0.7:8000/"})
    assert config.upstreams["app"].url == "http://10.0.0.7:8000"


def test_unset_variable_without_default_names_file_and_line() -> None:
    text = "version: 1\nupstreams:\n  app: {url: '${NOPE}'}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml", environ={})
    message = str(info.value)
    assert "gw.yaml:3" in message
    assert "NOPE" in message
    assert "${NOPE:-value}" in message


def test_validation_error_names_path_and_expectation(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text(GOOD.replace("methods: [get]", "methods: [FETCH]")
                    .replace("upstream: app", "upstream: app\n    bogus: 1"))
    with pytest.raises(ConfigError) as info:
        load_config(file, environ={})
    message = str(info.value)
    assert str(file) in message
    assert "routes[0].methods" in message
    assert "FETCH" in message
    assert "routes[0].bogus" in message


def test_unknown_upstream_reference() -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\]\.upstream 'nowhere'"):
        parse_config(GOOD.replace("upstream: app", "upstream: nowhere"), "gw.yaml", environ={})


def test_not_yaml_and_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"gw\.yaml: not valid YAML"):
        parse_config("routes: [", "gw.yaml", environ={})
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config("- 1\n- 2\n", "gw.yaml", environ={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["minimal.yaml", "demo.yaml"])
def test_examples_load(name: str) -> None:
    config = load_config(ROOT / "examples" / name, environ={})
    assert config.events.enabled
    assert config.ratelimit.policies
    assert config.ratelimit.policies[0].key_by == "client_id"


def test_minimal_routes_everything_to_upstream_url() -> None:
    config = load_config(ROOT / "examples" / "minimal.yaml",
                         environ={"UPSTREAM_URL": "http://127.0.0.1:7777"})
    assert config.upstreams["app"].url == "http://127.0.0.1:7777"
    assert [route.template for route in config.routes] == ["/*"]


def test_demo_templates() -> None:
    config = load_config(ROOT / "examples" / "demo.yaml", environ={})
    templates = {(route.methods[0], route.template) for route in config.routes}
    assert ("GET", "/orders/{id}") in templates
    assert ("POST", "/orders") in templates
    assert ("GET", "/catalog/items/{sku}") in templates
