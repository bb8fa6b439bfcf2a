"""Schema set-up. Placeholder until the Alembic migrations land: builds the tables directly."""

from app.db import get_engine
from app.tables import Base


def upgrade_database(database_url: str) -> None:
    Base.metadata.create_all(get_engine(database_url))
