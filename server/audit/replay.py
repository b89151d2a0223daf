"""Deterministic replay: score recorded feature snapshots again with the recorded model.

Each selected decision a model made is scored again by the archive its record names (from
a model store, in a TorchServe process of its own, or a running replica serving that
version); a score beyond the tolerance, or a different outcome, is reported. ``against``
scores every decision with one given archive instead. RULES, ABSTAIN and CACHED_SCORE
decisions are counted as skipped, with the reason. Commands and exit codes: docs/audit.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.domain import Side
from core.processes import free_ports
from feature_cache.schema import FEATURE_NAMES, SCHEMA_VERSION, model_row
from server.audit.reader import DecisionReader
from server.model_client import TorchServeClient
from server.model_errors import ModelFailure
from torchserve.archive import archive_version
from torchserve.replica import (
    ModelServing,
    ReplicaPorts,
    start_replica,
    torchserve_replica,
)

log = logging.getLogger(__name__)

MODEL_SOURCES = ("PRIMARY", "SECONDARY", "CANARY")
SCORE_BATCH = 256
CALL_TIMEOUT_S = 30.0


class ReplayError(Exception):
    """The replay could not run (nothing selected, no such archive, replica unreachable)."""


@dataclass(frozen=True, slots=True)
class Difference:
    decision_id: str
    model_version: str
    recorded_score: float
    replayed_score: float
    recorded_decision: str
    replayed_decision: str


@dataclass
class ReplayReport:
    selected: int = 0
    replayed: int = 0
    differences: list[Difference] = field(default_factory=list)
    # reason -> decisions: nothing to replay (no model decided them)
    skipped: Counter[str] = field(default_factory=Counter)
    # reason -> decisions: a model decided them, but it could not be found or reached
    unreplayable: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "replayed": self.replayed,
            "differences": [asdict(d) for d in self.differences],
            "skipped": dict(self.skipped),
            "unreplayable": dict(self.unreplayable),
        }


def select_decisions(
    reader: DecisionReader,
    decision_ids: Sequence[str] = (),
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 10_000,
) -> list[dict[str, Any]]:
    """Recorded decisions by id (those in ``[since, until)`` when given too), or in
    ``[since, until)``, from the database or the archive: oldest first, at most ``limit``."""
    if not decision_ids:
        return reader.between(since, until, limit)
    return [
        row
        for row in reader.by_ids(decision_ids)
        if (since is None or row["decided_at"] >= since)
        and (until is None or row["decided_at"] < until)
    ][:limit]


def archives_by_version(model_store: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(model_store.glob("*.mar")):
        version = archive_version(path)
        if version is not None:
            found[version] = path.resolve()  # TorchServe runs in a folder of its own
    return found


@contextlib.asynccontextmanager
async def served_archive(archive: Path, model_name: str) -> AsyncIterator[TorchServeClient]:
    """A TorchServe process of its own on free loopback ports, serving ``archive``."""
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        ports = ReplicaPorts(*free_ports(6))
        proc = torchserve_replica(
            "replay",
            ports,
            archive.parent,
            Path(tmp),
            model_section=ModelServing(model_name, mar_name=archive.name).properties(),
        )
        try:
            log.info("starting TorchServe with %s for the replay", archive.name)
            start_replica(proc, ports, model_name=model_name)
            client = TorchServeClient("replay", f"127.0.0.1:{ports.grpc_inference}", model_name)
            await client.start()
            try:
                yield client
            finally:
                await client.stop()
        finally:
            proc.stop()


@contextlib.asynccontextmanager
async def running_replica(address: str, model_name: str) -> AsyncIterator[TorchServeClient]:
    client = TorchServeClient("replica", address, model_name)
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


def _outcome(score: float, threshold: float) -> str:
    return "TRADE" if score >= threshold else "NO_TRADE"


async def _score(
    client: TorchServeClient,
    rows: list[dict[str, Any]],
    report: ReplayReport,
    *,
    expected_version: str | None,
    tolerance: float,
) -> None:
    for start in range(0, len(rows), SCORE_BATCH):
        batch = rows[start : start + SCORE_BATCH]
        inputs = [
            model_row(Side[r["side"]].sign, [r["features"][name] for name in FEATURE_NAMES])
            for r in batch
        ]
        try:
            scores = await client.predict(inputs, CALL_TIMEOUT_S)
        except ModelFailure as exc:
            raise ReplayError(f"scoring failed: {exc}") from exc
        if expected_version is not None and scores.model_version != expected_version:
            reason = f"replica serves {scores.model_version[:12]}, not the recorded version"
            report.unreplayable[reason] += len(batch)
            continue
        for record, replayed in zip(batch, scores.scores, strict=True):
            report.replayed += 1
            recorded = float(record["score"])
            outcome = _outcome(replayed, float(record["threshold"]))
            if abs(replayed - recorded) > tolerance or outcome != record["decision"]:
                report.differences.append(
                    Difference(
                        record["decision_id"],
                        scores.model_version,
                        recorded,
                        replayed,
                        record["decision"],
                        outcome,
                    )
                )


def _replayable(records: list[dict[str, Any]], report: ReplayReport) -> list[dict[str, Any]]:
    keep = []
    for record in records:
        source = record["source"]
        if source == "CACHED_SCORE":
            report.skipped["cached score: replay the decision that computed it"] += 1
        elif source not in MODEL_SOURCES:
            report.skipped[f"{source}: no model score to replay"] += 1
        elif record["feature_schema_version"] != SCHEMA_VERSION or not record["features"]:
            report.unreplayable["features of another schema version"] += 1
        else:
            keep.append(record)
    return keep


async def replay(
    records: list[dict[str, Any]],
    *,
    model_store: Path | None = None,
    replica: str | None = None,
    against: Path | None = None,
    tolerance: float = 1e-6,
) -> ReplayReport:
    """Replays ``records`` (rows of the decisions table); see the module docstring."""
    report = ReplayReport(selected=len(records))
    replayable = _replayable(records, report)
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in replayable:
        by_model[(record["model_name"], record["model_version"])].append(record)
    archives = archives_by_version(model_store) if model_store is not None else {}
    for (model_name, version), rows in by_model.items():
        if against is not None:
            async with served_archive(against, model_name) as client:
                await _score(client, rows, report, expected_version=None, tolerance=tolerance)
        elif replica is not None:
            async with running_replica(replica, model_name) as client:
                await _score(client, rows, report, expected_version=version, tolerance=tolerance)
        elif version in archives:
            async with served_archive(archives[version], model_name) as client:
                await _score(client, rows, report, expected_version=version, tolerance=tolerance)
        else:
            reason = f"no archive with version {version[:12]} in the model store"
            report.unreplayable[reason] += len(rows)
    return report
