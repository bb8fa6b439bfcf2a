"""Named constraints (app.tables.NAMING_CONVENTION) and CHECK constraints on every enum column.

PostgreSQL: the names the server gave the initial schema's unnamed keys are renamed in place. SQLite, whose
initial constraints have no names at all, rebuilds each table in batch mode under the naming convention.
Either way, a later migration can drop or alter any constraint by its conventional name.

The CHECK lists are the values of app.domain's enums as of this revision, written out so that this
migration never changes; tests/app/test_migrations.py fails when an enum grows without a migration.

Revision ID: 2026_11_29_0002
Revises: 2026_11_28_0001
Create Date: 2026-11-29 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "2026_11_29_0002"
down_revision: str | Sequence[str] | None = "2026_11_28_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# table -> (name PostgreSQL generated, conventional name)
RENAMES: dict[str, list[tuple[str, str]]] = {
    "faces": [("faces_pkey", "pk_faces"), ("faces_sha256_key", "uq_faces_sha256")],
    "idempotency_keys": [("idempotency_keys_pkey", "pk_idempotency_keys")],
    "jobs": [("jobs_pkey", "pk_jobs"), ("jobs_parent_job_id_fkey", "fk_jobs_parent_job_id_jobs")],
    "feedback": [
        ("feedback_pkey", "pk_feedback"),
        ("feedback_face_a_fkey", "fk_feedback_face_a_faces"),
        ("feedback_face_b_fkey", "fk_feedback_face_b_faces"),
    ],
    "models": [
        ("models_pkey", "pk_models"),
        ("models_created_by_job_id_fkey", "fk_models_created_by_job_id_jobs"),
        ("models_parent_id_fkey", "fk_models_parent_id_models"),
    ],
    "activations": [
        ("activations_pkey", "pk_activations"),
        ("activations_job_id_fkey", "fk_activations_job_id_jobs"),
        ("activations_model_id_fkey", "fk_activations_model_id_models"),
        ("activations_previous_model_id_fkey", "fk_activations_previous_model_id_models"),
    ],
    "embeddings": [
        ("embeddings_pkey", "pk_embeddings"),
        ("embeddings_face_id_fkey", "fk_embeddings_face_id_faces"),
        ("embeddings_model_id_fkey", "fk_embeddings_model_id_models"),
    ],
    "evaluations": [
        ("evaluations_pkey", "pk_evaluations"),
        ("evaluations_job_id_fkey", "fk_evaluations_job_id_jobs"),
        ("evaluations_model_id_fkey", "fk_evaluations_model_id_models"),
    ],
}


def _in(column: str, *values: str) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


# table -> (CHECK name, condition): the enum columns that had none.
CHECKS: dict[str, tuple[str, str]] = {
    "jobs": ("ck_jobs_kind", _in("kind", "finetune", "evaluate", "reindex", "validate_model")),
    "models": (
        "ck_models_arch",
        _in("arch", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"),
    ),
    "faces": ("ck_faces_split", _in("split", "train", "val", "test")),
    "feedback": ("ck_feedback_split", _in("split", "train", "val", "test", "cross", "regression")),
    "evaluations": ("ck_evaluations_split", _in("split", "test", "val", "regression")),
}


def _require_sqlite_foreign_keys_off() -> None:
    """Batch mode drops and re-creates tables: with foreign keys enforced, dropping `faces` would cascade."""
    if op.get_bind().exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "migrate SQLite with PRAGMA foreign_keys=OFF (alembic's own connection has it off)"
        )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _require_sqlite_foreign_keys_off()
        for table in RENAMES:
            # Reflected unnamed constraints take their names from the convention as the table is rebuilt.
            with op.batch_alter_table(table, recreate="always", naming_convention=NAMING_CONVENTION) as batch:
                if table in CHECKS:
                    name, condition = CHECKS[table]
                    batch.create_check_constraint(op.f(name), condition)
        return
    for table, renames in RENAMES.items():
        for old, new in renames:
            op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{old}" TO "{new}"')
    for table, (name, condition) in CHECKS.items():
        op.create_check_constraint(op.f(name), table, condition)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # The names stay (SQLite gives them no meaning, and upgrade() keeps names it finds); the checks go.
        _require_sqlite_foreign_keys_off()
        for table, (name, _condition) in CHECKS.items():
            with op.batch_alter_table(table, recreate="always") as batch:
                batch.drop_constraint(op.f(name), type_="check")
        return
    for table, (name, _condition) in CHECKS.items():
        op.drop_constraint(op.f(name), table, type_="check")
    for table, renames in RENAMES.items():
        for old, new in renames:
            op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{new}" TO "{old}"')
