"""Which decisions the labeler labels, waits on or gives up on (no processes: the logic)."""

from __future__ import annotations

import redis.asyncio as aioredis
import sqlalchemy as sa

from quality.labeler import (
    BEFORE_HISTORY,
    NO_MARKET_DATA,
    NO_SPREAD,
    SERVED,
    SHADOW,
    Labeler,
    Scorer,
)
from quality.settings import LABELS_STOPPED_S, LabelerSettings, QualitySettings
from quality.store import Outcome, OutcomeStore, PendingDecision

HORIZON_US = 2_000_000
GIVE_UP_US = 30_000_000


def labeler() -> Labeler:
    settings = QualitySettings(quality=LabelerSettings(horizon_ms=2000))
    store = OutcomeStore(sa.create_engine("sqlite://"), horizon_ms=2000)
    return Labeler(settings, aioredis.Redis(), store)


def pending(
    at_us: int,
    *,
    symbol: str = "SIM-A",
    side: float = 1.0,
    spread: float | None = 2.0,
    **more: object,
) -> PendingDecision:
    fields: dict[str, object] = {
        "decision_id": f"d-{at_us}-{side}",
        "decided_at_us": at_us + 1000,
        "feature_time_us": at_us,
        "symbol": symbol,
        "side_sign": side,
        "spread_bps": spread,
        "source": "PRIMARY",
        "model_name": "champion",
        "model_version": "v1",
        "score": 0.7,
        "threshold": 0.55,
        "shadow_model_name": None,
        "shadow_model_version": None,
        "shadow_score": None,
    }
    fields.update(more)
    return PendingDecision(**fields)  # type: ignore[arg-type]


def test_a_decision_waits_until_the_market_data_is_past_its_horizon() -> None:
    lab = labeler()
    history = lab._history("SIM-A")
    history.note(1_000_000, 100.0)
    decision = pending(1_000_000)
    history.note(3_000_000, 100.05)  # exactly at the horizon: more may come at that time
    assert lab.outcome(decision, now_us=3_100_000) is None
    history.note(3_000_001, 101.0)
    # The mid in effect at the horizon is 100.05: up 5 bps, more than the 1 bp half-spread.
    outcome = lab.outcome(decision, now_us=3_100_000)
    assert outcome == Outcome(decision.decision_id, decision.decided_at_us, 1, 100.0, 100.05)
    sell = lab.outcome(pending(1_000_000, side=-1.0), now_us=3_100_000)
    assert sell is not None and sell.label == 0


def test_a_move_inside_the_half_spread_is_not_favourable() -> None:
    lab = labeler()
    history = lab._history("SIM-A")
    history.note(0, 100.0)
    history.note(1_000_000, 100.005)  # +0.5 bp, the half-spread is 1 bp
    history.note(HORIZON_US + 1, 100.005)
    for side in (1.0, -1.0):
        outcome = lab.outcome(pending(0, side=side), now_us=HORIZON_US + 2)
        assert outcome is not None and outcome.label == 0


def test_decisions_without_a_label_say_why() -> None:
    lab = labeler()
    history = lab._history("SIM-A")
    history.note(5_000_000, 100.0)
    history.note(10_000_000, 100.0)
    early = lab.outcome(pending(4_000_000), now_us=10_000_000)
    assert early is not None and (early.label, early.reason) == (None, BEFORE_HISTORY)
    spreadless = lab.outcome(pending(5_000_000, spread=None), now_us=10_000_000)
    assert spreadless is not None and (spreadless.label, spreadless.reason) == (None, NO_SPREAD)
    # A silent symbol: waited on until the horizon and the give-up time have passed.
    silent = pending(9_000_000)
    assert lab.outcome(silent, now_us=silent.decided_at_us + HORIZON_US + GIVE_UP_US) is None
    late = lab.outcome(silent, now_us=silent.decided_at_us + HORIZON_US + GIVE_UP_US + 1)
    assert late is not None and (late.label, late.reason) == (None, NO_MARKET_DATA)
    unknown = pending(9_000_000, symbol="SIM-Z")
    assert lab.outcome(unknown, now_us=unknown.decided_at_us + 1) is None
    gone = lab.outcome(unknown, now_us=unknown.decided_at_us + HORIZON_US + GIVE_UP_US + 1)
    assert gone is not None and gone.reason == NO_MARKET_DATA


def test_scores_are_judged_by_who_scored_them() -> None:
    lab = labeler()
    decided = [
        (pending(1, source="PRIMARY"), Outcome("a", 0, 1)),
        (pending(2, source="SECONDARY"), Outcome("b", 0, 0)),
        (pending(3, source="RULES", model_name="rules", model_version=""), Outcome("c", 0, 1)),
        (pending(4, source="CACHED_SCORE"), Outcome("d", 0, 1)),  # an earlier decision's score
        (pending(5, source="ABSTAIN", score=None), Outcome("e", 0, 1)),
        (
            pending(6, shadow_model_name="challenger", shadow_model_version="c1", shadow_score=0.2),
            Outcome("f", 0, 0),
        ),
        (pending(7), Outcome("g", 0, None, reason=NO_MARKET_DATA)),
    ]
    lab.judge(decided)
    assert {scorer: rolling.labelled for scorer, rolling in lab.quality.items()} == {
        Scorer("champion", "v1", SERVED): 3,  # PRIMARY, SECONDARY and the shadowed one's own
        Scorer("rules", "", SERVED): 1,
        Scorer("challenger", "c1", SHADOW): 1,
    }


def test_the_labels_trail_the_decisions_and_stop_past_the_limit() -> None:
    """Behind: the newest labelled decision against the newest decision read; before a
    label, the labeler's start. No decisions coming: nothing trails."""
    stats = labeler().stats
    start = stats.started_at_us
    assert stats.labels_behind_s() == 0.0
    stats.newest_decided_at_us = start - 60_000_000  # the lookback's, from before the start
    assert stats.labels_behind_s() == 0.0
    stats.newest_decided_at_us = start + 30_000_000
    assert stats.labels_behind_s() == 30.0
    stats.newest_labelled_decided_at_us = start + 23_000_000
    assert stats.labels_behind_s() == 7.0
    assert not stats.labels_stopped()
    stats.newest_decided_at_us = start + 23_000_000 + int(LABELS_STOPPED_S * 1e6) + 1
    assert stats.labels_stopped()
