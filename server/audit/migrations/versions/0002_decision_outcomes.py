"""decisions.feature_time and decision_outcomes: realized labels of decisions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("feature_time", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "decision_outcomes",
        sa.Column("decision_id", sa.String(length=36), nullable=False),
        sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("horizon_ms", sa.Integer(), nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=True),
        sa.Column("mid_at_features", sa.Float(), nullable=True),
        sa.Column("mid_after_horizon", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("decision_id"),
    )


def downgrade() -> None:
    op.drop_table("decision_outcomes")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("feature_time")
