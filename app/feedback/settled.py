"""A single pair of two faces that already have labels, stored in one statement on the event loop.

Once a service has been labelling for a while, nearly every post names two faces that already have labels:
neither may move (app/feedback/placement.py), no split's count of labelled faces changes, and the pair's
split follows from the faces' splits alone. Such a pair needs no placement lock and no decision in Python,
so one INSERT ... SELECT checks both faces, derives the split and inserts, in its own transaction, through
an async psycopg pool: no thread hop, no ORM, one round trip, where the general path
(`service.ingest_feedback`, in the thread pool) takes a read, a write and a commit.

Everything else gets None here and goes through the general path, which decides and words the answer as
before: a face without a label, an unknown face, a pair stored before, a regression pair, a lease, SQLite,
and any failure of this statement (a face deleted meanwhile, the database unreachable, the pool busy). The
general path then answers from the database as it stands, so a statement that committed just before its
connection broke reads as the pair stored before (200), never twice.
"""

import logging
import uuid
from datetime import datetime

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.db import libpq_url
from app.domain import FeedbackSplit
from app.feedback.placement import PG_FACE_HAS_LABEL
from app.feedback.schemas import FeedbackIn
from app.feedback.service import canonical_pair
from app.tables import FeedbackPair, utcnow

log = logging.getLogger(__name__)

# Both faces exist and some stored pair names each of them (placement.face_states's probe); the pair then
# takes their common split or `cross`, as `service.pair_split` has it.
INSERT_BETWEEN_LABELLED = f"""
WITH named AS (
    SELECT faces.split, {PG_FACE_HAS_LABEL} AS labelled
    FROM faces WHERE faces.id IN (%(face_a)s, %(face_b)s)
), settled AS (
    SELECT min(split) AS low, max(split) AS high FROM named HAVING count(*) = 2 AND bool_and(labelled)
)
INSERT INTO feedback (id, face_a, face_b, label, split, annotator, source, api_key_id, created_at)
SELECT %(id)s, %(face_a)s, %(face_b)s, %(label)s,
       CASE WHEN low = high THEN low ELSE '{FeedbackSplit.CROSS.value}' END,
       %(annotator)s, %(source)s, %(api_key_id)s, %(created_at)s
FROM settled
ON CONFLICT (face_a, face_b) DO NOTHING
RETURNING split
"""
# How long a post waits for a free connection before it takes the general path instead.
POOL_WAIT_S = 0.5


class SettledPairs:
    """The pool behind the one-statement path of one api process; open with the app, closed with it.

    Connections are opened on demand (none while idle) up to `max_size`, the api's thread count: as many
    as the general path's threads can use at once, beside the engine's own pool.
    """

    def __init__(self, database_url: str, max_size: int) -> None:
        self._pool: AsyncConnectionPool | None = None
        if database_url.startswith("postgresql"):
            self._pool = AsyncConnectionPool(
                libpq_url(database_url),
                min_size=0,
                max_size=max_size,
                kwargs={"autocommit": True, "row_factory": tuple_row},
                open=False,
                name="settled-pairs",
            )
        self.stored = 0
        """Pairs this path stored: the rest went the general way."""

    async def open(self) -> None:
        if self._pool is not None:
            await self._pool.open(wait=False)

    async def close(self) -> None:
        if self._pool is not None and not self._pool.closed:
            await self._pool.close()

    async def record(
        self, item: FeedbackIn, api_key_id: str | None, now: datetime | None = None
    ) -> FeedbackPair | None:
        """The new pair (committed), when `item` is a plain pair of two labelled faces not stored yet; else
        None and nothing stored."""
        if self._pool is None or self._pool.closed or item.split is not None or item.lease_id is not None:
            return None
        face_a, face_b = canonical_pair(item.face_a, item.face_b)
        values = {
            "id": uuid.uuid4(),
            "face_a": face_a,
            "face_b": face_b,
            "label": item.label,
            "annotator": item.annotator,
            "source": item.source,
            "api_key_id": api_key_id,
            "created_at": now or utcnow(),
        }
        try:
            async with self._pool.connection(timeout=POOL_WAIT_S) as connection:
                row = await (await connection.execute(INSERT_BETWEEN_LABELLED, values)).fetchone()
        except psycopg.IntegrityError:
            return None  # a face was deleted since the statement read it: the general path says which
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            log.info("settled pair: %s; taking the general path", type(exc).__name__)
            return None
        if row is None:
            return None
        self.stored += 1
        return FeedbackPair(split=row[0], **values)
