"""``make run``'s ``--models DIR``: a folder without the champion's and the challenger's
archives stops the start with what is missing, before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.processes import ProcessStartError
from localstack.stack import served_models


def models_folder(folder: Path, listed: dict[str, str], present: list[str]) -> Path:
    folder.mkdir()
    models = {name: {"archive": archive, "version": "v1"} for name, archive in listed.items()}
    (folder / "models.json").write_text(json.dumps({"models": models}))
    for archive in present:
        (folder / archive).write_bytes(b"")
    return folder


def test_a_folder_without_models_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProcessStartError, match=r"no models in .*models\.json"):
        served_models(tmp_path / "nowhere")


def test_unlisted_models_and_missing_archives_are_named(tmp_path: Path) -> None:
    folder = models_folder(tmp_path / "m", {"champion": "champion.mar"}, present=[])
    with pytest.raises(ProcessStartError) as raised:
        served_models(folder)
    assert "models not listed ['challenger']" in str(raised.value)
    assert f"archives missing ['{folder / 'champion.mar'}']" in str(raised.value)


def test_a_complete_folder_gives_both_archives(tmp_path: Path) -> None:
    listed = {"champion": "champion.mar", "challenger": "challenger.mar"}
    folder = models_folder(tmp_path / "m", listed, present=list(listed.values()))
    archives = served_models(folder)
    assert {name: a.path for name, a in archives.items()} == {
        "champion": folder / "champion.mar",
        "challenger": folder / "challenger.mar",
    }


@pytest.mark.parametrize("manifest", ['{"models": ["champion"]}', '{"models": {"champion": {}}}'])
def test_a_models_json_of_another_shape_is_named(tmp_path: Path, manifest: str) -> None:
    (tmp_path / "models.json").write_text(manifest)
    with pytest.raises(ProcessStartError, match=r"no models in "):
        served_models(tmp_path)
