"""The fallback ladder's settings: cached scores and the rules baseline."""

from __future__ import annotations

from pydantic import Field, model_validator

from core.settings import SettingsSection


class FallbackSettings(SettingsSection):
    cached_score_max_age_ms: float = Field(
        1000.0, gt=0, description="A cached model score older than this is not used."
    )
    cached_score_write_interval_ms: float = Field(
        100.0,
        ge=0,
        description="A symbol and side's cached score is rewritten at most this often, so "
        "busy symbols do not cost a Redis write per decision.",
    )
    cached_score_held_ms: float = Field(
        100.0,
        ge=0,
        description="Each server process holds the cached scores it reads or computes in "
        "memory this long before reading Redis again, so shedding load or open breakers do "
        "not cost a Redis read per decision; 0 reads Redis every time.",
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

    @model_validator(mode="after")
    def _held_shorter_than_useful(self) -> FallbackSettings:
        if self.cached_score_held_ms >= self.cached_score_max_age_ms:
            raise ValueError(
                f"cached_score_held_ms ({self.cached_score_held_ms:g}) must be less than "
                f"cached_score_max_age_ms ({self.cached_score_max_age_ms:g}): a score held "
                "that long would be too old to use before it is read again"
            )
        return self
