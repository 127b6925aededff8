"""An upstream pool: its targets, the balancer, its keep-alive connections, health.

Forwarded requests go through `connections` (proxy/upstream_pool.py, the lean client):
`max_connections` bounds the whole pool, `max_connections_per_target` each target, idle
connections are kept `keepalive_s`; a request waiting for a connection waits within its
connect timeout. The aiohttp `session` (the same limits, counted apart) serves what still
needs an aiohttp client: WebSocket sessions, aggregation backends, routes with response
filters (cache, transform: proxy/response_filter.py takes an aiohttp response) and active
health checks.
Outlier detection, the active health checker and the circuit breaker exist only when
configured, so a plain single-URL upstream costs nothing extra per request.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Final

import aiohttp

from proxy.balancing import ConsistentHash, Endpoint, make_balancer
from proxy.config import Upstream
from proxy.health import HealthChecker, OutlierDetector, publish
from proxy.resilience import HALF_OPEN, CircuitBreaker
from proxy.tls import unverified_context, upstream_context
from proxy.upstream_pool import ConnectionPool

if TYPE_CHECKING:
    from proxy.app import Exchange

SKIP_AUTO_HEADERS: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class UpstreamPool:
    """One upstream: targets, balancer, connection pool, outlier detection, breaker."""

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        self.endpoints = [Endpoint(index, target.url, target.weight)
                          for index, target in enumerate(config.target_list())]
        self.single = self.endpoints[0] if len(self.endpoints) == 1 else None
        self.balancer = make_balancer(config.balancing, self.endpoints)
        balancing = config.balancing
        self._hash_on = balancing.hash_on if isinstance(self.balancer, ConsistentHash) else ""
        self._hash_header = balancing.hash_header or ""
        self.outlier = (OutlierDetector(name, config.outlier_detection, self.endpoints)
                        if config.outlier_detection is not None else None)
        self.breaker = (CircuitBreaker(name, config.circuit_breaker)
                        if config.circuit_breaker is not None else None)
        self.watched = self.outlier is not None or config.health_check is not None
        self.checker: HealthChecker | None = None
        timeouts = config.timeouts
        self.timeout = aiohttp.ClientTimeout(total=timeouts.total_s, connect=timeouts.connect_s,
                                             sock_read=timeouts.read_s)
        self._session: aiohttp.ClientSession | None = None
        self._connections: ConnectionPool | None = None

    # kept for callers of the single-target era
    @property
    def target(self) -> str:
        return self.endpoints[0].address

    async def start(self) -> None:
        config = self.config
        context = self.ssl_context()
        self._connections = ConnectionPool(
            self.endpoints, max_connections=config.max_connections,
            max_per_target=config.max_connections_per_target, keepalive_s=config.keepalive_s,
            tls=context if isinstance(context, ssl.SSLContext)
            else None if context else unverified_context())
        connector = aiohttp.TCPConnector(limit=config.max_connections,
                                         limit_per_host=config.max_connections_per_target,
                                         keepalive_timeout=config.keepalive_s, ttl_dns_cache=60,
                                         ssl=context)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS, trust_env=False, read_bufsize=64 * 1024,
            max_field_size=16 * 1024, timeout=self.timeout)
        if self.watched:
            for ep in self.endpoints:
                publish(self.name, ep)
        if config.health_check is not None:
            self.checker = HealthChecker(self.name, config.health_check, self.endpoints,
                                         self._session)
            self.checker.start()

    def ssl_context(self) -> ssl.SSLContext | bool:
        """https targets: verified (proxy/tls.py); plain-http pools skip loading CAs."""
        if self.config.tls is None and not any(ep.base.startswith("https:")
                                               for ep in self.endpoints):
            return True
        return upstream_context(self.config.tls)

    async def close(self) -> None:
        if self.checker is not None:
            await self.checker.stop()
            self.checker = None
        if self.outlier is not None:
            self.outlier.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        connections, self._connections = self._connections, None
        if connections is not None:
            await connections.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream {self.name!r} used before start()")
        return self._session

    @property
    def connections(self) -> ConnectionPool:
        if self._connections is None:
            raise RuntimeError(f"upstream {self.name!r} used before start()")
        return self._connections

    def pick(self, ex: Exchange) -> Endpoint:
        single = self.single
        if single is not None:
            return single
        if self.watched and not any(ep.available for ep in self.endpoints):
            from proxy.metrics import UPSTREAM_PANIC

            UPSTREAM_PANIC.labels(self.name).inc()
        key = ""
        if self._hash_on:
            caller = ex.caller
            if self._hash_on == "header":
                key = ex.request.headers.get(self._hash_header, "")
            elif caller is not None:
                key = (caller.client_id or caller.address) if self._hash_on == "client_id" \
                    else caller.address
        return self.balancer.pick(key)

    def record(self, ep: Endpoint, error_type: str, status: int) -> None:
        """The outcome of one attempt on `ep` (transport error class, or the status)."""
        failed = bool(error_type) or status >= 500
        outlier = self.outlier
        if outlier is not None:
            if error_type:
                outlier.transport_error(ep)
            elif status >= 500:
                outlier.server_error(ep)
            elif ep.consecutive_5xx or ep.consecutive_errors:
                outlier.success(ep)
        breaker = self.breaker
        if breaker is not None:
            breaker.record(not failed)

    def abandon(self) -> None:
        """An admitted attempt ended without a verdict (the client left)."""
        breaker = self.breaker
        if breaker is not None and breaker.state == HALF_OPEN:
            breaker.probes = max(0, breaker.probes - 1)
