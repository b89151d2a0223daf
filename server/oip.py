"""The Open Inference Protocol (KServe v2) gRPC API: ``OipClient`` and its wire format.

TorchServe 0.12 serves it beside its own API (in a package of its own), and Triton,
KServe and MLServer speak it under the standard service name: one ``ModelInfer`` with an
FP32 tensor ``rows`` of shape ``[n, width]``. The scores are the output named
``scores`` (our TorchServe handler's), else the response's only output (MLServer's
XGBoost runtime answers ``predict``, ``[n, 1]``); FP32 or FP64, in the typed
``contents`` or in ``raw_output_contents`` (Triton's default).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from proto.third_party.torchserve import open_inference_grpc_pb2 as oip_pb2
from server.model_client import GrpcModelClient, ModelScores, check_float32
from server.model_errors import ModelInputError, ModelResponseError

TORCHSERVE_OIP_SERVICE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
OIP_SERVICE = "inference.GRPCInferenceService"  # the standard name: Triton, KServe, MLServer


class OipClient(GrpcModelClient):
    """The Open Inference Protocol (KServe v2) gRPC API's ``ModelInfer`` on one replica.

    ``service`` is the gRPC service name: TorchServe's own package (the default), or
    ``OIP_SERVICE`` for Triton, KServe and MLServer; the messages are the same. The scores
    are the answer's ``scores`` output, else its only output.
    """

    def __init__(
        self,
        name: str,
        address: str,
        model_name: str,
        *,
        service: str = TORCHSERVE_OIP_SERVICE,
        **options: Any,
    ) -> None:
        """``options``: as ``GrpcModelClient``'s."""
        super().__init__(name, address, model_name, **options)
        self.service = service

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self._infer = oip_model_infer(channel, self.service)

    async def predict(self, rows: Sequence[Sequence[float]], timeout_s: float) -> ModelScores:
        check_float32(rows)
        request = oip_request(self.model_name, rows, queue_timeout_s=timeout_s)
        response, elapsed_ms = await self._call(
            lambda wire_timeout_s: self._infer(request, timeout=wire_timeout_s),
            timeout_s,
        )
        scores = oip_scores(response, len(rows), replica=self.name)
        return self._scores(scores, response.model_version, len(rows), elapsed_ms)


def oip_model_infer(channel: grpc.aio.Channel, service: str) -> Any:
    """The OIP ``ModelInfer`` method of ``service`` on ``channel``."""
    return channel.unary_unary(
        f"/{service}/ModelInfer",
        request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=oip_pb2.ModelInferResponse.FromString,
    )


def oip_request(
    model_name: str, rows: Sequence[Sequence[float]], *, queue_timeout_s: float = 0.0
) -> oip_pb2.ModelInferRequest:
    """A ``ModelInfer`` request with ``rows`` as the FP32 input tensor ``rows``.
    ``queue_timeout_s``: how long the request may wait in the model server's queue, the
    schedule-policy ``timeout`` parameter (Triton refuses it after that, rather than
    score rows its caller has given up on; servers without the extension ignore it)."""
    timeout_us = max(1, round(queue_timeout_s * 1_000_000)) if queue_timeout_s > 0 else 0
    return oip_pb2.ModelInferRequest(
        model_name=model_name,
        parameters={"timeout": oip_pb2.InferParameter(int64_param=timeout_us)}
        if timeout_us > 0
        else {},
        inputs=[
            oip_pb2.ModelInferRequest.InferInputTensor(
                name="rows",
                datatype="FP32",
                shape=[len(rows), len(rows[0]) if rows else 0],
                contents=oip_pb2.InferTensorContents(fp32_contents=[v for r in rows for v in r]),
            )
        ],
    )


def oip_scores(response: oip_pb2.ModelInferResponse, rows: int, *, replica: str) -> list[float]:
    """One score per row from the output that holds them: ``scores``, else the only
    output; an ``error`` output is the replica rejecting our rows."""
    names = [o.name for o in response.outputs]
    if "error" in names:
        error = response.outputs[names.index("error")]
        raise ModelInputError(f"{replica} rejected the rows: {_oip_text(error.contents)}")
    wanted = names[0] if len(names) == 1 else "scores"
    if wanted not in names:
        raise ModelResponseError(f"{replica} answered outputs {names}: none is 'scores'")
    index = names.index(wanted)
    tensor = response.outputs[index]
    if list(tensor.shape) not in ([rows], [rows, 1]):
        raise ModelResponseError(
            f"{replica} answered {wanted!r} of shape {list(tensor.shape)}:"
            f" not one score for each of {rows} rows"
        )
    raw = None
    if response.raw_output_contents:  # then one entry per output, in the outputs' order
        if len(response.raw_output_contents) != len(names):
            raise ModelResponseError(
                f"{replica} answered {len(response.raw_output_contents)} raw contents"
                f" for {len(names)} outputs"
            )
        raw = response.raw_output_contents[index]
    return _tensor_values(tensor, raw, replica)


# OIP datatypes a score may come in: the typed contents field and the raw bytes' format.
_FLOAT_TENSORS = {"FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8")}


def _tensor_values(
    tensor: oip_pb2.ModelInferResponse.InferOutputTensor, raw: bytes | None, replica: str
) -> list[float]:
    """A float tensor's values, from its typed contents or from its raw bytes (a server
    sends one or the other: Triton raw by default, TorchServe and MLServer typed)."""
    if tensor.datatype not in _FLOAT_TENSORS:
        raise ModelResponseError(
            f"{replica} answered {tensor.name!r} as {tensor.datatype}, not FP32 or FP64"
        )
    field, layout = _FLOAT_TENSORS[tensor.datatype]
    if raw is not None:
        width = np.dtype(layout).itemsize
        if len(raw) % width:
            raise ModelResponseError(f"{replica} answered {len(raw)} raw bytes for {tensor.name!r}")
        return [float(v) for v in np.frombuffer(raw, dtype=layout)]
    return [float(v) for v in getattr(tensor.contents, field)]


def _oip_text(contents: oip_pb2.InferTensorContents) -> str:
    """The first BYTES element as text; TorchServe sends each one JSON-encoded."""
    if not contents.bytes_contents:
        return "(no message)"
    raw = contents.bytes_contents[0].decode(errors="replace")
    try:
        text = json.loads(raw)
    except ValueError:
        return raw
    return text if isinstance(text, str) else raw
