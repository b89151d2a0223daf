"""Admin fixtures: the audit store's databases (SQLite, PostgreSQL) hold the control state."""

from tests.server.audit.conftest import database_url, postgres_admin, postgres_url

__all__ = ["database_url", "postgres_admin", "postgres_url"]
