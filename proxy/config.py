"""The gateway configuration: a declarative YAML file validated by pydantic.

`load_config(path)` interpolates `${VAR}` / `${VAR:-default}` from the environment, parses the
YAML and validates it; any problem raises `ConfigError` whose message names the file, the path
inside it and what was expected.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.aggregate import AggregateConfig, check_aggregate_references
from proxy.auth.config import Access, Auth, Cors, RouteAuth, RouteAuthz, check_references
from proxy.balancing import Balancing, Target
from proxy.cache import CacheConfig
from proxy.health import HealthCheck, OutlierDetection
from proxy.limits import RouteLimits
from proxy.policy import Mode, Policy
from proxy.resilience import CircuitBreakerConfig, Retry, RouteTimeouts
from proxy.tls import ListenerTls, UpstreamTls
from proxy.tracing import TracingConfig
from proxy.transform import TransformConfig, check_transform_references

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ROUTE_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PARAM_TYPES = ("str", "int", "uuid", "path")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Timeouts(_Strict):
    connect_s: float = Field(default=2.0, gt=0, le=300)
    read_s: float = Field(default=30.0, gt=0, le=3600)
    total_s: float = Field(default=60.0, gt=0, le=3600)


class Upstream(_Strict):
    url: Annotated[str | None, Field(description="Base URL, e.g. http://127.0.0.1:9001 "
                                                  "(or `targets` for a pool)")] = None
    targets: list[Target] = Field(default_factory=list, description="A pool of instances.")
    balancing: Balancing = Field(default_factory=Balancing)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_connections: int = Field(default=256, gt=0, le=100_000)
    max_connections_per_target: int = Field(default=0, ge=0, le=100_000,
                                            description="0: only max_connections applies.")
    keepalive_s: float = Field(default=60.0, gt=0, le=3600)
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    tls: UpstreamTls | None = Field(default=None, description="https targets: verified by "
                                    "default; ca_file, client cert, verify: false.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", value):
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/") if value is not None else None

    @model_validator(mode="after")
    def _url_or_targets(self) -> Upstream:
        if (self.url is None) == (not self.targets):
            raise ValueError("set exactly one of `url` or `targets`")
        return self

    def target_list(self) -> list[Target]:
        return [Target(url=self.url)] if self.url is not None else list(self.targets)


class RouteMatch(_Strict):
    path: str | None = Field(default=None, description="A template such as /orders/{id} or "
                             "/orders/{id:int}; types str (default), int, uuid, and path "
                             "(last segment only: the rest of the path).")
    prefix: str | None = Field(default=None, description="Matches this path and everything below.")
    regex: str | None = Field(default=None, max_length=1000, description="A regular expression "
                              "the whole normalised, decoded path must match (anchored).")
    template: str | None = Field(default=None, max_length=1000, description="The http_route "
                                 "recorded for a regex route (default: the regex itself).")
    hosts: list[str] = Field(default_factory=list, description="Host header: exact "
                             "(api.example.com) or wildcard (*.example.com); empty = any.")
    headers: dict[str, str | bool] = Field(default_factory=dict, description="Header "
                                           "conditions: a string = that exact value, "
                                           "true = present, false = absent.")
    query: dict[str, str | bool] = Field(default_factory=dict, description="Query parameter "
                                         "conditions, as for `headers`.")

    @field_validator("headers", "query", mode="before")
    @classmethod
    def _numbers_as_text(cls, value: Any) -> Any:
        if isinstance(value, dict):  # `X-Api-Version: 2` in YAML means the text "2"
            return {key: str(item) if isinstance(item, int | float) and
                    not isinstance(item, bool) else item for key, item in value.items()}
        return value

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        hosts = [host.strip().lower().rstrip(".") for host in value]
        for host in hosts:
            if not _HOST.match(host):
                raise ValueError(f"{host!r} is not a host name (or *.domain wildcard)")
        return hosts

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str | bool]) -> dict[str, str | bool]:
        for name in value:
            if not _TOKEN.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> RouteMatch:
        if sum(value is not None for value in (self.path, self.prefix, self.regex)) != 1:
            raise ValueError("set exactly one of `path`, `prefix` or `regex`")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"`regex` does not compile: {exc}") from None
            return self
        if self.template is not None:
            raise ValueError("`template` names a regex route's http_route; only with `regex`")
        value = self.path if self.path is not None else self.prefix
        assert value is not None
        if not value.startswith("/"):
            raise ValueError("`path`/`prefix` must start with '/'")
        segments = value.split("/")
        for index, segment in enumerate(segments):
            if not (segment.startswith("{") and segment.endswith("}") and len(segment) > 2):
                continue
            kind = segment[1:-1].partition(":")[2]
            if kind and kind not in _PARAM_TYPES:
                raise ValueError(f"parameter {segment}: unknown type {kind!r} (one of "
                                 f"{', '.join(_PARAM_TYPES)})")
            if kind == "path" and (self.prefix is not None or index != len(segments) - 1):
                raise ValueError(f"parameter {segment}: a path parameter must be the last "
                                 "segment of a `path`")
        return self

    def param_names(self) -> set[str]:
        """The names of the path template's parameters (typed or not)."""
        value = self.path if self.path is not None else self.prefix
        return {segment[1:-1].partition(":")[0] for segment in (value or "").split("/")
                if segment.startswith("{") and segment.endswith("}") and len(segment) > 2}


