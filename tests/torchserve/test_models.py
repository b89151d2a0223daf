"""The training pipeline's reproducibility and the handler's contract, run in-process."""

from __future__ import annotations

import json
import site
import struct
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from core.drift import psi
from feature_cache.schema import MODEL_INPUT_NAMES, MODEL_INPUT_WIDTH, pack_rows
from tests.conftest import TEST_TRAINING, shared_models
from torchserve import archive as archive_cli
from torchserve.archive import archive_meta
from torchserve.dataset import DataSpec, simulate_day
from torchserve.mlserver import model_repository
from torchserve.models import ensure_models, load_models
from torchserve.triton import package_dirs


def test_same_seed_same_versions_other_seed_other_versions(tmp_path: Path, trained_models):
    again = ensure_models(tmp_path / "again", seed=0, **TEST_TRAINING)
    other = shared_models(seed=1)
    for name in ("champion", "challenger"):
        assert again[name].version == trained_models[name].version
        assert other[name].version != trained_models[name].version
        assert len(again[name].version) == 64
    assert load_models(tmp_path / "again") == again


def test_labels_follow_the_decision_semantics():
    spec = DataSpec(days=1, events_per_day=20_000)
    rows = simulate_day(spec, 0)
    assert rows.x.shape[1] == MODEL_INPUT_WIDTH
    buys, sells = rows.x[:, 0] == 1.0, rows.x[:, 0] == -1.0
    assert buys.sum() == sells.sum() > 100
    # A move beyond the half-spread favours one side at most; both lose when it stays inside.
    pair = rows.y.reshape(-1, 2)
    assert not (pair[:, 0] & pair[:, 1]).any()
    assert 0.2 < rows.y.mean() < 0.6
    assert (np.diff(rows.time_us) >= 0).all()
    assert rows.time_us[0] >= spec.warmup_s * 1_000_000


def test_archives_carry_reference_distributions(trained_models):
    for name, framework in (("champion", "torchscript"), ("challenger", "xgboost")):
        path = trained_models[name].path
        meta = archive_meta(path)
        assert meta["framework"] == framework
        assert meta["version"] == trained_models[name].version
        assert meta["split"]["heldout_day"] > meta["split"]["validation_day"]
        with zipfile.ZipFile(path) as mar:
            reference = json.loads(mar.read("reference.json"))
        assert set(reference["features"]) == set(MODEL_INPUT_NAMES[1:])
        spread = reference["features"]["spread_bps"]
        assert sum(spread["shares"]) == pytest.approx(1.0)
        assert len(spread["shares"]) == len(spread["edges"]) + 1
        assert 0.0 < min(reference["score"]["edges"]) < max(reference["score"]["edges"]) < 1.0


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    values = rng.normal(size=20_000)
    from core.drift import histogram

    reference = histogram(values)
    assert psi(reference, rng.normal(size=20_000)) < 0.01
    assert psi(reference, rng.normal(loc=1.0, size=20_000)) > 0.25


@pytest.fixture(scope="module", params=["champion", "challenger"])
def handler(request, trained_models, tmp_path_factory: pytest.TempPathFactory):
    archive = trained_models[request.param]
    model_dir = tmp_path_factory.mktemp(f"model-dir-{request.param}")
    with zipfile.ZipFile(archive.path) as mar:
        mar.extractall(model_dir)
    import torchserve.handler as module

    service = module.ScoreHandler()
    service.initialize(SimpleNamespace(system_properties={"model_dir": str(model_dir)}))
    return service, archive.version


def oip_body(rows, *, shape=None, datatype="FP32", name="rows"):
    flat = [v for row in rows for v in row]
    tensor = {"name": name, "datatype": datatype, "shape": shape or [len(rows), MODEL_INPUT_WIDTH]}
    return {"body": {"id": "r1", "model_name": "m", "inputs": [{**tensor, "data": flat}]}}


def test_handler_scores_each_row_of_each_request_in_both_forms(handler):
    service, version = handler
    rows = [[1.0 if i % 2 else -1.0] + [0.1 * i] * (MODEL_INPUT_WIDTH - 1) for i in range(5)]
    out = service.handle(
        [{"rows": pack_rows(rows[:2])}, {"rows": pack_rows(rows[2:])}, oip_body(rows[2:])], None
    )
    first, second, oip = (json.loads(o) for o in out)
    assert first["model_version"] == version
    assert len(first["scores"]) == 2 and len(second["scores"]) == 3
    assert oip["model_version"] == version and oip["id"] == "r1"
    assert oip["outputs"] == [
        {"name": "scores", "datatype": "FP32", "shape": [3], "data": second["scores"]}
    ]
    alone = json.loads(service.handle([{"rows": pack_rows(rows[3:4])}], None)[0])
    assert alone["scores"][0] == pytest.approx(second["scores"][1], abs=1e-6)


