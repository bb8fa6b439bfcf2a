"""`/v1/verify`: 1:1 verification with the serving model's stored embeddings."""

from fastapi import APIRouter

from app.auth.dependencies import requires
from app.auth.scopes import Scope
from app.deps import SessionDep
from app.problems import problem_doc
from app.verify import service
from app.verify.schemas import PairVerdict, SubjectVerdict, VerifyRequest

router = APIRouter(prefix="/verify", tags=["verify"])


@router.post(
    "",
    dependencies=[requires(Scope.FACES_READ)],
    response_model=PairVerdict | SubjectVerdict,
    responses={
        404: problem_doc("No such face (unknown-face), or no other face has the subject (unknown-subject)"),
        409: problem_doc(
            "No model serves yet (no-serving-model), or the serving model has not embedded the face or any "
            "face of the subject yet (not-embedded, with `Retry-After`)"
        ),
        422: problem_doc(
            "Not exactly one of the two forms (validation-error), or a face with itself (same-face)"
        ),
    },
)
def verify(body: VerifyRequest, session: SessionDep) -> PairVerdict | SubjectVerdict:
    """Same person? Two faces (`face_a`, `face_b`) answer their cosine score; a face and a subject answer the
    best and mean score over the subject's other faces. `same` is the score (the best one) at the serving
    model's calibrated threshold, or null with `same_reason` when it has none: never a guess."""
    if body.face is not None and body.subject is not None:
        return service.verify_subject(session=session, face=body.face, subject=body.subject)
    assert body.face_a is not None and body.face_b is not None  # the request's validator checked the form
    return service.verify_pair(session=session, face_a=body.face_a, face_b=body.face_b)
