"""The callers' service config (proto/decision/v1/decision_grpc_service_config.json): it
names only methods the service has, caps unary deadlines only, retries nothing; a real
Python channel with it balances calls over every address and keeps a stream up."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc

from decision_client.channel import channel_options, service_config
from decision_client.v1 import decision_pb2, decision_pb2_grpc

SERVICE = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"]


def test_the_config_names_only_methods_of_the_service_and_retries_nothing() -> None:
    config = json.loads(service_config(python=False))
    named = {(n["service"], n.get("method")) for m in config["methodConfig"] for n in m["name"]}
    assert named == {(SERVICE.full_name, method.name) for method in SERVICE.methods}
    assert all("retryPolicy" not in m and m["waitForReady"] is False
               for m in config["methodConfig"])  # fmt: skip
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    caps = {n["method"]: m.get("timeout") for m in config["methodConfig"] for n in m["name"]}
    assert caps == {"Decide": "0.500000000s", "DecideBatch": "0.500000000s", "DecideStream": None}
    # Python's channels go without the cap (grpcio applies it wrongly: see the module).
    assert all("timeout" not in m for m in json.loads(service_config())["methodConfig"])


async def test_a_python_channel_with_it_balances_calls_and_keeps_a_stream_up() -> None:
    served: Counter[int] = Counter()

    def server_for(index: int) -> grpc.aio.Server:
        async def decide(request: Any, context: Any) -> decision_pb2.DecideResponse:
            served[index] += 1
            return decision_pb2.DecideResponse(request_id=request.request_id)

        async def stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            async for message in requests:
                await asyncio.sleep(0.8)  # longer than a unary call's cap
                yield decision_pb2.DecideStreamResponse(request_id=message.request.request_id)

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Decide": grpc.unary_unary_rpc_method_handler(
                decide,
                request_deserializer=decision_pb2.DecideRequest.FromString,
                response_serializer=decision_pb2.DecideResponse.SerializeToString,
            ),
            "DecideStream": grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=decision_pb2.DecideStreamRequest.FromString,
                response_serializer=decision_pb2.DecideStreamResponse.SerializeToString,
            ),
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        return server

    servers = [server_for(i) for i in range(2)]
    ports = [s.add_insecure_port("127.0.0.1:0") for s in servers]
    for server in servers:
        await server.start()
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    try:
        async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            for i in range(10):
                await stub.Decide(decision_pb2.DecideRequest(request_id=f"{i}"), timeout=2.0)
            assert served[0] > 0 and served[1] > 0, served  # round robin, not one pod

            call = stub.DecideStream()
            await call.write(
                decision_pb2.DecideStreamRequest(request=decision_pb2.DecideRequest(request_id="s"))
            )
            answer: Any = await call.read()
            assert answer.request_id == "s"  # 0.8 s in, the stream still up
            await call.done_writing()
    finally:
        for server in servers:
            await server.stop(grace=None)
