"""The OpenAPI document says, per operation, the scope it needs and the 401/403/429 answers it may give."""

from typing import Any

from fastapi import FastAPI

from app.auth.dependencies import ANY_KEY, BEARER_SCHEME, OPEN, bearer
from app.auth.routes import operations
from app.problems import problem_doc


def install(app: FastAPI) -> None:
    """Wrap `app.openapi`: the bearer scheme, and on each operation its security requirement (the scope it
    needs, none for any valid key, `[]` when open) and `x-required-scope`."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER_SCHEME] = bearer.model.model_dump(mode="json", by_alias=True, exclude_none=True)
        paths = schema.get("paths", {})
        for declared in operations(app):
            operation = paths.get(declared.path, {}).get(declared.method.lower())
            if operation is None:
                continue
            if declared.access == (OPEN,):
                operation["security"] = []
                continue
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", problem_doc("No valid key (unauthenticated), with WWW-Authenticate"))
            if declared.access == (ANY_KEY,):
                operation["security"] = [{BEARER_SCHEME: []}]
                continue  # any valid key: no scope to lack, and a read (no write rate)
            scope = str(declared.access[0]) if len(declared.access) == 1 else "admin"
            operation["security"] = [{BEARER_SCHEME: [scope]}]
            operation["x-required-scope"] = scope
            responses.setdefault("403", problem_doc(f"The key lacks scope {scope} (insufficient-scope)"))
            responses.setdefault("429", problem_doc("Over the key's write rate or job cap, with Retry-After"))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
