"""`jobs.revision`: a counter bumped by every update of a job row, the id of its progress events.

Revision ID: 2026_11_29_0009
Revises: 2026_11_29_0008
Create Date: 2026-11-29 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2026_11_29_0009"
down_revision: str | Sequence[str] | None = "2026_11_29_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("revision")
