"""A single pair of two faces that already have labels, stored in one statement (PostgreSQL).

Once a service has been labelling for a while, nearly every post names two faces that already have labels:
neither may move (app/feedback/placement.py), no split's count of labelled faces changes, and the pair's
split follows from the faces' splits alone. Such a pair needs no placement lock and no decision in Python,
so one INSERT ... SELECT checks both faces, derives the split and inserts, in its own transaction: one round
trip where the general path (`service.ingest_feedback`) takes a read, a write and a commit. Everything else
(a face without a label, an unknown face, a pair stored before, a regression pair, a lease, SQLite) gets
None here and goes through the general path, which decides and words the answer as before.
"""

import uuid
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from app.domain import FeedbackSplit
from app.feedback.schemas import FeedbackIn
from app.tables import FeedbackPair, utcnow

# Both faces exist and some stored pair names each of them (the probes of placement.face_states); the
# pair then takes their common split or `cross`, as `service.pair_split` has it.
_INSERT_BETWEEN_LABELLED = f"""
WITH named AS (
    SELECT faces.split,
           EXISTS (SELECT 1 FROM feedback WHERE feedback.face_a = faces.id)
           OR EXISTS (SELECT 1 FROM feedback WHERE feedback.face_b = faces.id) AS labelled
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


def record_between_labelled_faces(
    engine: Engine, item: FeedbackIn, api_key_id: str | None, now: datetime | None = None
) -> FeedbackPair | None:
    """The new pair (committed), when `item` is a plain pair of two labelled faces not stored yet; else None
    and nothing stored."""
    if engine.dialect.name != "postgresql" or item.split is not None or item.lease_id is not None:
        return None
    face_a, face_b = sorted((item.face_a, item.face_b))
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
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        try:
            row = connection.exec_driver_sql(_INSERT_BETWEEN_LABELLED, values).first()
        except IntegrityError:
            return None  # a face was deleted since the statement read it: the general path says which
    if row is None:
        return None
    return FeedbackPair(split=row[0], **values)
