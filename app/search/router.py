"""`/v1/search`: 1:N search among the stored faces with the serving model's embeddings."""

from fastapi import APIRouter

from app.auth.dependencies import requires
from app.auth.scopes import Scope
from app.deps import SessionDep, SettingsDep
from app.problems import problem_doc
from app.search import service
from app.search.schemas import SearchRequest, SearchResult

router = APIRouter(prefix="/search", tags=["search"])


@router.post(
    "",
    dependencies=[requires(Scope.FACES_READ)],
    response_model=SearchResult,
    responses={
        404: problem_doc("No such face (unknown-face)"),
        409: problem_doc(
            "No model serves yet (no-serving-model), or the serving model has not embedded the query face "
            "yet (not-embedded, with `Retry-After`)"
        ),
        422: problem_doc(
            "k outside 1..100, an unknown field, or an empty subject or source (validation-error)"
        ),
    },
)
def search(body: SearchRequest, session: SessionDep, settings: SettingsDep) -> SearchResult:
    """The k faces most like a stored face (exact cosine ranking, the face itself left out), optionally only
    of one subject or source, and the best-matching subjects by their best face; `same` at the serving
    model's threshold."""
    return service.search(session=session, database_url=settings.database_url, request=body)
