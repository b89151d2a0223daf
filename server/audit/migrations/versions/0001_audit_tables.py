"""audit tables: decisions and admin_actions

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21 07:28:18.917976
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_actions",
        sa.Column("action_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column(
            "before",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "after",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("action_id"),
    )
    with op.batch_alter_table("admin_actions", schema=None) as batch_op:
        batch_op.create_index("ix_admin_actions_actor_at", ["actor", "at"], unique=False)
        batch_op.create_index("ix_admin_actions_at", ["at"], unique=False)

    op.create_table(
        "decisions",
        sa.Column("decision_id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=False),
        sa.Column("caller", sa.String(length=256), nullable=False),
        sa.Column("server_id", sa.String(length=128), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("symbol", sa.String(length=32), nullable=False),
        sa.Column("side", sa.String(length=8), nullable=False),
        sa.Column("quantity", sa.Float(), nullable=False),
        sa.Column("limit_price", sa.Float(), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("feature_schema_version", sa.Integer(), nullable=False),
        sa.Column(
            "features",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "feature_overrides",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("feature_age_ms", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("shadow_model_name", sa.String(length=64), nullable=True),
        sa.Column("shadow_model_version", sa.String(length=64), nullable=True),
        sa.Column("shadow_score", sa.Float(), nullable=True),
        sa.Column("features_us", sa.BigInteger(), nullable=False),
        sa.Column("model_us", sa.BigInteger(), nullable=False),
        sa.Column("total_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("decision_id"),
    )
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.create_index("ix_decisions_decided_at", ["decided_at"], unique=False)
        batch_op.create_index(
            "ix_decisions_model_version_decided_at", ["model_version", "decided_at"], unique=False
        )
        batch_op.create_index("ix_decisions_request_id", ["request_id"], unique=False)
        batch_op.create_index(
            "ix_decisions_source_decided_at", ["source", "decided_at"], unique=False
        )
        batch_op.create_index(
            "ix_decisions_symbol_decided_at", ["symbol", "decided_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_index("ix_decisions_symbol_decided_at")
        batch_op.drop_index("ix_decisions_source_decided_at")
        batch_op.drop_index("ix_decisions_request_id")
        batch_op.drop_index("ix_decisions_model_version_decided_at")
        batch_op.drop_index("ix_decisions_decided_at")

    op.drop_table("decisions")
    with op.batch_alter_table("admin_actions", schema=None) as batch_op:
        batch_op.drop_index("ix_admin_actions_at")
        batch_op.drop_index("ix_admin_actions_actor_at")

    op.drop_table("admin_actions")
