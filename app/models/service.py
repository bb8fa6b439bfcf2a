"""The model registry: register checkpoints, read them with their evaluations, choose the model in service.

Torch-free and database-only, so the worker's auto-promotion calls `activate` just like the api does.
"""

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.blobs import BlobStore, StagedBlob
from app.config import Settings
from app.domain import Architecture, EvaluationSplit, JobKind, ModelStatus
from app.jobs.params import EvaluateParams, ReindexParams, ValidateModelParams
from app.jobs.submission import add_job
from app.models.checkpoint_keys import KeysUnreadable, checkpoint_shapes, compare, fitting_arch
from app.models.checkpoint_scan import CheckpointRejected, scan_checkpoint
from app.models.serving import mark_embedded_if_complete
from app.pagination import PageParams, fetch_page
from app.problems import Problem, not_found
from app.tables import Activation, Evaluation, Job, ModelVersion

log = logging.getLogger(__name__)

NAMESPACE = "checkpoints"
_ACTIVATION_LOCK = 0x6D6167_61637476  # one PostgreSQL advisory lock serialises activations


def _lock(session: Session, key: int | str) -> None:
    """Serialise concurrent writers on PostgreSQL for this transaction (SQLite serialises writes anyway)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    if isinstance(key, str):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})
    else:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def get_model_row(session: Session, model_id: uuid.UUID | str) -> ModelVersion:
    try:
        key = model_id if isinstance(model_id, uuid.UUID) else uuid.UUID(str(model_id))
    except ValueError:
        raise not_found("model", model_id) from None
    model = session.get(ModelVersion, key, populate_existing=True)
    if model is None:
        raise not_found("model", key)
    return model


def require_ready_model(session: Session, model_id: uuid.UUID | str) -> ModelVersion:
    model = get_model_row(session, model_id)
    if model.status != ModelStatus.READY:
        reason = f": {model.status_reason}" if model.status_reason else ""
        raise Problem(
            409,
            "model-not-ready",
            "Model not ready",
            f"model {model.id} is {model.status}{reason}",
            model_id=str(model.id),
            model_status=model.status,
        )
    return model


def current_activation(session: Session) -> Activation | None:
    statement = select(Activation).order_by(Activation.created_at.desc(), Activation.id.desc()).limit(1)
    return session.scalars(statement).first()


def active_model_id(session: Session) -> uuid.UUID | None:
    """The model in service: the one named by the latest activation."""
    activation = current_activation(session)
    return activation.model_id if activation is not None else None


def get_active_model(*, session: Session) -> ModelVersion:
    model_id = active_model_id(session)
    if model_id is None:
        raise Problem(404, "no-active-model", "No active model", "no model has been activated yet")
    return get_model_row(session, model_id)


def evaluations_by_model(session: Session, model_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Evaluation]]:
    """Evaluations of several models in one query, newest first."""
    found: dict[uuid.UUID, list[Evaluation]] = defaultdict(list)
    if not model_ids:
        return found
    statement = (
        select(Evaluation)
        .where(Evaluation.model_id.in_(model_ids))
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
    )
    for evaluation in session.scalars(statement):
        found[evaluation.model_id].append(evaluation)
    return found


def validation_jobs_by_model(session: Session, model_ids: list[uuid.UUID]) -> dict[uuid.UUID, Job]:
    """The latest `validate_model` job of each model, in one query, so a client can tell why a model is
    still `validating` (queued behind a fine-tune, say) or why it became `invalid`.

    The job names its model only in its JSON params; `->>` on PostgreSQL's JSONB and `json_extract` on
    SQLite both read it through SQLAlchemy's JSON index with `as_string()`.
    """
    if not model_ids:
        return {}
    wanted = {str(model_id): model_id for model_id in model_ids}
    named = Job.params["model"].as_string()
    statement = (
        select(named, Job)
        .where(Job.kind == JobKind.VALIDATE_MODEL, named.in_(list(wanted)))
        .order_by(Job.created_at.desc(), Job.id.desc())
    )
    found: dict[uuid.UUID, Job] = {}
    for model_key, job in session.execute(statement):
        found.setdefault(wanted[model_key], job)
    return found


def list_models(
    *, session: Session, page: PageParams, status: str | None = None, arch: str | None = None
) -> tuple[list[ModelVersion], str | None]:
    return fetch_page(session, ModelVersion, page, status=status, arch=arch)


def checkpoint_file(*, session: Session, store: BlobStore, model_id: uuid.UUID) -> tuple[ModelVersion, Path]:
    """The checkpoint of a `ready` model: one still validating, or refused by the worker's strict load, is
    not served (409 model-not-ready), since only that load vouches for the bytes."""
    model = require_ready_model(session, model_id)
    path = store.path(NAMESPACE, model.sha256)
    if not path.is_file():
        raise Problem(
            404,
            "checkpoint-missing",
            "Checkpoint missing",
            f"the checkpoint of model {model.id} is not stored",
        )
    return model, path


@dataclass
class Registration:
    model: ModelVersion
    created: bool
    validation_job: Job | None


def _checkpoint_lock(session: Session, sha256: str) -> None:
    """Serialises storing a checkpoint's bytes with `drop_checkpoint_if_unused` deleting them."""
    _lock(session, f"checkpoint:{sha256}")


