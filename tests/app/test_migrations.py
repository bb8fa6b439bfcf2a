"""The Alembic migrations build exactly the schema of app/tables.py, on PostgreSQL and SQLite, and undo it."""

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    CheckConstraint,
    Engine,
    ForeignKeyConstraint,
    PrimaryKeyConstraint,
    UniqueConstraint,
    create_engine,
    insert,
    inspect,
    pool,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError

from app import migrate
from app.config import get_settings
from app.tables import Base, Face, FeedbackPair, Job, ModelVersion

CHECK_CONSTRAINTS = {
    "faces": {"ck_faces_split"},
    "feedback": {"ck_feedback_label", "ck_feedback_distinct_faces", "ck_feedback_split"},
    "jobs": {"ck_jobs_status", "ck_jobs_kind"},
    "models": {"ck_models_status", "ck_models_arch"},
    "evaluations": {"ck_evaluations_split"},
    "review_leases": {"ck_review_leases_distinct_faces", "ck_review_leases_split"},
    "job_chunks": {"ck_job_chunks_status"},
}
BEFORE_NAMED_CONSTRAINTS = "2026_11_28_0001"
BEFORE_UNIQUE_MODELS = "2026_11_29_0004"


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
            present = set(inspector.get_table_names())
            return {
                table: {check["name"] for check in inspector.get_check_constraints(table)}
                for table in CHECK_CONSTRAINTS
                if table in present
            }
    finally:
        engine.dispose()


def _quoted(sql: str) -> set[str]:
    """The quoted literals of a CHECK condition, however the server re-renders it (casts, ANY(ARRAY[...]))."""
    return set(re.findall(r"'([^']*)'", sql))


def declared_constraints() -> dict[str, dict[str, set[str]]]:
    """Per table and kind, the constraint names app/tables.py declares (under its naming convention)."""
    kinds = {
        PrimaryKeyConstraint: "primary",
        ForeignKeyConstraint: "foreign",
        UniqueConstraint: "unique",
        CheckConstraint: "check",
    }
    declared: dict[str, dict[str, set[str]]] = {}
    for table in Base.metadata.sorted_tables:
        named = declared.setdefault(table.name, {kind: set() for kind in kinds.values()})
        for constraint in table.constraints:
            named[kinds[type(constraint)]].add(str(constraint.name))
    return declared


