"""Labelled model rows from simulated trading days, through the shared feature module.

A day is one ``MarketGenerator`` session of its own seed, run through ``SymbolState`` (the
consumer's feature code, so training sees exactly what serving sees); every
``sample_every_ms`` per symbol the features become two rows, one per side. Label
(``core.labels.favourable_move``): the mid ``horizon_ms`` later has moved in the side's
favour by more than the half-spread now. No label looks past its day's end, and each day's
first ``warmup_s`` are skipped. Data and labels: docs/model-serving.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from core.labels import favourable_move
from feature_cache.features import SymbolState
from feature_cache.generator import MarketGenerator
from feature_cache.schema import MODEL_INPUT_WIDTH, SCHEMA_VERSION, model_row

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]

DAY_US = 86_400 * 1_000_000
FIRST_DAY_US = 1_767_258_000_000_000  # 2026-01-01 09:00 UTC: each day's session opens then


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the rows; part of each model's recorded provenance."""

    seed: int = 0
    days: int = 6
    events_per_day: int = 300_000
    # The local stack's symbols at its rate (localstack.DEFAULT_SYMBOLS, 300 events/s):
    # the models are trained on the instruments they serve (feature_cache.generator).
    symbols: tuple[str, ...] = ("BTC-USD", "ETH-USD", "SOL-USD")
    events_per_second: float = 300.0
    sample_every_ms: int = 250
    horizon_ms: int = 2_000
    warmup_s: int = 30
    feature_schema_version: int = field(default=SCHEMA_VERSION)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["symbols"] = list(self.symbols)
        return doc


@dataclass(frozen=True)
class Rows:
    x: FloatArray  # (n, MODEL_INPUT_WIDTH)
    y: np.ndarray[Any, np.dtype[np.uint8]]  # (n,) 0 or 1
    time_us: IntArray  # (n,) exchange time of the features
    day: IntArray  # (n,)

    def __len__(self) -> int:
        return len(self.y)

    def where(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> Rows:
        return Rows(self.x[mask], self.y[mask], self.time_us[mask], self.day[mask])


def day_seed(seed: int, day: int) -> int:
    """A day's generator seed: independent per day, fixed by (seed, day)."""
    digest = hashlib.sha256(f"decision-training:{seed}:{day}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def simulate_day(spec: DataSpec, day: int) -> Rows:
    """The labelled rows of one day (both sides per sample, in time order)."""
    start_us = FIRST_DAY_US + day * DAY_US
    generator = MarketGenerator(
        spec.symbols,
        seed=day_seed(spec.seed, day),
        start_time_us=start_us,
        events_per_second=spec.events_per_second,
    )
    states = {symbol: SymbolState() for symbol in spec.symbols}
    mid_times: dict[str, list[int]] = {symbol: [] for symbol in spec.symbols}
    mid_values: dict[str, list[float]] = {symbol: [] for symbol in spec.symbols}
    samples: dict[str, list[tuple[int, float, tuple[float, ...]]]] = {s: [] for s in spec.symbols}
    next_sample = dict.fromkeys(spec.symbols, start_us + spec.warmup_s * 1_000_000)
    step_us = spec.sample_every_ms * 1000
    for event in generator.events(spec.events_per_day):
        state = states[event.symbol]
        state.apply(event)
        mid = state.mid
        if mid is None:
            continue
        now = state.last_event_time_us
        times, values = mid_times[event.symbol], mid_values[event.symbol]
        if times and times[-1] == now:
            values[-1] = mid  # the mid in effect at ``now`` is the last one applied
        else:
            times.append(now)
            values.append(mid)
        if now >= next_sample[event.symbol]:
            features = state.features()
            if features is not None:
                samples[event.symbol].append((now, mid, features))
                next_sample[event.symbol] = now + step_us
    horizon_us = spec.horizon_ms * 1000
    x: list[list[float]] = []
    y: list[int] = []
    when: list[int] = []
    for symbol in spec.symbols:
        times_np = np.asarray(mid_times[symbol], dtype=np.int64)
        values_np = np.asarray(mid_values[symbol], dtype=np.float64)
        for now, mid, features in samples[symbol]:
            if times_np[-1] < now + horizon_us:
                continue  # the horizon runs past the day's data: no label
            later = float(values_np[np.searchsorted(times_np, now + horizon_us, side="right") - 1])
            for side_sign in (1.0, -1.0):
                x.append(model_row(side_sign, features))
                y.append(int(favourable_move(side_sign, mid, later, features[0])))
            when.extend((now, now))
    order = np.argsort(np.asarray(when, dtype=np.int64), kind="stable")
    rows = np.asarray(x, dtype=np.float32).reshape(-1, MODEL_INPUT_WIDTH)
    return Rows(
        rows[order],
        np.asarray(y, dtype=np.uint8)[order],
        np.asarray(when, dtype=np.int64)[order],
        np.full(len(y), day, dtype=np.int64),
    )


def simulate(spec: DataSpec, *, workers: int = 2, progress: Any = None) -> list[Rows]:
    """Every day's rows, days in parallel processes; the result does not depend on
    ``workers``. ``progress(done, total)`` is called as days finish."""
    days = list(range(spec.days))
    if workers <= 1:
        out = []
        for day in days:
            out.append(simulate_day(spec, day))
            if progress:
                progress(len(out), len(days))
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(simulate_day, spec, day) for day in days]
        out = []
        for future in futures:
            out.append(future.result())
            if progress:
                progress(len(out), len(days))
        return out


def concat(parts: Sequence[Rows]) -> Rows:
    return Rows(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.time_us for p in parts]),
        np.concatenate([p.day for p in parts]),
    )