def drop_checkpoint_if_unused(session: Session, store: BlobStore, sha256: str) -> bool:
    """Delete the checkpoint's bytes unless a model that is not `invalid` still names them: a file the
    worker refused keeps no bytes on disk. Runs in the caller's transaction, which should commit soon."""
    _checkpoint_lock(session, sha256)
    in_use = session.scalar(
        select(func.count()).where(ModelVersion.sha256 == sha256, ModelVersion.status != ModelStatus.INVALID)
    )
    if in_use:
        return False
    return store.delete(NAMESPACE, sha256)


def _registered(session: Session, sha256: str, arch: Architecture) -> ModelVersion | None:
    statement = (
        select(ModelVersion)
        .where(ModelVersion.sha256 == sha256, ModelVersion.arch == arch)
        .order_by(ModelVersion.created_at)
        .limit(1)
    )
    return session.scalars(statement).first()


def _sha_in_use(session: Session, sha256: str) -> bool:
    return bool(session.scalar(select(func.count()).where(ModelVersion.sha256 == sha256)))


def _check_architecture(path: Path, arch: Architecture) -> None:
    """Refuse a checkpoint whose tensors do not fit `arch`, naming the one they fit.

    A layout the torch-free reader does not know is let through: the worker's strict load decides then.
    """
    try:
        shapes = checkpoint_shapes(path)
    except KeysUnreadable as exc:
        log.info("architecture of the uploaded checkpoint left to the worker: %s", exc)
        return
    fit = compare(shapes, arch)
    if fit.exact:
        return
    suggested = fitting_arch(shapes)
    hint = f"it fits {suggested}" if suggested else "it fits no known architecture"
    raise Problem(
        422,
        "wrong-architecture",
        "Wrong architecture",
        f"the checkpoint does not fit {arch} ({fit.describe()}); {hint}",
        suggested_arch=suggested,
    )


