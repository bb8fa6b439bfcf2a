"""`Annotated` dependencies shared by every router."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_session_factory
from app.pagination import PageParams, page_params


def app_settings(request: Request) -> Settings:
    """The settings the app was created with; for dependencies that take the request alone."""
    return request.app.state.settings


async def get_settings_dep(request: Request) -> Settings:
    # Async, like get_session: a sync dependency costs every request a hop to the thread pool.
    return app_settings(request)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session per request, opened without a thread hop (it connects lazily, on first use, in the
    endpoint's thread). Closing it talks to the database only when a transaction is still open (a read, or
    a failed write): that ROLLBACK runs in the thread pool, so a slow database never blocks the event loop.

    It takes the request, not SettingsDep: FastAPI solves a dependency's own dependencies wherever it is used,
    so every dependency avoided here is one less per route that asks for a session."""
    session = get_session_factory(app_settings(request).database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]
PageDep = Annotated[PageParams, Depends(page_params)]
