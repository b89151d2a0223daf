"""decisions partitioned by day on PostgreSQL; its key (decision_id, decided_at)

The existing table is not copied: it is renamed and attached as the partition of every
time before the day after the migration runs (its key rebuilt to include decided_at, as a
partitioned table's unique key must); a default partition takes rows no day covers
(server/audit/partitions.py makes the days). SQLite is not partitioned: its table gets the
same key.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 05:20:00
"""

from __future__ import annotations

import datetime as dt
import warnings

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The indexes of 0001, on the partitioned table as on each partition.
INDEXES = {
    "ix_decisions_symbol_decided_at": "symbol, decided_at",
    "ix_decisions_model_version_decided_at": "model_version, decided_at",
    "ix_decisions_source_decided_at": "source, decided_at",
    "ix_decisions_decided_at": "decided_at",
    "ix_decisions_request_id": "request_id",
}


def _sqlite_key(columns: list[str]) -> None:
    # The table is copied with its new key; SQLAlchemy warns that the key differs from the
    # one it read, which is the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        with op.batch_alter_table("decisions", recreate="always") as batch:
            batch.create_primary_key("pk_decisions", columns)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        _sqlite_key(["decision_id", "decided_at"])
        return
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    until = f"{tomorrow:%Y-%m-%d} 00:00:00+00"
    before = f"decisions_before_{tomorrow:%Y%m%d}"
    op.execute(f"ALTER TABLE decisions RENAME TO {before}")
    for index in INDEXES:
        op.execute(f"ALTER INDEX {index} RENAME TO {index.replace('decisions', before, 1)}")
    op.execute(
        f"ALTER TABLE {before} DROP CONSTRAINT decisions_pkey,"
        f" ADD CONSTRAINT {before}_pkey PRIMARY KEY (decision_id, decided_at)"
    )
    op.execute(
        f"CREATE TABLE decisions (LIKE {before} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        " PARTITION BY RANGE (decided_at)"
    )
    op.execute("ALTER TABLE decisions ADD CONSTRAINT decisions_pkey"
               " PRIMARY KEY (decision_id, decided_at)")  # fmt: skip
    for index, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {index} ON decisions ({columns})")
    op.execute(
        f"ALTER TABLE decisions ATTACH PARTITION {before} FOR VALUES FROM (MINVALUE) TO ('{until}')"
    )
    op.execute("CREATE TABLE decisions_default PARTITION OF decisions DEFAULT")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        _sqlite_key(["decision_id"])
        return
    # Every partition's rows into one table again: a copy, as there is no way around it.
    op.execute(
        "CREATE TABLE decisions_flat (LIKE decisions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    op.execute("INSERT INTO decisions_flat SELECT * FROM decisions")
    op.execute("DROP TABLE decisions")
    op.execute("ALTER TABLE decisions_flat RENAME TO decisions")
    op.execute("ALTER TABLE decisions ADD CONSTRAINT decisions_pkey PRIMARY KEY (decision_id)")
    for index, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {index} ON decisions ({columns})")
