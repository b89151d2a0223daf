"""Live drift: PSI of recent decisions' features and the champion's scores against the
training-period reference saved in the serving model's archive (``reference.json``).

The decision path only appends to bounded windows sampled evenly over ``WINDOW_S``
(``DriftMonitor.observe``); a task of the monitor's own computes the PSI every
``interval_s`` in a worker thread, against the reference of the version the champion last
answered with (from ``drift.model_store``). With no such archive, or too few decisions,
the status says why and no PSI is reported. Windows and thresholds: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.drift import psi
from core.tasks import cancel_and_wait
from feature_cache.schema import FEATURE_NAMES
from server.settings import DriftSettings
from torchserve.archive import archive_version

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"
RESCAN_INTERVAL_S = 60.0  # how often an unknown version makes the store be read again


@dataclass(frozen=True, slots=True)
class Reference:
    model_version: str
    features: dict[str, dict[str, list[float]]]  # by feature name: a core.drift histogram
    score: dict[str, list[float]]


def archived_version(store: Path, model_name: str) -> str:
    """The version hash of ``<store>/<model_name>.mar``: what a model server that numbers
    its versions (Triton) serves, when it was built from the same archives."""
    path = store / f"{model_name}.mar"
    version = archive_version(path)
    if version is None:
        raise ValueError(f"no model archive with a version at {path}")
    return version


class ModelReferences:
    """The reference distributions in a folder of model archives, by model version."""

    def __init__(self, store: Path) -> None:
        self._store = store
        self._paths: dict[str, Path] = {}
        self._loaded: dict[str, Reference | None] = {}
        self._scanned_at = -RESCAN_INTERVAL_S

    def get(self, version: str) -> Reference | None:
        if version in self._loaded:
            return self._loaded[version]
        if version not in self._paths and time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
            self._scan()
        path = self._paths.get(version)
        if path is None:
            return None
        reference = self._read(version, path)
        self._loaded[version] = reference
        return reference

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        for path in sorted(self._store.glob("*.mar")):
            version = archive_version(path)
            if version is not None:
                self._paths.setdefault(version, path)

    @staticmethod
    def _read(version: str, path: Path) -> Reference | None:
        try:
            with zipfile.ZipFile(path) as archive:
                doc: dict[str, Any] = json.loads(archive.read(REFERENCE_FILE))
            return Reference(version, dict(doc["features"]), dict(doc["score"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("no drift reference in %s: %s", path, exc)
            return None


@dataclass(frozen=True, slots=True)
class DriftStatus:
    model_version: str = ""  # whose reference the PSI is against; "" before any
    samples: int = 0  # decisions with features in the window
    scores: int = 0  # champion scores in the window
    feature_psi: dict[str, float] = field(default_factory=dict)  # empty: not computed
    score_psi: float | None = None
    computed_at_us: int = 0
    problem: str = "no decision yet"  # why there is no PSI, "" when there is


class Ring:
    """The last ``size`` values (rows of ``width`` floats) in a preallocated array, each
    with its time, taken at most one every ``every_s``: an append copies into a slot, a
    snapshot is one copy of the array, so neither the decision path nor the computation's
    thread holds the GIL for long. Order is not kept: a PSI does not need it."""

    def __init__(self, size: int, width: int | None = None, every_s: float = 0.0) -> None:
        self._data = np.zeros((size,) if width is None else (size, width), dtype=np.float64)
        self._times = np.zeros(size, dtype=np.float64)
        self._size = size
        self._every_s = every_s
        self._next = 0
        self._filled = 0
        self._last_s = -math.inf

    def __len__(self) -> int:
        return self._filled

    def due(self, now_s: float) -> bool:
        """Whether a value offered at ``now_s`` (monotonic) would be kept."""
        return now_s - self._last_s >= self._every_s

    def append(self, value: float | Sequence[float], now_s: float) -> None:
        self._data[self._next] = value
        self._times[self._next] = now_s
        self._last_s = now_s
        self._next = (self._next + 1) % self._size
        self._filled = min(self._filled + 1, self._size)

    def snapshot(self) -> tuple[np.ndarray[Any, np.dtype[np.float64]], float]:
        """The values kept, and the seconds between the oldest and the newest."""
        times = self._times[: self._filled]
        span = float(times.max() - times.min()) if self._filled else 0.0
        return self._data[: self._filled].copy(), span


# The PSI is over decisions sampled evenly from the last WINDOW_S: features vary with the
# market's regimes over minutes (volatility clusters, spreads widen with it), so the
# last few thousand decisions, a few seconds at a high rate, are one regime, not the
# distribution the model was trained on. At most one decision's row (and one champion
# score) is kept every SAMPLE_EVERY_S, WINDOW of them.
WINDOW_S = 1800.0
WINDOW = 5000
SAMPLE_EVERY_S = WINDOW_S / WINDOW
# No PSI before the samples span this long, or below this many: a shorter span or a
# smaller sample differs from the reference by chance (a healthy stack's own data
# measured: PSI up to 2 over 100 s windows, at most 0.18 over 10 minutes).
MIN_SPAN_S = 600.0
MIN_SAMPLES = 500
# How often the PSI is computed: drift is a matter of minutes.
INTERVAL_S = 10.0


class DriftMonitor:
    @classmethod
    def for_server(cls, settings: DriftSettings) -> DriftMonitor | None:
        """The monitor of the archives in ``model_store``; None when none is set."""
        if not settings.model_store:
            return None
        return cls(settings, ModelReferences(Path(settings.model_store)))

    def __init__(self, settings: DriftSettings, references: ModelReferences) -> None:
        self._settings = settings
        self._references = references
        self._rows = Ring(WINDOW, len(FEATURE_NAMES), SAMPLE_EVERY_S)
        self._scores = Ring(WINDOW, every_s=SAMPLE_EVERY_S)
        self._version = ""
        self._status = DriftStatus()
        self._task: asyncio.Task[None] | None = None

    def observe(
        self,
        rows: Sequence[Sequence[float] | None],
        scores: Sequence[float],
        model_version: str,
    ) -> None:
        """A decision call's feature rows (None: it had none) and the champion's scores
        with their model version (empty when the champion did not answer). Keeps the
        first of each when the window's sampling is due, else nothing; a new version
        starts the scores' window afresh (the features' stays: they are the market's, and
        the next PSI compares them with the new version's reference)."""
        now_s = time.monotonic()
        for row in rows:
            if row is not None and self._rows.due(now_s):
                self._rows.append(row, now_s)
        if scores and model_version != self._version:
            self._scores = Ring(WINDOW, every_s=SAMPLE_EVERY_S)
            self._version = model_version
        for score in scores:
            if self._scores.due(now_s):
                self._scores.append(score, now_s)

    def status(self) -> DriftStatus:
        return self._status

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="drift-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            try:
                await self.refresh()
            except Exception:  # the next interval tries again; serving is not affected
                log.exception("drift computation failed")

    async def refresh(self) -> DriftStatus:
        """Computes the drift of the windows now (what the task does every interval)."""
        self._status = await self._compute()
        return self._status

    async def _compute(self) -> DriftStatus:
        version = self._version
        (rows, span_s), (scores, _) = self._rows.snapshot(), self._scores.snapshot()
        window = DriftStatus(version, len(rows), len(scores))
        if not version:
            return dataclasses.replace(window, problem="the champion has not answered yet")
        # Off the loop: it may list the store and open an archive.
        reference = await asyncio.to_thread(self._references.get, version)
        if reference is None:
            store = self._settings.model_store
            problem = f"no archive of model version {version[:12]} in {store}"
            return dataclasses.replace(window, problem=problem)
        if len(rows) < MIN_SAMPLES:
            problem = f"{len(rows)} decisions with features (needs {MIN_SAMPLES})"
            return dataclasses.replace(window, problem=problem)
        if span_s < MIN_SPAN_S:
            problem = (
                f"decisions sampled over {span_s:.0f} s, {MIN_SPAN_S:.0f} s needed: a shorter"
                " span is one regime of the market, not its distribution"
            )
            return dataclasses.replace(window, problem=problem)
        feature_psi, score_psi = await asyncio.to_thread(
            population_stability, reference, rows, scores, MIN_SAMPLES
        )
        return dataclasses.replace(
            window,
            feature_psi=feature_psi,
            score_psi=score_psi,
            computed_at_us=time.time_ns() // 1000,
            problem="",
        )


def population_stability(
    reference: Reference,
    rows: Sequence[Sequence[float]] | np.ndarray[Any, Any],
    scores: Sequence[float] | np.ndarray[Any, Any],
    min_scores: int,
) -> tuple[dict[str, float], float | None]:
    """PSI per feature the reference has, and of the scores (None with fewer than
    ``min_scores``)."""
    matrix = np.asarray(rows, dtype=np.float64)
    feature_psi = {
        name: psi(reference.features[name], matrix[:, i])
        for i, name in enumerate(FEATURE_NAMES)
        if name in reference.features
    }
    score_psi = (
        psi(reference.score, np.asarray(scores, dtype=np.float64))
        if len(scores) >= min_scores
        else None
    )
    return feature_psi, score_psi
