"""What the gRPC benchmark runs beside the product, to measure it against: ``echo``, the
floor, and ``otlp``, a trace collector that keeps nothing.

``echo`` answers Decide with a fixed response and does no work, with the decision
server's service name, messages and event loop (uvloop): the difference between the two
is the decision layer's own cost. ``otlp`` receives OTLP/gRPC traces, counts their spans
and prints the count when it stops: what exporting spans costs the decision server.

    python -m loadtest.stand_ins echo --port 50099
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
import uvloop
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from decision_client.v1 import decision_pb2

KINDS = ("echo", "otlp")
_RESPONSE = decision_pb2.DecideResponse(
    decision=decision_pb2.DECISION_ABSTAIN, source=decision_pb2.SOURCE_ABSTAIN
)


async def _decide(
    request: decision_pb2.DecideRequest,
    context: grpc.aio.ServicerContext[decision_pb2.DecideRequest, decision_pb2.DecideResponse],
) -> decision_pb2.DecideResponse:
    return _RESPONSE


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve(kind: str, port: int) -> None:
    """Serves on loopback ``port`` until SIGTERM or SIGINT."""
    server, sink = grpc.aio.server(), Sink()
    if kind == "echo":
        handler = grpc.unary_unary_rpc_method_handler(
            _decide,
            request_deserializer=decision_pb2.DecideRequest.FromString,
            response_serializer=decision_pb2.DecideResponse.SerializeToString,
        )
        service = grpc.method_handlers_generic_handler(
            "decision.v1.DecisionService", {"Decide": handler}
        )
        server.add_generic_rpc_handlers((service,))
    else:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)
    if kind == "otlp":
        print(f"otlp sink: {sink.spans} spans received", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.kind, args.port))


if __name__ == "__main__":
    main()
