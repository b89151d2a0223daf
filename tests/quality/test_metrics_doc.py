"""docs/metrics.md names every metric the labeler exports."""

from __future__ import annotations

import re
from pathlib import Path

import redis.asyncio as aioredis
import sqlalchemy as sa

from quality.labeler import Labeler
from quality.metrics import LabelerCollector
from quality.settings import QualitySettings
from quality.store import OutcomeStore

REPO = Path(__file__).resolve().parents[2]


def test_docs_metrics_names_every_metric_of_the_labeler() -> None:
    engine = sa.create_engine("sqlite://")
    redis = aioredis.Redis()  # never connected: collecting reads the labeler's own state
    labeler = Labeler(QualitySettings(), redis, OutcomeStore(engine, horizon_ms=2000))
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in LabelerCollector(labeler).collect()
    }
    engine.dispose()
    docs = (REPO / "docs/metrics.md").read_text()
    assert len(names) > 10
    assert sorted(name for name in names if not re.search(rf"\b{name}\b", docs)) == []
