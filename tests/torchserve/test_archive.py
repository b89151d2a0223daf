"""Archive reproducibility and the handler's contract (handler run in-process)."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from feature_cache.schema import MODEL_INPUT_WIDTH
from server.model_client import pack_rows
from torchserve.archive import build_archive


def test_same_seed_same_version_other_seed_other_version(tmp_path: Path, model_store):
    _, first = model_store
    again = build_archive(tmp_path / "a", seed=0)
    other = build_archive(tmp_path / "b", seed=1)
    assert again.version == first.version
    assert other.version != first.version
    assert len(first.version) == 64


@pytest.fixture(scope="module")
def handler(model_store, tmp_path_factory: pytest.TempPathFactory):
    _, archive = model_store
    model_dir = tmp_path_factory.mktemp("model-dir")
    with zipfile.ZipFile(archive.path) as mar:
        mar.extractall(model_dir)
    import torchserve.handler as module

    service = module.ScoreHandler()
    service.initialize(SimpleNamespace(system_properties={"model_dir": str(model_dir)}))
    return service, archive.version


def test_handler_scores_each_row_of_each_request(handler):
    service, version = handler
    rows = [[0.1 * i] * MODEL_INPUT_WIDTH for i in range(5)]
    out = service.handle([{"rows": pack_rows(rows[:2])}, {"rows": pack_rows(rows[2:])}], None)
    first, second = (json.loads(o) for o in out)
    assert first["model_version"] == version
    assert len(first["scores"]) == 2 and len(second["scores"]) == 3
    alone = json.loads(service.handle([{"rows": pack_rows(rows[3:4])}], None)[0])
    assert alone["scores"][0] == pytest.approx(second["scores"][1], abs=1e-6)


def test_bad_rows_get_a_clear_error_and_do_not_spoil_the_batch(handler):
    service, _ = handler
    good = pack_rows([[0.0] * MODEL_INPUT_WIDTH])
    nan_row = struct.pack(f"<{MODEL_INPUT_WIDTH}f", *([float("nan")] * MODEL_INPUT_WIDTH))
    out = [
        json.loads(o)
        for o in service.handle(
            [{"rows": good[:-4]}, {"rows": nan_row}, {"other": b""}, {"rows": good}], None
        )
    ]
    assert "not a whole number of 12-float rows" in out[0]["error"]
    assert out[1]["error"] == "row 0 has a non-finite value"
    assert out[2]["error"] == "missing input 'rows'"
    assert len(out[3]["scores"]) == 1