def test_bad_rows_get_a_clear_error_and_do_not_spoil_the_batch(handler):
    service, _ = handler
    good = pack_rows([[0.0] * MODEL_INPUT_WIDTH])
    nan_row = struct.pack(f"<{MODEL_INPUT_WIDTH}f", *([float("nan")] * MODEL_INPUT_WIDTH))
    requests = [
        {"rows": good[:-4]},
        {"rows": nan_row},
        {"other": b""},
        oip_body([[0.0] * 3], shape=[1, 3]),
        oip_body([[0.0] * MODEL_INPUT_WIDTH], datatype="FP64"),
        oip_body([[0.0] * MODEL_INPUT_WIDTH], name="x"),
        {"rows": good},
    ]
    out = [json.loads(o) for o in service.handle(requests, None)]
    assert "not a whole number of 12-float rows" in out[0]["error"]
    assert out[1]["error"] == "row 0 has a non-finite value"
    assert out[2]["error"] == "missing input 'rows'"
    oip_errors = [o["outputs"][0] for o in out[3:6]]
    assert all(e["name"] == "error" and e["datatype"] == "BYTES" for e in oip_errors)
    assert "must have shape [n, 12], got [1, 3]" in oip_errors[0]["data"][0]
    assert "must be FP32, got FP64" in oip_errors[1]["data"][0]
    assert "missing input tensor 'rows'" in oip_errors[2]["data"][0]
    assert len(out[6]["scores"]) == 1


def test_the_archive_cli_prints_the_version_the_images_are_checked_against(
    trained_models, tmp_path: Path, capsys
):
    main = archive_cli.main
    archive = trained_models["challenger"]
    assert main(["version", str(archive.path)]) == 0
    assert capsys.readouterr().out.strip() == archive.version
    not_an_archive = tmp_path / "x.mar"
    not_an_archive.write_bytes(b"not a zip")
    assert main(["version", str(not_an_archive)]) == 1
    assert main(["versions"]) == 2


def test_an_mlserver_repository_holds_the_archives_model_and_version(trained_models, tmp_path):
    archive = trained_models["challenger"]
    model_dir = model_repository(archive.path, tmp_path)
    settings = json.loads((model_dir / "model-settings.json").read_text())
    assert settings["parameters"] == {"uri": "./model.json", "version": archive.version}
    assert settings["implementation"] == "mlserver_xgboost.XGBoostModel"
    assert (model_dir / "model.json").stat().st_size > 1000
    with pytest.raises(ValueError, match="XGBoost challenger"):
        model_repository(trained_models["champion"].path, tmp_path / "other")


def test_an_archive_is_staged_in_a_folder_of_its_own(tmp_path: Path):
    """torch-model-archiver stages the files in {temp folder}/{model name}: a build beside
    another of the same name (``make models`` during a test run) shared it and failed.
    Something in that shared place must not matter to a build."""
    name = f"staging-{tmp_path.name}"
    shared = Path(tempfile.gettempdir()) / name
    shared.write_text("not a folder: the archiver cannot remove it as one")
    model = tmp_path / "model.json"
    model.write_text("{}")
    try:
        info = archive_cli.build_archive(
            tmp_path / "store", model_name=name, serialized_file=model, meta={}, extra_files={}
        )
    finally:
        shared.unlink()
    assert info.path.exists() and len(info.version) == 64


def test_the_triton_stub_is_given_the_packages_a_pth_file_adds(tmp_path: Path, monkeypatch):
    """A venv laid over another environment (the device kit's) names that one's packages
    only in a .pth file; the stub, which reads python-path.txt and no .pth, needs both."""
    venv_site, other = tmp_path / "site-packages", tmp_path / "other-env"
    venv_site.mkdir()
    other.mkdir()
    (venv_site / "zz-other.pth").write_text(f"{other}\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    site.addsitedir(str(venv_site))
    dirs = package_dirs()
    assert str(venv_site) in dirs and str(other) in dirs
    assert sysconfig.get_paths()["stdlib"] not in dirs  # the stub's Python brings its own
