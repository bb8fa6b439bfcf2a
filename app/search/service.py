"""1:N search over the serving model's embeddings, from an in-memory index kept current without reloading.

The api process holds one `EmbeddingIndex` per (database, serving model), loaded on first use in chunks.
Every request reads the model's `EmbeddingGeneration` (one primary-key lookup); when it moved, only the rows
written since (`generation >` the index's) are read and added, since writers of one model commit in
generation order. Deleted faces leave no generation behind, so every candidate is checked against the faces
table (its subject and source are read there anyway); one that is gone is dropped from the index and the
search runs again, which keeps the answer exact: the same faces, in the same order, as brute force over the
model's stored vectors.
"""

import logging
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.embeddings import (
    decode_vector,
    not_embedded,
    require_faces,
    require_serving_model,
    vectors_of,
    verdict,
)
from app.search.index import EmbeddingIndex
from app.search.schemas import FaceMatch, SearchRequest, SearchResult, SubjectMatch
from app.tables import EmbeddingGeneration, Face, FaceEmbedding

LOAD_CHUNK = 10_000

log = logging.getLogger(__name__)


@dataclass
class ModelIndex:
    """One model's index and the generation it holds every row up to."""

    model_id: uuid.UUID
    index: EmbeddingIndex | None = None  # created with the first row (its dimension)
    generation: int = -1  # -1: not loaded yet
    rows_read: int = 0  # embedding rows read from the database, ever: a catch-up reads only new ones
    lock: threading.Lock = field(default_factory=threading.Lock)  # one load or catch-up at a time


_indexes: dict[tuple[str, uuid.UUID], ModelIndex] = {}
_indexes_lock = threading.Lock()


def cached_index(database_url: str, model_id: uuid.UUID) -> ModelIndex | None:
    """The index this process holds for the model, if any (for tests and diagnostics)."""
    with _indexes_lock:
        return _indexes.get((database_url, model_id))


def model_index(session: Session, database_url: str, model_id: uuid.UUID) -> ModelIndex:
    """The model's index, current up to the generation read now; other models' indexes are dropped."""
    with _indexes_lock:
        for key in [key for key in _indexes if key[0] == database_url and key[1] != model_id]:
            del _indexes[key]
        entry = _indexes.setdefault((database_url, model_id), ModelIndex(model_id))
    current = _generation(session, model_id)
    if entry.generation >= 0 and current <= entry.generation:
        return entry
    with entry.lock:
        if entry.generation < 0:
            _read_rows(session, entry, after=None)
            entry.generation = current
        elif current > entry.generation:
            _read_rows(session, entry, after=entry.generation)
            entry.generation = current
    return entry


def _generation(session: Session, model_id: uuid.UUID) -> int:
    statement = select(EmbeddingGeneration.generation).where(EmbeddingGeneration.model_id == model_id)
    return int(session.scalar(statement) or 0)


def _read_rows(session: Session, entry: ModelIndex, *, after: int | None) -> None:
    """Add the model's rows (those above generation `after`; all when None), LOAD_CHUNK at a time.

    The generation is read before the rows: a row committed in between is read now and again next time,
    which only rewrites it.
    """
    statement = (
        select(FaceEmbedding.face_id, FaceEmbedding.vector, Face.subject, Face.source)
        .join(Face, Face.id == FaceEmbedding.face_id)
        .where(FaceEmbedding.model_id == entry.model_id)
        .execution_options(yield_per=LOAD_CHUNK)
    )
    if after is not None:
        statement = statement.where(FaceEmbedding.generation > after)
    for chunk in session.execute(statement).partitions():
        ids, raws, subjects, sources = zip(*chunk, strict=True)
        dim = len(raws[0]) // 4
        if entry.index is None:
            entry.index = EmbeddingIndex(dim)
        vectors = np.frombuffer(b"".join(raws), dtype="<f4").reshape(len(raws), dim)
        entry.index.add(list(ids), vectors, list(subjects), list(sources))
        entry.rows_read += len(ids)


