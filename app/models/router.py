"""/v1/models: register checkpoints, read the registry, download checkpoints, choose the model in service.

The activation log is `GET /v1/models/activations` (every change, newest first; `model_id` narrows it).
"""

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.auth.dependencies import CallerDep, caller_id, requires
from app.auth.scopes import Scope
from app.blobs import BlobStore
from app.deps import PageDep, SessionDep, SettingsDep
from app.domain import Architecture, ModelStatus, parse
from app.models import service
from app.models.schemas import (
    ActivationOut,
    ActivationRequest,
    ActivationResult,
    ActiveModelOut,
    EvaluationOut,
    ModelOut,
    ModelRegistered,
    ValidationJobOut,
)
from app.models.serving import missing_faces, serving_activation
from app.pagination import PAGE_RESPONSES, Page
from app.problems import Problem, problem_doc
from app.schemas import stored_text
from app.tables import Evaluation, Job, ModelVersion
from app.uploads import check_fields, multipart_body, receive_upload

router = APIRouter(prefix="/models", tags=["models"])

MAX_NAME_CHARS = 256  # the width of the models' name column
ModelName = Annotated[str, stored_text(MAX_NAME_CHARS)]

_UPLOAD_BODY = multipart_body(
    "a torch.save checkpoint",
    required=("arch",),
    arch={"type": "string", "enum": [arch.value for arch in Architecture]},
    name={"type": "string", "maxLength": MAX_NAME_CHARS},
)


def _model_out(
    model: ModelVersion,
    active_id: uuid.UUID | None,
    evaluations: list[Evaluation],
    validation_job: Job | None = None,
) -> ModelOut:
    out = ModelOut.model_validate(model)
    out.is_active = model.id == active_id
    out.evaluations = [EvaluationOut.model_validate(evaluation) for evaluation in evaluations]
    if validation_job is not None:
        out.validation_job = ValidationJobOut.model_validate(validation_job)
    return out


def _detail(session: Session, model: ModelVersion) -> ModelOut:
    evaluations = service.evaluations_by_model(session, [model.id]).get(model.id, [])
    validation = service.validation_jobs_by_model(session, [model.id]).get(model.id)
    return _model_out(model, service.active_model_id(session), evaluations, validation)


def _name(field: str | None, filename: str | None) -> str | None:
    """The model's name: the `name` field (refused when the database could not store it), else the upload's
    filename, cut to the column's width (a long filename is no reason to refuse a checkpoint; `name` is
    there to choose a better one)."""
    if field:
        check_fields({"name": field}, name=ModelName)
        return field
    if filename is None:
        return None
    name = filename[:MAX_NAME_CHARS]
    check_fields({"file": name}, file=ModelName)  # NUL in the filename: refused, naming the file part
    return name


def _arch(value: str | None) -> Architecture:
    arch = parse(Architecture, value)
    if arch is None:
        message = f"Input should be one of {', '.join(Architecture)}"
        error_type = "missing" if value is None else "literal_error"
        raise Problem(
            422,
            "validation-error",
            "Invalid request",
            f"body.arch: {message}",
            errors=[{"loc": ["body", "arch"], "msg": message, "type": error_type}],
        )
    return arch


@router.post(
    "",
    dependencies=[requires(Scope.MODELS_WRITE)],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ModelRegistered,
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": ModelRegistered, "description": "These bytes under this arch were registered before"},
        413: problem_doc("The file is over `max_checkpoint_bytes` (upload-too-large)"),
        422: problem_doc(
            "Empty, not a checkpoint, a checkpoint whose pickle references code, or one whose tensors do "
            "not fit `arch` (wrong-architecture, with `suggested_arch`: the architecture they fit, or null)"
        ),
    },
)
async def register_model(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep
) -> ModelRegistered:
    """Register a checkpoint; the worker then loads it strictly and marks it `ready` or `invalid`."""
    store = BlobStore(settings.blob_dir)
    async with receive_upload(
        request,
        store,
        namespace=service.NAMESPACE,
        max_bytes=settings.max_checkpoint_bytes,
        text_fields=("arch", "name"),
        max_field_chars=MAX_NAME_CHARS,
    ) as upload:
        arch = _arch(upload.fields.get("arch"))
        name = _name(upload.fields.get("name"), upload.filename)
        registration = await run_in_threadpool(
            lambda: service.register_model(
                session=session,
                settings=settings,
                store=store,
                blob=upload.blob,
                arch=arch,
                name=name,
            )
        )
    model = await run_in_threadpool(lambda: _detail(session, registration.model))
    response.status_code = status.HTTP_202_ACCEPTED if registration.created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/models/{model.id}"
    job = registration.validation_job
    return ModelRegistered(**model.model_dump(), validation_job_id=job.id if job is not None else None)


