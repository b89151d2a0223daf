"""The labeler's settings: its own section, and the Redis, Kafka and audit-store settings
it shares with the feature cache and the decision server (the same variables)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from core.settings import ROOT_CONFIG, SettingsSection
from feature_cache.settings import KafkaSettings, RedisSettings
from server.settings import AuditSettings


class LabelerSettings(SettingsSection):
    horizon_ms: int = Field(
        2000,
        gt=0,
        description="The label's horizon: the mid this long after a decision's features is "
        "compared with the mid then. Must be the horizon the models were trained on "
        "(models.json's spec.data.horizon_ms).",
    )
    poll_interval_ms: float = Field(
        5000.0,
        gt=0,
        description="How often the audit store is read for decisions to label: labels are "
        "for rolling quality, a few seconds late is fine, and each read scans the "
        "lookback's decisions.",
    )
    lookback_s: float = Field(
        120.0,
        gt=0,
        description="How far behind the newest decision seen the store is read again, for "
        "decisions that reach it late (the shipper's batches, a short store outage); one "
        "stored later than this after it was decided is not labelled.",
    )
    give_up_s: float = Field(
        30.0,
        gt=0,
        description="A decision whose symbol has no market data this long past its horizon "
        "gets an outcome without a label (reason given) instead of waiting on.",
    )
    batch: int = Field(20_000, ge=1, description="Decisions read from the store per poll, at most.")
    window: int = Field(
        2000,
        ge=10,
        description="Labelled decisions per model version that the rolling AUC, precision "
        "and calibration error are computed over.",
    )
    log_level: str = Field("INFO", description="Python logging level of the labeler.")
    metrics_host: str = Field("127.0.0.1", description="Address of the labeler's /metrics.")
    metrics_port: int = Field(
        9490, ge=0, le=65535, description="The labeler's /metrics port; 0: off."
    )

    @model_validator(mode="after")
    def _lookback_covers_the_wait(self) -> LabelerSettings:
        if self.lookback_s * 1000 <= self.horizon_ms + self.give_up_s * 1000:
            raise ValueError(
                "lookback_s must exceed horizon_ms + give_up_s: a decision still waiting for "
                "its label would fall out of the store reads"
            )
        return self


class QualitySettings(BaseSettings):
    """The settings of ``python -m quality``."""

    model_config = ROOT_CONFIG

    quality: LabelerSettings = LabelerSettings()
    redis: RedisSettings = RedisSettings()
    kafka: KafkaSettings = KafkaSettings()
    audit: AuditSettings = AuditSettings()
