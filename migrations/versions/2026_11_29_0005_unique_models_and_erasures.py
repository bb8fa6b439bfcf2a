"""One model per (sha256, arch) and at most one per job that created it; tombstones of erased files.

`uq_models_sha256_arch` replaces `ix_models_sha256` (its leading column still serves lookups by sha256), and
`uq_models_created_by_job_id` makes a fine-tune's registration idempotent: a retried attempt finds its
child instead of adding a second one. A database that already holds duplicates is not changed: the upgrade
stops and names them, since which duplicate to keep (one may be active) is the operator's decision.

`erasures` holds a tombstone for each stored file whose row was deleted and which is not removed yet
(app/erasures.py): an erase is recorded with the row's deletion and finished by the sweeper if need be.

Revision ID: 2026_11_29_0005
Revises: 2026_11_29_0004
Create Date: 2026-11-29 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2026_11_29_0005"
down_revision: str | Sequence[str] | None = "2026_11_29_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUPLICATES = {
    "sha256, arch": "SELECT sha256, arch, count(*) FROM models GROUP BY sha256, arch HAVING count(*) > 1",
    "created_by_job_id": (
        "SELECT created_by_job_id, count(*) FROM models WHERE created_by_job_id IS NOT NULL "
        "GROUP BY created_by_job_id HAVING count(*) > 1"
    ),
}


def _refuse_duplicates() -> None:
    bind = op.get_bind()
    for columns, query in DUPLICATES.items():
        rows = bind.exec_driver_sql(query).fetchall()
        if rows:
            listed = "; ".join(", ".join(str(value) for value in row) for row in rows[:10])
            raise RuntimeError(
                f"models holds {len(rows)} duplicate ({columns}) groups ({listed}): delete the extra rows "
                "(keep the one that is active or referenced), then migrate again"
            )


def upgrade() -> None:
    _refuse_duplicates()
    op.create_index("uq_models_sha256_arch", "models", ["sha256", "arch"], unique=True)
    op.create_index("uq_models_created_by_job_id", "models", ["created_by_job_id"], unique=True)
    op.drop_index("ix_models_sha256", table_name="models")
    op.create_table(
        "erasures",
        sa.Column("namespace", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "sha256", name="pk_erasures"),
    )


def downgrade() -> None:
    op.drop_table("erasures")
    op.create_index("ix_models_sha256", "models", ["sha256"])
    op.drop_index("uq_models_created_by_job_id", table_name="models")
    op.drop_index("uq_models_sha256_arch", table_name="models")
