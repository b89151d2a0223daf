"""Reading the scores out of an Open Inference Protocol answer, as TorchServe, MLServer and
Triton send them (messages written from the KServe v2 protocol's definition)."""

from __future__ import annotations

import struct

import pytest
from pydantic import ValidationError

from proto.third_party.torchserve import open_inference_grpc_pb2 as oip
from server.model_errors import ModelInputError, ModelResponseError
from server.oip import oip_scores
from server.settings import TorchServeSettings

Output = oip.ModelInferResponse.InferOutputTensor


def fp32(name: str, values: list[float], shape: list[int]) -> Output:
    return Output(
        name=name,
        datatype="FP32",
        shape=shape,
        contents=oip.InferTensorContents(fp32_contents=values),
    )


def answer(*outputs: Output, raw: list[bytes] | None = None) -> oip.ModelInferResponse:
    return oip.ModelInferResponse(
        model_name="m", model_version="v", outputs=list(outputs), raw_output_contents=raw or []
    )


def read(response: oip.ModelInferResponse, rows: int) -> list[float]:
    return oip_scores(response, rows, replica="challenger")


def test_our_handler_answers_scores() -> None:
    assert read(answer(fp32("scores", [0.25, 0.75], [2])), 2) == [0.25, 0.75]


def test_mlserver_answers_its_only_output_predict_as_a_column() -> None:
    assert read(answer(fp32("predict", [0.25, 0.75], [2, 1])), 2) == [0.25, 0.75]


def test_triton_sends_raw_little_endian_bytes_fp32_or_fp64() -> None:
    raw32 = answer(
        Output(name="out", datatype="FP32", shape=[2, 1]), raw=[struct.pack("<2f", 0.25, 0.5)]
    )
    assert read(raw32, 2) == [0.25, 0.5]
    raw64 = answer(
        Output(name="out", datatype="FP64", shape=[2]), raw=[struct.pack("<2d", 0.1, 0.2)]
    )
    assert read(raw64, 2) == [0.1, 0.2]


def test_of_several_outputs_scores_is_read_and_none_is_guessed() -> None:
    response = answer(fp32("predict", [1.0, 0.0], [2]), fp32("scores", [0.9, 0.1], [2]))
    assert read(response, 2) == pytest.approx([0.9, 0.1])
    unnamed = answer(fp32("predict", [1.0, 0.0], [2]), fp32("proba", [0.9, 0.1], [2]))
    with pytest.raises(ModelResponseError, match=r"none is 'scores'"):
        read(unnamed, 2)


def test_an_error_output_is_our_rows_being_rejected() -> None:
    error = Output(
        name="error",
        datatype="BYTES",
        shape=[1],
        contents=oip.InferTensorContents(bytes_contents=[b'"rows: shape [1, 3]"']),
    )
    with pytest.raises(ModelInputError, match=r"rejected the rows: rows: shape \[1, 3\]"):
        read(answer(error), 1)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (fp32("predict_proba", [0.1, 0.9, 0.3, 0.7], [2, 2]), r"shape \[2, 2\]"),
        (fp32("predict", [0.5], [1]), r"shape \[1\]: not one score for each of 2 rows"),
        (Output(name="predict", datatype="INT64", shape=[2]), "INT64, not FP32 or FP64"),
    ],
)
def test_an_answer_that_is_not_one_score_a_row_is_refused(output: Output, message: str) -> None:
    with pytest.raises(ModelResponseError, match=message):
        read(answer(output), 2)


def test_raw_contents_must_come_one_per_output() -> None:
    two = answer(
        Output(name="predict", datatype="FP32", shape=[1]),
        Output(name="scores", datatype="FP32", shape=[1]),
        raw=[struct.pack("<f", 0.5)],
    )
    with pytest.raises(ModelResponseError, match="1 raw contents for 2 outputs"):
        read(two, 1)


def test_the_challenger_has_a_protocol_of_its_own_and_the_champions_by_default() -> None:
    apart = TorchServeSettings(protocol="torchserve-oip", challenger_protocol="kserve-v2")
    assert apart.protocol_of(challenger=False) == "torchserve-oip"
    assert apart.protocol_of(challenger=True) == "kserve-v2"
    plain = TorchServeSettings(protocol="kserve-v2")
    assert plain.protocol_of(challenger=True) == plain.protocol_of(challenger=False) == "kserve-v2"


def test_the_old_ambiguous_protocol_name_stops_the_server() -> None:
    with pytest.raises(ValidationError, match="torchserve-oip"):
        TorchServeSettings(protocol="oip")