def search(*, session: Session, database_url: str, request: SearchRequest) -> SearchResult:
    require_faces(session, [request.face], ["face"])
    model = require_serving_model(session)
    raw = vectors_of(session, model.id, [request.face]).get(request.face)
    if raw is None:
        raise not_embedded(model.id, face=request.face)
    entry = model_index(session, database_url, model.id)
    query = decode_vector(raw)
    faces, subjects = _rank(session, entry.index, query, request) if entry.index is not None else ([], [])
    _, reason = verdict(0.0, model.threshold)
    scores = _exact_scores(entry.index, query, [face_id for face_id, *_ in faces] + [f for _, f in subjects])

    def same(score: float) -> bool | None:
        return verdict(score, model.threshold)[0]

    results = [
        FaceMatch(
            id=face_id, subject=subject, source=source, score=scores[face_id], same=same(scores[face_id])
        )
        for face_id, subject, source in faces
        if face_id in scores
    ]
    subject_matches = [
        SubjectMatch(subject=name, score=scores[best], best_face=best, same=same(scores[best]))
        for name, best in subjects
        if best in scores
    ]
    return SearchResult(
        face=request.face,
        model_id=model.id,
        threshold=model.threshold,
        same_reason=reason,
        results=sorted(results, key=lambda match: -match.score),
        subjects=sorted(subject_matches, key=lambda match: -match.score),
    )


Labelled = tuple[uuid.UUID, str | None, str | None]


def _rank(
    session: Session, index: EmbeddingIndex, query: np.ndarray, request: SearchRequest
) -> tuple[list[Labelled], list[tuple[str, uuid.UUID]]]:
    """The top faces with their labels, and the top subjects with their best face, all still stored.

    A subject's best face is its first appearance in the face ranking; the subjects not among the top k
    faces come from the index's exact best-subjects ranking, each then searched for its best face.
    """
    k, exclude = request.k, [request.face]
    while True:
        hits = [
            face_id
            for face_id, _ in index.search(
                query, k, subject=request.subject, source=request.source, exclude=exclude
            )
        ]
        best_faces: dict[str, uuid.UUID] = {}
        for face_id in hits:
            subject = index.labels(face_id)[0]
            if subject is not None:
                best_faces.setdefault(subject, face_id)
        if request.subject is not None:
            ranked = list(best_faces)
        else:
            ranked = [
                name for name, _ in index.best_subjects(query, k, source=request.source, exclude=exclude)
            ]
            for name in ranked:
                if name not in best_faces:
                    found = index.search(query, 1, subject=name, source=request.source, exclude=exclude)
                    if found:
                        best_faces[name] = found[0][0]
            ranked = [name for name in ranked if name in best_faces]
        wanted = set(hits) | {best_faces[name] for name in ranked}
        stored = _stored_labels(session, wanted)
        gone = wanted - stored.keys()
        if gone:
            log.info("dropped %d deleted faces from the search index", index.remove(gone))
            continue
        faces = [(face_id, *stored[face_id]) for face_id in hits]
        return faces, [(name, best_faces[name]) for name in ranked]


def _stored_labels(
    session: Session, face_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, tuple[str | None, str | None]]:
    ids = list(face_ids)
    if not ids:
        return {}
    rows = session.execute(select(Face.id, Face.subject, Face.source).where(Face.id.in_(ids)))
    return {face_id: (subject, source) for face_id, subject, source in rows}


def _exact_scores(
    index: EmbeddingIndex | None, query: np.ndarray, face_ids: list[uuid.UUID]
) -> dict[uuid.UUID, float]:
    """Scores in float64 from the stored float32 vectors, as verify computes them: one pair, one score.

    A face another request dropped meanwhile (deleted since it was checked) is left out.
    """
    scores: dict[uuid.UUID, float] = {}
    if index is None:
        return scores
    q = query.astype(np.float64)
    for face_id in dict.fromkeys(face_ids):
        try:
            scores[face_id] = float(index.vector(face_id).astype(np.float64) @ q)
        except KeyError:
            continue
    return scores
