"""The floor's relay: a Decide answered after exactly one ModelInfer, whose failure fails
the Decide (a model server stand-in records what it was asked)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from checks.floor import relay_server
from core.processes import free_port
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from proto.third_party.torchserve import open_inference_grpc_pb2 as oip
from torchserve.triton import TRITON_OIP_SERVICE


async def test_the_relay_answers_after_one_model_call_and_fails_with_it() -> None:
    asked: list[str] = []

    async def model_infer(request: oip.ModelInferRequest, context: Any) -> Any:
        asked.append(request.model_name)
        if len(asked) > 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model server going away")
        return oip.ModelInferResponse(model_name=request.model_name)

    model = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        model_infer,
        request_deserializer=oip.ModelInferRequest.FromString,
        response_serializer=oip.ModelInferResponse.SerializeToString,
    )
    model.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(TRITON_OIP_SERVICE, {"ModelInfer": handler}),)
    )
    model_port = model.add_insecure_port("127.0.0.1:0")
    await model.start()
    port = free_port()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{model_port}") as to_model:
        relay = await relay_server(port, to_model)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = decision_pb2_grpc.DecisionServiceStub(channel)
                answer = await stub.Decide(decision_pb2.DecideRequest(), timeout=2.0)
                assert answer.source == decision_pb2.SOURCE_PRIMARY
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Decide(decision_pb2.DecideRequest(), timeout=2.0)
        finally:
            await relay.stop(grace=None)
            await model.stop(grace=None)
    assert asked == ["champion", "champion"]
