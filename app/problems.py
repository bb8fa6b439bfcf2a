"""RFC 9457 problem details: every error the api returns is `application/problem+json`."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
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


def _invalid_json(errors: list[dict[str, Any]]) -> Problem | None:
    """A body that is not JSON at all is a 400, like any request that cannot be read; 422 is for JSON that
    does not fit the schema."""
    broken = [error for error in errors if error["type"] == "json_invalid"]
    if not broken:
        return None
    return Problem(400, "invalid-json", "Malformed JSON body", "the body is not valid JSON", errors=broken)


async def _handle_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _field_errors(exc)
    unreadable = _invalid_json(errors)
    if unreadable is not None:
        return problem_response(unreadable)
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
    return problem_response(Problem(422, "validation-error", "Invalid request", detail, errors=errors))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app takes at this path. The router's own 405 names only the methods
    of the first route that matched the path, while a path is often served by several (GET and DELETE
    /v1/faces/{id} are two routes)."""
    literal: set[str] = set()
    templated: set[str] = set()
    for context in iter_route_contexts(request.app.routes):
        pattern = getattr(context, "path_regex", None)
        if pattern is not None and context.methods and pattern.match(request.url.path):
            (templated if "{" in getattr(context, "path", "{") else literal).update(context.methods)
    # A literal path (/v1/feedback/batch) is a resource of its own, as the OpenAPI document has it: it does
    # not take the methods of a template that its text happens to fit (/v1/feedback/{feedback_id}).
    return sorted(literal or templated)


async def _handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    titles = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request)) or headers.get("Allow", "")
    problem = Problem(
        exc.status_code,
        f"http-{exc.status_code}",
        titles.get(exc.status_code, "HTTP error"),
        str(exc.detail) if exc.detail else None,
        headers=headers or None,
    )
    return problem_response(problem)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _handle_problem)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
