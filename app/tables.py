"""All tables of the service. The database is the source of truth for faces, feedback, jobs and models."""

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.domain import (
    Architecture,
    EvaluationSplit,
    FaceSplit,
    FeedbackSplit,
    JobKind,
    JobStatus,
    ModelStatus,
    sql_in,
)

JsonType = JSON().with_variant(JSONB(), "postgresql")
QUEUED_ONLY = f"status = '{JobStatus.QUEUED.value}'"


def utcnow() -> datetime:
    return datetime.now(UTC)


def enum_type(enum: type[StrEnum], length: int) -> Enum:
    """A VARCHAR(length) column that reads back as `enum` members and stores their lowercase values.

    Not a native enum and no implicit CHECK: the schema stays plain strings, with CHECK constraints named
    and written out in `__table_args__` (so the migrations can add and drop them by name). Unknown strings
    pass through unvalidated on the way in, so filtering by one finds nothing instead of raising.
    """
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=False,
    )


# Every constraint and index gets a predictable name, so a migration can drop or alter it by that name
# (SQLite's batch mode cannot find an unnamed one). An explicit CHECK name is the suffix after the table's.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012
        datetime: DateTime(timezone=True),
        dict[str, Any]: JsonType,
        uuid.UUID: Uuid(),
    }


class Face(Base):
    """A stored face crop. Its split starts from its content hash; until the face has a label it may join
    a pair partner's split (app/feedback/placement.py), after that it never changes. One row per image, so
    no image is ever in two splits."""

    __tablename__ = "faces"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    byte_size: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    split: Mapped[FaceSplit] = mapped_column(enum_type(FaceSplit, 16))
    subject: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint(sql_in("split", FaceSplit), name="split"),
        Index("ix_faces_created_at_id", "created_at", "id"),
    )


class FeedbackPair(Base):
    """One same/different judgement on two faces, stored in canonical order (face_a < face_b)."""

    __tablename__ = "feedback"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    face_a: Mapped[uuid.UUID] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    face_b: Mapped[uuid.UUID] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    label: Mapped[int] = mapped_column(Integer)
    split: Mapped[FeedbackSplit] = mapped_column(enum_type(FeedbackSplit, 16))
    annotator: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The API key that posted it (null for pairs stored before keys existed, or with auth disabled).
    api_key_id: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        UniqueConstraint("face_a", "face_b", name="uq_feedback_pair"),
        CheckConstraint("label IN (0, 1)", name="label"),
        CheckConstraint("face_a <> face_b", name="distinct_faces"),
        CheckConstraint(sql_in("split", FeedbackSplit), name="split"),
        Index("ix_feedback_face_b", "face_b"),
        Index("ix_feedback_split_label", "split", "label"),
        Index("ix_feedback_created_at_id", "created_at", "id"),
        Index("ix_feedback_api_key_id", "api_key_id"),
    )


