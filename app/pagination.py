"""Cursor pagination over (created_at, id), stable while rows are added."""

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session

from app.problems import Problem

T = TypeVar("T")

MAX_PAGE_SIZE = 1000


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


class PageParams(BaseModel):
    limit: int
    cursor: str | None


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=cursor)


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        return datetime.fromisoformat(created_at), uuid.UUID(row_id)
    except (ValueError, TypeError) as exc:
        raise Problem(
            400, "invalid-cursor", "Invalid cursor", "the cursor is not one this api issued"
        ) from exc


def paginate(statement: Select[Any], model: Any, params: PageParams) -> Select[Any]:
    """Newest first; the cursor is the last row's (created_at, id) of the previous page."""
    if params.cursor:
        created_at, row_id = decode_cursor(params.cursor)
        statement = statement.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < row_id))
        )
    return statement.order_by(model.created_at.desc(), model.id.desc()).limit(params.limit + 1)


def next_cursor(rows: Sequence[Any], limit: int) -> tuple[list[Any], str | None]:
    """Trim the probe row fetched by `paginate` and return the cursor for the following page."""
    if len(rows) <= limit:
        return list(rows), None
    page = list(rows[:limit])
    last = page[-1]
    return page, encode_cursor(last.created_at, last.id)


def fetch_page(
    session: Session, model: Any, params: PageParams, *conditions: ColumnElement[bool], **equal_to: Any
) -> tuple[list[Any], str | None]:
    """One page of `model` rows matching `conditions` and the `equal_to` column filters that were given
    (a None filter is left out), with the cursor for the next page."""
    given = [getattr(model, column) == value for column, value in equal_to.items() if value is not None]
    statement = select(model).where(*conditions, *given)
    return next_cursor(session.scalars(paginate(statement, model, params)).all(), params.limit)
