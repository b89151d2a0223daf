"""``python -m checks.quality_report`` (``make quality-report``): the labeler's live AUC
against the offline evaluation of the same period, and a broken model's.

Replays the start of the models' held-out day through the local stack in real time and
decides at a steady rate, while the challenger serves the champion's scores inverted.
With ``--restart-after-s N`` the stack first runs N s, is restarted on the same run
folder, and the run after the restart is the one judged. Writes docs/quality.md, which
says what is compared and against which bounds; exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from core.domain import DEFAULT_TRADE_THRESHOLD
from core.metrics_http import Samples, scrape
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc
from feature_cache.events import MarketEvent
from feature_cache.generator import MarketGenerator
from feature_cache.replay import Progress, replay
from feature_cache.settings import FeatureCacheSettings
from loadtest.loadgen import Recorder, open_loop
from localstack.stack import PARTS, LocalStack
from quality.rolling import auc, calibration_error
from quality.store import epoch_us
from torchserve.archive import archive_meta, archive_version, build_archive
from torchserve.dataset import DAY_US, FIRST_DAY_US, day_seed
from torchserve.models import ensure_models

REPO = Path(__file__).resolve().parents[1]
MAX_GAP = 0.02  # the bound on |live AUC - offline AUC|
MIN_LABELLED = 0.9  # after a restart: labelled share of the decisions that could be
FIRST_LABEL_WITHIN_S = 60.0  # after a restart: from the stack serving to the first label
MODEL_SOURCES = (decision_pb2.SOURCE_PRIMARY, decision_pb2.SOURCE_SECONDARY)
# This report publishes the market data itself, so no generated feed beside it.
WITHOUT_REPLAYER = tuple(part for part in PARTS if part != "replayer")


class Inverted(torch.nn.Module):
    """A deliberately broken model: the champion's scores, inverted."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.inner(rows)
        return 1.0 - scores


def inverted_archive(champion: Path, out: Path) -> None:
    """``out/challenger.mar``: the champion's archive with its model's scores inverted."""
    meta = archive_meta(champion)
    with tempfile.TemporaryDirectory(prefix="inverted-") as tmp, zipfile.ZipFile(champion) as mar:
        work = Path(tmp)
        original = work / "champion.pt"
        original.write_bytes(mar.read(meta["serialized_file"]))
        reference = mar.read(meta["reference_file"])
        model = torch.jit.script(Inverted(torch.jit.load(str(original))))  # type: ignore[no-untyped-call]
        serialized = work / "inverted.pt"
        torch.jit.save(model, str(serialized))
        kept = {
            k: v for k, v in meta.items() if k not in ("model_name", "serialized_file", "version")
        }
        build_archive(
            out,
            model_name="challenger",
            serialized_file=serialized,
            meta={**kept, "inverted_from": meta["version"]},
            extra_files={"reference.json": reference},
        )


def models_with_inverted_challenger(models: Path, out: Path) -> None:
    """A model folder for the stack: the champion, and the inverted one as challenger."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models / "champion.mar", out / "champion.mar")
    inverted_archive(models / "champion.mar", out)
    manifest = {
        "models": {
            name: {"archive": f"{name}.mar", "version": archive_version(out / f"{name}.mar")}
            for name in ("champion", "challenger")
        }
    }
    (out / "models.json").write_text(json.dumps(manifest, indent=1))


def heldout_events(spec: dict[str, Any], duration_s: float) -> list[MarketEvent]:
    """The first ``duration_s`` of exchange time of the held-out day, as training made it."""
    day = spec["days"] - 1
    start_us = FIRST_DAY_US + day * DAY_US
    generator = MarketGenerator(
        tuple(spec["symbols"]),
        seed=day_seed(spec["seed"], day),
        start_time_us=start_us,
        events_per_second=spec["events_per_second"],
    )
    end_us = start_us + int(duration_s * 1e6)
    events = []
    for event in generator.events(spec["events_per_day"]):
        if event.exchange_time_us >= end_us:
            break
        events.append(event)
    return events


def rebased(events: list[MarketEvent], shift_us: int, session: int) -> Iterator[MarketEvent]:
    """The events ``shift_us`` later, in ``session`` (one per replay, as the replayer's)."""
    for event in events:
        yield dataclasses.replace(
            event, exchange_time_us=event.exchange_time_us + shift_us, session=session
        )


@dataclasses.dataclass
class Called:
    decision_ids: list[str] = dataclasses.field(default_factory=list)
    sources: Counter[int] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)


