"""The floor: a bare grpc.aio server answering Decide with a fixed response, no work.

Same service name, messages and event loop (uvloop) as the decision server, so the
difference between the two is the decision layer's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop

from proto.decision.v1 import decision_pb2

_RESPONSE = decision_pb2.DecideResponse(
    decision=decision_pb2.DECISION_ABSTAIN, source=decision_pb2.SOURCE_ABSTAIN
)


async def _decide(
    request: decision_pb2.DecideRequest,
    context: grpc.aio.ServicerContext[decision_pb2.DecideRequest, decision_pb2.DecideResponse],
) -> decision_pb2.DecideResponse:
    return _RESPONSE


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        _decide,
        request_deserializer=decision_pb2.DecideRequest.FromString,
        response_serializer=decision_pb2.DecideResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("decision.v1.DecisionService", {"Decide": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
