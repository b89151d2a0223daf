"""The labeler as a process, on the session's broker and redis-server and a real audit
store: generated market data and decisions whose features came from it; the outcomes it
stores must be the labels training computes from the same events."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from core.processes import ManagedProcess, free_port, listening
from feature_cache.events import MarketEvent
from feature_cache.features import SymbolState
from feature_cache.generator import MarketGenerator
from feature_cache.schema import FEATURE_NAMES
from feature_cache.settings import KafkaSettings
from k8s.alert_rules import dashboard_expressions, rule_expressions
from k8s.render import OVERLAYS, render_overlay
from server.audit.migrate import upgrade
from server.audit.record import DecisionRecord, decode, encode
from server.audit.store import AuditStore, create_store_engine, decision_outcomes
from tests.conftest import REPO, RedisInstance
from tests.feature_cache.conftest import publish
from tests.metrics import exported_names, names_in, scrape, value
from tests.quality.test_rolling import brute_force_auc
from tests.server.audit.conftest import decision_record

pytestmark = pytest.mark.integration

HORIZON_US = 2_000_000
START_US = 1_767_258_000_000_000


def sampled(
    events: list[MarketEvent], every_us: int, warmup_us: int
) -> list[tuple[str, int, float, tuple[float, ...]]]:
    """(symbol, time, mid, features) every ``every_us`` per symbol after the warm-up, as
    torchserve.dataset samples its rows."""
    states: dict[str, SymbolState] = {}
    next_at: dict[str, int] = {}
    samples = []
    for event in events:
        state = states.setdefault(event.symbol, SymbolState())
        state.apply(event)
        mid, now = state.mid, state.last_event_time_us
        if mid is None or now < next_at.setdefault(event.symbol, START_US + warmup_us):
            continue
        features = state.features()
        if features is not None:
            samples.append((event.symbol, now, mid, features))
            next_at[event.symbol] = now + every_us
    return samples


def later_mids(events: list[MarketEvent]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per symbol, the mid after each event time (the last one at a time), as arrays."""
    states: dict[str, SymbolState] = {}
    points: dict[str, dict[int, float]] = {}
    for event in events:
        state = states.setdefault(event.symbol, SymbolState())
        state.apply(event)
        if state.mid is not None:
            points.setdefault(event.symbol, {})[state.last_event_time_us] = state.mid
    return {
        symbol: (np.array(list(p), dtype=np.int64), np.array(list(p.values())))
        for symbol, p in points.items()
    }


def labeler_process(
    kafka: KafkaSettings,
    redis_instance: RedisInstance,
    key_prefix: str,
    database_url: str,
    metrics_port: int,
    logs: Path,
) -> ManagedProcess:
    """A labeler process (``python -m quality``, not started) on the test's topic, prefix
    and store, logging at INFO to ``logs/labeler.log``."""
    return ManagedProcess(
        "labeler",
        [sys.executable, "-m", "quality"],
        cwd=REPO,
        log_path=logs / "labeler.log",
        env={
            **os.environ,
            "DECISION_REDIS__URL": redis_instance.url,
            "DECISION_REDIS__KEY_PREFIX": key_prefix,
            "DECISION_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "DECISION_KAFKA__TOPIC": kafka.topic,
            "DECISION_AUDIT__DATABASE_URL": database_url,
            "DECISION_QUALITY__METRICS_PORT": str(metrics_port),
            "DECISION_QUALITY__POLL_INTERVAL_S": "0.5",  # labels soon after their horizon
            "DECISION_TELEMETRY__LOG_LEVEL": "INFO",
        },
    )


