"""call_tallies: the calls each server's gRPC core saw, refusals among them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "call_tallies",
        sa.Column("server_id", sa.String(length=128), nullable=False),
        sa.Column("from_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("to_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calls_started", sa.BigInteger(), nullable=False),
        sa.Column("calls_answered", sa.BigInteger(), nullable=False),
        sa.Column("calls_failed", sa.BigInteger(), nullable=False),
        sa.Column("calls_refused", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("server_id", "from_at"),
    )
    op.create_index("ix_call_tallies_from_at", "call_tallies", ["from_at"])


def downgrade() -> None:
    op.drop_index("ix_call_tallies_from_at", table_name="call_tallies")
    op.drop_table("call_tallies")
