"""The quality report's deliberately broken model: the champion with inverted scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from feature_cache.schema import MODEL_INPUT_WIDTH
from tests.conftest import offline_scores
from torchserve.archive import ArchiveInfo, archive_meta, archive_version


def test_the_inverted_challenger_scores_one_minus_the_champion(
    trained_models: dict[str, ArchiveInfo], tmp_path: Path
) -> None:
    # Imported here: the report builds its model with torch, which collection then skips.
    from checks.quality_report import inverted_archive

    champion = trained_models["champion"].path
    inverted_archive(champion, tmp_path / "out")
    challenger = tmp_path / "out" / "challenger.mar"
    rows = np.random.default_rng(0).normal(size=(64, MODEL_INPUT_WIDTH)).astype(np.float32)
    got = offline_scores(challenger, rows, tmp_path / "challenger")
    want = 1.0 - np.asarray(offline_scores(champion, rows, tmp_path / "champion"))
    np.testing.assert_allclose(got, want, atol=1e-6)
    meta = archive_meta(challenger)
    assert meta["model_name"] == "challenger"
    assert meta["inverted_from"] == trained_models["champion"].version
    assert archive_version(challenger) not in (None, trained_models["champion"].version)
