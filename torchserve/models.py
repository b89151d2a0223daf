"""The models' folder (``make models`` writes it): its manifest, whether it is current
for a spec and the code as it is, and training it (``torchserve.train``, in a child
process) when it is not. Imports no torch or xgboost: the local stack, the benches and the
tests' sessions read archives without their seconds of imports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchserve.archive import ArchiveInfo
from torchserve.dataset import DataSpec

REPO = Path(__file__).resolve().parents[1]

# The sources whose change can change a model: a cached build with another digest is stale.
CODE_FILES = (
    "torchserve/train.py",
    "torchserve/models.py",
    "torchserve/dataset.py",
    "torchserve/model.py",
    "torchserve/reference.py",
    "core/drift.py",
    "torchserve/archive.py",
    "torchserve/handler.py",
    "feature_cache/generator.py",
    "feature_cache/features.py",
    "feature_cache/windows.py",
    "feature_cache/schema.py",
    "core/labels.py",
)


@dataclass(frozen=True)
class TrainSpec:
    data: DataSpec = field(default_factory=DataSpec)
    mlp_hidden: int = 32
    mlp_max_epochs: int = 40
    mlp_patience: int = 5
    mlp_batch: int = 512
    mlp_learning_rate: float = 1e-3
    xgb_max_rounds: int = 600
    xgb_early_stopping: int = 40
    xgb_params: tuple[tuple[str, Any], ...] = (
        ("objective", "binary:logistic"),
        ("eval_metric", "logloss"),
        ("tree_method", "hist"),
        ("max_depth", 4),
        ("eta", 0.05),
        ("subsample", 0.8),
        ("colsample_bytree", 0.8),
        ("min_child_weight", 5),
        ("nthread", 1),
    )

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["data"] = self.data.as_dict()
        doc["xgb_params"] = dict(self.xgb_params)
        return doc


def code_digest() -> str:
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return digest.hexdigest()


def is_current(out: Path, spec: TrainSpec) -> bool:
    """Whether ``out`` holds models built from ``spec`` by the code as it is now."""
    try:
        manifest = json.loads((out / "models.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("spec") == json.loads(json.dumps(spec.as_dict()))
        and manifest.get("code_digest") == code_digest()
        and all((out / m["archive"]).exists() for m in manifest.get("models", {}).values())
    )


def ensure_models(
    out: Path,
    *,
    seed: int = 0,
    days: int = DataSpec.days,
    events_per_day: int = DataSpec.events_per_day,
) -> dict[str, ArchiveInfo]:
    """The models in ``out`` for this spec, trained first (in a child process) if stale."""
    spec = TrainSpec(data=DataSpec(seed=seed, days=days, events_per_day=events_per_day))
    if not is_current(out, spec):
        argv = [sys.executable, "-m", "torchserve.train", "--out", str(out), "--seed", str(seed)]
        argv += ["--days", str(days), "--events-per-day", str(events_per_day), "--if-stale"]
        subprocess.run(argv, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})  # noqa: S603
    return load_models(out)


def load_models(out: Path) -> dict[str, ArchiveInfo]:
    """The archives listed in ``out/models.json``, by model name."""
    manifest = json.loads((out / "models.json").read_text())
    return {
        name: ArchiveInfo(name, out / model["archive"], model["version"])
        for name, model in manifest["models"].items()
    }
