"""Erasing stored files completely: a tombstone in the row's transaction, the file removed after it.

An erase that deleted the row and then failed to remove the file would leave an image nobody can find or
erase again. So the row's deletion records an `Erasure` in the same transaction; the file goes after the
commit and the tombstone with it; when the blob store refuses, the tombstone stays, the caller reports the
erasure as pending and the sweeper finishes it. Bytes that a row names again (the same image uploaded
anew) are kept and their tombstone dropped.
"""

import logging

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.domain import ModelStatus
from app.tables import Erasure, Face, ModelVersion

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000


def record_erasure(session: Session, namespace: str, sha256: str) -> None:
    """Add the tombstone to the caller's transaction, which deletes the row naming the file."""
    session.merge(Erasure(namespace=namespace, sha256=sha256))


def _in_use(session: Session, namespace: str, sha256: str) -> bool:
    if namespace == "faces":
        statement = select(func.count()).where(Face.sha256 == sha256)
    else:
        statement = select(func.count()).where(
            ModelVersion.sha256 == sha256, ModelVersion.status != ModelStatus.INVALID
        )
    return bool(session.scalar(statement))


def finish_erasure(session: Session, store: BlobStore, namespace: str, sha256: str) -> bool:
    """Remove the file unless a row names it again, then its tombstone; False (the tombstone kept) when the
    blob store refuses."""
    if not _in_use(session, namespace, sha256):
        try:
            store.delete(namespace, sha256)
        except OSError as exc:
            session.rollback()
            log.warning("erasure of %s/%s left to the sweeper: %s", namespace, sha256, exc)
            return False
    session.execute(delete(Erasure).where(Erasure.namespace == namespace, Erasure.sha256 == sha256))
    session.commit()
    return True


def finish_pending_erasures(settings: Settings) -> tuple[int, int]:
    """(finished, still pending): the sweeper's pass over the tombstones."""
    store = BlobStore(settings.blob_dir)
    with session_scope(settings.database_url) as session:
        pending = session.execute(select(Erasure.namespace, Erasure.sha256).limit(SWEEP_BATCH)).all()
        finished = sum(finish_erasure(session, store, namespace, sha) for namespace, sha in pending)
    return finished, len(pending) - finished
