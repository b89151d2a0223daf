"""Live drift: PSI of recent decisions against the serving model's training reference,
read from its archive; nothing reported before there is enough to say."""

from __future__ import annotations

import asyncio
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.drift import histogram
from feature_cache.schema import FEATURE_NAMES
from server.drift import DriftMonitor, ModelReferences, Reference, Ring, archived_version
from server.settings import DriftSettings
from torchserve.archive import META_FILE

SETTINGS = DriftSettings(model_store="unused")
RNG = np.random.default_rng(7)
TRAINING = RNG.normal(size=(20_000, len(FEATURE_NAMES)))
TRAINING_SCORES = RNG.uniform(size=20_000)


def reference(version: str = "v1") -> Reference:
    return Reference(
        version,
        {name: histogram(TRAINING[:, i]) for i, name in enumerate(FEATURE_NAMES)},
        histogram(TRAINING_SCORES),
    )


class References:
    """Known references by version (no archives)."""

    def __init__(self, *known: Reference) -> None:
        self._known = {r.model_version: r for r in known}

    def get(self, version: str) -> Reference | None:
        return self._known.get(version)


@pytest.fixture(autouse=True)
def every_decision_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows a test observes at once stand for decisions spread over the window."""
    monkeypatch.setattr("server.drift.SAMPLE_EVERY_S", 0.0)
    monkeypatch.setattr("server.drift.MIN_SPAN_S", 0.0)


def monitor(*known: Reference) -> DriftMonitor:
    return DriftMonitor(SETTINGS, References(*known))  # type: ignore[arg-type]


def live_rows(count: int, shift_feature: str | None = None) -> list[tuple[float, ...]]:
    rows = RNG.normal(size=(count, len(FEATURE_NAMES)))
    if shift_feature is not None:
        rows[:, FEATURE_NAMES.index(shift_feature)] += 1.5
    return [tuple(row) for row in rows]


async def test_live_values_like_training_show_no_drift_and_a_shifted_feature_does() -> None:
    drift = monitor(reference())
    for _ in range(100):  # decisions of ten orders, the champion answering
        rows = live_rows(10, shift_feature="ofi_5s")
        drift.observe(rows, list(RNG.uniform(size=10)), "v1")
    status = await drift.refresh()
    assert status.problem == ""
    assert (status.model_version, status.samples, status.scores) == ("v1", 1000, 1000)
    assert set(status.feature_psi) == set(FEATURE_NAMES)
    assert status.feature_psi["ofi_5s"] > 0.25
    others = [psi for name, psi in status.feature_psi.items() if name != "ofi_5s"]
    assert max(others) < 0.1
    assert status.score_psi is not None and status.score_psi < 0.1
    assert status.computed_at_us > 0


async def test_decisions_without_features_or_model_count_only_what_they_have() -> None:
    drift = monitor(reference())
    drift.observe([None, None], [], "")
    drift.observe(live_rows(600), [], "")  # the ladder answered: no champion score
    await drift.refresh()
    assert drift.status().problem == "the champion has not answered yet"
    assert drift.status().samples == 600
    drift.observe(live_rows(1), [0.4], "v1")
    status = await drift.refresh()
    assert status.problem == "" and status.samples == 601 and status.scores == 1
    assert status.score_psi is None, "one score is no distribution"


async def test_too_few_decisions_or_no_reference_is_said_and_no_psi_given() -> None:
    drift = monitor(reference("v1"))
    drift.observe(live_rows(100), [0.5] * 100, "v1")
    await drift.refresh()
    assert drift.status().problem == "100 decisions with features (needs 500)"
    assert drift.status().feature_psi == {}
    drift.observe(live_rows(600), [0.5] * 600, "v2-unknown-version")
    await drift.refresh()
    assert drift.status().problem.startswith("no archive of model version v2-unknown-v")
    assert drift.status().feature_psi == {}


def write_archive(path: Path, version: str, doc: dict[str, Any] | None) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(META_FILE, json.dumps({"version": version}))
        if doc is not None:
            archive.writestr("reference.json", json.dumps(doc))


def test_references_are_read_from_the_archive_of_each_version(tmp_path: Path) -> None:
    doc: dict[str, Any] = {
        "features": {"spread_bps": {"edges": [1.0, 2.0], "shares": [0.2, 0.5, 0.3]}},
        "score": {"edges": [0.5], "shares": [0.5, 0.5]},
    }
    write_archive(tmp_path / "champion.mar", "aaa", doc)
    write_archive(tmp_path / "old.mar", "bbb", None)  # built before references existed
    (tmp_path / "notes.txt").write_text("not an archive")
    references = ModelReferences(tmp_path)
    found = references.get("aaa")
    assert found == Reference("aaa", doc["features"], doc["score"])
    assert references.get("bbb") is None
    assert references.get("ccc") is None


async def test_the_monitor_refreshes_by_itself_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("server.drift.INTERVAL_S", 0.01)
    drift = DriftMonitor(
        DriftSettings(model_store="unused"),
        References(reference()),  # type: ignore[arg-type]
    )
    drift.observe(live_rows(600), [0.5] * 600, "v1")
    await drift.start()
    try:
        async with asyncio.timeout(5.0):
            while drift.status().problem:  # noqa: ASYNC110 - the task sets it, no event
                await asyncio.sleep(0.01)
    finally:
        await drift.stop()
    assert drift.status().feature_psi


def test_the_ring_keeps_the_last_values_only() -> None:
    ring = Ring(4, width=2)
    assert len(ring) == 0 and ring.snapshot()[0].shape == (0, 2)
    for i in range(7):
        ring.append((i, -i), now_s=float(i))
    assert len(ring) == 4
    values, span_s = ring.snapshot()
    assert sorted(map(tuple, values.tolist())) == [(3, -3), (4, -4), (5, -5), (6, -6)]
    assert span_s == 3.0


def test_the_ring_keeps_one_value_every_so_often_so_that_it_spans_time() -> None:
    ring = Ring(100, every_s=1.0)
    for i in range(50):  # ten a second for five seconds
        now_s = i / 10
        if ring.due(now_s):
            ring.append(float(i), now_s)
    values, span_s = ring.snapshot()
    assert sorted(values.tolist()) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert span_s == 4.0


async def test_no_psi_until_the_sample_spans_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last thousands of decisions at a high rate are seconds of one regime: before,
    a healthy stack's own generated data read as SHIFTED within a minute."""
    monkeypatch.setattr("server.drift.MIN_SPAN_S", 600.0)
    drift = monitor(reference())
    drift.observe(live_rows(600), [0.5] * 600, "v1")
    status = await drift.refresh()
    assert status.feature_psi == {}
    assert status.problem == (
        "decisions sampled over 0 s, 600 s needed: a shorter span is one regime of the market,"
        " not its distribution"
    )


async def test_a_new_model_version_starts_the_score_window_afresh() -> None:
    drift = monitor(reference("v1"), reference("v2"))
    drift.observe(live_rows(600), [0.9] * 600, "v1")
    drift.observe(live_rows(10), [0.5] * 10, "v2")
    status = await drift.refresh()
    assert (status.model_version, status.samples, status.scores) == ("v2", 610, 10)


def test_the_archived_version_is_the_named_archives_or_a_clear_error(tmp_path: Path) -> None:
    write_archive(tmp_path / "champion.mar", "c0ffee", None)
    assert archived_version(tmp_path, "champion") == "c0ffee"
    with pytest.raises(ValueError, match=r"no model archive with a version at .*challenger\.mar"):
        archived_version(tmp_path, "challenger")