async def decide_steadily(
    address: str, symbols: list[str], rate: float, until: float, called: Called
) -> None:
    """Decide calls at ``rate`` a second on ``loadgen``'s open-loop schedule, until the
    monotonic time ``until``."""
    rng = random.Random(0)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)

        async def one() -> str:
            request = decision_pb2.DecideRequest(
                request_id=str(uuid.uuid4()),
                symbol=rng.choice(symbols),
                side=rng.choice((decision_pb2.SIDE_BUY, decision_pb2.SIDE_SELL)),
                quantity=1.0,
                client_id="quality-report",
            )
            try:
                response = await stub.Decide(request, timeout=0.1)
            except grpc.aio.AioRpcError as exc:
                called.errors[exc.code().name] += 1
                raise
            called.decision_ids.append(response.decision_id)
            called.sources[response.source] += 1
            return decision_pb2.Source.Name(response.source)

        seconds = until - time.monotonic()
        if seconds > 0:
            sends = round(seconds * rate)
            await open_loop(one, Recorder(), rate_per_s=rate, seconds=seconds, max_requests=sends)


async def shadow_every_decision(stack: LocalStack) -> None:
    token = (stack.run_dir / "admin" / "operator.token").read_text().strip()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.admin_port}") as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).SetFlag(
            admin_pb2.SetFlagRequest(
                name="shadow_sample_rate",
                value="1",
                reason="quality report: judge the inverted challenger",
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=5,
        )


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), float("nan"))


def labelled(port: int, result: str = "") -> tuple[float, float]:
    """(outcomes written, of ``result`` if given; decisions waiting) at the labeler; (0, 0)
    while it is not up."""
    try:
        samples = scrape(port)
    except OSError:
        return 0.0, 0.0
    total = sum(
        v
        for (name, labels), v in samples.items()
        if name == "decision_quality_outcomes_total"
        and (not result or ("result", result) in labels)
    )
    return total, samples.get(("decision_quality_pending_decisions", frozenset()), 0.0)


