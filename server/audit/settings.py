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
    archive_url: str = Field(
        ".run/audit/archive",
        description="Where python -m server.audit archive writes each closed day as Parquet: "
        "a folder, or an fsspec URL (s3://bucket/audit with s3fs installed).",
    )
    retention_days: int = Field(
        7,
        ge=0,
        description="Days a decision stays in the database once its day is archived and "
        "verified; older days are removed from it (and read from the archive).",
    )
    archive_after_s: float = Field(
        21_600.0,
        ge=0,
        description="How long after a day ends it is archived: longer than a store outage "
        "whose backlog the shippers still deliver. A row later than that is still kept: "
        "archived with the day's late rows.",
    )
    server_id: str = Field(
        "", description="This server in the audit records; empty: host name and port."
    )
