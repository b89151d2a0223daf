"""The labeler's tests use the feature cache's topics and the audit tests' databases."""

from tests.feature_cache.conftest import kafka_settings
from tests.server.audit.conftest import database_url, postgres_admin, postgres_url

__all__ = ["database_url", "kafka_settings", "postgres_admin", "postgres_url"]
