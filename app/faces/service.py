"""Faces: a face is its image's bytes, stored once whatever the number of uploads."""

import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.blobs import BlobStore, StagedBlob
from app.config import Settings
from app.embeddings import embedding_qualities, serving_model_id
from app.erasures import finish_erasure, record_erasure
from app.faces.images import DecodeLimits, inspect_image
from app.faces.schemas import FaceOut
from app.feedback import placement
from app.models.serving import request_embedding
from app.pagination import PageParams, fetch_page
from app.problems import Problem, not_found
from app.splits import split_for_digest
from app.tables import Face

NAMESPACE = "faces"

log = logging.getLogger(__name__)


def store_face(
    *,
    session: Session,
    store: BlobStore,
    blob: StagedBlob,
    max_pixels: int,
    split_fractions: Mapping[str, float],
    subject: str | None = None,
    source: str | None = None,
    decode_limits: DecodeLimits | None = None,
) -> tuple[Face, bool]:
    """Keep a received image as a face, or return the face that already has these bytes.

    Returns the face and whether it was created. The image is validated before its blob is committed and the
    blob is committed before its row, so a failure leaves no orphan row; a blob this call placed is removed
    again if the row cannot be written. Subject and source of an existing face are left as they were.
    """
    if blob.size == 0:
        raise Problem(422, "empty-upload", "Empty upload", "the uploaded file has no bytes")
    sha = blob.finish()
    existing = _face_by_sha(session, sha)
    if existing is not None:
        return existing, False

    info = inspect_image(blob.path, max_pixels=max_pixels, limits=decode_limits)
    blob_was_there = store.exists(NAMESPACE, sha)
    blob.commit()
    face = Face(
        sha256=sha,
        byte_size=blob.size,
        media_type=info.media_type,
        width=info.width,
        height=info.height,
        channels=info.channels,
        split=split_for_digest(sha, split_fractions),
        subject=subject or None,
        source=source or None,
    )
    session.add(face)
    try:
        session.commit()
    except IntegrityError:
        # The same bytes arrived concurrently and the other upload's row won: it owns the blob too.
        session.rollback()
        existing = _face_by_sha(session, sha)
        if existing is None:
            raise
        return existing, False
    except BaseException:
        session.rollback()
        if not blob_was_there:
            store.delete(NAMESPACE, sha)
        raise
    return face, True


def queue_embedding(*, session: Session, settings: Settings) -> None:
    """Queue the embedding of a face just committed, by every model in service (coalesced per model).

    Its own transaction, after the face's: the face is stored whatever happens here. A broker that is down
    leaves the job queued for the sweeper to send; a failed insert is logged, and the face waits for the next
    arrival's job or a reindex.
    """
    try:
        request_embedding(session, settings)
    except SQLAlchemyError:
        session.rollback()
        log.warning("could not queue the embedding of new faces", exc_info=True)


def faces_out(session: Session, faces: Sequence[Face]) -> list[FaceOut]:
    """Faces as shown, each with whether the serving model has embedded it and the quality it found: two
    queries for any number."""
    model_id = serving_model_id(session)
    qualities = embedding_qualities(session, model_id, [face.id for face in faces])
    return [
        FaceOut.model_validate(face).model_copy(
            update={
                "embedded": face.id in qualities,
                "quality": qualities.get(face.id),
                "serving_model_id": model_id,
            }
        )
        for face in faces
    ]


def get_face(*, session: Session, face_id: uuid.UUID) -> Face:
    face = session.get(Face, face_id)
    if face is None:
        raise not_found("face", face_id)
    return face


def face_image(*, session: Session, store: BlobStore, face_id: uuid.UUID) -> tuple[Path, str]:
    """The image file of a face and its media type."""
    face = get_face(session=session, face_id=face_id)
    path = store.path(NAMESPACE, face.sha256)
    if not path.is_file():
        raise Problem(
            500, "missing-blob", "Image missing", f"the image of face {face_id} is not in the store"
        )
    return path, face.media_type


def list_faces(
    *, session: Session, page: PageParams, subject: str | None = None, split: str | None = None
) -> tuple[Sequence[Face], str | None]:
    return fetch_page(session, Face, page, subject=subject, split=split)


def delete_face(*, session: Session, store: BlobStore, face_id: uuid.UUID) -> bool:
    """Erase a face: the database cascades to its feedback and embeddings, then its image goes.

    The row's deletion records a tombstone for the image in the same transaction (app/erasures.py); the
    image is removed after the commit, unless a row names its bytes again (a concurrent re-upload). Returns
    False when the blob store refused: the erasure is then pending and the sweeper finishes it.
    """
    face = get_face(session=session, face_id=face_id)
    sha, split = face.sha256, face.split
    placement.lock_placement(session)
    partners = placement.partners(session, face_id)
    session.delete(face)
    session.flush()
    placement.forget_labels(session, partners, deleted_split=split if partners else None)
    record_erasure(session, NAMESPACE, sha)
    session.commit()
    return finish_erasure(session, store, NAMESPACE, sha)


def _face_by_sha(session: Session, sha: str) -> Face | None:
    return session.scalar(select(Face).where(Face.sha256 == sha))
