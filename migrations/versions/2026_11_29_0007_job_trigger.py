"""`jobs.trigger`: why the service queued a job by itself (the auto fine-tune policy), null otherwise.

Revision ID: 2026_11_29_0007
Revises: 2026_11_29_0006
Create Date: 2026-11-29 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "2026_11_29_0007"
down_revision: str | Sequence[str] | None = "2026_11_29_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("trigger", JSON_TYPE, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "trigger")
