"""``AuditSettings``, the audit section of the server's settings, in a module of its own:
the audit shipper's child process reads it without importing the rest of the server."""

from __future__ import annotations

from pydantic import Field

from core.settings import SettingsSection


class AuditSettings(SettingsSection):
    enabled: bool = Field(
        True,
        description="Record every decision. Off only to measure what the audit costs: "
        "decisions are then not recorded at all.",
    )
    journal_dir: str = Field(
        ".run/audit/journal",
        description="Folder of the local journal, written before each response; one server "
        "process per folder.",
    )
    fsync_interval_ms: float = Field(
        200.0,
        ge=0,
        description="How often the journal is fsynced: what a machine crash may lose (a process "
        "crash loses nothing). 0: after every append, at a cost on every decision.",
    )
    database_url: str = Field(
        "sqlite:///.run/audit/audit.db",
        description="SQLAlchemy URL of the audit store: SQLite by default, "
        "postgresql+psycopg://... in production.",
    )
    migrate_on_start: bool = Field(
        True, description="Bring the store's schema to the latest migration before shipping."
    )
    max_backlog_bytes: int = Field(
        0,
        ge=0,
        description="Unshipped journal bytes at which new decisions are refused (UNAVAILABLE) "
        "until the store catches up; below the journal volume's size over the "
        "workers. 0: no cap.",
    )
    shutdown_drain_s: float = Field(
        5.0,
        ge=0,
        description="On shutdown, how long the shipper may go on shipping the backlog; what "
        "is left is shipped by the next start.",
    )
    server_id: str = Field(
        "", description="This server in the audit records; empty: host name and port."
    )