def of_decisions(database: Path, decision_ids: list[str], query: str) -> list[Any]:
    """The rows of ``query`` over the audit store, where the table ``wanted`` holds
    ``decision_ids``."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.execute("CREATE TEMP TABLE wanted (decision_id TEXT PRIMARY KEY)")
        conn.executemany("INSERT INTO wanted VALUES (?)", [(i,) for i in decision_ids])
        return conn.execute(query).fetchall()


def stored_outcomes(database: Path, decision_ids: list[str]) -> list[tuple[str, float, int, str]]:
    """(source, score, label, feature_time) of the labelled decisions among ``decision_ids``."""
    return of_decisions(
        database,
        decision_ids,
        "SELECT d.source, d.score, o.label, d.feature_time FROM decisions d"
        " JOIN wanted USING (decision_id) JOIN decision_outcomes o USING (decision_id)"
        " WHERE o.label IS NOT NULL",
    )


def outcome_counts(database: Path, decision_ids: list[str]) -> dict[str, int]:
    """Outcomes of ``decision_ids`` by reason ("" for labelled)."""
    rows = of_decisions(
        database,
        decision_ids,
        "SELECT reason, count(*) FROM decision_outcomes JOIN wanted USING (decision_id)"
        " GROUP BY reason",
    )
    return {reason: count for reason, count in rows}


def quality_of(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> dict[str, float]:
    flagged = scores >= DEFAULT_TRADE_THRESHOLD
    return {
        "rows": float(len(scores)),
        "auc": auc(scores, labels),
        "precision": float(labels[flagged].mean()) if flagged.any() else float("nan"),
        "trade_share": float(flagged.mean()),
        "calibration_error": calibration_error(scores, labels),
        "favourable_share": float(labels.mean()),
    }


@dataclasses.dataclass
class Restart:
    """The run before the restart, and when the restarted stack served again."""

    before: Called
    serving_at_us: int  # wall clock, µs since the epoch


def labelled_after_restart(
    database: Path, decision_ids: list[str], horizon_us: int, end_us: int, serving_at_us: int
) -> tuple[int, int, float]:
    """Of the decisions the labeler could label (features whose horizon ends by the
    replay's last event, ``end_us``): (labelled, could be, seconds from serving to the
    first label)."""
    rows = of_decisions(
        database,
        decision_ids,
        "SELECT d.feature_time, o.label, o.labeled_at FROM decisions d"
        " JOIN wanted USING (decision_id) LEFT JOIN decision_outcomes o USING (decision_id)"
        " WHERE d.feature_time IS NOT NULL",
    )

    def us(text: str) -> int:  # SQLite's DateTime text, naive UTC, as SQLAlchemy stores it
        return epoch_us(dt.datetime.fromisoformat(text))

    could = [r for r in rows if us(r[0]) + horizon_us <= end_us]
    done = [r for r in could if r[1] is not None]
    first = min((us(r[2]) for r in done), default=0)
    return len(done), len(could), (first - serving_at_us) / 1e6 if done else float("nan")


async def replay_and_decide(
    stack: LocalStack, events: list[MarketEvent], warmup_s: float, args: argparse.Namespace,
    symbols: list[str], called: Called,
) -> int:  # fmt: skip
    """Replays ``events`` rebased to now, in a session of their own, and decides at
    ``args.rate`` from ``warmup_s`` until the replay ends; the shift applied."""
    shift_us = time.time_ns() // 1000 - events[0].exchange_time_us
    publishing = asyncio.create_task(
        replay(
            rebased(events, shift_us, session=time.time_ns() // 1000),
            bootstrap=f"127.0.0.1:{stack.kafka_port}",
            topic=FeatureCacheSettings().kafka.topic,
            speed=1.0,
            progress=Progress(len(events)),
        )
    )
    # Decide once the features' 30 s windows have filled, as training samples do.
    await asyncio.sleep(warmup_s)
    duration_s = (events[-1].exchange_time_us - events[0].exchange_time_us) / 1e6
    until = time.monotonic() + duration_s - warmup_s
    print(f"deciding at {args.rate:.0f}/s until the replay ends")
    await decide_steadily(f"127.0.0.1:{stack.decision_port}", symbols, args.rate, until, called)
    await publishing
    return shift_us


async def run_before_restart(
    args: argparse.Namespace, stack: LocalStack, spec: dict[str, Any]
) -> Called:
    """The first ``args.restart_after_s`` of the day through ``stack``, then stopped."""
    events = heldout_events(spec, args.restart_after_s)
    print(f"before the restart: {len(events):,} events over {args.restart_after_s:.0f} s")
    called = Called()
    try:
        await stack.start()
        await replay_and_decide(stack, events, spec["warmup_s"], args, spec["symbols"], called)
    finally:
        await stack.stop()
    print(f"stopped after {len(called.decision_ids):,} decisions; starting it again")
    return called


async def run(args: argparse.Namespace) -> int:
    archives = await asyncio.to_thread(ensure_models, args.models)
    manifest = json.loads((args.models / "models.json").read_text())
    spec = manifest["spec"]["data"]
    champion_version = archives["champion"].version
    heldout = np.load(args.models / "heldout.npz")
    stack_models = args.run_dir / "models"
    await asyncio.to_thread(models_with_inverted_challenger, args.models, stack_models)
    events = heldout_events(spec, args.duration_s)
    print(f"held-out day {spec['days'] - 1}: {len(events):,} events over {args.duration_s:.0f} s")

    # Every decision stays in the labeler's window: the whole run is one sample.
    os.environ["DECISION_QUALITY__WINDOW"] = "1000000"
    stack = LocalStack(args.run_dir, args.port_offset, stack_models, parts=WITHOUT_REPLAYER)
    refused = stack.claim_ports()
    if refused:
        print(f"{refused}; --port-offset N moves this stack")
        return 2
    restart = None
    if args.restart_after_s:
        before = await run_before_restart(args, stack, spec)  # releases the ports at its stop
        stack = LocalStack(args.run_dir, args.port_offset, stack_models, parts=WITHOUT_REPLAYER)
    called = Called()
    try:
        await stack.start()
        if args.restart_after_s:
            restart = Restart(before, serving_at_us=time.time_ns() // 1000)
        await shadow_every_decision(stack)

        shift_us = await replay_and_decide(
            stack, events, spec["warmup_s"], args, spec["symbols"], called
        )
        print(f"{len(called.decision_ids):,} decisions, errors {dict(called.errors) or 0};"
              " waiting for the labeler")  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            written, waiting = labelled(stack.labeler_metrics_port)
            if written >= len(called.decision_ids) and waiting == 0:
                break
            if time.monotonic() > deadline:
                print(f"the labeler wrote {written:.0f} outcomes of {len(called.decision_ids)}")
                break
            await asyncio.sleep(1)
        samples = scrape(stack.labeler_metrics_port)
    finally:
        await stack.stop()

    database = args.run_dir / "audit" / "audit.db"
    rows = stored_outcomes(database, called.decision_ids)
    outcomes = outcome_counts(database, called.decision_ids)
    model_rows = [r for r in rows if r[0] in ("PRIMARY", "SECONDARY")]
    scores = np.array([r[1] for r in model_rows])
    labels = np.array([r[2] for r in model_rows])
    # SQLite's DateTime text, naive UTC, as SQLAlchemy stores it.
    times = np.array(
        [epoch_us(dt.datetime.fromisoformat(r[3])) - shift_us for r in model_rows],
        dtype=np.int64,
    )
    live = quality_of(scores, labels)
    served = {"model": "champion", "model_version": champion_version, "role": "served"}
    live_metric = value(samples, "decision_quality_auc", **served)
    broken = next(
        (v for (name, labels_), v in samples.items()
         if name == "decision_quality_auc" and ("role", "shadow") in labels_),
        float("nan"),
    )  # fmt: skip
    period = (heldout["time_us"] >= times.min()) & (heldout["time_us"] <= times.max())
    offline = quality_of(heldout["champion"][period].astype(np.float64), heldout["y"][period])
    whole_day = quality_of(heldout["champion"].astype(np.float64), heldout["y"])
    gap = abs(live_metric - offline["auc"])
    ok = gap <= MAX_GAP and broken < 0.5
    restarted = ""
    if restart is not None:
        end_us = events[-1].exchange_time_us + shift_us
        horizon_us = spec["horizon_ms"] * 1000
        done, could, first_s = labelled_after_restart(
            database, called.decision_ids, horizon_us, end_us, restart.serving_at_us
        )
        share = done / could if could else 0.0
        ok = ok and share >= MIN_LABELLED and first_s <= FIRST_LABEL_WITHIN_S
        restarted = restart_text(args, restart, done, could, share, first_s)
    text = (
        report_text(args, called, outcomes, live, live_metric, offline, whole_day, broken, gap, ok)
        + restarted
    )
    print(text)
    args.report.write_text(text)
    print(f"wrote {args.report}")
    return 0 if ok else 1


def restart_text(
    args: argparse.Namespace, restart: Restart, done: int, could: int, share: float, first_s: float
) -> str:
    return f"""
