"""The rules baseline: explainable thresholds on spread, volatility and book imbalance.

Score: ``0.5 + 0.5 * lean``, where lean is the 5-level depth imbalance signed toward
the order's side (bids outweighing asks favour a buy). TRADE needs the lean to reach
``min_imbalance`` and the spread and volatility to be within their limits; a breached
limit forces the score to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.domain import Decision, Side
from feature_cache.schema import FEATURE_INDEX

_SPREAD = FEATURE_INDEX["spread_bps"]
_VOL = FEATURE_INDEX["realized_vol_30s_bps"]
_IMBALANCE = FEATURE_INDEX["imbalance_l5"]


@dataclass(frozen=True, slots=True)
class RulesVerdict:
    decision: Decision
    score: float
    threshold: float
    explanation: str


class RulesBaseline:
    def __init__(
        self, *, max_spread_bps: float, max_volatility_bps: float, min_imbalance: float
    ) -> None:
        self.max_spread_bps = max_spread_bps
        self.max_volatility_bps = max_volatility_bps
        self.min_imbalance = min_imbalance
        self.threshold = 0.5 + 0.5 * min_imbalance

    def parameters(self) -> dict[str, float]:
        """Everything that determines the rules' answers (their version's input)."""
        return {
            "max_spread_bps": self.max_spread_bps,
            "max_volatility_bps": self.max_volatility_bps,
            "min_imbalance": self.min_imbalance,
        }

    def evaluate(self, side: Side, features: Sequence[float]) -> RulesVerdict:
        spread, vol = features[_SPREAD], features[_VOL]
        lean = side.sign * features[_IMBALANCE]
        if spread > self.max_spread_bps:
            why = f"spread {spread:.1f} bps > {self.max_spread_bps:.1f}"
            return RulesVerdict(Decision.NO_TRADE, 0.0, self.threshold, why)
        if vol > self.max_volatility_bps:
            why = f"volatility {vol:.1f} bps > {self.max_volatility_bps:.1f}"
            return RulesVerdict(Decision.NO_TRADE, 0.0, self.threshold, why)
        score = min(1.0, max(0.0, 0.5 + 0.5 * lean))
        side_name = side.name.lower()
        if lean >= self.min_imbalance:
            why = f"book leans {lean:+.2f} toward {side_name} >= {self.min_imbalance:.2f}"
            return RulesVerdict(Decision.TRADE, score, self.threshold, why)
        why = f"book leans {lean:+.2f} toward {side_name} < {self.min_imbalance:.2f}"
        return RulesVerdict(Decision.NO_TRADE, score, self.threshold, why)
