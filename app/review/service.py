"""The review queue's database side: eligible candidates, leases, and answering or skipping a lease.

A request does bounded work whatever the number of faces: it samples `review_sample_faces` faces at random
from the serving model's in-memory search index (so only faces that model embedded), scores every
within-split pair among them with one matrix product, finds the nearest neighbours of at most
`review_anchors` training faces in that index (one more matrix product), and reads the labelled pairs and
live leases touching those faces. `selection` then picks the page; the picked pairs are leased with an
insert that skips pairs a concurrent reviewer leased first (the unique pair in `review_leases`), and those
are replaced from the remaining candidates.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import and_, delete, or_, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import dialect_insert
from app.domain import FaceSplit
from app.embeddings import require_serving_model
from app.evidence import EvidenceMinimums, count_evidence, evidence_needed, val_needed
from app.problems import Problem
from app.review import selection
from app.review.schemas import ReviewFace, ReviewPage, ReviewPair
from app.search.index import EmbeddingIndex
from app.search.service import model_index
from app.tables import Face, FeedbackPair, ReviewLease, utcnow

DEFAULT_LIMIT = 10
FALLBACK_THRESHOLD = 0.4  # the uncertainty centre while the serving model has no calibrated threshold
MAX_PAIRS_PER_SPLIT = 4000  # random within-split pairs kept as candidates, per split
LEASE_ROUNDS = 3  # selections tried when concurrent reviewers took some of the pairs first
_IDS_PER_QUERY = 2000
_LEASING_LOCK_KEY = 0x6D6167_7265_7669

Key = tuple[uuid.UUID, uuid.UUID]


@dataclass(frozen=True)
class FaceInfo:
    split: str
    subject: str | None


def check_limit(limit: int, settings: Settings) -> None:
    if not 1 <= limit <= settings.review_max_limit:
        raise Problem(
            422,
            "invalid-limit",
            "Limit out of range",
            f"limit must be between 1 and {settings.review_max_limit}, got {limit}",
            errors=[{"loc": ["body", "limit"], "msg": "out of range", "type": "invalid_limit"}],
        )


def lease_pairs(*, session: Session, settings: Settings, limit: int, holder: str | None) -> ReviewPage:
    """A page of up to `limit` pairs, each leased to the caller (`holder`, its API key) until its `expires_at`
    (commits)."""
    check_limit(limit, settings)
    model = require_serving_model(session)
    threshold = model.threshold if model.threshold is not None else FALLBACK_THRESHOLD
    rng = random.Random(settings.review_seed) if settings.review_seed is not None else random.Random()
    now = utcnow()
    counts = count_evidence(session)
    needed = evidence_needed(counts, EvidenceMinimums.from_settings(settings)) | val_needed(counts, settings)
    shares = selection.page_shares(
        limit,
        needed=needed,
        val_share=settings.review_val_share,
        evidence_max_share=settings.review_evidence_max_share,
    )
    entry = model_index(session, settings.database_url, model.id)
    candidates: list[selection.Candidate] = []
    info: dict[uuid.UUID, FaceInfo] = {}
    if entry.index is not None and len(entry.index) >= 2:
        candidates, info = _candidates(session, settings, entry.index, threshold, rng, now)

    _lock_leasing(session)
    session.execute(delete(ReviewLease).where(ReviewLease.expires_at <= now))
    expires_at = now + timedelta(seconds=settings.review_lease_s)
    leased: list[tuple[uuid.UUID, selection.Choice]] = []
    taken: set[Key] = set()
    remaining = dict(shares)
    for _ in range(LEASE_ROUNDS):
        pool = [c for c in candidates if c.key not in taken]
        choices = selection.select_pairs(
            pool,
            shares=remaining,
            threshold=threshold,
            band=settings.review_uncertain_band,
            explore_share=settings.review_explore_share,
            rng=rng,
            already=[choice for _, choice in leased],
            likely_same_share=settings.review_likely_same_share,
        )
        if not choices:
            break
        stored = _insert_leases(session, choices, model.id, now, expires_at, holder)
        for choice in choices:
            taken.add(choice.candidate.key)
            lease_id = stored.get(choice.candidate.key)
            if lease_id is not None:
                leased.append((lease_id, choice))
                remaining[choice.candidate.split] -= 1
        if len(stored) == len(choices):
            break
    session.commit()

    def face(face_id: uuid.UUID) -> ReviewFace:
        return ReviewFace(id=face_id, subject=info[face_id].subject)

    items = [
        ReviewPair(
            lease_id=lease_id,
            face_a=face(choice.candidate.face_a),
            face_b=face(choice.candidate.face_b),
            split=FaceSplit(choice.candidate.split),
            score=choice.candidate.score,
            threshold=model.threshold,
            reason=choice.reason,  # type: ignore[arg-type]
            stratum=choice.stratum,  # type: ignore[arg-type]
            expires_at=expires_at,
        )
        for lease_id, choice in leased
    ]
    return ReviewPage(
        model_id=model.id, threshold=model.threshold, items=items, shares=shares, evidence_needed=needed
    )


def _check_holder(lease: ReviewLease, holder: str | None) -> None:
    """Only the key a pair was leased to may answer or skip it: another reviewer's skip would hand the pair
    to a third, and its answer would be recorded as the first reviewer's review."""
    if lease.api_key_id != holder:
        raise Problem(
            409,
            "lease-not-yours",
            "Lease held by another key",
            f"lease {lease.id} was given to another API key; ask for pairs of your own",
            lease_id=str(lease.id),
        )


