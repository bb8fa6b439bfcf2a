"""RFC 9457 problem details: every error the api returns is `application/problem+json`."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://magtune.dev/problems/"


class Problem(Exception):
    """Raise from a service or router to answer with a problem document.

    `kind` is a short slug (e.g. "unknown-face") that becomes the `type` URI, so clients can branch on it.
    """

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
        }
        if self.detail is not None:
            body["detail"] = self.detail
        if self.errors is not None:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.to_dict(), status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE, headers=problem.headers
    )


def problem_doc(description: str) -> dict[str, Any]:
    """An OpenAPI `responses` entry for a problem+json answer."""
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {}}}


def not_found(what: str, identifier: object) -> Problem:
    return Problem(404, f"unknown-{what}", f"Unknown {what}", f"no {what} with id {identifier}")


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in exc.errors()
    ]


async def _handle_problem(_request: Request, exc: Problem) -> JSONResponse:
    return problem_response(exc)


async def _handle_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _field_errors(exc)
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
    return problem_response(Problem(422, "validation-error", "Invalid request", detail, errors=errors))


async def _handle_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    titles = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}
    problem = Problem(
        exc.status_code,
        f"http-{exc.status_code}",
        titles.get(exc.status_code, "HTTP error"),
        str(exc.detail) if exc.detail else None,
        headers=getattr(exc, "headers", None),
    )
    return problem_response(problem)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _handle_problem)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
