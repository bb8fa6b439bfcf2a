"""Bodies of /v1/keys."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.auth.scopes import Scope
from app.schemas import UtcDatetime, stored_text

MAX_EXPIRES_IN_S = 10 * 366 * 24 * 3600  # ten years


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, stored_text(256, min_length=1)] = Field(description="Who or what holds the key")
    scopes: list[Scope] = Field(min_length=1, max_length=len(Scope), description="`admin` holds every scope")
    expires_in_s: int | None = Field(
        default=None, ge=1, le=MAX_EXPIRES_IN_S, description="Seconds until it expires; none: never"
    )


class KeyOut(BaseModel):
    """A key without its secret."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    scopes: list[str]
    created_at: UtcDatetime
    expires_at: UtcDatetime | None
    revoked_at: UtcDatetime | None
    last_used_at: UtcDatetime | None
    created_by: str | None
    state: str = Field(description="active, revoked or expired")


class KeyCreated(KeyOut):
    key: str = Field(description="The whole key (mt_<id>_<secret>): shown this once, never again")


class KeySelf(BaseModel):
    """The key a request was made with: what it may do."""

    id: str | None
    name: str | None
    scopes: list[str]
    auth_disabled: bool = Field(description="True: the api checks no key, every operation is allowed")


class KeyList(BaseModel):
    items: list[KeyOut]


class RetractedFeedback(BaseModel):
    key_id: str
    retracted: int = Field(description="Pairs deleted by this call (0 when called again)")
