"""/v1/keys: issue, list, read and revoke API keys, and retract everything one key posted (scope `admin`)."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from sqlalchemy.orm import Session

from app.auth import keys
from app.auth.dependencies import CallerDep, any_key, requires
from app.auth.schemas import KeyCreate, KeyCreated, KeyList, KeyOut, KeySelf, RetractedFeedback
from app.auth.scopes import Scope
from app.deps import SessionDep
from app.feedback import service as feedback_service
from app.problems import not_found, problem_doc
from app.tables import ApiKey

router = APIRouter(prefix="/keys", tags=["keys"])
ADMIN = [requires(Scope.ADMIN)]
KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="The key's public id")]
UNKNOWN_KEY = {404: problem_doc("No such key (unknown-key)")}


def key_out(row: ApiKey) -> KeyOut:
    fields = ("id", "name", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at", "created_by")
    return KeyOut(**{name: getattr(row, name) for name in fields}, state=keys.key_state(row))


def _key(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise not_found("key", key_id)
    return row


@router.post("", dependencies=ADMIN, status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, caller: CallerDep, response: Response) -> KeyCreated:
    """Issue a key; the answer's `key` is the only time the secret is shown."""
    issued = keys.issue_key(
        session,
        name=body.name,
        scopes=body.scopes,
        expires_in=None if body.expires_in_s is None else timedelta(seconds=body.expires_in_s),
        created_by=f"key {caller.key_id}" if caller is not None else None,
    )
    session.commit()
    response.headers["Location"] = f"/v1/keys/{issued.row.id}"
    return KeyCreated(**key_out(issued.row).model_dump(), key=issued.secret)


@router.get("", dependencies=ADMIN, response_model=KeyList)
def list_keys(session: SessionDep) -> KeyList:
    """Every key, newest first, without secrets."""
    return KeyList(items=[key_out(row) for row in keys.all_keys(session)])


@router.get("/me", dependencies=[any_key()], response_model=KeySelf)
def read_own_key(caller: CallerDep) -> KeySelf:
    """The calling key's id, name and scopes, for any valid key: what a frontend (the console) may offer.

    With auth disabled (MAGTUNE_AUTH_DISABLED) there is no key: every scope, and a null id.
    """
    if caller is None:
        return KeySelf(id=None, name=None, scopes=sorted(Scope), auth_disabled=True)
    return KeySelf(id=caller.key_id, name=caller.name, scopes=sorted(caller.scopes), auth_disabled=False)


@router.get("/{key_id}", dependencies=ADMIN, response_model=KeyOut, responses=UNKNOWN_KEY)
def get_key(key_id: KeyId, session: SessionDep) -> KeyOut:
    return key_out(_key(session, key_id))


@router.post("/{key_id}/revoke", dependencies=ADMIN, response_model=KeyOut, responses=UNKNOWN_KEY)
def revoke_key(key_id: KeyId, session: SessionDep, request: Request) -> KeyOut:
    """Revoke a key: refused at once by every api process. Idempotent."""
    row = keys.revoke_key(session, key_id)
    if row is None:
        raise not_found("key", key_id)
    session.commit()
    # Other processes hear of it from PostgreSQL; this one forgets it now, not when its listener wakes.
    request.app.state.key_cache.forget_all()
    return key_out(row)


@router.post(
    "/{key_id}/retract-feedback", dependencies=ADMIN, response_model=RetractedFeedback, responses=UNKNOWN_KEY
)
def retract_feedback(key_id: KeyId, session: SessionDep) -> RetractedFeedback:
    """Delete every feedback pair posted with this key (e.g. a frontend found to label badly). Idempotent:
    a second call retracts nothing. Revoke the key first, or it may post more meanwhile."""
    _key(session, key_id)
    count = feedback_service.retract_feedback_of_key(session=session, api_key_id=key_id)
    return RetractedFeedback(key_id=key_id, retracted=count)