## After a restart

Before the run above, the stack ran the day's first {args.restart_after_s:.0f} s the same way
({len(restart.before.decision_ids):,} decisions), was stopped, and was started again on the same
run folder: the broker kept the topic, Redis started empty (its checkpoints gone), so the
labeler read the topic from its start, the earlier run's events and then the new
replay's, numbered from 1 again in a session of its own. The run above is the one after
the restart: its first label was written **{first_s:.0f} s** after the stack served again
(bound {FIRST_LABEL_WITHIN_S:.0f} s; decisions start after the 30 s warm-up), and
**{done:,} of {could:,}** decisions that could be labelled ({share:.1%}; bound
{MIN_LABELLED:.0%}) were: those with features whose horizon ended before the replay did.
"""


def report_text(
    args: argparse.Namespace,
    called: Called,
    outcomes: dict[str, int],
    live: dict[str, float],
    live_metric: float,
    offline: dict[str, float],
    whole_day: dict[str, float],
    broken: float,
    gap: float,
    ok: bool,
) -> str:
    sources = ", ".join(
        f"{decision_pb2.Source.Name(decision_pb2.Source.ValueType(s)).removeprefix('SOURCE_').lower()}"
        f" {n:,}"
        for s, n in sorted(called.sources.items())
    )

    unlabelled = ", ".join(f"{reason} {n:,}" for reason, n in sorted(outcomes.items()) if reason)

    def row(name: str, q: dict[str, float]) -> str:
        return (
            f"| {name} | {q['rows']:,.0f} | {q['auc']:.3f} | {q['precision']:.3f} |"
            f" {q['trade_share']:.3f} | {q['calibration_error']:.3f} |"
            f" {q['favourable_share']:.3f} |"
        )

    return f"""# Live model quality against the offline evaluation

