"""Deployment settings shared by every process, read from `APIGW_*` environment variables.

Each process builds exactly one settings object (`ProxySettings`, `ControlPlaneSettings`, ...)
that extends `CommonSettings`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.cwd() / "var"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APIGW_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir,
                           description="Where embedded state lives (chDB store, Redis files).")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0",
                           description="Redis for policies, rate-limit state and the event stream.")
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
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    def resolved_clickhouse_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
