"""Maintained counts (`tallies`), so /v1/metrics and a first label never count a whole table.

Triggers keep the faces per split and the feedback pairs per split and label, for every way a row can change:
the api, `magtune import`, a face's cascade, SQL typed by hand. PostgreSQL: one statement-level trigger per
table and operation, which adds a whole batch's counts in one upsert over its transition table, spread over
eight shards by backend so that concurrent posts rarely wait on one row. SQLite: row-level triggers (it has
one writer anyway). The faces with labels per split (`labelled_faces`) are kept by the api under the
placement lock instead (app/feedback/placement.py): whether a face is named by another pair is the api's
knowledge at that moment. Existing rows are counted once here.

Revision ID: 2026_12_07_0011
Revises: 2026_12_07_0010
Create Date: 2026-12-07 16:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "2026_12_07_0011"
down_revision: str | Sequence[str] | None = "2026_12_07_0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_SHARDS = 8
# table: its label column (None: the table has none, its counts are per split, label -1)
COUNTED = {"feedback": "label", "faces": None}
UPSERT = "ON CONFLICT (kind, split, label, shard) DO UPDATE SET n = tallies.n + excluded.n"


def upgrade() -> None:
    op.create_table(
        "tallies",
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "split", "label", "shard", name="pk_tallies"),
    )
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_triggers()
    else:
        _sqlite_triggers()
    for table in COUNTED:
        label, keys = _label_and_keys(table)
        op.execute(
            f"INSERT INTO tallies (kind, split, label, shard, n) "
            f"SELECT '{table}', split, {label}, 0, count(*) FROM {table} GROUP BY {keys}"
        )
    op.execute(
        "INSERT INTO tallies (kind, split, label, shard, n) "
        "SELECT 'labelled_faces', split, -1, 0, count(*) FROM faces "
        "WHERE id IN (SELECT face_a FROM feedback UNION SELECT face_b FROM feedback) GROUP BY split"
    )


def _label_and_keys(table: str, row: str = "") -> tuple[str, str]:
    """The label expression of `table`'s counts and the columns they are grouped by."""
    label = COUNTED[table]
    if label is None:
        return "-1", "split"
    return f"{row}{label}", f"split, {label}"


def _pg_delta(table: str, rows: str, sign: str) -> str:
    label, keys = _label_and_keys(table)
    return (
        f"INSERT INTO tallies (kind, split, label, shard, n) "
        f"SELECT '{table}', split, {label}, pg_backend_pid() % {PG_SHARDS}, {sign}count(*) FROM {rows} "
        f"GROUP BY {keys} ORDER BY {keys} {UPSERT};"
    )


def _postgresql_triggers() -> None:
    for table in COUNTED:
        op.execute(
            f"""
            CREATE FUNCTION magtune_tally_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_OP = 'TRUNCATE' THEN
                    DELETE FROM tallies WHERE kind = '{table}';
                    RETURN NULL;
                END IF;
                IF TG_OP IN ('INSERT', 'UPDATE') THEN
                    {_pg_delta(table, "new_rows", "")}
                END IF;
                IF TG_OP IN ('DELETE', 'UPDATE') THEN
                    {_pg_delta(table, "old_rows", "-")}
                END IF;
                RETURN NULL;
            END
            $$
            """
        )
        function = f"EXECUTE FUNCTION magtune_tally_{table}()"
        op.execute(
            f"CREATE TRIGGER tally_{table}_insert AFTER INSERT ON {table} "
            f"REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT {function}"
        )
        op.execute(
            f"CREATE TRIGGER tally_{table}_delete AFTER DELETE ON {table} "
            f"REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT {function}"
        )
        op.execute(
            f"CREATE TRIGGER tally_{table}_update AFTER UPDATE ON {table} "
            f"REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT {function}"
        )
        op.execute(
            f"CREATE TRIGGER tally_{table}_truncate AFTER TRUNCATE ON {table} FOR EACH STATEMENT {function}"
        )


def _sqlite_delta(table: str, row: str, sign: str) -> str:
    label, _keys = _label_and_keys(table, f"{row}.")
    return (
        f"INSERT INTO tallies (kind, split, label, shard, n) "
        f"VALUES ('{table}', {row}.split, {label}, 0, {sign}1) {UPSERT};"
    )


def _sqlite_triggers() -> None:
    for table in COUNTED:
        _label, changed = _label_and_keys(table)
        op.execute(
            f"CREATE TRIGGER tally_{table}_insert AFTER INSERT ON {table} "
            f"BEGIN {_sqlite_delta(table, 'NEW', '')} END"
        )
        op.execute(
            f"CREATE TRIGGER tally_{table}_delete AFTER DELETE ON {table} "
            f"BEGIN {_sqlite_delta(table, 'OLD', '-')} END"
        )
        op.execute(
            f"CREATE TRIGGER tally_{table}_update AFTER UPDATE OF {changed} ON {table} "
            f"BEGIN {_sqlite_delta(table, 'OLD', '-')} {_sqlite_delta(table, 'NEW', '')} END"
        )


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table in COUNTED:
        for event in ("insert", "delete", "update", *(("truncate",) if postgresql else ())):
            op.execute(f"DROP TRIGGER tally_{table}_{event}" + (f" ON {table}" if postgresql else ""))
        if postgresql:
            op.execute(f"DROP FUNCTION magtune_tally_{table}()")
    op.drop_table("tallies")
