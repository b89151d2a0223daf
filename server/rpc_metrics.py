"""Request metrics of every unary RPC, under the names go-grpc-prometheus gave them
(``grpc_server_started_total``, ``grpc_server_handled_total``,
``grpc_server_handling_seconds``), so that the usual gRPC dashboards and alerts work
unchanged. An interceptor on both gRPC servers records them. Each method's label children
are looked up once and kept, so a call costs two clock reads, a counter and a histogram
observation. DecideStream is measured by its messages, each as a call
(``grpc_type="bidi_stream"``, docs/overload.md); other streaming RPCs (server reflection,
health's Watch) pass through unmeasured. Labels and buckets: docs/metrics.md.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from core.histogram import LATENCY_BOUNDS_S

Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


@dataclass(slots=True)
class _MethodMetrics:
    """One method's children: the handled counter by code (made on first use), the
    histogram."""

    handled: Callable[..., Any]  # the handled counter's ``labels`` with all but the code
    handling: Any
    by_code: dict[grpc.StatusCode, Any] = field(default_factory=dict)

    def record(self, code: grpc.StatusCode, seconds: float) -> None:
        child = self.by_code.get(code)
        if child is None:
            child = self.by_code[code] = self.handled(grpc_code=code.name)
        child.inc()
        self.handling.observe(seconds)


class RpcMetrics:
    """The three grpc_server_* families, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self._started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=registry
        )
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the handler's start to its answer (or error), in seconds.",
            labels,
            buckets=LATENCY_BOUNDS_S,
            registry=registry,
        )
        self._methods: dict[str, tuple[Any, _MethodMetrics]] = {}

    def method(self, full_method: str, grpc_type: str = "unary") -> tuple[Any, _MethodMetrics]:
        """The started counter's child and the rest, for ``/package.Service/Method``."""
        found = self._methods.get(full_method)
        if found is None:
            service, _, name = full_method.lstrip("/").rpartition("/")
            labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": name}
            found = (
                self._started.labels(**labels),
                _MethodMetrics(
                    handled=functools.partial(self._handled.labels, **labels),
                    handling=self._handling.labels(**labels),
                ),
            )
            self._methods[full_method] = found
        return found

    def stream_messages(self, full_method: str) -> Callable[[grpc.StatusCode, float], None]:
        """Records one message of a bidirectional stream as a call: started, handled with
        its own status, its seconds from receipt to response."""
        started, method = self.method(full_method, "bidi_stream")

        def record(code: grpc.StatusCode, seconds: float) -> None:
            started.inc()
            method.record(code, seconds)

        return record


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics
        # Per method: the handler seen and its measured wrapper. A service's handlers are
        # the same objects call after call, so the wrapper is built once, not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        seen = self._wrapped.get(handler_call_details.method)
        if seen is not None and seen[0] is handler:
            return cast("grpc.RpcMethodHandler[Any, Any]", seen[1])
        wrapped = self._wrap(handler_call_details.method, handler)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        started, method = self._metrics.method(full_method)
        unary = cast(Behaviour, handler.unary_unary)

        async def measured(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started.inc()
            begun = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await unary(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException:
                # An abort set its code; anything else reaches the caller as UNKNOWN.
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                method.record(code, time.perf_counter() - begun)

        return grpc.unary_unary_rpc_method_handler(
            measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
