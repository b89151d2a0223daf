"""decision_outcomes gets its decision's decided_at, its key (decision_id, decided_at),
and on PostgreSQL the decisions' daily partitions

An outcome's decided_at is its decision's, filled in from ``decisions``; an outcome whose
decision already left the database (archived and removed under 0006) takes its
``labeled_at``, the nearest time known. Then, as 0006 did for decisions, the table is not
copied: it is renamed and attached as the partition of every time before the day after
the migration runs, beside a default partition (server/audit/partitions.py makes the
days). SQLite is not partitioned: its table gets the same column and key.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 08:30:00
"""

from __future__ import annotations

import datetime as dt
import warnings

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_FILL = (
    "UPDATE decision_outcomes SET decided_at = COALESCE("
    "(SELECT d.decided_at FROM decisions d WHERE d.decision_id = decision_outcomes.decision_id"
    " ORDER BY d.decided_at LIMIT 1), labeled_at)"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("decision_outcomes") as batch:
            batch.add_column(sa.Column("decided_at", sa.DateTime(timezone=True)))
        op.execute(_FILL)
        with warnings.catch_warnings():  # SQLAlchemy warns that the key changed: the point
            warnings.simplefilter("ignore", sa.exc.SAWarning)
            with op.batch_alter_table("decision_outcomes", recreate="always") as batch:
                batch.alter_column("decided_at", nullable=False)
                batch.create_primary_key("pk_decision_outcomes", ["decision_id", "decided_at"])
        return
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    until = f"{tomorrow:%Y-%m-%d} 00:00:00+00"
    before = f"decision_outcomes_before_{tomorrow:%Y%m%d}"
    op.execute("ALTER TABLE decision_outcomes ADD COLUMN decided_at timestamptz")
    op.execute(_FILL)
    op.execute("ALTER TABLE decision_outcomes ALTER COLUMN decided_at SET NOT NULL")
    op.execute(f"ALTER TABLE decision_outcomes RENAME TO {before}")
    op.execute(
        f"ALTER TABLE {before} DROP CONSTRAINT decision_outcomes_pkey,"
        f" ADD CONSTRAINT {before}_pkey PRIMARY KEY (decision_id, decided_at)"
    )
    op.execute(
        f"CREATE TABLE decision_outcomes (LIKE {before} INCLUDING DEFAULTS"
        " INCLUDING CONSTRAINTS) PARTITION BY RANGE (decided_at)"
    )
    op.execute("ALTER TABLE decision_outcomes ADD CONSTRAINT decision_outcomes_pkey"
               " PRIMARY KEY (decision_id, decided_at)")  # fmt: skip
    op.execute(
        f"ALTER TABLE decision_outcomes ATTACH PARTITION {before}"
        f" FOR VALUES FROM (MINVALUE) TO ('{until}')"
    )
    op.execute("CREATE TABLE decision_outcomes_default PARTITION OF decision_outcomes DEFAULT")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Every partition's rows into one table again: a copy, as there is no way around it.
        op.execute(
            "CREATE TABLE decision_outcomes_flat"
            " (LIKE decision_outcomes INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        op.execute("INSERT INTO decision_outcomes_flat SELECT * FROM decision_outcomes")
        op.execute("DROP TABLE decision_outcomes")
        op.execute("ALTER TABLE decision_outcomes_flat RENAME TO decision_outcomes")
        op.execute("ALTER TABLE decision_outcomes DROP COLUMN decided_at")
        op.execute("ALTER TABLE decision_outcomes ADD CONSTRAINT decision_outcomes_pkey"
                   " PRIMARY KEY (decision_id)")  # fmt: skip
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        with op.batch_alter_table("decision_outcomes", recreate="always") as batch:
            batch.create_primary_key("pk_decision_outcomes", ["decision_id"])
            batch.drop_column("decided_at")
