"""Deployment settings shared by every process, read from `APIGW_*` environment variables.

Each process builds exactly one settings object (`ProxySettings`, `ControlPlaneSettings`, ...)
that extends `CommonSettings`.

Redis TLS and AUTH live in `APIGW_REDIS_URL` itself, so every process (and redis-py's
`from_url`) reads them the same way: `rediss://user:password@host:6379/0?ssl_ca_certs=/ca.pem`
(plus `ssl_certfile`/`ssl_keyfile` for a client certificate). The URL is checked here so a
mistake is a clear start-up error rather than a connection that fails later. Validation errors
never echo the input (`hide_input_in_errors`): the URL and DSN may hold passwords.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REDIS_TLS_FILES: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_REDIS_CERT_REQS: Final = ("required", "optional", "none")


def default_data_dir() -> Path:
    return Path.cwd() / "var"


def check_redis_url(value: str) -> str:
    """The scheme, and the TLS options of the query string: files that exist, only with
    rediss://. Messages never include the URL (it may hold a password)."""
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    query = parse_qs(urlsplit(value).query)
    tls_options = sorted(name for name in query if name.startswith("ssl_"))
    if tls_options and not value.startswith("rediss://"):
        raise ValueError(f"{', '.join(tls_options)} only apply to a rediss:// (TLS) URL")
    for name in _REDIS_TLS_FILES:
        for path in query.get(name, []):
            if not Path(path).is_file():
                raise ValueError(f"{name}={path}: no such file")
    for reqs in query.get("ssl_cert_reqs", []):
        if reqs not in _REDIS_CERT_REQS:
            raise ValueError(f"ssl_cert_reqs={reqs}: use one of {', '.join(_REDIS_CERT_REQS)}")
    return value


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APIGW_", extra="ignore",
                                      hide_input_in_errors=True)

    data_dir: Path = Field(default_factory=default_data_dir,
                           description="Where embedded state lives (chDB store, Redis files).")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0",
                           description="Redis for policies, rate-limit state and the event stream: "
                                       "redis://[user:password@]host:port/db, or rediss://... "
                                       "?ssl_ca_certs=/path/ca.pem for TLS.")
    clickhouse_dsn: str = Field(default="",
                                description="ClickHouse DSN: http(s)://user:pass@host:8123/db or "
                                            "chdb:///dir. Empty means chdb://<data_dir>/clickhouse.")
    key_prefix: str = Field(default="apigw", description="Prefix of every Redis key.")
    events_stream: str = Field(default="apigw:events", description="Redis Stream of events.")
    log_level: str = "INFO"
    instance: str = Field(default="", description="Name of this instance in events and logs.")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return check_redis_url(value)

    def resolved_clickhouse_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