Written by `make quality-report` (`python -m checks.quality_report`) on
{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; do not edit by hand.

The first {args.duration_s:.0f} s of the models' held-out day were replayed through the local
stack in real time; after the 30 s warm-up, {args.rate:.0f} Decide calls a second for random
symbols and sides ({len(called.decision_ids):,} decisions: {sources}). The labeler labelled
{outcomes.get("", 0):,} of them from the same market data; without a label: {unlabelled or "none"}
(the decisions of the last 2 s, whose horizon ran past the end of the replay). The
champion's served scores (primary and secondary answers) are judged against those
labels, and the offline evaluation is the champion's scores on the held-out rows of the
same span of exchange time.

| scorer | decisions / rows | AUC | precision | trade share | calibration error | favourable |
| --- | --- | --- | --- | --- | --- | --- |
{row("live: champion's served scores (audit store)", live)}
{row("offline: held-out rows, same period", offline)}
{row("offline: the whole held-out day", whole_day)}

- The labeler's own live AUC (`decision_quality_auc`, role served): **{live_metric:.3f}**;
  offline, same period: **{offline["auc"]:.3f}**; difference {gap:.3f} (bound {MAX_GAP}).
- The challenger replaced by the champion with inverted scores (1 - score), shadow-scoring
  every decision: live AUC **{broken:.3f}** (below 0.5: `DecisionModelWorseThanChance` /
  `DecisionChallengerWorseThanChance` fire on it, `k8s/monitoring/alert-rules-test.yaml`).
- Verdict: {"PASS" if ok else "FAIL"}.

Live decisions come at random times with the features of the moment; the offline rows
every 250 ms per symbol. Both are samples of the same period, so the AUCs differ by
sampling noise (neighbouring decisions share most of their horizon, so the noise is
larger than the counts suggest).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=360.0, help="exchange time replayed")
    parser.add_argument("--rate", type=float, default=25.0, help="Decide calls a second")
    parser.add_argument("--models", type=Path, default=REPO / ".run/models")
    parser.add_argument("--run-dir", type=Path, default=REPO / ".run/quality-report")
    parser.add_argument("--port-offset", type=int, default=300)
    parser.add_argument("--report", type=Path, default=REPO / "docs/quality.md")
    parser.add_argument(
        "--restart-after-s",
        type=float,
        default=0.0,
        help="first run this much of the day, stop the stack and start it again (0: no restart)",
    )
    args = parser.parse_args()
    if args.run_dir.exists():
        shutil.rmtree(args.run_dir)  # a fresh audit store and journal each run
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