def release_lease(*, session: Session, lease_id: uuid.UUID, holder: str | None) -> None:
    """Skip a pair: its lease goes, and the pair may be offered again (commits)."""
    lease = session.get(ReviewLease, lease_id)
    if lease is None:
        raise Problem(404, "unknown-lease", "Unknown lease", f"no lease with id {lease_id}")
    _check_holder(lease, holder)
    session.delete(lease)
    session.commit()


def claim_lease(
    *, session: Session, lease_id: uuid.UUID, face_x: uuid.UUID, face_y: uuid.UUID, holder: str | None
) -> None:
    """Check that a live lease holds this pair and delete it (not committed: the answer commits with it)."""
    statement = select(ReviewLease).where(ReviewLease.id == lease_id)
    if session.get_bind().dialect.name == "postgresql":
        statement = statement.with_for_update()
    lease = session.scalars(statement).first()
    if lease is None:
        raise Problem(
            409,
            "unknown-lease",
            "Unknown lease",
            f"no live lease with id {lease_id}: it was answered, skipped or expired and offered again",
            lease_id=str(lease_id),
        )
    _check_holder(lease, holder)
    expires_at = lease.expires_at if lease.expires_at.tzinfo else lease.expires_at.replace(tzinfo=UTC)
    if expires_at <= utcnow():
        raise Problem(
            409,
            "lease-expired",
            "Lease expired",
            f"lease {lease_id} expired at {expires_at.isoformat()}; ask for pairs again",
            lease_id=str(lease_id),
        )
    if {lease.face_a, lease.face_b} != {face_x, face_y}:
        raise Problem(
            409,
            "lease-mismatch",
            "Lease holds another pair",
            f"lease {lease_id} holds faces {lease.face_a} and {lease.face_b}",
            lease_id=str(lease_id),
        )
    session.delete(lease)


