"""Archives in real TorchServe processes: served scores equal offline scores for the same
rows, through both inference APIs, bad rows get a clear error, and the Kubernetes probes'
request is answered by the model's worker."""

from __future__ import annotations

import asyncio
import math
import urllib.request

import numpy as np
import pytest

from feature_cache.schema import MODEL_INPUT_WIDTH
from server.batching import BatchingClient
from server.model_client import ModelScores, TorchServeClient
from server.model_errors import ModelInputError
from server.oip import OipClient
from tests.conftest import offline_scores

pytestmark = pytest.mark.integration

CLIENTS = {"torchserve": TorchServeClient, "oip": OipClient}


@pytest.fixture(scope="module")
def heldout_rows(model_store) -> np.ndarray:
    store, _ = model_store
    rows: np.ndarray = np.load(store / "heldout.npz")["x"][:64]
    return rows


@pytest.mark.parametrize("protocol", ["torchserve", "oip"])
@pytest.mark.parametrize("model", ["champion", "challenger"])
async def test_served_scores_equal_offline_scores(
    protocol, model, replicas, challenger_replica, trained_models, heldout_rows, tmp_path
):
    replica = replicas["primary"] if model == "champion" else challenger_replica
    archive = trained_models[model]
    want = offline_scores(archive.path, heldout_rows, tmp_path)
    client = CLIENTS[protocol]("replica", replica.address, model)
    await client.start()
    try:
        for n in (1, 8, 64):
            got = await client.predict(heldout_rows[:n].tolist(), timeout_s=10.0)
            assert got.model_version == archive.version
            assert got.scores == pytest.approx(want[:n], abs=1e-6)
        # The scores spread: a model that answers a constant would pass the check above.
        assert float(np.std(want)) > 0.01
    finally:
        await client.stop()


@pytest.mark.parametrize("protocol", ["torchserve", "oip"])
async def test_bad_rows_get_a_clear_error_and_the_replica_stays_up(
    protocol, replicas, model_store, heldout_rows
):
    client = CLIENTS[protocol]("primary", replicas["primary"].address, "champion")
    await client.start()
    try:
        with pytest.raises(ModelInputError, match=r"shape|whole number"):
            await client.predict([[0.5] * (MODEL_INPUT_WIDTH - 1)], timeout_s=10.0)
        with pytest.raises(ModelInputError, match=r"non-finite|not finite"):
            await client.predict([[math.inf] * MODEL_INPUT_WIDTH], timeout_s=10.0)
        good = await client.predict(heldout_rows[:2].tolist(), timeout_s=10.0)
        assert len(good.scores) == 2
    finally:
        await client.stop()


@pytest.mark.parametrize("protocol", ["torchserve", "oip"])
async def test_micro_batched_scores_are_the_scores_of_unbatched_calls(
    protocol, replicas, heldout_rows
):
    """64 concurrent one-row calls, coalesced into a few model calls, get what each row
    gets alone, and a bad row among them fails alone. Equal to float32 rounding, not bit
    for bit: a matrix product over 16 rows may round a row's last bit differently from
    one over a single row (6e-8 seen), which TorchServe's own server-side batching of
    concurrent requests does as well."""
    plain = CLIENTS[protocol]("primary", replicas["primary"].address, "champion")
    batching = BatchingClient(
        CLIENTS[protocol]("primary", replicas["primary"].address, "champion"),
        max_batch_rows=16,
        max_concurrent_calls=2,
    )
    await plain.start()
    await batching.start()
    try:
        rows = heldout_rows.tolist()
        alone = [(await plain.predict([row], timeout_s=10.0)).scores for row in rows]
        bad = [[math.inf] * MODEL_INPUT_WIDTH]
        answers = await asyncio.gather(
            *(batching.predict([row], timeout_s=10.0) for row in rows[:32]),
            batching.predict(bad, timeout_s=10.0),
            *(batching.predict([row], timeout_s=10.0) for row in rows[32:]),
            return_exceptions=True,
        )
        assert isinstance(answers.pop(32), ModelInputError)
        batched = [a.scores for a in answers if isinstance(a, ModelScores)]
        assert len(batched) == len(alone)
        for got, want in zip(batched, alone, strict=True):
            assert got == pytest.approx(want, abs=1e-6)
        stats = batching.stats()
        assert stats.calls < len(rows) / 2, stats  # they were coalesced
    finally:
        await batching.stop()
        await plain.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10.0) as response:
        return response.status, response.read().decode()


async def test_the_probes_request_is_answered_by_the_models_worker(replicas, challenger_replica):
    """The Kubernetes probes of every TorchServe container GET /predictions/<model>
    (k8s/base): the model's worker itself answers it (the handler's error naming the
    missing rows, 200), where /ping is answered by the frontend from its count of
    workers, which still says Healthy when the worker answers nothing."""
    for replica in (replicas["primary"], challenger_replica):
        status, body = await asyncio.to_thread(
            _get, replica.ports.rest_inference, f"/predictions/{replica.model_name}"
        )
        assert status == 200
        assert "missing input 'rows'" in body