@router.get(
    "", dependencies=[requires(Scope.MODELS_READ)], response_model=Page[ModelOut], responses=PAGE_RESPONSES
)
def list_models(
    session: SessionDep,
    page: PageDep,
    model_status: Annotated[ModelStatus | None, Query(alias="status")] = None,
    arch: Annotated[Architecture | None, Query()] = None,
) -> Page[ModelOut]:
    """Registered models, newest first, each with its evaluations and its validation job."""
    models, cursor = service.list_models(session=session, page=page, status=model_status, arch=arch)
    ids = [model.id for model in models]
    evaluations = service.evaluations_by_model(session, ids)
    validations = service.validation_jobs_by_model(session, ids)
    active_id = service.active_model_id(session)
    items = [
        _model_out(model, active_id, evaluations.get(model.id, []), validations.get(model.id))
        for model in models
    ]
    return Page[ModelOut](items=items, next_cursor=cursor)


@router.get(
    "/active",
    dependencies=[requires(Scope.MODELS_READ)],
    response_model=ActiveModelOut,
    responses={404: problem_doc("No model is active (no-active-model)")},
)
def get_active_model(session: SessionDep) -> ActiveModelOut:
    """The activated model; `switching` while its reindex runs and the previous model still answers."""
    model = service.get_active_model(session=session)
    serving = serving_activation(session)
    serving_id = serving.model_id if serving is not None else None
    return ActiveModelOut(
        **_detail(session, model).model_dump(),
        serving_model_id=serving_id,
        switching=serving_id != model.id,
        waiting_faces=missing_faces(session, model.id),
    )


@router.get(
    "/activations",
    dependencies=[requires(Scope.MODELS_READ)],
    response_model=Page[ActivationOut],
    responses=PAGE_RESPONSES,
)
def list_activations(
    session: SessionDep, page: PageDep, model_id: Annotated[uuid.UUID | None, Query()] = None
) -> Page[ActivationOut]:
    """The activation log, newest first: who put which model in service, when, why, and what it replaced."""
    rows, cursor = service.list_activations(session=session, page=page, model_id=model_id)
    return Page[ActivationOut](items=[ActivationOut.model_validate(row) for row in rows], next_cursor=cursor)


@router.get(
    "/{model_id}",
    dependencies=[requires(Scope.MODELS_READ)],
    response_model=ModelOut,
    responses={404: problem_doc("No such model")},
)
def get_model(model_id: uuid.UUID, session: SessionDep) -> ModelOut:
    return _detail(session, service.get_model_row(session, model_id))


@router.get(
    "/{model_id}/checkpoint",
    dependencies=[requires(Scope.MODELS_READ)],
    response_class=FileResponse,
    responses={
        200: {"description": "The checkpoint's bytes", "content": {"application/octet-stream": {}}},
        404: problem_doc("No such model"),
        409: problem_doc("The model is not ready: still validating, or refused (model-not-ready)"),
    },
)
def download_checkpoint(model_id: uuid.UUID, session: SessionDep, settings: SettingsDep) -> FileResponse:
    model, path = service.checkpoint_file(
        session=session, store=BlobStore(settings.blob_dir), model_id=model_id
    )
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model.arch}-{model.id}.pt")


@router.post(
    "/{model_id}/activate",
    dependencies=[requires(Scope.MODELS_ACTIVATE)],
    response_model=ActivationResult,
    responses={
        404: problem_doc("No such model"),
        409: problem_doc("The model is not ready (model-not-ready)"),
    },
)
def activate_model(
    model_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    body: Annotated[ActivationRequest | None, Body()] = None,
) -> ActivationResult:
    """Put a ready model in service and queue the reindex of every face with it; a rollback is this call
    with the previous model's id."""
    body = body or ActivationRequest()
    outcome = service.activate(
        session=session,
        settings=settings,
        model_id=model_id,
        actor=caller.name if caller is not None else None,
        api_key_id=caller_id(caller),
        reason=body.reason,
    )
    session.commit()
    reindex = outcome.reindex_job
    return ActivationResult(
        **ActivationOut.model_validate(outcome.activation).model_dump(),
        reindex_job_id=reindex.id if reindex is not None else None,
    )
