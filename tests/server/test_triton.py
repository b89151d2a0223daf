"""Triton Inference Server as the model server: a real ``tritonserver`` (from the
nvidia-pytriton wheel, installed into .tools/triton by ``make setup-ci``) serves the
champion and the challenger from a repository made of their archives, and the decision
path answers with the archives' own scores and version hashes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from core.processes import free_ports, start_ready
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from feature_cache.schema import FEATURE_NAMES, MODEL_INPUT_WIDTH, model_row
from server.app import DecisionApp
from server.oip import OipClient, oip_model_infer, oip_request
from tests.conftest import offline_scores
from tests.server.conftest import (
    OPERATOR,
    SAMPLE_FEATURES,
    TOKENS,
    buy,
    decision_stub,
    sample_record,
)
from torchserve.archive import ArchiveInfo
from torchserve.triton import (
    TRITON_OIP_SERVICE,
    TRITON_ROOT,
    model_ready,
    model_repository,
    tritonserver_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.timed]

MODELS = ("champion", "challenger")


@pytest.fixture(scope="module")
def triton(
    trained_models: dict[str, ArchiveInfo], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real tritonserver serving both archives; its gRPC address."""
    if not (TRITON_ROOT / "bin" / "tritonserver").exists():
        pytest.fail(f"{TRITON_ROOT} not found: `make setup-ci` installs Triton there")
    run_dir = tmp_path_factory.mktemp("triton")
    folder = run_dir / "models"
    for name in MODELS:
        model_repository(trained_models[name].path, folder, model_name=name)
    grpc_port, http_port, metrics_port = free_ports(3)
    address = f"127.0.0.1:{grpc_port}"
    proc = tritonserver_process(
        TRITON_ROOT,
        folder,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_path=run_dir / "triton.log",
    )
    start_ready(proc, lambda: all(model_ready(address, m) for m in MODELS), timeout_s=120.0)
    try:
        yield address
    finally:
        proc.stop()


@pytest.mark.parametrize("name", MODELS)
async def test_triton_scores_equal_the_archives_offline_scores(
    triton: str, name: str, trained_models, model_store, tmp_path
) -> None:
    store, _ = model_store
    rows: np.ndarray = np.load(store / "heldout.npz")["x"][:256]
    archive = trained_models[name]
    want = offline_scores(archive.path, rows, tmp_path)
    client = OipClient(name, triton, name, service=TRITON_OIP_SERVICE)
    await client.start()
    try:
        for n in (1, 8, 64, 256):  # 256: a whole DecideBatch in one call
            got = await client.predict(rows[:n].tolist(), timeout_s=10.0)
            assert got.model_version == "1"  # Triton numbers versions
            assert got.scores == pytest.approx(want[:n], abs=1e-6)
    finally:
        await client.stop()
    assert float(np.std(want)) > 0.01, "a constant model would pass the check above"


async def test_the_decision_path_answers_from_triton_with_the_archives_versions(
    triton: str, start_app, trained_models, channel_to, feature_writer, tmp_path
) -> None:
    champion, challenger = trained_models["champion"], trained_models["challenger"]
    app: DecisionApp = await start_app(
        torchserve={
            "primary_address": triton,
            "secondary_address": triton,
            "challenger_address": triton,
            "protocol": "kserve-v2",
            # Triton answers version "1": the versions of the archives it was built from.
            "model_version": "archive",
        },
        drift={"model_store": str(champion.path.parent)},
        admin={"tokens": TOKENS},
    )
    await feature_writer.write_many([sample_record("BTC-USD")])
    stub = decision_stub(channel_to(app))
    row = np.array(
        [model_row(1.0, tuple(SAMPLE_FEATURES[name] for name in FEATURE_NAMES))], dtype=np.float32
    )
    primary = [await stub.Decide(buy(), timeout=2.0) for _ in range(3)]
    (want,) = offline_scores(champion.path, row, tmp_path / "champion")
    assert {a.source for a in primary} == {decision_pb2.SOURCE_PRIMARY}
    assert {a.model_version for a in primary} == {champion.version}
    assert all(a.score == pytest.approx(want, abs=1e-6) for a in primary)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).SetCanary(
            admin_pb2.SetCanaryRequest(weight=1.0, reason="challenger on Triton", force=True),
            metadata=OPERATOR,
            timeout=5.0,
        )
    canary = [await stub.Decide(buy(), timeout=2.0) for _ in range(3)]
    (want,) = offline_scores(challenger.path, row, tmp_path / "challenger")
    assert {a.source for a in canary} == {decision_pb2.SOURCE_CANARY}
    assert {a.model_version for a in canary} == {challenger.version}
    assert all(a.score == pytest.approx(want, abs=1e-6) for a in canary)


async def test_triton_refuses_a_request_queued_past_its_own_timeout(triton: str) -> None:
    """The decision client sends each call's budget as the request's queue timeout: a
    request its caller has given up on is refused, not scored."""
    rows = [[0.0] * MODEL_INPUT_WIDTH]
    async with grpc.aio.insecure_channel(triton) as channel:
        infer = oip_model_infer(channel, TRITON_OIP_SERVICE)
        # A timeout past the repository's ceiling is held to the ceiling, not refused.
        patient = oip_request("champion", rows, queue_timeout_s=1000.0)
        assert len((await infer(patient, timeout=10.0)).outputs) == 1
        given_up = oip_request("champion", rows, queue_timeout_s=1e-6)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await infer(given_up, timeout=10.0)
    assert "timeout" in (refused.value.details() or "").lower()
