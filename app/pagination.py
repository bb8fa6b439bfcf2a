"""Cursor pagination over (created_at, id), stable while rows are added.

A cursor is `base64url(json [resource, created_at, id]) "." base64url(hmac)`: signed with a key every api
process derives from the same settings (`cursor_key`), so any of them accepts another's cursors, and bound to
the table it pages, so a cursor of one list is refused by another. Anything else is a 400 `invalid-cursor`.
"""

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query, Request
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session

from app.problems import Problem, problem_doc

T = TypeVar("T")

MAX_PAGE_SIZE = 1000
_SIGNATURE_BYTES = 16

# The `responses` of every list route: its cursor may be refused.
PAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_doc("The cursor is not one this api issued for this list (invalid-cursor)")
}


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


class PageParams(BaseModel):
    limit: int
    cursor: str | None
    key: bytes


def page_params(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=cursor, key=request.app.state.settings.cursor_key)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))


def _signature(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:_SIGNATURE_BYTES]


def encode_cursor(key: bytes, resource: str, created_at: datetime, row_id: uuid.UUID) -> str:
    payload = json.dumps([resource, created_at.isoformat(), str(row_id)], separators=(",", ":")).encode()
    return f"{_b64encode(payload)}.{_b64encode(_signature(key, payload))}"


def invalid_cursor() -> Problem:
    detail = "the cursor is not one this api issued for this list"
    return Problem(400, "invalid-cursor", "Invalid cursor", detail)


def decode_cursor(key: bytes, resource: str, cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) of a cursor `encode_cursor` made with `key` for `resource`; any other text,
    however it was shaped or altered, is a 400 `invalid-cursor`."""
    try:
        encoded_payload, encoded_signature = cursor.split(".")
        payload = _b64decode(encoded_payload)
        if not hmac.compare_digest(_b64decode(encoded_signature), _signature(key, payload)):
            raise invalid_cursor()
        decoded = json.loads(payload)
        if not (isinstance(decoded, list) and len(decoded) == 3 and all(isinstance(v, str) for v in decoded)):
            raise invalid_cursor()
        cursor_resource, created_at, row_id = decoded
        if cursor_resource != resource:
            raise invalid_cursor()
        return datetime.fromisoformat(created_at), uuid.UUID(row_id)
    except (ValueError, TypeError, AttributeError, binascii.Error) as exc:
        raise invalid_cursor() from exc


def paginate(statement: Select[Any], model: Any, params: PageParams) -> Select[Any]:
    """Newest first; the cursor is the last row's (created_at, id) of the previous page.

    The redundant `created_at <= cursor` is what bounds the (created_at, id) index scan: the OR alone is a
    filter, which makes a deep page read every newer row first.
    """
    if params.cursor:
        created_at, row_id = decode_cursor(params.key, model.__tablename__, params.cursor)
        statement = statement.where(
            model.created_at <= created_at,
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < row_id)),
        )
    return statement.order_by(model.created_at.desc(), model.id.desc()).limit(params.limit + 1)


def next_cursor(rows: Sequence[Any], model: Any, params: PageParams) -> tuple[list[Any], str | None]:
    """Trim the probe row fetched by `paginate` and return the cursor for the following page."""
    if len(rows) <= params.limit:
        return list(rows), None
    page = list(rows[: params.limit])
    last = page[-1]
    return page, encode_cursor(params.key, model.__tablename__, last.created_at, last.id)


def fetch_page(
    session: Session, model: Any, params: PageParams, *conditions: ColumnElement[bool], **equal_to: Any
) -> tuple[list[Any], str | None]:
    """One page of `model` rows matching `conditions` and the `equal_to` column filters that were given
    (a None filter is left out), with the cursor for the next page."""
    given = [getattr(model, column) == value for column, value in equal_to.items() if value is not None]
    statement = select(model).where(*conditions, *given)
    return next_cursor(session.scalars(paginate(statement, model, params)).all(), model, params)
