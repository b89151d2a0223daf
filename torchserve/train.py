"""``make models``: simulated days -> features -> labels -> walk-forward split -> the
champion (Torch MLP, TorchScript) and the challenger (XGBoost, native JSON) -> archives.

Walk-forward by day: the first ``days - 2`` train, the next validates (early stopping),
the last is held out for the evaluation report. One seed fixes everything, so the same
spec gives archives with the same version hash (``main`` re-runs itself under
``PYTHONHASHSEED=0``). Writes to ``--out``: both archives, ``heldout.npz`` and
``models.json``. Data, split and outputs: docs/model-serving.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xgboost as xgb
from torch import nn

from feature_cache.schema import MODEL_INPUT_NAMES, MODEL_INPUT_WIDTH, SCHEMA_VERSION
from torchserve.archive import ArchiveInfo, build_archive
from torchserve.dataset import DataSpec, Rows, concat, simulate
from torchserve.model import ScoreMLP, fit_scaling, to_torchscript
from torchserve.models import REPO, TrainSpec, code_digest, is_current
from torchserve.reference import reference_distributions


@dataclass(frozen=True)
class Split:
    train: Rows
    valid: Rows
    heldout: Rows


def walk_forward(days: list[Rows]) -> Split:
    if len(days) < 3:
        raise ValueError(f"need at least 3 days (train, validate, hold out), got {len(days)}")
    return Split(concat(days[:-2]), days[-2], days[-1])


Say = Callable[[str], None]


def train_champion(split: Split, spec: TrainSpec, say: Say) -> ScoreMLP:
    torch.manual_seed(spec.data.seed)
    model = ScoreMLP(hidden=spec.mlp_hidden)
    fit_scaling(model, split.train.x)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.mlp_learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    x, y = torch.from_numpy(split.train.x), torch.from_numpy(split.train.y.astype(np.float32))
    vx, vy = torch.from_numpy(split.valid.x), torch.from_numpy(split.valid.y.astype(np.float32))
    shuffle = torch.Generator().manual_seed(spec.data.seed)
    best_loss, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, spec.mlp_max_epochs + 1):
        model.train()
        for batch in torch.split(torch.randperm(len(y), generator=shuffle), spec.mlp_batch):
            optimizer.zero_grad()
            loss_fn(model.logits(x[batch]), y[batch]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            valid_loss = float(loss_fn(model.logits(vx), vy))
        if valid_loss < best_loss - 1e-5:
            best_loss, best_state, stale = valid_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        say(f"      champion epoch {epoch:2d}: validation log-loss {valid_loss:.4f}")
        if stale >= spec.mlp_patience:
            break
    model.load_state_dict(best_state)
    return model.eval()


def train_challenger(split: Split, spec: TrainSpec, say: Say) -> xgb.Booster:
    params = {**dict(spec.xgb_params), "seed": spec.data.seed}
    train = xgb.DMatrix(split.train.x, label=split.train.y, feature_names=list(MODEL_INPUT_NAMES))
    valid = xgb.DMatrix(split.valid.x, label=split.valid.y, feature_names=list(MODEL_INPUT_NAMES))
    booster = xgb.train(
        params,
        train,
        num_boost_round=spec.xgb_max_rounds,
        evals=[(valid, "valid")],
        early_stopping_rounds=spec.xgb_early_stopping,
        verbose_eval=False,
    )
    rounds = booster.best_iteration + 1
    say(f"      challenger: {rounds} trees (validation log-loss {booster.best_score:.4f})")
    return booster[:rounds]


def torchscript_scores(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Scores from the saved TorchScript file, as the handler computes them."""
    model = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        return np.asarray(model(torch.from_numpy(x)).numpy(), dtype=np.float32)


