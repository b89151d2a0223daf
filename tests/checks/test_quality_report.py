"""The quality report's deliberately broken model: the champion with inverted scores."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from checks.quality_report import inverted_archive
from feature_cache.schema import MODEL_INPUT_WIDTH
from torchserve.archive import ArchiveInfo, archive_meta, archive_version


def scores(archive: Path, rows: np.ndarray, tmp_path: Path) -> np.ndarray:
    meta = archive_meta(archive)
    model_file = tmp_path / f"{archive.stem}.pt"
    with zipfile.ZipFile(archive) as mar:
        model_file.write_bytes(mar.read(meta["serialized_file"]))
    model = torch.jit.load(str(model_file))
    with torch.inference_mode():
        return np.asarray(model(torch.from_numpy(rows)).numpy())


def test_the_inverted_challenger_scores_one_minus_the_champion(
    trained_models: dict[str, ArchiveInfo], tmp_path: Path
) -> None:
    champion = trained_models["champion"].path
    inverted_archive(champion, tmp_path / "out")
    challenger = tmp_path / "out" / "challenger.mar"
    rows = np.random.default_rng(0).normal(size=(64, MODEL_INPUT_WIDTH)).astype(np.float32)
    got = scores(challenger, rows, tmp_path)
    want = 1.0 - scores(champion, rows, tmp_path)
    np.testing.assert_allclose(got, want, atol=1e-6)
    meta = archive_meta(challenger)
    assert meta["model_name"] == "challenger"
    assert meta["inverted_from"] == trained_models["champion"].version
    assert archive_version(challenger) not in (None, trained_models["champion"].version)