class Route(_Strict):
    id: str
    match: RouteMatch
    methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH",
                                                        "DELETE", "OPTIONS"])
    upstream: str
    strip_prefix: bool = False
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000, description="Higher is "
                          "tried first, before specificity (docs/data-plane.md).")
    timeouts: RouteTimeouts | None = Field(default=None,
                                           description="Overrides the upstream's timeouts.")
    retry: Retry | None = None
    max_in_flight: int | None = Field(default=None, gt=0, le=1_000_000,
                                      description="Beyond this, 503 with Retry-After.")
    limits: RouteLimits | None = None
    auth: RouteAuth | None = Field(default=None, description="Credentials accepted; None = "
                                                             "no authentication.")
    authz: RouteAuthz | None = Field(default=None, description="Scopes and IP lists.")
    cors: Cors | None = Field(default=None, description="CORS; preflights answered here.")
    cache: CacheConfig | None = Field(default=None, description="GET/HEAD response cache.")
    transform: TransformConfig | None = Field(default=None, description="Header, path, "
                                              "query and JSON body rewriting.")
    aggregate: AggregateConfig | None = Field(default=None, description="Call several "
                                              "backends, merge their JSON (`upstream` is "
                                              "their default upstream).")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ROUTE_ID.match(value):
            raise ValueError("must be 1-100 characters of letters, digits and ._-")
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        upper = [method.upper() for method in value]
        unknown = sorted(set(upper) - _HTTP_METHODS)
        if unknown:
            raise ValueError(f"unknown HTTP method(s) {unknown}")
        return upper

    @property
    def template(self) -> str:
        """The route template recorded as `http_route` in events."""
        if self.match.path is not None:
            return self.match.path
        if self.match.regex is not None:
            return self.match.template or self.match.regex
        assert self.match.prefix is not None
        return self.match.prefix.rstrip("/") + "/*"


class Identity(_Strict):
    client_id_header: str = Field(
        default="X-Client-Id",
        description="Header that names the client when the route has no authentication. "
                    "It is an unverified claim; authenticated principals take precedence.")
    trusted_proxies: list[str] = Field(default_factory=list,
                                       description="CIDRs whose X-Forwarded-For is believed.")


class Events(_Strict):
    enabled: bool = True
    batch_size: int = Field(default=500, gt=0, le=100_000)
    flush_interval_ms: int = Field(default=200, gt=0, le=60_000)
    buffer_max: int = Field(default=100_000, gt=0, le=10_000_000,
                            description="Events held while Redis is unreachable; then dropped.")
    stream_maxlen: int = Field(
        default=10_000, gt=0,
        description="Approximate bound on the stream's length in entries (one entry per "
                    "batch): at most ~460 MB of Redis per 1,000 full entries of 500 events.")
    redact_query_params: list[str] = Field(default_factory=lambda: [
        "api_key", "apikey", "key", "token", "access_token", "id_token", "refresh_token",
        "password", "passwd", "secret", "client_secret", "signature", "sig", "code", "auth"])


