"""API keys, and who did what.

- `api_keys`: a public id, the SHA-256 of the secret (never the secret), scopes, expiry, revocation, last use.
- `feedback.api_key_id` (indexed, for the list filter and retracting everything one key posted),
  `jobs.created_by` / `jobs.cancelled_by` (with `ix_jobs_created_by_status` for the per-key job cap) and
  `activations.api_key_id`. All nullable: rows stored before keys existed name no key.

Revision ID: 2026_11_29_0004
Revises: 2026_11_29_0003
Create Date: 2026-11-29 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "2026_11_29_0004"
down_revision: str | Sequence[str] | None = "2026_11_29_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("secret_sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("scopes", JSON_TYPE, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_created_at_id", "api_keys", ["created_at", "id"])
    op.add_column("feedback", sa.Column("api_key_id", sa.String(length=32), nullable=True))
    op.create_index("ix_feedback_api_key_id", "feedback", ["api_key_id"])
    op.add_column("jobs", sa.Column("created_by", sa.String(length=32), nullable=True))
    op.add_column("jobs", sa.Column("cancelled_by", sa.String(length=32), nullable=True))
    op.create_index("ix_jobs_created_by_status", "jobs", ["created_by", "status"])
    op.add_column("activations", sa.Column("api_key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("activations", "api_key_id")
    op.drop_index("ix_jobs_created_by_status", table_name="jobs")
    op.drop_column("jobs", "cancelled_by")
    op.drop_column("jobs", "created_by")
    op.drop_index("ix_feedback_api_key_id", table_name="feedback")
    op.drop_column("feedback", "api_key_id")
    op.drop_index("ix_api_keys_created_at_id", table_name="api_keys")
    op.drop_table("api_keys")