def _lock_leasing(session: Session) -> None:
    """Serialise the writing of leases until commit, so that two reviewers never wait on each other's
    uncommitted leases (each holding a pair the other wants: a deadlock). PostgreSQL: an advisory lock;
    SQLite: the first write takes the database's one write lock anyway."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LEASING_LOCK_KEY})


def _candidates(
    session: Session,
    settings: Settings,
    index: EmbeddingIndex,
    threshold: float,
    rng: random.Random,
    now: datetime,
) -> tuple[list[selection.Candidate], dict[uuid.UUID, FaceInfo]]:
    ids = index.ids()
    if settings.review_seed is not None:
        ids.sort()  # the index's row order depends on load order; a seed must give one answer
    sample = rng.sample(ids, min(settings.review_sample_faces, len(ids)))
    info = _face_info(session, sample)
    sample = [face for face in sample if face in info]
    anchors = [face for face in sample if info[face].split == FaceSplit.TRAIN][: settings.review_anchors]
    neighbour_pairs = [
        (anchor, other, score)
        for anchor, found in zip(
            anchors, index.neighbours_of(anchors, settings.review_neighbours), strict=True
        )
        for other, score in found
    ]
    info.update(_face_info(session, {other for _, other, _ in neighbour_pairs} - info.keys()))

    faces = set(info)
    labelled, same_of, different = _labels(session, faces)
    leased = _leased(session, faces, now)

    def eligible(key: Key) -> bool:
        return key[0] != key[1] and key not in labelled and key not in leased

    def known_different(a: uuid.UUID, b: uuid.UUID) -> bool:
        sa, sb = info[a].subject, info[b].subject
        if sa is not None and sb is not None and sa != sb:
            return True
        return (same_of(a), same_of(b)) in different

    def known_same(a: uuid.UUID, b: uuid.UUID) -> bool:
        return same_of(a) == same_of(b)

    candidates: dict[Key, selection.Candidate] = {}
    for anchor, other, score in neighbour_pairs:
        key = _canonical(anchor, other)
        same_split = other in info and info[other].split == info[anchor].split
        if same_split and eligible(key) and not known_same(*key):
            candidates[key] = _candidate(key, info, score, neighbour=True, different=known_different(*key))

    by_split: dict[str, list[uuid.UUID]] = {}
    for face in sample:
        by_split.setdefault(info[face].split, []).append(face)
    for split, members in by_split.items():
        if len(members) < 2:
            continue
        vectors = np.stack([index.vector(face) for face in members]).astype(np.float64)
        scores = vectors @ vectors.T
        rows, cols = np.triu_indices(len(members), k=1)
        order = list(range(len(rows)))
        rng.shuffle(order)
        kept = 0
        for i in order:
            if kept >= MAX_PAIRS_PER_SPLIT:
                break
            key = _canonical(members[rows[i]], members[cols[i]])
            if key in candidates or not eligible(key):
                continue
            if split == FaceSplit.TRAIN and known_same(*key):
                continue
            candidates[key] = _candidate(
                key, info, float(scores[rows[i], cols[i]]), neighbour=False, different=known_different(*key)
            )
            kept += 1
    ordered = sorted(candidates.values(), key=lambda c: c.key)
    return ordered, info


def _candidate(
    key: Key, info: dict[uuid.UUID, FaceInfo], score: float, *, neighbour: bool, different: bool
) -> selection.Candidate:
    a, b = key
    return selection.Candidate(
        face_a=a,
        face_b=b,
        split=str(info[a].split),
        score=float(score),
        subject_a=info[a].subject,
        subject_b=info[b].subject,
        neighbour=neighbour,
        known_different=different,
    )


def _canonical(x: uuid.UUID, y: uuid.UUID) -> Key:
    return (x, y) if x < y else (y, x)


def _chunks(values: Sequence[Any], size: int = _IDS_PER_QUERY) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _face_info(session: Session, face_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, FaceInfo]:
    found: dict[uuid.UUID, FaceInfo] = {}
    for chunk in _chunks(sorted(set(face_ids))):
        rows = session.execute(select(Face.id, Face.split, Face.subject).where(Face.id.in_(chunk)))
        found.update({face_id: FaceInfo(str(split), subject) for face_id, split, subject in rows})
    return found


def _labels(session: Session, faces: set[uuid.UUID]) -> tuple[set[Key], Any, set[tuple[Any, Any]]]:
    """Labelled pairs touching `faces`, and what they imply: groups of one person, and groups that differ.

    Returns (labelled keys, group_of(face), pairs of groups known to differ). A group is a set of faces
    joined by `same` labels (union-find over the edges read); a `different` label between two groups says
    every pair across them differs.
    """
    edges: list[tuple[uuid.UUID, uuid.UUID, int]] = []
    for chunk in _chunks(sorted(faces)):
        rows = session.execute(
            select(FeedbackPair.face_a, FeedbackPair.face_b, FeedbackPair.label).where(
                or_(FeedbackPair.face_a.in_(chunk), FeedbackPair.face_b.in_(chunk))
            )
        )
        edges.extend((a, b, int(label)) for a, b, label in rows)
    parent: dict[uuid.UUID, uuid.UUID] = {}

    def find(face: uuid.UUID) -> uuid.UUID:
        root = face
        while parent.get(root, root) != root:
            root = parent[root]
        while face != root:
            parent[face], face = root, parent.get(face, face)
        return root

    for a, b, label in edges:
        if label == 1:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    different: set[tuple[Any, Any]] = set()
    for a, b, label in edges:
        if label == 0:
            ra, rb = find(a), find(b)
            different.update({(ra, rb), (rb, ra)})
    labelled = {(a, b) for a, b, _ in edges}
    return labelled, find, different


def _leased(session: Session, faces: set[uuid.UUID], now: datetime) -> set[Key]:
    """The pairs among `faces` that live leases hold."""
    found: set[Key] = set()
    ordered = sorted(faces)
    for chunk in _chunks(ordered):
        rows = session.execute(
            select(ReviewLease.face_a, ReviewLease.face_b).where(
                and_(
                    ReviewLease.face_a.in_(chunk),
                    ReviewLease.face_b.in_(ordered),
                    ReviewLease.expires_at > now,
                )
            )
        )
        found.update((a, b) for a, b in rows)
    return found


def _insert_leases(
    session: Session,
    choices: Sequence[selection.Choice],
    model_id: uuid.UUID,
    now: datetime,
    expires_at: datetime,
    holder: str | None,
) -> dict[Key, uuid.UUID]:
    """Lease the chosen pairs, skipping those a concurrent reviewer holds; the leases stored, by pair."""
    rows = [
        {
            "id": uuid.uuid4(),
            "face_a": choice.candidate.face_a,
            "face_b": choice.candidate.face_b,
            "model_id": model_id,
            "split": choice.candidate.split,
            "reason": choice.reason,
            "score": choice.candidate.score,
            "api_key_id": holder,
            "created_at": now,
            "expires_at": expires_at,
        }
        for choice in choices
    ]
    table = ReviewLease.__table__
    statement = (
        dialect_insert(session, table)
        .on_conflict_do_nothing(index_elements=["face_a", "face_b"])
        .returning(table.c.id, table.c.face_a, table.c.face_b)
    )
    stored: dict[Key, uuid.UUID] = {}
    for row in rows:  # at most a page of leases, one statement each: the pairs a conflict skipped are known
        result = session.execute(statement.values(**row)).first()
        if result is not None:
            stored[(result.face_a, result.face_b)] = result.id
    return stored
