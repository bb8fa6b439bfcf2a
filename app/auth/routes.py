"""Every operation of an app with the access it declares, read from the app's own route table."""

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from app.auth.dependencies import route_access
from app.auth.scopes import Scope


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    access: tuple[Scope | str, ...]  # one Scope or OPEN when declared right
    include_in_schema: bool


def operations(app: FastAPI) -> list[Operation]:
    """One entry per method of every FastAPI route, with the included routers' prefixes resolved."""
    found = []
    for context in iter_route_contexts(app.routes):
        if not isinstance(context.original_route, APIRoute):
            continue
        access = tuple(route_access(context))
        for method in sorted(context.methods or ()):
            found.append(Operation(method, context.path_format, access, bool(context.include_in_schema)))
    return found


def other_routes(app: FastAPI) -> list[str]:
    """Paths of the routes that are not FastAPI operations (the OpenAPI document, static mounts)."""
    return [
        getattr(context.original_route, "path", repr(context.original_route))
        for context in iter_route_contexts(app.routes)
        if not isinstance(context.original_route, APIRoute)
    ]
