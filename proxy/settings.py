"""Deployment settings of the proxy process, from `APIGW_*` environment variables."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, PrivateAttr, field_validator, model_validator

from apigw.settings import CommonSettings


def parse_listen(value: str) -> tuple[str, int]:
    """Split "host:port" into its parts; raise ValueError with the expected shape."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


class ProxySettings(CommonSettings):
    config: Path | None = Field(default=None, description="Gateway YAML (APIGW_CONFIG).")
    listen: str = Field(default="127.0.0.1:8080", description="Where clients connect.")
    admin_listen: str = Field(default="127.0.0.1:9090",
                              description="Health, readiness, metrics and config.")
    workers: int = Field(default=1, ge=1, le=256, description="Worker processes sharing listen.")
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600,
                                    description="How long in-flight requests may finish.")
    config_watch_s: float = Field(default=2.0, ge=0, le=3600,
                                  description="How often the config file is polled for changes "
                                              "(0: SIGHUP only).")
    redis_timeout_s: float = Field(default=0.1, gt=0, le=5,
                                   description="Budget of a Redis call on the hot path: a "
                                               "rate-limit check, a Redis cache lookup.")
    redis_max_connections: int = Field(
        default=512, ge=4, le=100_000,
        description="Redis connections per worker; more concurrent commands wait for one.")
    redis_pool_wait_s: float = Field(
        default=2.0, gt=0, le=60,
        description="Longest wait for a free Redis connection before the command fails.")
    client_header_timeout_s: float = Field(
        default=10.0, ge=0, le=3600,
        description="A connection must send a complete request head this long after it opens "
                    "or starts its next request: else 408 (bytes arrived) or close (0 = off).")
    client_body_timeout_s: float = Field(
        default=30.0, ge=0, le=3600,
        description="Longest pause between reads of a request body before it fails (0 = off).")
    keepalive_timeout_s: float = Field(
        default=75.0, gt=0, le=3600, description="Idle keep-alive connections close after this.")
    max_request_line_bytes: int = Field(
        default=8190, ge=1024, le=1_048_576,
        description="Longest request line the parser reads; longer is 414.")
    max_header_field_bytes: int = Field(
        default=8190, ge=1024, le=1_048_576,
        description="Longest header field (name + value); longer is 431.")
    max_header_fields: int = Field(default=128, ge=16, le=10_000,
                                   description="Most header fields; more is 431.")
    metrics_flush_s: float = Field(
        default=1.0, gt=0, le=60,
        description="How often a worker hands its per-request counts to its metrics; with "
                    "several workers, how far the admin port's /metrics may lag behind.")

    _default_instance: bool = PrivateAttr(default=False)

    @field_validator("listen", "admin_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _name_instance(self) -> ProxySettings:
        if not self.instance:
            self.instance = _instance_name()
            self._default_instance = True
        return self

    def for_worker(self) -> ProxySettings:
        """The settings as seen by a worker process: a defaulted instance name gets its pid."""
        if not self._default_instance:
            return self
        copy = self.model_copy(update={"instance": _instance_name()})
        copy._default_instance = True
        return copy


def _instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
