"""The labeler's settings: its own section, and the Redis, Kafka and audit-store settings
it shares with the feature cache and the decision server (the same variables)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from core.settings import ROOT_CONFIG, SettingsSection, TelemetrySettings
from feature_cache.settings import KafkaSettings, RedisSettings
from server.audit.settings import AuditSettings

# How far behind the newest decision seen each pass reads again: decisions reach the
# store late (the shipper's batches, a short store outage).
LOOKBACK_S = 120.0
# A decision whose symbol has no market data this long past its horizon gets an outcome
# without a label (reason given) instead of waiting on.
GIVE_UP_S = 30.0
PASS_DECISIONS = 20_000  # decisions read from the store per pass, at most
# Labels trail decisions by the horizon and a pass or two; trailing by this much (past any
# horizon the settings allow plus the give-up wait), labelling has stopped.
LABELS_STOPPED_S = 120.0


class LabelerSettings(SettingsSection):
    horizon_ms: int = Field(
        2000,
        gt=0,
        # A decision still waiting for its label must not fall out of the store reads.
        lt=int((LOOKBACK_S - GIVE_UP_S) * 1000),
        description="The label's horizon: the mid this long after a decision's features is "
        "compared with the mid then. Must be the horizon the models were trained on "
        "(models.json's spec.data.horizon_ms).",
    )
    window: int = Field(
        2000,
        ge=10,
        description="Labelled decisions per model version that the rolling AUC, precision "
        "and calibration error are computed over.",
    )
    poll_interval_s: float = Field(
        5.0,
        gt=0,
        # Well within the lookback, and labels stopped is judged at minutes.
        le=30,
        description="Seconds between the labeler's passes over the audit store: how late "
        "a label may come past its horizon. Each pass reads the last two minutes' "
        "decisions, so a shorter interval costs the store more reads.",
    )
    metrics_port: int = Field(
        9490, ge=0, le=65535, description="The labeler's /metrics port; 0: off."
    )


class QualitySettings(BaseSettings):
    """The settings of ``python -m quality``."""

    model_config = ROOT_CONFIG

    quality: LabelerSettings = LabelerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    redis: RedisSettings = RedisSettings()
    kafka: KafkaSettings = KafkaSettings()
    audit: AuditSettings = AuditSettings()
