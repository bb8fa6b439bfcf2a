"""Review leases: the pairs the review queue has handed to a reviewer, until they expire.

`uq_review_leases_pair` on the canonical pair (face_a < face_b) makes two concurrent reviewers unable to
hold the same pair: expired leases are deleted before new ones are inserted, so the constraint holds only
among live ones.

Revision ID: 2026_11_29_0006
Revises: 2026_11_29_0005
Create Date: 2026-11-29 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2026_11_29_0006"
down_revision: str | Sequence[str] | None = "2026_11_29_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "review_leases",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("face_a", sa.Uuid(), nullable=False),
        sa.Column("face_b", sa.Uuid(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=True),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("api_key_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("face_a <> face_b", name=op.f("ck_review_leases_distinct_faces")),
        sa.CheckConstraint("split IN ('train', 'val', 'test')", name=op.f("ck_review_leases_split")),
        sa.ForeignKeyConstraint(
            ["face_a"], ["faces.id"], name=op.f("fk_review_leases_face_a_faces"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["face_b"], ["faces.id"], name=op.f("fk_review_leases_face_b_faces"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_review_leases_model_id_models"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_leases")),
        sa.UniqueConstraint("face_a", "face_b", name="uq_review_leases_pair"),
    )
    op.create_index("ix_review_leases_face_b", "review_leases", ["face_b"])
    op.create_index("ix_review_leases_expires_at", "review_leases", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_review_leases_expires_at", table_name="review_leases")
    op.drop_index("ix_review_leases_face_b", table_name="review_leases")
    op.drop_table("review_leases")
