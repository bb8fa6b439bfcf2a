"""Embedding on arrival and the serving model.

- `jobs.coalesce_key`, unique among queued jobs: at most one queued embedding job per model.
- the `embed` job kind in the kind CHECK.
- `embeddings.generation` and the per-model counter `embedding_generations`, so a reader can catch up on the
  rows written since it last looked instead of reloading them all; the counter's row also holds the model's
  watermark (`covered_created_at`, `covered_id`), the face up to which every face is embedded, where an
  `embed` job starts its scan.
- `activations.embedded_at`: the serving model is that of the latest activation whose embeddings covered
  every face. Existing activations whose model covers every face now count as embedded since they were made.
  `ix_activations_model_id` finds a model's activations not yet marked.

Revision ID: 2026_11_29_0003
Revises: 2026_11_29_0002
Create Date: 2026-11-29 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2026_11_29_0003"
down_revision: str | Sequence[str] | None = "2026_11_29_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS_BEFORE = ("finetune", "evaluate", "reindex", "validate_model")
KINDS_AFTER = (*KINDS_BEFORE, "embed")
QUEUED_ONLY = "status = 'queued'"


def _kinds(values: tuple[str, ...]) -> str:
    return "kind IN ({})".format(", ".join(f"'{value}'" for value in values))


def _replace_kind_check(values: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        if op.get_bind().exec_driver_sql("PRAGMA foreign_keys").scalar():
            raise RuntimeError(
                "migrate SQLite with PRAGMA foreign_keys=OFF (alembic's own connection has it off)"
            )
        with op.batch_alter_table("jobs", recreate="always") as batch:
            batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
            batch.create_check_constraint(op.f("ck_jobs_kind"), _kinds(values))
        return
    op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", _kinds(values))


def upgrade() -> None:
    op.add_column("jobs", sa.Column("coalesce_key", sa.String(length=128), nullable=True))
    _replace_kind_check(KINDS_AFTER)
    op.create_index(
        "uq_jobs_queued_coalesce_key",
        "jobs",
        ["coalesce_key"],
        unique=True,
        postgresql_where=sa.text(QUEUED_ONLY),
        sqlite_where=sa.text(QUEUED_ONLY),
    )

    op.add_column("embeddings", sa.Column("generation", sa.BigInteger(), server_default="0", nullable=False))
    op.create_index("ix_embeddings_model_id_generation", "embeddings", ["model_id", "generation"])
    op.drop_index("ix_embeddings_model_id", table_name="embeddings")
    op.create_table(
        "embedding_generations",
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("covered_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("covered_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name="fk_embedding_generations_model_id_models",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_id", name="pk_embedding_generations"),
    )

    op.add_column("activations", sa.Column("embedded_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_activations_model_id", "activations", ["model_id"])
    op.execute(
        "UPDATE activations SET embedded_at = created_at WHERE "
        "(SELECT count(*) FROM embeddings WHERE embeddings.model_id = activations.model_id) "
        ">= (SELECT count(*) FROM faces)"
    )


def downgrade() -> None:
    op.drop_index("ix_activations_model_id", table_name="activations")
    op.drop_column("activations", "embedded_at")
    op.drop_table("embedding_generations")
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"])
    op.drop_index("ix_embeddings_model_id_generation", table_name="embeddings")
    op.drop_column("embeddings", "generation")
    op.drop_index("uq_jobs_queued_coalesce_key", table_name="jobs")
    op.execute("DELETE FROM jobs WHERE kind = 'embed'")
    _replace_kind_check(KINDS_BEFORE)
    op.drop_column("jobs", "coalesce_key")