def xgboost_scores(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Scores from the saved XGBoost JSON file, as the handler computes them."""
    booster = xgb.Booster(model_file=str(path))
    return np.asarray(booster.inplace_predict(x, validate_features=False), dtype=np.float32)


OFFLINE_SCORERS: dict[str, Callable[[Path, np.ndarray[Any, Any]], np.ndarray[Any, Any]]] = {
    "torchscript": torchscript_scores,
    "xgboost": xgboost_scores,
}
"""A saved model's offline scorer, by the framework named in its archive's metadata."""


def _meta(framework: str, spec: TrainSpec, split: Split) -> dict[str, Any]:
    return {
        "framework": framework,
        "input_width": MODEL_INPUT_WIDTH,
        "input_names": list(MODEL_INPUT_NAMES),
        "feature_schema_version": SCHEMA_VERSION,
        "training": spec.as_dict(),
        "split": {
            "train_days": sorted({int(d) for d in split.train.day}),
            "validation_day": int(split.valid.day[0]),
            "heldout_day": int(split.heldout.day[0]),
            "train_rows": len(split.train),
        },
        "reference_file": "reference.json",
    }


def _reference(scores: np.ndarray[Any, Any], split: Split) -> bytes:
    doc = reference_distributions(MODEL_INPUT_NAMES[1:], split.train.x[:, 1:], scores)
    return json.dumps(doc, sort_keys=True).encode()


def _archive(
    out: Path, name: str, framework: str, model_file: Path, split: Split, spec: TrainSpec
) -> ArchiveInfo:
    """Archives a saved model with its metadata and its training-period reference."""
    train_scores = OFFLINE_SCORERS[framework](model_file, split.train.x)
    return build_archive(
        out,
        model_name=name,
        serialized_file=model_file,
        meta=_meta(framework, spec, split),
        extra_files={"reference.json": _reference(train_scores, split)},
    )


def build_models(out: Path, spec: TrainSpec, say: Say) -> dict[str, ArchiveInfo]:
    """Runs the pipeline into ``out``; needs ``PYTHONHASHSEED=0``: TorchScript's emitted
    code follows set iteration order, and the archive's version hash covers that code."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        raise RuntimeError("build_models needs PYTHONHASHSEED=0; run python -m torchserve.train")
    torch.set_num_threads(1)
    started = time.perf_counter()
    say(f"[1/4] simulating {spec.data.days} days x {spec.data.events_per_day:,} events")
    days = simulate(spec.data, progress=lambda done, total: say(f"      day {done}/{total}"))
    split = walk_forward(days)
    say(
        f"      rows: train {len(split.train):,}, validation {len(split.valid):,},"
        f" held out {len(split.heldout):,} (positive share {split.train.y.mean():.3f})"
    )
    out.mkdir(parents=True, exist_ok=True)
    archives: dict[str, ArchiveInfo] = {}
    heldout: dict[str, Any] = {
        "x": split.heldout.x,
        "y": split.heldout.y,
        "time_us": split.heldout.time_us,
    }
    with tempfile.TemporaryDirectory(prefix="models-") as tmp:
        say("[2/4] training the champion (Torch MLP)")
        champion_file = Path(tmp) / "model.pt"
        torch.jit.save(to_torchscript(train_champion(split, spec, say)), str(champion_file))
        archives["champion"] = _archive(out, "champion", "torchscript", champion_file, split, spec)
        heldout["champion"] = OFFLINE_SCORERS["torchscript"](champion_file, split.heldout.x)

        say("[3/4] training the challenger (XGBoost)")
        challenger_file = Path(tmp) / "model.json"
        train_challenger(split, spec, say).save_model(str(challenger_file))
        archives["challenger"] = _archive(
            out, "challenger", "xgboost", challenger_file, split, spec
        )
        heldout["challenger"] = OFFLINE_SCORERS["xgboost"](challenger_file, split.heldout.x)

    say("[4/4] writing held-out scores and models.json")
    np.savez_compressed(out / "heldout.npz", **heldout)
    manifest = {
        "spec": spec.as_dict(),
        "code_digest": code_digest(),
        "models": {
            name: {"archive": info.path.name, "version": info.version}
            for name, info in archives.items()
        },
    }
    (out / "models.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for name, info in archives.items():
        say(f"      {name}: {info.path} version {info.version[:16]}…")
    say(f"      done in {time.perf_counter() - started:.0f} s")
    return archives


def spec_from_args(args: argparse.Namespace) -> TrainSpec:
    return TrainSpec(
        data=DataSpec(seed=args.seed, days=args.days, events_per_day=args.events_per_day)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train and archive the champion and challenger.")
    parser.add_argument("--out", type=Path, default=REPO / ".run/models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=DataSpec.days)
    parser.add_argument("--events-per-day", type=int, default=DataSpec.events_per_day)
    parser.add_argument(
        "--if-stale", action="store_true", help="do nothing when --out is current for the spec"
    )
    args = parser.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # see build_models
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, "-m", "torchserve.train", *sys.argv[1:]], env)  # noqa: S606
    spec = spec_from_args(args)
    if args.if_stale and is_current(args.out, spec):
        print(f"models in {args.out} are current", flush=True)
        return
    build_models(args.out, spec, lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