def register_model(
    *,
    session: Session,
    settings: Settings,
    store: BlobStore,
    blob: StagedBlob,
    arch: Architecture,
    name: str | None = None,
) -> Registration:
    """Keep an uploaded checkpoint as a `validating` model and queue its strict load by the worker.

    The file is scanned, and its tensors checked against `arch`, before its blob is committed, so a refused
    upload leaves nothing behind. The same bytes under the same architecture return the model registered
    before. Commits the session.
    """
    if blob.size == 0:
        raise Problem(422, "empty-checkpoint", "Empty checkpoint", "the uploaded file has no bytes")
    sha = blob.finish()
    _lock(session, f"model:{sha}:{arch}")
    existing = _registered(session, sha, arch)
    if existing is not None:
        session.commit()
        return Registration(existing, created=False, validation_job=None)
    try:
        scan = scan_checkpoint(blob.path)
    except CheckpointRejected as exc:
        session.rollback()
        extra = {"offending_global": exc.offending} if exc.offending else {}
        titles = {
            "empty-checkpoint": "Empty checkpoint",
            "not-a-checkpoint": "Not a checkpoint",
            "checkpoint-contains-code": "Checkpoint contains code",
        }
        raise Problem(422, exc.kind, titles[exc.kind], exc.detail, **extra) from exc
    try:
        _check_architecture(blob.path, arch)
    except Problem:
        session.rollback()
        raise

    _checkpoint_lock(session, sha)
    blob_was_there = store.exists(NAMESPACE, sha)
    blob.commit()
    try:
        model = ModelVersion(
            name=name or None, arch=arch, status=ModelStatus.VALIDATING, sha256=sha, byte_size=blob.size
        )
        session.add(model)
        session.flush()
        job = add_job(
            session=session,
            settings=settings,
            kind=JobKind.VALIDATE_MODEL,
            params=ValidateModelParams(model=model.id),
        )
        session.commit()
    except IntegrityError:
        # The same bytes under the same arch, registered concurrently (uq_models_sha256_arch; SQLite has no
        # advisory lock): answer that registration, as for a re-upload.
        session.rollback()
        existing = _registered(session, sha, arch)
        if existing is None:
            raise
        return Registration(existing, created=False, validation_job=None)
    except BaseException:
        session.rollback()
        if not blob_was_there and not _sha_in_use(session, sha):
            store.delete(NAMESPACE, sha)
        raise
    log.info("model %s registered (%s, %s checkpoint, sha256 %s)", model.id, arch, scan.format, sha)
    return Registration(model, created=True, validation_job=job)


@dataclass
class ActivationOutcome:
    activation: Activation
    reindex_job: Job | None


def activate(
    *,
    session: Session,
    settings: Settings,
    model_id: uuid.UUID,
    actor: str | None = None,
    reason: str | None = None,
    job_id: uuid.UUID | None = None,
    api_key_id: str | None = None,
) -> ActivationOutcome:
    """Put a `ready` model in service, log who, why and what it replaced, and queue its reindex (and, for a
    model without a threshold, an evaluate job that calibrates one on val).

    Does not commit: the caller's commit makes the activation visible and only then sends the reindex job.
    Activating the model already in service changes nothing and returns the activation in force, with no
    reindex job. Raises Problem 404 (unknown model) or 409 "model-not-ready".
    """
    _lock(session, _ACTIVATION_LOCK)
    model = require_ready_model(session, model_id)
    current = current_activation(session)
    if current is not None and current.model_id == model.id:
        return ActivationOutcome(current, None)
    activation = Activation(
        model_id=model.id,
        previous_model_id=current.model_id if current is not None else None,
        actor=actor,
        api_key_id=api_key_id,
        reason=reason,
        job_id=job_id,
    )
    session.add(activation)
    session.flush()
    reindex = add_job(
        session=session,
        settings=settings,
        kind=JobKind.REINDEX,
        params=ReindexParams(model=model.id),
        parent_job_id=job_id,
        created_by=api_key_id,
    )
    # A model that already embeds every face (a rollback) serves at once; its reindex then finds nothing.
    mark_embedded_if_complete(session, model.id)
    if model.threshold is None:
        # An uploaded base checkpoint has no threshold: calibrate one on val, as a fine-tune does.
        add_job(
            session=session,
            settings=settings,
            kind=JobKind.EVALUATE,
            params=EvaluateParams(model=model.id, split=EvaluationSplit.VAL, calibrate=True),
            parent_job_id=job_id,
            created_by=api_key_id,
        )
    return ActivationOutcome(activation, reindex)


def list_activations(
    *, session: Session, page: PageParams, model_id: uuid.UUID | None = None
) -> tuple[list[Activation], str | None]:
    return fetch_page(session, Activation, page, model_id=model_id)
