"""The feature cache's settings: Redis (shared with the server, which reads the features),
the feature age limit, Kafka, and the root of the consumer and replayer processes."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from core.settings import ROOT_CONFIG, SettingsSection, TelemetrySettings


class RedisSettings(SettingsSection):
    url: str = Field("redis://127.0.0.1:16379/0", description="Feature and score cache.")
    key_prefix: str = Field("decision:", description="Prefix of every key this service uses.")


class FeatureSettings(SettingsSection):
    max_age_ms: float = Field(
        2000.0, gt=0, description="Older feature records are stale: the model is skipped."
    )


class KafkaSettings(SettingsSection):
    bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="Kafka brokers, comma-separated host:port."
    )
    topic: str = Field("market-data", description="Market events, keyed by symbol.")
    group_id: str = Field("feature-cache", description="Consumer group of the feature cache.")

    @property
    def dead_letter_topic(self) -> str:
        """Where malformed market events go, with the reason: the topic's name + .dlq."""
        return f"{self.topic}.dlq"


class FeatureCacheProcessSettings(SettingsSection):
    alive_file: str = Field(
        "",
        description="File the consumer touches every 10 s while its loop runs, for a "
        "container's liveness probe (`feature-cache --check-alive 60`); empty: none.",
    )
    metrics_port: int = Field(
        9480, ge=0, le=65535, description="The consumer's /metrics port (HTTP); 0 turns it off."
    )


class FeatureCacheSettings(BaseSettings):
    """The settings of ``python -m feature_cache`` and ``feature_cache.replay``."""

    model_config = ROOT_CONFIG

    feature_cache: FeatureCacheProcessSettings = FeatureCacheProcessSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    redis: RedisSettings = RedisSettings()
    kafka: KafkaSettings = KafkaSettings()
