"""Initial schema: every table of app/tables.py with its constraints and indexes.

Revision ID: 2026_11_28_0001
Revises:
Create Date: 2026-11-28 18:07:27.736771
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "2026_11_28_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSON everywhere, stored as JSONB on PostgreSQL (app.tables.JsonType).
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


@contextmanager
def _without_naming_convention() -> Iterator[None]:
    """Build the constraints exactly as this revision always has: unnamed ones named by the server.

    Alembic names a migration's unnamed constraints by the naming convention of the target metadata, which
    app/tables.py gained after this revision. Databases this revision built before then have the server's
    names (PostgreSQL's `feedback_face_a_fkey`, none on SQLite), and 2026_11_29_0002 renames those: this
    revision must keep producing them, whatever the metadata says today.
    """
    opts = op.get_context().opts
    target_metadata = opts.pop("target_metadata", None)
    try:
        yield
    finally:
        if target_metadata is not None:
            opts["target_metadata"] = target_metadata


def upgrade() -> None:
    with _without_naming_convention():
        _create_tables()


def _create_tables() -> None:
    op.create_table(
        "faces",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("byte_size", sa.Integer(), nullable=False),
        sa.Column("media_type", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=True),
        sa.Column("source", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256"),
    )
    op.create_index("ix_faces_created_at_id", "faces", ["created_at", "id"], unique=False)
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("endpoint", sa.String(length=128), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response", JSON_TYPE, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", "endpoint"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("params", JSON_TYPE, nullable=False),
        sa.Column("progress", JSON_TYPE, nullable=True),
        sa.Column("result", JSON_TYPE, nullable=True),
        sa.Column("error", JSON_TYPE, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=256), nullable=True),
        sa.Column("parent_job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="ck_jobs_status"
        ),
        sa.ForeignKeyConstraint(["parent_job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"], unique=False)
    op.create_index("ix_jobs_status_kind", "jobs", ["status", "kind"], unique=False)
    op.create_table(
        "feedback",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("face_a", sa.Uuid(), nullable=False),
        sa.Column("face_b", sa.Uuid(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.Column("annotator", sa.String(length=256), nullable=True),
        sa.Column("source", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("face_a <> face_b", name="ck_feedback_distinct_faces"),
        sa.CheckConstraint("label IN (0, 1)", name="ck_feedback_label"),
        sa.ForeignKeyConstraint(["face_a"], ["faces.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["face_b"], ["faces.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("face_a", "face_b", name="uq_feedback_pair"),
    )
    op.create_index("ix_feedback_created_at_id", "feedback", ["created_at", "id"], unique=False)
    op.create_index("ix_feedback_face_b", "feedback", ["face_b"], unique=False)
    op.create_index("ix_feedback_split_label", "feedback", ["split", "label"], unique=False)
    op.create_table(
        "models",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("arch", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.Column("embedding_size", sa.Integer(), nullable=True),
        sa.Column("preprocess", JSON_TYPE, nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("created_by_job_id", sa.Uuid(), nullable=True),
        sa.Column("hyperparameters", JSON_TYPE, nullable=True),
        sa.Column("dataset_snapshot", JSON_TYPE, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("validated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('validating', 'ready', 'invalid')", name="ck_models_status"),
        sa.ForeignKeyConstraint(["created_by_job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["parent_id"], ["models.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_models_created_at_id", "models", ["created_at", "id"], unique=False)
    op.create_index("ix_models_sha256", "models", ["sha256"], unique=False)
    op.create_table(
        "activations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("previous_model_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.String(length=256), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["previous_model_id"], ["models.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_activations_created_at", "activations", ["created_at"], unique=False)
    op.create_table(
        "embeddings",
        sa.Column("face_id", sa.Uuid(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["face_id"], ["faces.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("face_id", "model_id"),
    )
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"], unique=False)
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.Column("pairs_sha256", sa.String(length=64), nullable=False),
        sa.Column("pair_count", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("metrics", JSON_TYPE, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_evaluations_model_id", "evaluations", ["model_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_evaluations_model_id", table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index("ix_embeddings_model_id", table_name="embeddings")
    op.drop_table("embeddings")
    op.drop_index("ix_activations_created_at", table_name="activations")
    op.drop_table("activations")
    op.drop_index("ix_models_sha256", table_name="models")
    op.drop_index("ix_models_created_at_id", table_name="models")
    op.drop_table("models")
    op.drop_index("ix_feedback_split_label", table_name="feedback")
    op.drop_index("ix_feedback_face_b", table_name="feedback")
    op.drop_index("ix_feedback_created_at_id", table_name="feedback")
    op.drop_table("feedback")
    op.drop_index("ix_jobs_status_kind", table_name="jobs")
    op.drop_index("ix_jobs_created_at_id", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_faces_created_at_id", table_name="faces")
    op.drop_table("faces")
