"""The Alembic migrations build exactly the schema of app/tables.py, on PostgreSQL and SQLite, and undo it."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool

from app import migrate
from app.config import get_settings
from app.tables import Base

CHECK_CONSTRAINTS = {
    "feedback": {"ck_feedback_label", "ck_feedback_distinct_faces"},
    "jobs": {"ck_jobs_status"},
    "models": {"ck_models_status"},
}


@pytest.fixture
def empty_postgresql_url(postgres_database: str) -> str:
    """A database of its own on the test server, with nothing in it."""
    return postgres_database


@pytest.fixture
def empty_sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'magtune.db'}"


def schema_differences(url: str) -> list[object]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def check_constraints(url: str) -> dict[str, set[str]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            return {
                table: {check["name"] for check in inspector.get_check_constraints(table)}
                for table in CHECK_CONSTRAINTS
            }
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_upgrade_builds_the_declared_schema_and_downgrade_removes_it(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"empty_{database}_url")
    assert table_names(url) == set()

    migrate.upgrade_database(url)

    assert schema_differences(url) == []
    assert table_names(url) == {table.name for table in Base.metadata.sorted_tables} | {"alembic_version"}
    # compare_metadata does not look at CHECK constraints: they are checked by name.
    assert check_constraints(url) == CHECK_CONSTRAINTS

    migrate.downgrade_database(url)
    assert table_names(url) == {"alembic_version"}

    migrate.upgrade_database(url)
    assert schema_differences(url) == []


def test_upgrading_twice_changes_nothing(empty_sqlite_url: str) -> None:
    migrate.upgrade_database(empty_sqlite_url)
    migrate.upgrade_database(empty_sqlite_url)

    assert schema_differences(empty_sqlite_url) == []


def test_the_revision_history_is_one_line() -> None:
    scripts = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))

    assert len(scripts.get_heads()) == 1
    assert len(scripts.get_bases()) == 1
    assert all(
        path.name[:10].replace("_", "").isdigit()
        for path in (migrate.MIGRATIONS_DIR / "versions").glob("*.py")
    )


def test_the_command_migrates_the_configured_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'not' / 'yet' / 'there.db'}"
    monkeypatch.setenv("MAGTUNE_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        assert migrate.main([]) == 0
    finally:
        get_settings.cache_clear()

    assert schema_differences(url) == []


def test_importing_the_app_creates_no_tables(empty_sqlite_url: str) -> None:
    from app.config import Settings
    from app.main import create_app

    create_app(Settings(database_url=empty_sqlite_url, broker_url="memory://"), run_sweeper=False)

    assert table_names(empty_sqlite_url) == set()
