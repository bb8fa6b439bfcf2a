"""Make the OpenAPI document true about errors: every one is `application/problem+json`.

FastAPI documents each 422 as its `HTTPValidationError` in `application/json`, while the api answers every
error as a problem document (app/problems.py); and failures any operation can meet (500, the 503s of
app/failures.py, the 413 of app/body_limit.py) are documented nowhere. This rewrites the generated document
once: a `Problem` schema, referenced by every problem+json response, the 422s moved to it, and the shared
failure answers added to every /v1 operation, with what reading a body can refuse (413, 408, and by media
type 400 and 415) on every operation that takes one.
"""

from typing import Any

from fastapi import FastAPI

from app.problems import PROBLEM_MEDIA_TYPE

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document; `type` names the problem, other members add its facts.",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": True,
}
FAILURES = {
    "500": "An unexpected failure, logged by the server (internal-error)",
    "503": (
        "The database or the blob store is unavailable (database-unavailable, storage-unavailable), or "
        "large uploads are being decoded (decoder-busy); retry after `Retry-After` seconds"
    ),
}
BODY_TOO_LARGE = "The body is over the route's limit (body-too-large)"
KEY_REUSED = "The Idempotency-Key was used before with another body (idempotency-key-reused)"
BODY_TIMEOUT = "The body did not arrive in time (body-timeout); the connection is closed"
# What reading a body can refuse, by its media type, before the operation's own checks.
UNREADABLE_BODY = {
    "application/json": {"400": "The body is not valid JSON (invalid-json)"},
    "multipart/form-data": {
        "400": "The multipart body is malformed, e.g. cut before its closing boundary (malformed-multipart)",
        "415": "The body is not multipart/form-data (expected-multipart)",
    },
}
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}}


def _rewrite(schema: dict[str, Any]) -> None:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                content = response.get("content", {})
                if status == "422" or PROBLEM_MEDIA_TYPE in content:
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}
            if path.startswith("/v1/"):
                for status, description in FAILURES.items():
                    responses.setdefault(status, _problem(description))
                if "requestBody" in operation:
                    responses.setdefault("413", _problem(BODY_TOO_LARGE))
                    responses.setdefault("408", _problem(BODY_TIMEOUT))
                    _document_unreadable_body(operation, responses)
                _document_idempotency(operation, responses)


def _add_problem(responses: dict[str, Any], status: str, description: str) -> None:
    """Document a problem under `status`, added to (not replacing) what the operation says there."""
    if status not in responses:
        responses[status] = _problem(description)
    elif description not in responses[status]["description"]:
        responses[status]["description"] += "; or: " + description
        responses[status]["content"] = {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}


def _document_unreadable_body(operation: dict[str, Any], responses: dict[str, Any]) -> None:
    """The refusals of a body that cannot be read, by its media type."""
    for media_type in operation["requestBody"].get("content", {}):
        for status, description in UNREADABLE_BODY.get(media_type, {}).items():
            _add_problem(responses, status, description)


def _document_idempotency(operation: dict[str, Any], responses: dict[str, Any]) -> None:
    """An operation that honours `Idempotency-Key` (app/idempotency.py) refuses a key reused for another
    body."""
    names = {str(parameter.get("name", "")).lower() for parameter in operation.get("parameters", [])}
    said = responses.get("409", {}).get("description", "")
    if "idempotency-key" in names and "Idempotency-Key" not in said:
        _add_problem(responses, "409", KEY_REUSED)


def document_errors(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _rewrite(generate())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