async def test_the_labeler_stores_the_training_label_of_every_decision_and_its_quality(
    kafka_settings: KafkaSettings,
    redis_instance: RedisInstance,
    key_prefix: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    events = list(
        MarketGenerator(
            ("SIM-A", "SIM-B"), seed=7, start_time_us=START_US, events_per_second=400
        ).events(8000)
    )  # 20 s of exchange time
    mids = later_mids(events)
    last_us = {symbol: int(times[-1]) for symbol, (times, _) in mids.items()}
    decisions: list[DecisionRecord] = []
    expected: dict[str, tuple[int, float]] = {}
    rng = np.random.default_rng(0)
    for symbol, at_us, mid, features in sampled(events, every_us=250_000, warmup_us=5_000_000):
        if at_us + HORIZON_US >= last_us[symbol]:
            continue  # the data ends before the horizon: it would wait for more
        times, values = mids[symbol]
        later = float(values[np.searchsorted(times, at_us + HORIZON_US, side="right") - 1])
        for side, sign in (("BUY", 1.0), ("SELL", -1.0)):
            # As torchserve.dataset labels its rows, written out here independently.
            label = int(sign * (later - mid) > features[0] * mid / 2e4)
            # A model that ranks better than chance; its inverse ranks worse.
            score = float(np.clip(0.35 + 0.3 * label + rng.normal(0.0, 0.2), 0.0, 1.0))
            record = decision_record(
                len(decisions),
                symbol=symbol,
                side=side,
                features=dict(zip(FEATURE_NAMES, features, strict=True)),
                feature_time_us=at_us,
                score=score,
                model_name="champion",
                model_version="v-champion",
                shadow_model_name="challenger",
                shadow_model_version="v-inverted",
                shadow_score=1.0 - score,
            )
            decisions.append(record)
            expected[record.decision_id] = (label, score)
    # Features from before the market data the labeler holds: no label, and why.
    early = decision_record(len(decisions), symbol="SIM-A", feature_time_us=START_US - 1_000_000)
    # No features: not the labeler's.
    featureless = decision_record(len(decisions) + 1, features=None, source="ABSTAIN")
    engine = create_store_engine(database_url)
    upgrade(engine)
    AuditStore(engine).insert([decode(encode(r)) for r in (*decisions, early, featureless)])
    await publish(kafka_settings, events)

    port = free_port()
    labeler = labeler_process(
        kafka_settings, redis_instance, key_prefix, database_url, port, tmp_path
    )
    labeler.start()
    try:
        labeler.wait_ready(listening(port), 30.0)
        deadline = time.monotonic() + 60
        while value(scrape(port), "decision_quality_outcomes_total", result="labelled") < len(
            decisions
        ):
            assert labeler.running(), labeler.log_tail()
            assert time.monotonic() < deadline, labeler.log_tail()
            await asyncio.sleep(0.2)
        samples = scrape(port)
        exported = exported_names(port)
    finally:
        labeler.stop()
    assert labeler.wait(1.0) == 0

    with engine.connect() as conn:
        stored = {row.decision_id: row for row in conn.execute(sa.select(decision_outcomes))}
    engine.dispose()
    assert set(stored) == {*expected, early.decision_id}
    wrong = [i for i, (label, _) in expected.items() if stored[i].label != label]
    assert not wrong, f"{len(wrong)} of {len(expected)} labels differ from training's"
    assert stored[early.decision_id].label is None
    assert stored[early.decision_id].reason == "before_history"
    assert {row.horizon_ms for row in stored.values()} == {2000}

    labels = np.array([label for label, _ in expected.values()])
    scores = np.array([score for _, score in expected.values()])
    assert len(expected) <= 2000  # the default window holds them all
    want = brute_force_auc(scores, labels)
    champion = {"model": "champion", "model_version": "v-champion", "role": "served"}
    challenger = {"model": "challenger", "model_version": "v-inverted", "role": "shadow"}
    got = value(samples, "decision_quality_auc", **champion)
    assert got == pytest.approx(want, abs=1e-9)
    inverted = value(samples, "decision_quality_auc", **challenger)
    assert inverted == pytest.approx(1 - want, abs=1e-9)
    assert inverted < 0.5 < got
    assert value(samples, "decision_quality_samples", **champion) == len(expected)
    assert value(samples, "decision_quality_outcomes_total", result="before_history") == 1
    assert value(samples, "decision_quality_store_errors_total") == 0
    assert not math.isnan(got)

    for overlay in OVERLAYS:
        objects = render_overlay(overlay)
        for where, expressions in (
            ("rules", rule_expressions(objects)),
            ("dashboard", dashboard_expressions(objects)),
        ):
            used = names_in(expressions, ("decision_quality_",))
            assert used, f"{overlay} {where} show the labeler"
            assert used <= exported, f"{overlay} {where}: {sorted(used - exported)}"


WAITING = "waiting for the audit store's tables"


async def test_on_a_fresh_store_the_labeler_waits_for_its_tables_then_labels(
    kafka_settings: KafkaSettings, redis_instance: RedisInstance, key_prefix: str, tmp_path: Path
) -> None:
    """As on a fresh ``make run``: the labeler starts before the decision server has
    created the audit tables; it waits for them, saying so once, and counts no error."""
    database = tmp_path / "audit.db"
    database.touch()  # empty: no tables yet
    database_url = f"sqlite:///{database}"
    port = free_port()
    labeler = labeler_process(
        kafka_settings, redis_instance, key_prefix, database_url, port, tmp_path
    )
    labeler.start()
    try:
        labeler.wait_ready(listening(port), 30.0)
        deadline = time.monotonic() + 30
        # Until it says it waits, or (the defect) fails a pass on the missing tables.
        while WAITING not in labeler.log_tail(200):
            assert value(scrape(port), "decision_quality_store_errors_total") == 0, (
                labeler.log_tail()
            )
            assert time.monotonic() < deadline, labeler.log_tail()
            await asyncio.sleep(0.2)
        await asyncio.sleep(6.0)  # a pass's interval and more: still waiting, no error
        assert value(scrape(port), "decision_quality_store_errors_total") == 0
        assert value(scrape(port), "decision_quality_last_pass_timestamp_seconds") == 0

        engine = create_store_engine(database_url)
        upgrade(engine)  # what the decision server does as it starts
        engine.dispose()
        deadline = time.monotonic() + 30
        while value(scrape(port), "decision_quality_last_pass_timestamp_seconds") == 0:
            assert labeler.running(), labeler.log_tail()
            assert time.monotonic() < deadline, labeler.log_tail()
            await asyncio.sleep(0.2)
        samples = scrape(port)
    finally:
        labeler.stop()
    assert labeler.wait(1.0) == 0
    assert value(samples, "decision_quality_store_errors_total") == 0
    log_text = (tmp_path / "labeler.log").read_text()
    assert log_text.count(WAITING) == 1, log_text
    assert "no such table" not in log_text
