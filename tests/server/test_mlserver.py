"""Model-server portability: the challenger served by a real MLServer (from PyPI, in a
virtualenv of its own: .tools/mlserver, made by ``make setup-ci``) answers the decision
path through the Open Inference Protocol with the archive's own scores and version."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from core.processes import ManagedProcess, free_ports, start_ready
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from feature_cache.schema import FEATURE_NAMES, model_row
from server.app import DecisionApp
from server.oip import OipClient
from tests.conftest import REPO, offline_scores
from tests.server.conftest import (
    OPERATOR,
    SAMPLE_FEATURES,
    TOKENS,
    UNHURRIED,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)
from torchserve.archive import ArchiveInfo
from torchserve.mlserver import (
    MLSERVER_OIP_SERVICE,
    mlserver_process,
    model_ready,
    model_repository,
    server_settings,
)

pytestmark = pytest.mark.integration

MLSERVER = REPO / ".tools" / "mlserver" / "bin" / "mlserver"


@pytest.fixture(scope="module")
def mlserver(
    trained_models: dict[str, ArchiveInfo], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real MLServer serving the challenger archive's model; its gRPC address."""
    if not MLSERVER.exists():
        pytest.fail(f"{MLSERVER} not found: `make setup-ci` installs MLServer there")
    folder = tmp_path_factory.mktemp("mlserver")
    model_repository(trained_models["challenger"].path, folder)
    grpc_port, http_port, metrics_port = free_ports(3)
    server_settings(
        folder,
        host="127.0.0.1",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
    address = f"127.0.0.1:{grpc_port}"
    proc: ManagedProcess = mlserver_process(MLSERVER, folder, folder / "mlserver.log")
    start_ready(proc, lambda: model_ready(address, "challenger"), timeout_s=90.0)
    try:
        yield address
    finally:
        proc.stop()


async def test_mlserver_scores_equal_the_archives_offline_scores(
    mlserver: str, trained_models, model_store, tmp_path
) -> None:
    store, _ = model_store
    rows: np.ndarray = np.load(store / "heldout.npz")["x"][:64]
    archive = trained_models["challenger"]
    want = offline_scores(archive.path, rows, tmp_path)
    client = OipClient("challenger", mlserver, "challenger", service=MLSERVER_OIP_SERVICE)
    pinned = OipClient(
        "challenger", mlserver, "challenger", service=MLSERVER_OIP_SERVICE, model_version="pin"
    )
    await client.start()
    await pinned.start()
    try:
        for n in (1, 8, 64):
            got = await client.predict(rows[:n].tolist(), timeout_s=10.0)
            assert got.model_version == archive.version  # MLServer answers the archive's
            assert got.scores == pytest.approx(want[:n], abs=1e-6)
        assert float(np.std(want)) > 0.01, "a constant model would pass the check above"
        assert (await pinned.predict(rows[:2].tolist(), timeout_s=10.0)).model_version == "pin"
    finally:
        await client.stop()
        await pinned.stop()


async def test_the_canary_lane_decides_with_the_challenger_on_mlserver(
    mlserver: str, start_app, replicas, trained_models, channel_to, feature_writer, tmp_path
) -> None:
    app: DecisionApp = await start_app(
        torchserve={
            **replica_settings(replicas),
            "challenger_address": mlserver,
            "challenger_protocol": "kserve-v2",
        },
        admin={"tokens": TOKENS},
        **UNHURRIED,
    )
    await feature_writer.write_many([sample_record("BTC-USD")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).SetCanary(
            admin_pb2.SetCanaryRequest(weight=1.0, reason="challenger on MLServer", force=True),
            metadata=OPERATOR,
            timeout=5.0,
        )
    stub = decision_stub(channel_to(app))
    answers = [await stub.Decide(buy(), timeout=2.0) for _ in range(5)]

    archive = trained_models["challenger"]
    row = model_row(1.0, tuple(SAMPLE_FEATURES[name] for name in FEATURE_NAMES))
    (want,) = offline_scores(archive.path, np.array([row], dtype=np.float32), tmp_path)
    assert [a.source for a in answers] == [decision_pb2.SOURCE_CANARY] * 5
    assert {a.model_version for a in answers} == {archive.version}
    assert {a.model_name for a in answers} == {"challenger"}
    assert all(a.score == pytest.approx(want, abs=1e-6) for a in answers)
