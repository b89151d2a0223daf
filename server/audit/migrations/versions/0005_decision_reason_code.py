"""decisions.reason_code: why the decision is what it is, as the answer's reason code

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 02:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("reason_code", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("reason_code")
