"""OpenTelemetry tracing: a server span per request, a client span per upstream attempt.

Off by default; when off the gateway holds no tracer and each request pays one `is None`
test. On (`tracing: {enabled: true, sample_ratio: 0.1}`), each Gateway owns an SDK
TracerProvider (not the global one, so a reload swaps it with the rest of the config):
sampler ParentBased(TraceIdRatioBased(sample_ratio)) - an incoming sampled/unsampled
decision is followed - and a BatchSpanProcessor (bounded queue, background export, drops
counted by the SDK; tuned by OTEL_BSP_*). The exporter follows the standard variables:
OTEL_TRACES_EXPORTER (otlp - the default -, console or none), OTLP over HTTP/protobuf
configured by OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _HEADERS / _TIMEOUT / _COMPRESSION;
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service (default `apigw-proxy`).
OTEL_SDK_DISABLED=true turns tracing off whatever the config says.

Ids: the server span continues an incoming W3C traceparent; its trace id and span id are the
event's `trace_id`/`span_id`. The traceparent sent upstream names the client span of that
attempt (trace id unchanged), so the upstream's spans hang under the gateway's.
Attributes follow the OpenTelemetry HTTP semantic conventions (http.request.method,
http.route, http.response.status_code, url.path, url.query (credentials redacted),
url.scheme, server.address/port, client.address, user_agent.original, error.type, ...).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from yarl import URL

    from proxy.event import RequestEvent

log = logging.getLogger(__name__)

DEFAULT_SERVICE: Final = "apigw-proxy"
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                   "CONNECT", "TRACE"})


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Export spans (OTLP/HTTP, OTEL_* env).")
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0,
                                description="Share of new traces sampled; incoming "
                                            "traceparent decisions are followed.")


def _traceparent(span: Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _exporter_from_env() -> SpanExporter | None:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("unsupported OTEL_TRACES_EXPORTER; using otlp", extra={"exporter": kind})
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
    if protocol != "http/protobuf":
        log.warning("only OTLP over http/protobuf is supported; using it",
                    extra={"protocol": protocol})
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def build_tracer(config: TracingConfig) -> GatewayTracer | None:
    """The gateway's tracer, or None when tracing is off (the zero-cost case)."""
    if not config.enabled or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    return GatewayTracer(config, _exporter_from_env())


class GatewayTracer:
    """One TracerProvider with its processor and exporter; starts request traces."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None, *,
                 batch: bool = True) -> None:
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes: dict[str, Any] = {}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = DEFAULT_SERVICE
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create(attributes),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        if exporter is not None:
            processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
            self.provider.add_span_processor(processor)
        self.tracer: Tracer = self.provider.get_tracer("apigw.proxy")
        self._propagator = TraceContextTextMapPropagator()
        self._getter: DefaultGetter = DefaultGetter()
        self._server = SpanKind.SERVER
        self._client = SpanKind.CLIENT

    def start(self, request: BaseRequest) -> RequestTrace:
        parent = self._propagator.extract(request.headers, getter=self._getter)
        method = request.method if request.method in _KNOWN_METHODS else "_OTHER"
        span = self.tracer.start_span(method, context=parent, kind=self._server,
                                      attributes={"http.request.method": method})
        return RequestTrace(self, span, method)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush what is queued and stop the export thread (blocking: call in a thread)."""
        self.provider.shutdown()


class RequestTrace:
    """The spans of one request."""

    __slots__ = ("method", "span", "span_id", "trace_id", "traceparent", "tracer")

    def __init__(self, tracer: GatewayTracer, span: Span, method: str) -> None:
        self.tracer = tracer
        self.method = method
        self.span = span
        context = span.get_span_context()
        self.trace_id = f"{context.trace_id:032x}"
        self.span_id = f"{context.span_id:016x}"
        self.traceparent = _traceparent(span)

    def client(self, method: str, url: URL, attempt: int) -> tuple[Span, str]:
        """A client span for one upstream attempt, and the traceparent naming it."""
        from opentelemetry.trace import set_span_in_context

        attributes: dict[str, Any] = {
            "http.request.method": method if method in _KNOWN_METHODS else "_OTHER",
            "server.address": url.host or "", "url.full": str(url.with_query(None)),
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        if attempt:
            attributes["http.request.resend_count"] = attempt
        span = self.tracer.tracer.start_span(
            attributes["http.request.method"], context=set_span_in_context(self.span),
            kind=self.tracer._client, attributes=attributes)
        return span, _traceparent(span)

    @staticmethod
    def end_client(span: Span, status: int, error_type: str) -> None:
        if span.is_recording():
            from opentelemetry.trace import StatusCode

            if status:
                span.set_attribute("http.response.status_code", status)
            if error_type or status >= 400:
                span.set_attribute("error.type", error_type or str(status))
                span.set_status(StatusCode.ERROR)
        span.end()

    def end(self, event: RequestEvent) -> None:
        """Describe the finished request from its event and end the server span."""
        try:
            self._describe(event)
        except Exception:  # telemetry must never fail a request
            log.exception("describing the server span failed")
        self.span.end()

    def _describe(self, event: RequestEvent) -> None:
        span = self.span
        if span.is_recording():
            from opentelemetry.trace import StatusCode

            status = event.http_response_status_code
            if event.http_route:
                span.update_name(f"{self.method} {event.http_route}")
            host, _, port = event.server_address.rpartition(":")
            attributes: dict[str, Any] = {
                "url.path": event.url_path, "url.scheme": event.url_scheme,
                "http.response.status_code": status,
                "network.protocol.version": event.network_protocol_version,
                "client.address": event.client_address,
                "server.address": host if port.isdigit() else event.server_address,
                "apigw.request_id": event.request_id,
            }
            if port.isdigit():
                attributes["server.port"] = int(port)
            optional = {"http.route": event.http_route, "url.query": event.url_query,
                        "user_agent.original": event.user_agent_original,
                        "apigw.route_id": event.route_id, "apigw.upstream": event.upstream,
                        "apigw.client_id": event.client_id}
            attributes.update((name, value) for name, value in optional.items() if value)
            if event.http_request_body_size:
                attributes["http.request.body.size"] = event.http_request_body_size
            if event.http_response_body_size:
                attributes["http.response.body.size"] = event.http_response_body_size
            if event.retries:
                attributes["apigw.retries"] = event.retries
            if event.error_type or status >= 500:
                attributes["error.type"] = event.error_type or str(status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
            span.set_attributes(attributes)