class Tally(Base):
    """A maintained count, so dashboards and first labels never count a whole table.

    `kind` is `feedback` (per split and label), `faces` (per split; label -1) or `labelled_faces` (faces some
    pair names, per split; label -1). The database's triggers keep the first two (migration 0011); the api
    keeps `labelled_faces` under the placement lock (app/feedback/placement.py). A count is the sum over
    shards: concurrent writers on PostgreSQL add to different rows.
    """

    __tablename__ = "tallies"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    split: Mapped[str] = mapped_column(String(16), primary_key=True)
    label: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class IdempotencyRecord(Base):
    """The stored answer to a request sent with an `Idempotency-Key`, replayed when the key comes again."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A fine-tune, evaluation, reindex or checkpoint validation; Celery only carries its id."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[JobKind] = mapped_column(enum_type(JobKind, 32))
    status: Mapped[JobStatus] = mapped_column(enum_type(JobStatus, 16), default=JobStatus.QUEUED)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(256))
    parent_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Jobs with the same key coalesce: at most one of them is queued at a time (e.g. "embed:<model id>").
    coalesce_key: Mapped[str | None] = mapped_column(String(128))
    # Why the service queued this job by itself (the auto fine-tune policy: its settings, reason and label
    # counts); null for a job a client or another job asked for.
    trigger: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    # The API keys that created and cancelled it (null: internal jobs, older rows, auth disabled).
    created_by: Mapped[str | None] = mapped_column(String(32))
    cancelled_by: Mapped[str | None] = mapped_column(String(32))
    # Bumped by every UPDATE of the row (ORM or Core, the worker's included, through `onupdate`): the id of
    # the job's progress events (GET /v1/jobs/{id}/events), increasing, so a stream resumes after it.
    # (No Python-side default: inserts leave it to the server, so code that predates the column still works.)
    revision: Mapped[int] = mapped_column(Integer, server_default=text("0"), onupdate=text("revision + 1"))

    __table_args__ = (
        CheckConstraint(sql_in("status", JobStatus), name="status"),
        CheckConstraint(sql_in("kind", JobKind), name="kind"),
        Index("ix_jobs_status_kind", "status", "kind"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_created_by_status", "created_by", "status"),
        Index(
            "uq_jobs_queued_coalesce_key",
            "coalesce_key",
            unique=True,
            postgresql_where=text(QUEUED_ONLY),
            sqlite_where=text(QUEUED_ONLY),
        ),
    )


class JobChunk(Base):
    """One range of a sharded reindex: the faces after (lo_created_at, lo_id) up to (hi_created_at, hi_id).

    A null bound is open (from the oldest face, to the newest). A chunk is claimed, heartbeats and is
    retried like a job row (worker/claims.py); its job's row stays the user's view of the whole reindex.
    """

    __tablename__ = "job_chunks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    lo_created_at: Mapped[datetime | None] = mapped_column()
    lo_id: Mapped[uuid.UUID | None] = mapped_column()
    hi_created_at: Mapped[datetime | None] = mapped_column()
    hi_id: Mapped[uuid.UUID | None] = mapped_column()
    status: Mapped[JobStatus] = mapped_column(enum_type(JobStatus, 16), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(256))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(sql_in("status", JobStatus), name="status"),
        Index("uq_job_chunks_job_id_seq", "job_id", "seq", unique=True),
        Index("ix_job_chunks_status", "status"),
    )


class ModelVersion(Base):
    """A checkpoint in the registry with its lineage; only `ready` models can be used or activated."""

    __tablename__ = "models"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str | None] = mapped_column(String(256))
    arch: Mapped[Architecture] = mapped_column(enum_type(Architecture, 32))
    status: Mapped[ModelStatus] = mapped_column(enum_type(ModelStatus, 16), default=ModelStatus.VALIDATING)
    status_reason: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    embedding_size: Mapped[int | None] = mapped_column(Integer)
    preprocess: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    threshold: Mapped[float | None] = mapped_column(Float)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    created_by_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    dataset_snapshot: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(sql_in("status", ModelStatus), name="status"),
        CheckConstraint(sql_in("arch", Architecture), name="arch"),
        Index("ix_models_created_at_id", "created_at", "id"),
        # One row per bytes and architecture (the api returns the existing one), and at most one model per
        # job that made it, so a retried fine-tune cannot register its child twice.
        Index("uq_models_sha256_arch", "sha256", "arch", unique=True),
        Index("uq_models_created_by_job_id", "created_by_job_id", unique=True),
    )


class Evaluation(Base):
    """Metrics of one model on one named pair set; `pairs_sha256` says which pairs exactly."""

    __tablename__ = "evaluations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    split: Mapped[EvaluationSplit] = mapped_column(enum_type(EvaluationSplit, 16))
    pairs_sha256: Mapped[str] = mapped_column(String(64))
    pair_count: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint(sql_in("split", EvaluationSplit), name="split"),
        Index("ix_evaluations_model_id", "model_id"),
    )


class FaceEmbedding(Base):
    """A face's embedding under one model: L2-normalised float32 vector plus MagFace's quality (the norm)."""

    __tablename__ = "embeddings"

    face_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    quality: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The model's EmbeddingGeneration when this row was written: a reader holding every row up to
    # generation g needs only the rows above g to be current.
    generation: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (Index("ix_embeddings_model_id_generation", "model_id", "generation"),)


class EmbeddingGeneration(Base):
    """A per-model counter that every write of embeddings bumps in its own transaction.

    The bump locks the model's row, so writers of one model commit in the order of their generations and a
    reader that has seen generation g has seen every row of generation g or below: the api's search index
    catches up by reading `generation > g` instead of reloading every vector.

    The row also holds the model's watermark, the (created_at, id) of a face: every face at or before it has
    an embedding by the model or could not be decoded when a pass reached it (such a face stays behind the
    watermark; once its image is fixed, a `reindex`, which always scans from the oldest face, embeds it). An
    `embed` job scans from the watermark only. It never passes `now - MAGTUNE_EMBED_WATERMARK_LAG_S`: a
    face's created_at is set before its row commits, so a face may commit after one with a later created_at.
    """

    __tablename__ = "embedding_generations"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)
    covered_created_at: Mapped[datetime | None] = mapped_column()
    covered_id: Mapped[uuid.UUID | None] = mapped_column()


class Activation(Base):
    """Every change of the model in service, so a rollback is one call and the history is auditable."""

    __tablename__ = "activations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    previous_model_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    # Who: the name of the API key that activated (a label, kept if the key is deleted) and its id.
    actor: Mapped[str | None] = mapped_column(String(256))
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the model's embeddings first covered every face after this activation. The serving model (the one
    # verify and search use) is that of the latest activation with this set: blue/green, never half-embedded.
    embedded_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        Index("ix_activations_created_at", "created_at"),
        Index("ix_activations_model_id", "model_id"),
    )


class ReviewLease(Base):
    """A pair offered to one reviewer until `expires_at`; the unique pair keeps two reviewers apart.

    Stored in canonical order (face_a < face_b) like feedback. A lease past `expires_at` is deleted by the
    next request for pairs, which may then offer the pair again; answering or skipping deletes it at once.
    """

    __tablename__ = "review_leases"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    face_a: Mapped[uuid.UUID] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    face_b: Mapped[uuid.UUID] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    model_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    split: Mapped[FaceSplit] = mapped_column(enum_type(FaceSplit, 16))
    reason: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    # The API key the pair was leased to: only it may answer or skip (null with auth off).
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()

    __table_args__ = (
        UniqueConstraint("face_a", "face_b", name="uq_review_leases_pair"),
        CheckConstraint("face_a <> face_b", name="distinct_faces"),
        CheckConstraint(sql_in("split", FaceSplit), name="split"),
        Index("ix_review_leases_face_b", "face_b"),
        Index("ix_review_leases_expires_at", "expires_at"),
    )


class Erasure(Base):
    """A stored file whose row is gone and which must not outlive it (a tombstone).

    Written in the transaction that deletes the row; the file is removed right after the commit and the
    tombstone with it. When the blob store refuses (read-only, failing), the tombstone stays and the sweeper
    finishes the erasure, so an erase never leaves a file behind unrecorded.
    """

    __tablename__ = "erasures"

    namespace: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: a public id and the SHA-256 of its secret (never the secret), with its scopes.

    Keys are not foreign keys elsewhere: who-did-what columns keep the id after a key is revoked.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    secret_sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    scopes: Mapped[list[str]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()
    created_by: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (Index("ix_api_keys_created_at_id", "created_at", "id"),)
