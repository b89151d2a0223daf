"""The models' evaluation report: champion, challenger and the rules baseline on the
held-out day, written as markdown with PNG plots (``make models`` writes docs/models.md).

Every scorer sees the same held-out rows (the last simulated day, never used while
fitting). The models are judged at the server's operating threshold
(``DECISION_DECISION__THRESHOLD``'s default), the rules at their own threshold, with the
server's default rules settings. AUC differences come with a 95 % interval from a block
bootstrap over 60 s blocks of the day: neighbouring rows share most of their horizon, so
resampling single rows would claim more certainty than the data holds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    brier_score_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from core.domain import DEFAULT_TRADE_THRESHOLD, Side
from fallback.rules import RulesBaseline
from fallback.settings import FallbackSettings

BLOCK_US = 60_000_000
BOOTSTRAP_SAMPLES = 300


@dataclass(frozen=True)
class Scored:
    name: str
    scores: np.ndarray[Any, Any]
    threshold: float


def rules_scores(x: np.ndarray[Any, Any]) -> Scored:
    fb = FallbackSettings()
    rules = RulesBaseline(
        max_spread_bps=fb.rules_max_spread_bps,
        max_volatility_bps=fb.rules_max_volatility_bps,
        min_imbalance=fb.rules_min_imbalance,
    )
    scores = [
        rules.evaluate(Side.BUY if row[0] > 0 else Side.SELL, row[1:].tolist()).score for row in x
    ]
    return Scored("rules baseline", np.asarray(scores), rules.threshold)


def metrics(y: np.ndarray[Any, Any], s: Scored) -> dict[str, float]:
    flagged = s.scores >= s.threshold
    return {
        "auc": float(roc_auc_score(y, s.scores)),
        "precision": float(precision_score(y, flagged, zero_division=0)),
        "recall": float(recall_score(y, flagged, zero_division=0)),
        "trade_share": float(flagged.mean()),
        "brier": float(brier_score_loss(y, np.clip(s.scores, 0.0, 1.0))),
    }


def auc_difference(
    y: np.ndarray[Any, Any], a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], blocks: Any
) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) and its 95 % block-bootstrap interval."""
    rng = np.random.default_rng(0)
    ids = np.unique(blocks)
    members = [np.flatnonzero(blocks == i) for i in ids]
    diffs = []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        if y[pick].min() == y[pick].max():
            continue
        diffs.append(roc_auc_score(y[pick], a[pick]) - roc_auc_score(y[pick], b[pick]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(roc_auc_score(y, a) - roc_auc_score(y, b)), float(low), float(high)


def plot_roc(y: np.ndarray[Any, Any], scored: list[Scored], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for s in scored:
        fpr, tpr, _ = roc_curve(y, s.scores)
        ax.plot(fpr, tpr, label=f"{s.name} (AUC {roc_auc_score(y, s.scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, held-out day")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(y: np.ndarray[Any, Any], scored: list[Scored], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for s in scored:
        observed, predicted = calibration_curve(y, s.scores, n_bins=10, strategy="quantile")
        ax.plot(predicted, observed, marker="o", label=s.name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    ax.set(
        xlabel="mean score in bin (deciles)",
        ylabel="share of favourable moves",
        title="Reliability, held-out day",
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(y: np.ndarray[Any, Any], scored: list[Scored], path: Path) -> None:
    fig, axes = plt.subplots(1, len(scored), figsize=(4 * len(scored), 3.4), sharey=False)
    bins = np.linspace(0.0, 1.0, 41)
    for ax, s in zip(axes, scored, strict=True):
        for label, colour in ((0, "tab:red"), (1, "tab:green")):
            ax.hist(s.scores[y == label], bins=bins, alpha=0.55, color=colour, density=True)
        ax.axvline(s.threshold, color="black", linestyle="--", linewidth=1)
        ax.set(title=s.name, xlabel="score")
    axes[0].set_ylabel("density")
    axes[0].legend(["threshold", "unfavourable", "favourable"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(models_dir: Path, out: Path) -> str:
    heldout = np.load(models_dir / "heldout.npz")
    manifest = json.loads((models_dir / "models.json").read_text())
    x, y, when = heldout["x"], heldout["y"], heldout["time_us"]
    threshold = DEFAULT_TRADE_THRESHOLD
    scored = [
        Scored("champion (Torch MLP)", heldout["champion"], threshold),
        Scored("challenger (XGBoost)", heldout["challenger"], threshold),
        rules_scores(x),
    ]
    table = {s.name: metrics(y, s) for s in scored}
    blocks = (when - when.min()) // BLOCK_US
    champion_vs_rules = auc_difference(y, scored[0].scores, scored[2].scores, blocks)
    challenger_vs_rules = auc_difference(y, scored[1].scores, scored[2].scores, blocks)
    champion_vs_challenger = auc_difference(y, scored[0].scores, scored[1].scores, blocks)

    images = out.parent / "img"
    images.mkdir(parents=True, exist_ok=True)
    plot_roc(y, scored, images / "models-roc.png")
    plot_reliability(y, scored, images / "models-reliability.png")
    plot_scores(y, scored, images / "models-scores.png")

    spec = manifest["spec"]["data"]
    rows = [
        f"| {name} | {m['auc']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} |"
        f" {m['trade_share']:.3f} | {m['brier']:.4f} |"
        for name, m in table.items()
    ]
    versions = [f"| {name} | `{model['version']}` |" for name, model in manifest["models"].items()]

    def verdict(d: tuple[float, float, float], who: str) -> str:
        if d[1] > 0:
            return f"{who} beats the rules on held-out AUC by {d[0]:.3f} (interval above 0)."
        return (
            f"{who} does NOT clearly beat the rules (AUC difference {d[0]:+.3f},"
            " interval not above 0)."
        )

    def diff(d: tuple[float, float, float]) -> str:
        return f"{d[0]:+.3f} (95 % interval {d[1]:+.3f} to {d[2]:+.3f})"

    text = f"""# Models: evaluation on held-out data

Written by `make models` (`python -m torchserve.evaluate`); do not edit by hand.

## Data and split

{spec["days"]} simulated days (`feature_cache.generator`, seed {spec["seed"]}),
{len(spec["symbols"])} symbols, {spec["events_per_day"]:,} market events a day; features from
`feature_cache.features` (schema version {spec["feature_schema_version"]}) sampled every
{spec["sample_every_ms"]} ms per symbol, one row per side. Label: the mid
{spec["horizon_ms"]} ms later has moved in the side's favour by more than the half-spread
(docs/architecture.md, decision semantics). Walk-forward by day: days
0-{spec["days"] - 3} train, day {spec["days"] - 2} validates (early stopping), day
{spec["days"] - 1} is held out and reported here: {len(y):,} rows, {y.mean():.1%} favourable.

## Results on the held-out day

Models at the server's operating threshold {threshold}; the rules at their own
({scored[2].threshold:.2f}). "trade share": rows the scorer would TRADE.

| scorer | AUC | precision | recall | trade share | Brier |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

AUC differences (block bootstrap over 60 s blocks, {BOOTSTRAP_SAMPLES} resamples):

- champion - rules: {diff(champion_vs_rules)}
- challenger - rules: {diff(challenger_vs_rules)}
- champion - challenger: {diff(champion_vs_challenger)}

What this says, and what it does not:

- {verdict(champion_vs_rules, "The champion")} {verdict(challenger_vs_rules, "The challenger")}
  An AUC near 0.6 ranks favourable moves only somewhat better than chance: typical of
  short-horizon price prediction, and no more than that is claimed.
- The rules score leans on 5-level book imbalance. In the simulator, order flow and
  trade impact move the price, not the book's size, which is why the rules rank
  {"worse than chance" if table[scored[2].name]["auc"] < 0.5 else "close to chance"} here.
  That is a finding about the simulator and these rules, not about real markets.
- All figures come from simulated data. The Coinbase recording in `../shared/data` is
  30 s long, too short to train or evaluate on.

## Plots

![ROC](img/models-roc.png)

![Reliability](img/models-reliability.png)

![Score distributions](img/models-scores.png)

## Model versions

| model | version (sha256 of the archive content) |
| --- | --- |
{chr(10).join(versions)}

Each archive carries `reference.json`: decile histograms of every input feature and of
the model's score over the training days, for PSI drift checks (`torchserve.reference`).
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the models' evaluation report.")
    parser.add_argument("--models", type=Path, default=Path(".run/models"))
    parser.add_argument("--report", type=Path, default=Path("docs/models.md"))
    args = parser.parse_args()
    report(args.models, args.report)
    print(f"wrote {args.report} and its plots in {args.report.parent / 'img'}")


if __name__ == "__main__":
    main()
