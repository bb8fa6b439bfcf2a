"""PostgreSQL: every change to a key that affects what it may do is announced on `magtune_api_keys`.

The api processes remember the keys they verified and forget them all on that notification
(app/auth/key_cache.py), so the trigger covers every way a key can change: the api, `magtune keys`, and SQL
typed by hand. `last_used_at` is left out: it says nothing about what a key may do. SQLite has no
notifications (and needs none: the api reads its keys from the file on every request there).

Revision ID: 2026_12_07_0010
Revises: 2026_11_29_0009
Create Date: 2026-12-07 13:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "2026_12_07_0010"
down_revision: str | Sequence[str] | None = "2026_11_29_0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "magtune_api_keys"  # app.auth.key_cache.CHANNEL at the time of this revision


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION magtune_api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_LEVEL = 'ROW' THEN
                PERFORM pg_notify('{CHANNEL}', OLD.id);
            ELSE
                PERFORM pg_notify('{CHANNEL}', '*');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER api_key_changed AFTER UPDATE OF secret_sha256, scopes, revoked_at, expires_at, name "
        "OR DELETE ON api_keys FOR EACH ROW EXECUTE FUNCTION magtune_api_key_changed()"
    )
    op.execute(
        "CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON api_keys "
        "FOR EACH STATEMENT EXECUTE FUNCTION magtune_api_key_changed()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER api_keys_truncated ON api_keys")
    op.execute("DROP TRIGGER api_key_changed ON api_keys")
    op.execute("DROP FUNCTION magtune_api_key_changed()")
