"""`/v1/faces`: upload, read, list and erase face crops."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from app.auth.dependencies import requires
from app.auth.scopes import Scope
from app.blobs import BlobStore
from app.config import Settings
from app.deps import PageDep, SessionDep, SettingsDep
from app.faces import service
from app.faces.images import DecodeLimits
from app.faces.schemas import FaceOut
from app.pagination import PAGE_RESPONSES, Page
from app.problems import problem_doc
from app.schemas import stored_text
from app.uploads import check_fields, multipart_body, receive_upload

router = APIRouter(prefix="/faces", tags=["faces"])

MAX_LABEL_CHARS = 256
MAX_SPLIT_CHARS = 16
Label = Annotated[str, stored_text(MAX_LABEL_CHARS)]

_UPLOAD_BODY = multipart_body(
    "JPEG, PNG, WebP or BMP",
    required=(),
    subject={"type": "string", "maxLength": MAX_LABEL_CHARS},
    source={"type": "string", "maxLength": MAX_LABEL_CHARS},
)


def blob_store(settings: Settings) -> BlobStore:
    return BlobStore(settings.blob_dir)


@router.post(
    "",
    dependencies=[requires(Scope.FACES_WRITE)],
    status_code=201,
    response_model=FaceOut,
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": FaceOut, "description": "These bytes were stored before: the existing face"},
        413: problem_doc("The file is over `max_image_bytes` (upload-too-large)"),
        415: problem_doc("Not multipart, or the file is not a JPEG, PNG, WebP or BMP image"),
        422: problem_doc("Empty upload, corrupt image, or over `max_image_pixels` (image-too-large)"),
    },
)
async def upload_face(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep
) -> FaceOut:
    """Store a face crop. The same bytes again answer 200 with the face stored before.

    A new face is queued for embedding by the model in service (one coalesced job per model), so verify and
    search can use it seconds later; `embedded` says when.
    """
    store = blob_store(settings)
    async with receive_upload(
        request,
        store,
        namespace=service.NAMESPACE,
        max_bytes=settings.max_image_bytes,
        text_fields=("subject", "source"),
        max_field_chars=MAX_LABEL_CHARS,
    ) as upload:
        check_fields(upload.fields, subject=Label, source=Label)
        face, created = await run_in_threadpool(
            lambda: service.store_face(
                session=session,
                store=store,
                blob=upload.blob,
                max_pixels=settings.max_image_pixels,
                split_fractions=settings.split_fractions,
                subject=upload.fields.get("subject"),
                source=upload.fields.get("source"),
                decode_limits=DecodeLimits(
                    settings.max_image_pixels, settings.max_concurrent_decodes, settings.decode_wait_s
                ),
            )
        )
    if created:
        await run_in_threadpool(lambda: service.queue_embedding(session=session, settings=settings))
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{face.id}"
    return (await run_in_threadpool(lambda: service.faces_out(session, [face])))[0]


@router.get(
    "", dependencies=[requires(Scope.FACES_READ)], response_model=Page[FaceOut], responses=PAGE_RESPONSES
)
def list_faces(
    session: SessionDep,
    page: PageDep,
    subject: Annotated[Label | None, Query()] = None,
    split: Annotated[Annotated[str, stored_text(MAX_SPLIT_CHARS)] | None, Query()] = None,
) -> Page[FaceOut]:
    """Faces, newest first."""
    faces, cursor = service.list_faces(session=session, page=page, subject=subject, split=split)
    return Page[FaceOut](items=service.faces_out(session, faces), next_cursor=cursor)


@router.get(
    "/{face_id}",
    dependencies=[requires(Scope.FACES_READ)],
    response_model=FaceOut,
    responses={404: problem_doc("No such face")},
)
def get_face(face_id: uuid.UUID, session: SessionDep) -> FaceOut:
    return service.faces_out(session, [service.get_face(session=session, face_id=face_id)])[0]


@router.get(
    "/{face_id}/image",
    dependencies=[requires(Scope.FACES_READ)],
    response_class=FileResponse,
    responses={
        200: {"description": "The original bytes", "content": {"image/*": {}}},
        404: problem_doc("No such face"),
    },
)
def get_face_image(face_id: uuid.UUID, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The image exactly as uploaded."""
    path, media_type = service.face_image(session=session, store=blob_store(settings), face_id=face_id)
    return FileResponse(path, media_type=media_type)


@router.delete(
    "/{face_id}",
    dependencies=[requires(Scope.FACES_WRITE)],
    status_code=204,
    responses={
        202: {"description": "Erased but for the image file, which the sweeper removes (erasure pending)"},
        404: problem_doc("No such face"),
    },
)
def delete_face(face_id: uuid.UUID, session: SessionDep, settings: SettingsDep) -> Response:
    """Erase a face, its image, its embeddings and every feedback pair that names it."""
    if not service.delete_face(session=session, store=blob_store(settings), face_id=face_id):
        detail = "the face is erased; its image file could not be removed yet and will be by the sweeper"
        return JSONResponse({"id": str(face_id), "erasure": "pending", "detail": detail}, status_code=202)
    return Response(status_code=204)
