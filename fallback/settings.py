"""The fallback ladder's settings: cached scores and the rules baseline."""

from __future__ import annotations

from pydantic import Field

from core.settings import SettingsSection
from fallback.score_cache import HELD_MS


class FallbackSettings(SettingsSection):
    cached_score_max_age_ms: float = Field(
        1000.0,
        gt=HELD_MS,  # a score held in memory longer would be too old before it is read again
        description="A cached model score older than this is not used.",
    )
    rules_max_spread_bps: float = Field(
        10.0, description="Rules: NO_TRADE when the spread is wider than this."
    )
    rules_max_volatility_bps: float = Field(
        25.0, description="Rules: NO_TRADE when 30 s realized volatility exceeds this."
    )
    rules_min_imbalance: float = Field(
        0.1,
        description="Rules: TRADE when 5-level depth imbalance leans this far the order's way.",
    )
