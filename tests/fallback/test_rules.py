"""The rules baseline (pure logic)."""

from __future__ import annotations

from core.domain import Decision, Side
from fallback.rules import RulesBaseline
from feature_cache.schema import FEATURE_NAMES

RULES = RulesBaseline(max_spread_bps=10, max_volatility_bps=25, min_imbalance=0.1)


def features(**values: float) -> list[float]:
    base = dict.fromkeys(FEATURE_NAMES, 0.0)
    base.update(spread_bps=2.0, realized_vol_30s_bps=5.0)
    base.update(values)
    return [base[name] for name in FEATURE_NAMES]


def test_book_leaning_toward_the_side_trades():
    verdict = RULES.evaluate(Side.BUY, features(imbalance_l5=0.4))
    assert verdict.decision == Decision.TRADE
    assert verdict.score == 0.7
    assert verdict.score >= verdict.threshold
    assert "toward buy" in verdict.explanation


def test_the_same_book_does_not_favour_the_other_side():
    verdict = RULES.evaluate(Side.SELL, features(imbalance_l5=0.4))
    assert verdict.decision == Decision.NO_TRADE
    assert verdict.score < verdict.threshold


def test_wide_spread_or_high_volatility_never_trades():
    wide = RULES.evaluate(Side.BUY, features(imbalance_l5=0.9, spread_bps=12))
    assert (wide.decision, wide.score) == (Decision.NO_TRADE, 0.0)
    assert wide.explanation == "spread 12.0 bps > 10.0"
    wild = RULES.evaluate(Side.BUY, features(imbalance_l5=0.9, realized_vol_30s_bps=40))
    assert wild.decision == Decision.NO_TRADE
    assert wild.explanation == "volatility 40.0 bps > 25.0"
