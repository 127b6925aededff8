"""Settings of the collector process (stream -> ClickHouse), from `APIGW_*` variables."""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator

from apigw.settings import CommonSettings


def default_consumer_name() -> str:
    """One consumer per process: `<hostname>-<pid>`."""
    return f"{socket.gethostname()}-{os.getpid()}"


class CollectorSettings(CommonSettings):
    consumer_group: str = Field(default="collector", description="Redis consumer group.")
    consumer_name: str = Field(default_factory=default_consumer_name,
                               description="This process's consumer in the group.")
    read_count: int = Field(default=100, ge=1, le=10_000,
                            description="Stream entries (event batches) per read and per insert.")
    block_ms: int = Field(default=1000, ge=1, description="How long one read waits for entries.")
    claim_idle_ms: int = Field(default=60_000, ge=1,
                               description="Pending entries of other consumers idle this long are "
                                           "reclaimed (their consumer is presumed dead).")
    claim_interval_s: float = Field(default=10.0, gt=0,
                                    description="How often to look for dead consumers' entries.")
    dead_letter_stream: str = Field(default="apigw:events:dead",
                                    description="Where undecodable entries go, with the reason.")
    dead_letter_maxlen: int = Field(default=100_000, ge=1,
                                    description="Approximate bound of the dead-letter stream.")
    retention_days: int = Field(default=30, ge=1, le=3650,
                                description="TTL of raw events and rollups, applied at start.")
    retry_initial_s: float = Field(default=0.2, gt=0,
                                   description="First back-off after a failed insert.")
    retry_max_s: float = Field(default=10.0, gt=0, description="Back-off cap.")
    listen: str = Field(default="127.0.0.1:9091", description="Admin endpoint HOST:PORT.")
    loss_accounting: bool = Field(default=True,
                                  description="Run the loss accountant (one active per group).")
    loss_check_interval_s: float = Field(default=5.0, gt=0,
                                         description="How often the accountant settles numbers.")
    emitter_grace_s: float = Field(default=30.0, gt=0,
                                   description="An emitter whose heartbeat is older is finished "
                                               "(its worker died): its missing events are lost.")
    loss_clock_margin_ms: int = Field(default=2000, ge=0,
                                      description="Allowed clock difference between proxies and "
                                                  "Redis when matching heartbeats to entries.")

    @model_validator(mode="after")
    def _backoff_bounds(self) -> CollectorSettings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        return self
