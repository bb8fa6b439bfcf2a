"""`job_chunks`: the ranges of a sharded reindex, each claimed, heartbeating and retried on its own.

Revision ID: 2026_11_29_0008
Revises: 2026_11_29_0007
Create Date: 2026-11-29 15:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "2026_11_29_0008"
down_revision: str | Sequence[str] | None = "2026_11_29_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
STATUSES = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "job_chunks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("lo_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lo_id", sa.Uuid(), nullable=True),
        sa.Column("hi_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("hi_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=256), nullable=True),
        sa.Column("progress", JSON_TYPE, nullable=True),
        sa.Column("error", JSON_TYPE, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(STATUSES, name=op.f("ck_job_chunks_status")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_chunks_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_job_chunks_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_chunks")),
    )
    op.create_index("uq_job_chunks_job_id_seq", "job_chunks", ["job_id", "seq"], unique=True)
    op.create_index("ix_job_chunks_status", "job_chunks", ["status"])


def downgrade() -> None:
    op.drop_index("ix_job_chunks_status", table_name="job_chunks")
    op.drop_index("uq_job_chunks_job_id_seq", table_name="job_chunks")
    op.drop_table("job_chunks")