class RateLimit(_Strict):
    fail_mode: Literal["open", "closed"] = Field(
        default="open", description="Redis unreachable: open = local limiter, closed = 503.")
    expected_replicas: int = Field(default=1, gt=0, le=10_000,
                                   description="Local fallback divides limits by this.")
    policy_refresh_s: float = Field(default=1.0, gt=0, le=60,
                                    description="Safety-net poll of the policy version.")
    policies: list[Policy] = Field(default_factory=list,
                                   description="Baseline policies seeded into Redis at start.")
    backend: Literal["redis", "local", "hybrid"] = Field(
        default="redis", description="redis: one atomic script per check; hybrid: tokens "
                                     "reserved from Redis in batches; local: per worker only.")
    hybrid_batch: int = Field(default=10, gt=0, le=1000,
                              description="Tokens a worker reserves at once in hybrid mode.")
    legacy_headers: bool = Field(default=False,
                                 description="Also send X-RateLimit-Limit/Remaining/Reset.")

    @field_validator("policies")
    @classmethod
    def _unique_ids(cls, value: list[Policy]) -> list[Policy]:
        seen: set[str] = set()
        for policy in value:
            if policy.id in seen:
                raise ValueError(f"duplicate policy id {policy.id!r}")
            seen.add(policy.id)
        return value


class GatewayConfig(_Strict):
    version: Literal[1] = 1
    upstreams: dict[str, Upstream]
    routes: list[Route] = Field(min_length=1)
    identity: Identity = Field(default_factory=Identity)
    events: Events = Field(default_factory=Events)
    ratelimit: RateLimit = Field(default_factory=RateLimit)
    auth: Auth = Field(default_factory=Auth)
    access: Access = Field(default_factory=Access, description="Global IP allow/deny lists.")
    tls: ListenerTls | None = Field(default=None, description="Terminate TLS on the listener.")
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        ids: set[str] = set()
        for index, route in enumerate(self.routes):
            if route.id in ids:
                raise ValueError(f"routes[{index}].id {route.id!r} is used twice")
            ids.add(route.id)
            if route.upstream not in self.upstreams:
                raise ValueError(f"routes[{index}].upstream {route.upstream!r} is not one of "
                                 f"the upstreams {sorted(self.upstreams)}")
        for index, policy in enumerate(self.ratelimit.policies):
            if policy.route_id != "*" and policy.route_id not in ids:
                raise ValueError(f"ratelimit.policies[{index}].route_id {policy.route_id!r} "
                                 "names no route")
        check_references(self.routes, self.auth)
        check_transform_references(self.routes)
        check_aggregate_references(self.routes, self.upstreams)
        return self

    def route(self, route_id: str) -> Route | None:
        return next((route for route in self.routes if route.id == route_id), None)

    def enforced_policy_count(self) -> int:
        return sum(policy.mode is Mode.ENFORCE for policy in self.ratelimit.policies)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message says where and why."""


def interpolate(text: str, environ: Mapping[str, str], source: str) -> str:
    """Replace ${VAR} and ${VAR:-default}; an unset ${VAR} without default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        line = text.count("\n", 0, match.start()) + 1
        raise ConfigError(f"{source}:{line}: environment variable {name} is not set and "
                          f"${{{name}}} has no default (write ${{{name}:-value}})")

    return _ENV_REF.sub(replace, text)


def _format_location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def parse_config(text: str, source: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> GatewayConfig:
    expanded = interpolate(text, os.environ if environ is None else environ, source)
    try:
        document: Any = yaml.safe_load(expanded)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a gateway config") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, "
                          f"got {type(document).__name__}")
    try:
        return GatewayConfig.model_validate(document)
    except ValidationError as exc:
        lines = [f"{source}: {exc.error_count()} problem(s):"]
        for error in exc.errors():
            lines.append(f"  {_format_location(error['loc'])}: {error['msg']}"
                         + (f" (got {error['input']!r})"
                            if error["type"] not in ("missing",) and
                            not isinstance(error["input"], dict | list) else ""))
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc
    return parse_config(text, str(file), environ)


def config_version(config: GatewayConfig) -> str:
    """A short content hash identifying this configuration."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