def migrated_constraints(url: str) -> dict[str, dict[str, set[str]]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            return {
                table.name: {
                    "primary": {str(inspector.get_pk_constraint(table.name)["name"])},
                    "foreign": {str(fk["name"]) for fk in inspector.get_foreign_keys(table.name)},
                    "unique": {str(uq["name"]) for uq in inspector.get_unique_constraints(table.name)},
                    "check": {str(ck["name"]) for ck in inspector.get_check_constraints(table.name)},
                }
                for table in Base.metadata.sorted_tables
                if inspector.has_table(table.name)  # an older revision lacks the tables added since
            }
    finally:
        engine.dispose()


def check_values(url: str) -> dict[str, set[str]]:
    """The values each CHECK constraint of the database allows, by constraint name."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            return {
                check["name"]: _quoted(check["sqltext"])
                for table in CHECK_CONSTRAINTS
                for check in inspector.get_check_constraints(table)
            }
    finally:
        engine.dispose()


def assert_migrated_schema_is_declared(url: str) -> None:
    assert schema_differences(url) == []
    # compare_metadata looks at neither constraint names nor CHECK constraints: both are compared here.
    assert migrated_constraints(url) == declared_constraints()
    declared_checks = {
        str(check.name): _quoted(str(check.sqltext))
        for table in Base.metadata.sorted_tables
        for check in table.constraints
        if isinstance(check, CheckConstraint)
    }
    assert check_values(url) == declared_checks


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
    assert_migrated_schema_is_declared(url)

    migrate.downgrade_database(url)
    assert table_names(url) == {"alembic_version"}

    migrate.upgrade_database(url)
    assert schema_differences(url) == []
    assert_migrated_schema_is_declared(url)


def _insert_rows(engine: Engine) -> dict[str, uuid.UUID]:
    now = datetime.now(UTC)
    ids = {"a": uuid.uuid4(), "b": uuid.uuid4(), "pair": uuid.uuid4(), "job": uuid.uuid4()}
    face = {"byte_size": 1, "media_type": "image/png", "width": 1, "height": 1, "channels": 3}
    with engine.begin() as connection:
        for key in ("a", "b"):
            values = {"id": ids[key], "sha256": key * 64, "split": "train", "created_at": now, **face}
            connection.execute(insert(Face.__table__).values(**values))
        face_a, face_b = sorted((ids["a"], ids["b"]))
        connection.execute(
            insert(FeedbackPair.__table__).values(
                id=ids["pair"], face_a=face_a, face_b=face_b, label=1, split="train", created_at=now
            )
        )
        connection.execute(
            insert(Job.__table__).values(
                id=ids["job"],
                kind="reindex",
                status="queued",
                params={},
                attempts=0,
                max_attempts=3,
                cancel_requested=False,
                created_at=now,
            )
        )
    return ids


def _stored(engine: Engine) -> dict[str, set[uuid.UUID]]:
    with engine.connect() as connection:
        return {
            "faces": set(connection.scalars(select(Face.__table__.c.id))),
            "feedback": set(connection.scalars(select(FeedbackPair.__table__.c.id))),
            "jobs": set(connection.scalars(select(Job.__table__.c.id))),
        }


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_the_naming_revision_goes_down_and_up_again_keeping_every_row(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"empty_{database}_url")
    migrate.upgrade_database(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        ids = _insert_rows(engine)
        expected = {"faces": {ids["a"], ids["b"]}, "feedback": {ids["pair"]}, "jobs": {ids["job"]}}

        migrate.downgrade_database(url, BEFORE_NAMED_CONSTRAINTS)
        assert _stored(engine) == expected
        assert check_constraints(url)["jobs"] == {"ck_jobs_status"}
        if database == "postgresql":  # back to the names the server gave the initial schema
            assert migrated_constraints(url)["feedback"]["foreign"] == {
                "feedback_face_a_fkey",
                "feedback_face_b_fkey",
            }

        migrate.upgrade_database(url)
        assert _stored(engine) == expected
    finally:
        engine.dispose()
    assert_migrated_schema_is_declared(url)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_database_built_before_the_naming_convention_is_brought_to_it(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"empty_{database}_url")
    migrate.upgrade_database(url, BEFORE_NAMED_CONSTRAINTS)
    before = migrated_constraints(url)
    # What the initial revision has always built: keys named by the server (PostgreSQL) or not at all.
    expected_fk = {"feedback_face_a_fkey", "feedback_face_b_fkey"} if database == "postgresql" else {"None"}
    assert before["feedback"]["foreign"] == expected_fk

    migrate.upgrade_database(url)

    assert_migrated_schema_is_declared(url)


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


BEFORE_SERVING = "2026_11_29_0002"


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_activations_of_models_that_cover_every_face_serve_after_the_upgrade(
    database: str, request: pytest.FixtureRequest
) -> None:
    """Revision 0003 marks as embedded exactly the existing activations whose model embeds every face."""
    url = request.getfixturevalue(f"empty_{database}_url")
    migrate.upgrade_database(url, BEFORE_SERVING)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        ids = _insert_rows(engine)
        complete, partial = uuid.uuid4(), uuid.uuid4()
        activations = {complete: uuid.uuid4(), partial: uuid.uuid4()}
        with engine.begin() as connection:
            for model_id, faces in ((complete, ("a", "b")), (partial, ("a",))):
                connection.execute(
                    text(
                        "INSERT INTO models (id, arch, status, sha256, byte_size, created_at) "
                        "VALUES (:id, 'mobilefacenet', 'ready', :sha, 1, :now)"
                    ),
                    {"id": _uuid(model_id, database), "sha": model_id.hex * 2, "now": datetime.now(UTC)},
                )
                for face in faces:
                    connection.execute(
                        text(
                            "INSERT INTO embeddings (face_id, model_id, vector, quality, created_at) "
                            "VALUES (:face, :model, :vector, 1.0, :now)"
                        ),
                        {
                            "face": _uuid(ids[face], database),
                            "model": _uuid(model_id, database),
                            "vector": b"\0" * 8,
                            "now": datetime.now(UTC),
                        },
                    )
                connection.execute(
                    text("INSERT INTO activations (id, model_id, created_at) VALUES (:id, :model, :now)"),
                    {
                        "id": _uuid(activations[model_id], database),
                        "model": _uuid(model_id, database),
                        "now": datetime.now(UTC),
                    },
                )

        migrate.upgrade_database(url)

        with engine.connect() as connection:
            embedded = dict(connection.execute(text("SELECT model_id, embedded_at FROM activations")).all())
            generations = set(connection.scalars(text("SELECT generation FROM embeddings")))
        assert embedded[_uuid(complete, database)] is not None
        assert embedded[_uuid(partial, database)] is None
        assert generations == {0}
    finally:
        engine.dispose()


def _uuid(value: uuid.UUID, database: str) -> object:
    """A UUID as raw SQL binds and returns it: a UUID on PostgreSQL, 32 hex digits on SQLite."""
    return value if database == "postgresql" else value.hex


def _insert_model(engine: Engine, sha256: str, arch: str, job_id: uuid.UUID | None = None) -> None:
    values = {"id": uuid.uuid4(), "arch": arch, "status": "ready", "sha256": sha256, "byte_size": 1}
    with engine.begin() as connection:
        connection.execute(
            insert(ModelVersion.__table__).values(
                **values, created_at=datetime.now(UTC), created_by_job_id=job_id
            )
        )


def _insert_job(engine: Engine) -> uuid.UUID:
    job_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(
            insert(Job.__table__).values(
                id=job_id,
                kind="finetune",
                status="running",
                params={},
                attempts=1,
                max_attempts=3,
                cancel_requested=False,
                created_at=datetime.now(UTC),
            )
        )
    return job_id


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_models_are_unique_per_bytes_and_arch_and_per_creating_job(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"empty_{database}_url")
    migrate.upgrade_database(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        _insert_model(engine, "a" * 64, "iresnet18")
        _insert_model(engine, "a" * 64, "iresnet50")  # the same bytes under another arch: a model of its own
        with pytest.raises(IntegrityError):
            _insert_model(engine, "a" * 64, "iresnet18")
        job_id = _insert_job(engine)
        _insert_model(engine, "b" * 64, "iresnet18", job_id)
        with pytest.raises(IntegrityError):
            _insert_model(engine, "c" * 64, "iresnet18", job_id)
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_the_unique_models_revision_stops_on_duplicates_and_names_them(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"empty_{database}_url")
    migrate.upgrade_database(url, BEFORE_UNIQUE_MODELS)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        _insert_model(engine, "d" * 64, "mobilefacenet")
        _insert_model(engine, "d" * 64, "mobilefacenet")

        with pytest.raises(RuntimeError, match=r"d{64}, mobilefacenet"):
            migrate.upgrade_database(url)
        assert migrate.current_revision(url) == BEFORE_UNIQUE_MODELS
    finally:
        engine.dispose()
