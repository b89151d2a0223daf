"""OpenTelemetry tracing: the server's spans and its gRPC interceptors.

Configured by OpenTelemetry's own environment variables: with an OTLP endpoint set, each
server process has a tracer provider of its own (never the global one: several apps share
a test process) that exports in batches over OTLP/gRPC, and
``opentelemetry-instrumentation-grpc`` spans every DecisionService, AdminService and model
call (health checks left out). With no endpoint there is no provider, no span and no
interceptor: the decision path pays a few no-op calls (``QuietTracer``). The variables,
sampling and what it costs: docs/metrics.md, "Traces".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, Tracer

if TYPE_CHECKING:  # the SDK and the instrumentation load only when tracing is on (~6 MB)
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler

INSTRUMENTATION = "decision-service"
SERVICE_NAME = "decision-server"  # unless OTEL_SERVICE_NAME says otherwise
# New traces recorded unless OTEL_TRACES_SAMPLER says otherwise: tracing costs every
# call, sampled or not, and more the more it records (docs/metrics.md).
DEFAULT_SAMPLE_RATIO = 0.05


class _NoSpan:
    """A reusable ``with`` block that makes no span: OpenTelemetry's no-op tracer still
    builds a context manager and a context per span (~2 us here); this costs ~0.1 us."""

    def __enter__(self) -> Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


class QuietTracer(trace.NoOpTracer):
    """The tracer when tracing is off: spans cost next to nothing on the decision path."""

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return _NO_SPAN


NO_TRACER: Tracer = QuietTracer()


class Tracing:
    """A process's tracer provider (None: tracing off) and what hangs off it."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.tracer: Tracer = (
            provider.get_tracer(INSTRUMENTATION) if provider is not None else NO_TRACER
        )

    @classmethod
    def from_environment(cls) -> Tracing:
        """Off unless an OTLP endpoint is set."""
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        if not any(os.environ.get(name) for name in endpoints):
            return cls(None)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        return cls.with_processor(BatchSpanProcessor(OTLPSpanExporter()))

    @classmethod
    def with_processor(
        cls,
        processor: SpanProcessor,
        *,
        sampler: Sampler | None = None,
    ) -> Tracing:
        """Tracing whose spans go to ``processor`` (tests: an in-memory exporter's);
        ``sampler``: instead of the environment's or the default."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        if sampler is None and not os.environ.get("OTEL_TRACES_SAMPLER"):
            sampler = ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))
        provider = TracerProvider(  # sampler None: the SDK reads OTEL_TRACES_SAMPLER
            sampler=sampler,
            resource=Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME}
            ),
        )
        provider.add_span_processor(processor)
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.instrumentation.grpc.filters import health_check, negate

        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            self.provider, filter_=negate(health_check())
        )
        return [interceptor]

    def client_interceptors(self) -> Sequence[grpc.aio.ClientInterceptor]:
        if self.provider is None:
            return ()
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
        from opentelemetry.instrumentation.grpc.filters import health_check, negate

        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            self.provider, filter_=negate(health_check())
        )
        return interceptors

    def shutdown(self) -> None:
        """Exports what is buffered (bounded by the exporter's own timeout)."""
        if self.provider is not None:
            self.provider.shutdown()


def traceparent(span: Span) -> str | None:
    """The W3C ``traceparent`` of ``span``; None when there is no trace to find (tracing
    off, or the call not sampled)."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
