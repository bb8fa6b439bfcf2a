"""What the api answers when it, or something it depends on, fails: problem+json, never a traceback.

- The database unreachable (refused, terminated, timed out; SQLite locked): 503 `database-unavailable` with
  `Retry-After`. The request changed nothing (its transaction never committed), the connection to the client
  stays usable, and the pool reconnects on its own (`pool_pre_ping`) once the database is back.
- The blob store unwritable (`app.blobs.StorageUnavailable`): 503 `storage-unavailable`, nothing kept.
- The client gone mid-body: logged at INFO, no traceback (nobody reads the answer).
- Anything else unexpected: 500 `internal-error`, whose body says nothing about the internals; the traceback
  goes to the server's log.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import ClientDisconnect

from app.blobs import StorageUnavailable
from app.problems import Problem, problem_response

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 5
STORAGE_RETRY_AFTER_S = 30
DATABASE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, _first_line(exc))
    return problem_response(
        Problem(
            503,
            "database-unavailable",
            "Database unavailable",
            "the database cannot be reached right now; nothing was changed",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )
    )


async def _storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        Problem(
            503,
            "storage-unavailable",
            "Storage unavailable",
            "files cannot be stored right now; nothing was kept",
            headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
        )
    )


async def _client_gone(request: Request, _exc: Exception) -> JSONResponse:
    """The client left mid-body: nothing to answer and nothing wrong here; the upload's staged file is
    already removed. Logged at INFO, without a traceback."""
    log.info("%s %s: the client disconnected before sending the whole body", request.method, request.url.path)
    return problem_response(
        Problem(400, "client-disconnected", "Client disconnected", "the body ended with the connection")
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem_response(
        Problem(500, "internal-error", "Internal error", "the server failed to answer; the failure is logged")
    )


def install_failure_handlers(app: FastAPI) -> None:
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_unavailable)
    app.add_exception_handler(StorageUnavailable, _storage_unavailable)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
