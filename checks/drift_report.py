"""Drift of real market data against the champion's training reference.

For every recording under ``../shared/data/`` (as ``checks.acceptance`` finds them),
the features a decision would read are sampled the way the training rows were (per
symbol, every ``DataSpec.sample_every_ms`` of exchange time after a warm-up) and their
PSI per feature is computed against the ``reference.json`` of the champion's archive, as
the server's live drift does (``server.drift.population_stability``). A control run
does the same for generated market data of a day the model was not trained on: its PSI
is what "no drift" looks like. Prints one table per source; exit status 0.

    .venv/bin/python -m checks.drift_report [--models .run/models] [--source KIND:PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from checks.acceptance import DATA, find_sources
from feature_cache.events import MarketEvent
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.sources import Source
from feature_cache.features import SymbolState
from feature_cache.generator import MarketGenerator
from feature_cache.schema import FEATURE_NAMES
from server.drift import ModelReferences, Reference, population_stability
from torchserve.dataset import DAY_US, FIRST_DAY_US, DataSpec, day_seed
from torchserve.models import ensure_models

REPO = Path(__file__).resolve().parents[1]
CONTROL_DAY = 1_000  # a day no model was trained on


def sampled_features(
    events: Iterable[MarketEvent], *, every_ms: int, warmup_s: float
) -> list[tuple[float, ...]]:
    """Each symbol's features every ``every_ms`` of its exchange time, after its first
    ``warmup_s`` (the training rows' rule)."""
    states: dict[str, SymbolState] = {}
    next_sample: dict[str, int] = {}
    rows = []
    for event in events:
        state = states.get(event.symbol)
        if state is None:
            state = states[event.symbol] = SymbolState()
            next_sample[event.symbol] = event.exchange_time_us + int(warmup_s * 1e6)
        state.apply(event)
        now = state.last_event_time_us
        if now >= next_sample[event.symbol]:
            features = state.features()
            if features is not None:
                rows.append(features)
                next_sample[event.symbol] = now + every_ms * 1000
    return rows


def verdict(psi: float) -> str:
    return "shifted" if psi >= 0.25 else "drifting" if psi >= 0.1 else "stable"


def report(title: str, reference: Reference, rows: list[tuple[float, ...]]) -> None:
    print(f"\n## {title}: {len(rows):,} feature samples")
    if len(rows) < 100:
        print("too few samples for a PSI")
        return
    feature_psi, _ = population_stability(reference, rows, [], min_scores=1)
    print("\n| feature | PSI | |\n| --- | ---: | --- |")
    for name in FEATURE_NAMES:
        value = feature_psi[name]
        print(f"| {name} | {value:.3f} | {verdict(value)} |")
    shifted = sum(1 for v in feature_psi.values() if v >= 0.25)
    print(f"\n{shifted} of {len(feature_psi)} features shifted (PSI >= 0.25)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / ".run/models")
    parser.add_argument("--data", type=Path, default=DATA, help="where to look for recordings")
    parser.add_argument("--source", action="append", help="KIND:PATH instead (repeatable)")
    parser.add_argument(
        "--warmup-s", type=float, default=5.0, help="per symbol, before the first sample"
    )
    args = parser.parse_args()
    spec = DataSpec()
    champion = ensure_models(args.models)["champion"]
    reference = ModelReferences(champion.path.parent).get(champion.version)
    if reference is None:
        sys.exit(f"{champion.path} has no reference.json: rebuild it with `make models`")
    print(f"champion {champion.version[:12]}: reference of {spec.days} generated training days")
    every_ms = spec.sample_every_ms

    control_events = MarketGenerator(
        spec.symbols,
        seed=day_seed(spec.seed, CONTROL_DAY),
        start_time_us=FIRST_DAY_US + CONTROL_DAY * DAY_US,
        events_per_second=spec.events_per_second,
    ).events(spec.events_per_day)  # a day, as long as a training day: minutes of regimes
    control = sampled_features(control_events, every_ms=every_ms, warmup_s=spec.warmup_s)
    report("control: generated data of an unseen day", reference, control)

    sources = (
        [Source.parse(spec_text) for spec_text in args.source]
        if args.source
        else find_sources(args.data)
    )
    for source in sources:
        summary = ReplaySummary()
        rows = sampled_features(source.events(summary), every_ms=every_ms, warmup_s=args.warmup_s)
        report(f"{source.kind}:{source.path}", reference, rows)


if __name__ == "__main__":
    main()
