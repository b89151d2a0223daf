"""The labeler's tests use the feature cache's topics, the audit tests' databases and the
server tests' decision server processes."""

from tests.feature_cache.conftest import kafka_settings
from tests.server.audit.conftest import database_url, postgres_admin, postgres_url
from tests.server.conftest import server_processes

__all__ = ["database_url", "kafka_settings", "postgres_admin", "postgres_url", "server_processes"]
