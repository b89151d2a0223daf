"""control_state: the durable copy of on-call's levers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 19:40:00
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "control_state",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("entries", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The one row every change updates (locking it): version 0, nothing set.
    op.bulk_insert(
        table, [{"id": 1, "version": 0, "entries": "{}", "changed_at": dt.datetime.now(dt.UTC)}]
    )


def downgrade() -> None:
    op.drop_table("control_state")
